"""Pass 6: one attention op per layer again: merge a mixed layer's two head groups into ``duo::attention_cached``.

Matches, in every layer that has both kinds of heads, what ``split_attention`` and ``kv_layout`` leave:
``cat([retrieval_attention_cached(q[:, :a], k[:, :n], v[:, :n], ...), streaming_attention_cached(q[:, a:],
k[:, n:], v[:, n:], ...)], dim=1)``. Emits ``duo::attention_cached(q, k, v, <its four caches>, ...,
retrieval_kv_heads=n)`` on the unsliced q/k/v, whose kernels write both groups' heads into one output; the head
slices become dead code, which the pipeline's clean-up removes.

Why a separate pass rather than emitting the merged op from the start: passes 4 and 5 stay one idea each (split
the heads; give each group its cache), and every step in between is a graph the tests can run. What merging
buys is in the compiled graph: with the slices and the ``cat`` gone, Inductor produces q/k/v once per layer
and never copies the two outputs into a third tensor (what that measured: see
benchmarks/DECISIONS.md#merge-head-groups).
Layers with one kind of head keep their single op, which already reads q/k/v whole.
"""
from __future__ import annotations

import torch
from torch import fx

from duo_compile.kernels.ops import OPS

from .context import PassContext

RETRIEVAL, STREAMING = OPS["retrieval_attention_cached"], OPS["streaming_attention_cached"]


def _layer_pairs(graph: fx.Graph) -> dict[int, dict]:
    """Per layer, its cached ops by target (``duo_layer`` is set by split_attention and kept by kv_layout)."""
    pairs: dict[int, dict] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (RETRIEVAL, STREAMING):
            pairs.setdefault(node.meta["duo_layer"], {})[node.target] = node
    return pairs


def merge_head_groups(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    sites = {site.layer: site for site in ctx.sites}
    merged = 0
    for layer, ops in sorted(_layer_pairs(graph).items()):
        if len(ops) < 2:
            continue
        retrieval, streaming = ops[RETRIEVAL], ops[STREAMING]
        users = list(retrieval.users)
        cat = users[0] if len(users) == 1 else None
        if (cat is None or cat.target is not torch.ops.aten.cat.default or list(cat.args[0]) != [retrieval, streaming]
                or cat.args[1:] != (1,)):
            raise ValueError(f"layer {layer}: expected cat([{retrieval.name}, {streaming.name}], 1) after kv_layout, "
                             f"found users {[u.name for u in users]}")
        site = sites[layer]
        _, _, _, k_r, v_r, cache_start, valid, scale = retrieval.args
        _, _, _, k_s, v_s, _, _, _, sink, recent, chunk_mode = streaming.args
        args = (site.q, site.k, site.v, k_r, v_r, k_s, v_s, cache_start, valid, scale, ctx.retrieval_counts[layer],
                sink, recent, chunk_mode)
        with graph.inserting_before(cat):
            node = graph.call_function(OPS["attention_cached"], args, dict(retrieval.kwargs))  # block_table
        node.meta = {**cat.meta, "duo_layer": layer}
        cat.replace_all_uses_with(node)
        for old in (cat, retrieval, streaming):  # the cached ops write their caches: the clean-up would keep them
            graph.erase_node(old)
        merged += 1
    ctx.record("merge_head_groups", merged)
    return gm
