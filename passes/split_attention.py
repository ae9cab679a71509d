"""Pass 4: split each attention node into a retrieval op and a streaming op over contiguous head slices.

Matches every SDPA node tagged by ``find_attention`` (after ``reorder_heads``, so layer l's retrieval KV heads
are ``[0, n_l)``). Emits, per layer: slices of q (``n_l * groups`` query heads) and of the per-KV-head k/v,
``duo::retrieval_attention`` on the first slice, ``duo::streaming_attention`` (sink + recent window) on the
rest, and a ``cat`` of the two head outputs in place of the SDPA output. A layer with no heads of one kind gets
only the other op. The graph stays cacheless (whole sequence from position 0); the causal mask and the
repeat_kv expansion feeding SDPA become dead; the pipeline's clean-up removes them.
"""
from __future__ import annotations

import torch
from torch import fx

from duo_compile.kernels.ops import OPS

from .context import PassContext

aten = torch.ops.aten


def _heads(graph: fx.Graph, value: fx.Node, start: int, end: int) -> fx.Node:
    return graph.call_function(aten.slice.Tensor, (value, 1, start, end))


def split_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    for site in ctx.sites:
        n_r, n_kv, g = ctx.retrieval_counts[site.layer], site.num_kv_heads, site.groups
        outputs = []
        with graph.inserting_before(site.node):
            if n_r > 0:
                q = _heads(graph, site.q, 0, n_r * g)
                k, v = _heads(graph, site.k, 0, n_r), _heads(graph, site.v, 0, n_r)
                outputs.append(graph.call_function(OPS["retrieval_attention"], (q, k, v, site.scale)))
            if n_r < n_kv:
                q = _heads(graph, site.q, n_r * g, n_kv * g)
                k, v = _heads(graph, site.k, n_r, n_kv), _heads(graph, site.v, n_r, n_kv)
                outputs.append(
                    graph.call_function(
                        OPS["streaming_attention"], (q, k, v, site.scale, ctx.sink_size, ctx.recent_size)
                    )
                )
            out = outputs[0] if len(outputs) == 1 else graph.call_function(aten.cat.default, (outputs, 1))
        out.meta = dict(site.node.meta)
        for op in outputs:
            op.meta["duo_layer"] = site.layer
        site.node.replace_all_uses_with(out)
        graph.erase_node(site.node)
    ctx.record("split_attention", len(ctx.sites))
    return gm
