"""Pass 5: make the KV cache explicit state of the graph.

Matches the cacheless ``duo::retrieval_attention`` / ``duo::streaming_attention`` nodes emitted by
``split_attention``. Emits new graph inputs, the positions per batch row, ``cache_start`` int64 ``[B]`` (the
position of this call's first token in each row) and ``valid`` int64 ``[B]`` (how many of the row's T tokens are
real; the rest are padding), and one K and one V cache per layer and head group, and replaces each op with its
cached form, which writes each row's real keys/values into its cache and attends to that row's cached tokens:
  retrieval cache ``[B, n_l, max_seq_len, D]``: token p in slot p;
  streaming cache ``[B, H_kv - n_l, sink + recent, D]``: sink slots, then a ring of the recent tokens (a
  sliding-window layer's: ``[B, H_kv, window, D]``, a ring only, always in window mode: the model's own rule).
Keys are cached after RoPE at their true positions, so nothing is re-rotated. The graph becomes
``forward(input_ids, position_ids, cache_start, valid, *caches) -> logits``; ``ctx.cache_specs`` lists the caches
in argument order, for the runtime to allocate.

Paged engines (``ctx.page_size``): each retrieval cache is a pool of pages ``[num_pages, n_l, page_size, D]``
instead, and the graph takes one more input after the caches, ``block_table`` int ``[B, max_pages]`` (row b's
pages in order), passed to every retrieval op as its ``block_table`` (kernels/paged.py): the graph becomes
``forward(input_ids, position_ids, cache_start, valid, *caches, block_table)``.

Also matches the last-position slice in front of the LM head (``hidden[:, -1:]``, what capture's
``logits_to_keep=1`` leaves) and gathers each row at its own last real token instead (index ``valid[b] - 1``, as
ATen ops: ``_insert_last_real_token``), still one row per sequence through the LM head. A graph that
returns every position's logits has no such slice and is left as it is (the runtime gathers then).
"""
from __future__ import annotations

import torch
from torch import fx

from duo_compile.kernels.ops import OPS

from .context import CacheSpec, PassContext

aten = torch.ops.aten

_CACHED = {
    OPS["retrieval_attention"]: ("retrieval", OPS["retrieval_attention_cached"]),
    OPS["streaming_attention"]: ("streaming", OPS["streaming_attention_cached"]),
}


def _insert_last_real_token(graph: fx.Graph, hidden: fx.Node, valid: fx.Node) -> fx.Node:
    """Nodes computing ``hidden`` ``[B, T, H]`` -> ``[B, 1, H]``: each row at its last real token, index
    ``valid[b] - 1`` (0 for a row with no real token, whose logits are don't-care). ATen ops only, no Python
    function in the graph: Inductor's compile caches (and so an engine package's precompiled graphs) refuse a
    graph that calls one."""
    index = graph.call_function(aten.clamp_min.default, (graph.call_function(aten.sub.Tensor, (valid, 1)), 0))
    index = graph.call_function(aten.unsqueeze.default, (graph.call_function(aten.unsqueeze.default, (index, 1)), 2))
    width = graph.call_function(aten.sym_size.int, (hidden, 2))
    index = graph.call_function(aten.expand.default, (index, [-1, 1, width]))
    return graph.call_function(aten.gather.default, (hidden, 1, index))


def _last_position_slice(graph: fx.Graph) -> fx.Node | None:
    """The ``aten.slice(hidden, 1, -1, end)`` feeding the graph's output through the LM head, or None."""
    output = next(n for n in graph.nodes if n.op == "output")
    node = output.args[0]
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target is torch.ops.aten.slice.Tensor:
            dim, start, end = (list(node.args[1:]) + [0, None, None])[:3]
            return node if dim == 1 and start == -1 and (end is None or end >= 2**62) else None
        if node.target not in (torch.ops.aten.linear.default, torch.ops.aten.to.dtype,
                               torch.ops.aten._to_copy.default):
            return None
        node = node.args[0]
    return None


def kv_layout(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    attention = [n for n in graph.nodes if n.op == "call_function" and n.target in _CACHED]
    sites = {site.layer: site for site in ctx.sites}
    with graph.inserting_after(placeholders[-1]):
        cache_start = graph.placeholder("cache_start")
    with graph.inserting_after(cache_start):
        valid = graph.placeholder("valid")
    last_input = valid
    ctx.cache_specs = []
    paged_ops = []
    for node in attention:
        kind, cached_op = _CACHED[node.target]
        layer = node.meta["duo_layer"]
        site = sites[layer]
        n_r = ctx.retrieval_counts[layer]
        num_heads = n_r if kind == "retrieval" else site.num_kv_heads - n_r
        q, k, v, scale, *window = node.args
        slots = None if kind == "retrieval" else sum(window)  # sink + recent of this op
        caches = []
        for tensor in ("k", "v"):
            spec = CacheSpec(f"{tensor}_{kind}_{layer}", layer, kind, tensor, num_heads, site.head_dim, slots,
                             site.window)
            ctx.cache_specs.append(spec)
            with graph.inserting_after(last_input):
                last_input = graph.placeholder(spec.name)
            caches.append(last_input)
        args = (q, k, v, *caches, cache_start, valid, scale, *window)
        if kind == "streaming":
            args += (ctx.streaming_mode == "chunk" and not node.meta.get("duo_window"),)
        with graph.inserting_before(node):
            new = graph.call_function(cached_op, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if kind == "retrieval":
            paged_ops.append(new)
    if ctx.page_size is not None:
        with graph.inserting_after(last_input):
            block_table = graph.placeholder("block_table")
        for node in paged_ops:
            node.kwargs = {**node.kwargs, "block_table": block_table}
    last = _last_position_slice(graph)
    if last is not None:
        with graph.inserting_before(last):
            gathered = _insert_last_real_token(graph, last.args[0], valid)
        gathered.meta = dict(last.meta)
        last.replace_all_uses_with(gathered)
        graph.erase_node(last)
    ctx.record("kv_layout", len(attention))
    return gm
