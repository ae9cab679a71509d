"""Pass 4: make the KV cache explicit state of the graph.

Matches the cacheless ``duo::retrieval_attention`` / ``duo::streaming_attention`` nodes emitted by
``split_attention``. Emits new graph inputs, ``cache_position`` (the absolute positions of this call's tokens)
and one K and one V cache per layer and head group, and replaces each op with its cached form, which writes
this call's keys/values into its cache and attends to everything cached:
  retrieval cache ``[B, n_l, max_seq_len, D]``: token p in slot p;
  streaming cache ``[B, H_kv - n_l, sink + recent, D]``: sink slots, then a ring of the recent tokens.
Keys are cached after RoPE at their true positions, so nothing is re-rotated. The graph becomes
``forward(input_ids, position_ids, cache_position, *caches) -> logits``; ``ctx.cache_specs`` lists the caches
in argument order, for the runtime to allocate.
"""
from __future__ import annotations

from torch import fx

from duo_compile.kernels.ops import OPS

from .context import CacheSpec, PassContext

_CACHED = {
    OPS["retrieval_attention"]: ("retrieval", OPS["retrieval_attention_cached"]),
    OPS["streaming_attention"]: ("streaming", OPS["streaming_attention_cached"]),
}


def kv_layout(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    attention = [n for n in graph.nodes if n.op == "call_function" and n.target in _CACHED]
    sites = {site.layer: site for site in ctx.sites}
    with graph.inserting_after(placeholders[-1]):
        cache_position = graph.placeholder("cache_position")
    last_input = cache_position
    ctx.cache_specs = []
    for node in attention:
        kind, cached_op = _CACHED[node.target]
        layer = node.meta["duo_layer"]
        site = sites[layer]
        n_r = ctx.retrieval_counts[layer]
        num_heads = n_r if kind == "retrieval" else site.num_kv_heads - n_r
        slots = None if kind == "retrieval" else ctx.sink_size + ctx.recent_size
        caches = []
        for tensor in ("k", "v"):
            spec = CacheSpec(f"{tensor}_{kind}_{layer}", layer, kind, tensor, num_heads, site.head_dim, slots)
            ctx.cache_specs.append(spec)
            with graph.inserting_after(last_input):
                last_input = graph.placeholder(spec.name)
            caches.append(last_input)
        q, k, v, scale, *window = node.args
        args = (q, k, v, *caches, cache_position, scale, *window)
        if kind == "streaming":
            args += (ctx.streaming_mode == "chunk",)
        with graph.inserting_before(node):
            new = graph.call_function(cached_op, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    ctx.record("kv_layout", len(attention))
    return gm
