"""Proof that q, k and v reach attention head by head from their projections, so heads can be reordered.

``reorder_heads`` permutes a projection's output rows in head-sized blocks and expects the attention inputs to
come out permuted the same way. That holds when every op between the projection and SDPA acts on each head
alone, or on all heads alike: per-head RMS norms with one weight shared by the heads (Qwen3, Gemma 3), a norm
over the whole projection whose weight is permuted with the heads (OLMo-2), RoPE with tables broadcast over
the heads (full, partial or interleaved: GLM-4), dtype casts and the views that split the projection into
``[heads, head_dim]``. This module walks those ops and checks each against that rule; any op it does not know,
or a tensor that differs per head and is not a parameter to permute, is an error naming the node.

Rule per value on the path (its traced shape): a rank-3 value ``[B, T, C]`` holds the heads side by side in
``C = heads * head_dim`` (or ``C == 1`` after a reduction over all of them); a value of higher rank has a heads
axis, the first static dimension of size ``heads`` before the last. Another tensor an op reads must broadcast
over the heads (size 1, or absent, on the heads axis; on ``C`` for rank 3) unless it is a parameter of ``C``
elements, which is then returned for permutation. Reductions may not run over the heads axis. A projection
shared by q, k and v (Phi-3's ``qkv_proj``) must be read through one slice of its last dimension per value, at
the offsets of q, k and v in that order.
"""
from __future__ import annotations

import torch
from torch import fx

from .graph_utils import shape_of

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.unsqueeze.default, aten.alias.default, aten.clone.default,
          aten.contiguous.default, aten.flatten.using_ints, aten.expand.default}
_ELEMENTWISE = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.add.Tensor, aten.sub.Tensor,
                aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.pow.Tensor_Scalar, aten.rsqrt.default,
                aten.sqrt.default, aten.add.Scalar, aten.mul.Scalar}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList}
_WITHIN_HEAD = {aten.slice.Tensor, aten.cat.default, aten.stack.default}  # on an axis after the heads axis


def _static(size) -> int | None:
    return size if isinstance(size, int) else None


def heads_axis(shape: tuple, heads: int, width: int) -> int | None:
    """The heads axis of a path value (None for rank 3, whose last dimension holds the heads side by side);
    ValueError if the shape has no place for the heads."""
    if len(shape) == 3:
        if _static(shape[-1]) not in (width, 1):
            raise ValueError(f"shape {shape}: last dimension is not {heads} heads side by side ({width})")
        return None
    for axis, size in enumerate(shape[:-1]):
        if _static(size) == heads:
            return axis
    raise ValueError(f"shape {shape} has no axis of {heads} heads")


def _between(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes that depend on ``start`` and that ``end`` depends on, ``end`` included, in graph order."""
    after, todo = set(), [start]
    while todo:
        for user in todo.pop().users:
            if user not in after:
                after.add(user)
                todo.append(user)
    before, todo = {end}, [end]
    while todo:
        for node in todo.pop().all_input_nodes:
            if node not in before:
                before.add(node)
                todo.append(node)
    return [n for n in start.graph.nodes if n in after and n in before]


def _axis(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _check_node(node: fx.Node, path: set, heads: int, width: int, permuted: list) -> None:
    target = node.target
    if target not in _VIEWS | _ELEMENTWISE | _REDUCTIONS | _WITHIN_HEAD:
        raise ValueError(f"{target} is not known to act on each head alone")
    out = shape_of(node)
    axis = heads_axis(out, heads, width)
    inputs = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    source = next(a for a in inputs if a in path)
    in_shape = shape_of(source)
    in_axis = heads_axis(in_shape, heads, width)
    if target in _REDUCTIONS or target in _WITHIN_HEAD:
        dims = node.args[1] if len(node.args) > 1 else 0
        dims = [dims] if isinstance(dims, int) else list(dims)
        rank = len(out) if target is aten.stack.default else len(in_shape)
        if in_axis is None and (target not in _REDUCTIONS or any(_axis(d, rank) != rank - 1 for d in dims)):
            raise ValueError(f"{target} over dims {dims} of {in_shape}, whose channels hold the heads side by side")
        if in_axis is not None and any(_axis(d, rank) <= in_axis for d in dims):
            raise ValueError(f"{target} over dims {dims}, not after the heads axis {in_axis} of {in_shape}")
    if target in _VIEWS and len(in_shape) == 3 and len(out) > 3 and tuple(out[-2:]) != (heads, width // heads):
        raise ValueError(f"view of {in_shape} as {out} does not split the channels into [{heads}, {width // heads}]")
    for other in inputs:
        if other in path:
            continue
        shape = shape_of(other)
        if other.op == "get_attr" and axis is None and len(shape) == 1 and shape[0] == width:
            permuted.append(other)  # a weight over the whole projection: permuted with the heads
            continue
        offset = len(out) - len(shape)
        where = len(out) - 1 if axis is None else axis
        if where >= offset and _static(shape[where - offset]) != 1:
            raise ValueError(f"it reads {other.name} of shape {shape}, which differs per head and is not a "
                             f"parameter of the projection's width {width}")


def head_wise_params(site_name: str, proj: fx.Node, value: fx.Node, heads: int, head_dim: int, what: str,
                     segment: tuple[int, int] | None = None) -> list[fx.Node]:
    """Check that ``value`` (q, k or v before SDPA) is its projection ``proj`` taken head by head, through
    ``segment`` (start, end) of its output columns if the projection is shared. Returns the parameters of
    ``heads * head_dim`` elements on the way, whose blocks must be permuted with the heads; ValueError naming
    the node and the reason otherwise."""
    width = heads * head_dim
    path_nodes = _between(proj, value)
    path = set(path_nodes) | {proj}
    permuted: list[fx.Node] = []
    readers = [n for n in path_nodes if proj in n.all_input_nodes]
    if segment is not None:
        first = readers[0] if len(readers) == 1 else None
        dim, start, end = (list(first.args[1:]) + [0, 0, None])[:3] if first is not None else (None, None, None)
        total = _static(shape_of(proj)[-1])
        end = total if end is None or (total is not None and end > total) else end
        if first is None or first.target is not aten.slice.Tensor or _axis(dim, 3) != 2 or \
                (start, end) != segment:
            raise ValueError(f"attention node {site_name}: the {what} is not read from the shared projection "
                             f"{proj.name} as one slice of columns {segment[0]}:{segment[1]}")
        path_nodes = [n for n in path_nodes if n is not first]
        path = (path - {first}) | {proj}
        path.add(first)
    for node in path_nodes:
        try:
            _check_node(node, path, heads, width, permuted)
        except ValueError as err:
            raise ValueError(f"attention node {site_name}: node {node.name} between {proj.name} and the {what}: "
                             f"{err}; duo_compile reorders heads only through ops that act on each head "
                             f"alone") from None
    return permuted
