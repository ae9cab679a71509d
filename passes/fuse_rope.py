"""Pass 8: the rotary embedding moves into the attention ops: they take q and k before RoPE, plus cos/sin.

Matches, for each cached ``duo::`` op, q and k arguments that are (a head slice ``aten.slice(x, 1, a, b)`` of)
Hugging Face's ``apply_rotary_pos_emb`` as capture writes it in ATen:

    add(mul(x, C), mul(cat([neg(slice(x, -1, D/2, end)), slice(x, -1, 0, D/2)], -1), S))

with the same ``C`` and ``S`` ``[B, 1, T, D]`` (the rotary tables, unsqueezed over heads) for q and k. Emits the op
on ``x`` (sliced as before) with ``cos=C, sin=S``; the rotation nodes, now dead, go with the pipeline's clean-up.
Anything else (partial rotary dims, another RoPE formula) is left as it is: the op then gets rotated q/k, as before.

Why: at decode Inductor turns each layer's rotation of q and k into small kernels of their own, launched per
layer and paid by full attention and DuoAttention alike. The decode kernels rotate q and the new keys as they
load them (``triton_common.load_rope``; the cache still holds rotated keys), so those launches disappear; prefill
paths rotate q and k first, one kernel for both (``kernels/triton_rope.py``; against a compute-bound attention).
What it saved: see benchmarks/DECISIONS.md#fuse-rope.
"""
from __future__ import annotations

import torch
from torch import fx

from duo_compile.kernels.ops import OPS

from .context import PassContext
from .graph_utils import shape_of

aten = torch.ops.aten
CACHED_OPS = (OPS["retrieval_attention_cached"], OPS["streaming_attention_cached"], OPS["attention_cached"])


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _half_slice(node, x: fx.Node, lo: int, hi: int) -> bool:
    """``node`` is ``x[..., lo:hi]`` on the last dim (an end past the last index counts as the end)."""
    if not _is(node, aten.slice.Tensor) or node.args[0] is not x:
        return False
    rank, size = len(shape_of(x)), shape_of(x)[-1]
    dim, start, end = (list(node.args[1:]) + [0, 0, None])[:3]
    end = size if end is None else min(end, size)
    return dim in (-1, rank - 1) and start == lo and end == hi


def _rotate_half_of(node) -> fx.Node | None:
    """x if ``node`` is ``cat([-x[..., D/2:], x[..., :D/2]], -1)``, else None."""
    if not _is(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    neg, low = node.args[0]
    if not _is(neg, aten.neg.default) or not _is(low, aten.slice.Tensor):
        return None
    x, high = low.args[0], neg.args[0]
    d = shape_of(x)[-1]
    dim = node.args[1] if len(node.args) > 1 else 0
    if dim not in (-1, len(shape_of(x)) - 1) or d % 2 or not _half_slice(low, x, 0, d // 2) or \
            not _half_slice(high, x, d // 2, d):
        return None
    return x


def _rope_parts(node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, C, S) if ``node`` computes ``x * C + rotate_half(x) * S`` with C, S of shape [B, 1, T, D]."""
    if not _is(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs:
        return None
    plain, rotated = node.args
    if not (_is(plain, aten.mul.Tensor) and _is(rotated, aten.mul.Tensor)):
        return None
    for x, cos in (plain.args, plain.args[::-1]):
        for turned, sin in (rotated.args, rotated.args[::-1]):
            if _rotate_half_of(turned) is x and all(isinstance(t, fx.Node) for t in (x, cos, sin)):
                shapes = [shape_of(t) for t in (x, cos, sin)]
                if shapes[1] == shapes[2] and len(shapes[1]) == 4 and shapes[1][1] == 1 and \
                        shapes[1][-1] == shapes[0][-1]:
                    return x, cos, sin
    return None


def _unrotated(graph: fx.Graph, arg, before: fx.Node):
    """(the pre-RoPE value to pass instead of ``arg``, C, S), keeping a head slice of ``arg``; or None."""
    head_slice = None
    if _is(arg, aten.slice.Tensor) and arg.args[1] == 1:
        head_slice, arg = arg, arg.args[0]
    parts = _rope_parts(arg)
    if parts is None:
        return None
    x, cos, sin = parts
    if head_slice is not None:
        with graph.inserting_before(before):
            x = graph.call_function(aten.slice.Tensor, (x, *head_slice.args[1:]))
        x.meta = dict(head_slice.meta)
    return x, cos, sin


def fuse_rope(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in CACHED_OPS or "cos" in node.kwargs:
            continue
        q, k = (_unrotated(graph, arg, node) for arg in node.args[:2])
        if q is None or k is None or q[1:] != k[1:]:
            continue  # a head slice made for a half match is dead code: the pipeline's clean-up drops it
        node.args = (q[0], k[0], *node.args[2:])
        node.kwargs = {**node.kwargs, "cos": q[1], "sin": q[2]}
        fused += 1
    ctx.record("fuse_rope", fused)
    return gm
