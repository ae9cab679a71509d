"""Pass 7: linear layers that read the same input become one matrix multiply (q/k/v; gate/up).

Matches groups of two or more ``aten.linear(x, W_i[, b_i])`` on the same ``x`` whose weights are parameters
read by nothing else, of one dtype, device and input width, all with a bias or all without. Emits one
``aten.linear(x, cat(W_i), cat(b_i))`` and, per former node, an ``aten.slice`` of its output columns (a view:
no copy). The concatenated weight replaces the group's weights in the graph module, so the engine holds each
weight once.

Why: at decode a linear layer is a matrix-vector product, bound by reading its weight, and a small one does not
reach the GPU's bandwidth; one concatenated weight is read closer to it than its parts (numbers: see
benchmarks/DECISIONS.md#fuse-projections). Prefill is compute-bound and one larger GEMM is no slower than three.
It runs after every pass that finds attention through its q/k/v projections (and reorders their rows), since
those must see them separate.

Cost: the model's original weights are not touched (the engine must not modify its input), so while the user
keeps the model, the fused weights are a second copy of them; ``compile(..., fuse_projections=False)`` switches
the pass off (``PassContext.fuse_projections``; the pipeline then records it as skipped).
"""
from __future__ import annotations

import torch
from torch import fx

from .context import PassContext
from .graph_utils import drop_param, get_param, is_linear, linear_bias, set_param

aten = torch.ops.aten


def _weight_and_bias(linear: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    return linear.args[1], linear_bias(linear)


def _fusable(gm: fx.GraphModule, linear: fx.Node) -> bool:
    """A weight (and bias) the pass may replace: a parameter or buffer this linear alone reads."""
    weight, bias = _weight_and_bias(linear)
    params = [weight] + ([bias] if bias is not None else [])
    return all(isinstance(p, fx.Node) and p.op == "get_attr" and len(p.users) == 1 for p in params) and \
        get_param(gm, weight).dim() == 2


def _groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Linear nodes grouped by input, keeping only groups of 2+ with one dtype, device, width and bias use."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if is_linear(node) and isinstance(node.args[0], fx.Node) and _fusable(gm, node):
            by_input.setdefault(node.args[0], []).append(node)
    groups = []
    for linears in by_input.values():
        weights = [get_param(gm, _weight_and_bias(n)[0]) for n in linears]
        kinds = {(w.dtype, w.device, w.shape[1], _weight_and_bias(n)[1] is None) for n, w in zip(linears, weights)}
        if len(linears) > 1 and len(kinds) == 1:
            groups.append(linears)
    return groups


def _fused_name(gm: fx.GraphModule, targets: list[str], what: str) -> str:
    """``layers.0.self_attn.q_proj.weight`` + ``...k_proj.weight`` -> ``layers.0.self_attn.fused_q_proj_k_proj_weight``."""
    owners = [t.rpartition(".")[0] for t in targets]
    parents = {o.rpartition(".")[0] for o in owners}
    parent = parents.pop() if len(parents) == 1 else ""
    name = "fused_" + "_".join(o.rpartition(".")[2] for o in owners) + f"_{what}"
    while hasattr(gm.get_submodule(parent) if parent else gm, name):
        name += "_"
    return f"{parent}.{name}" if parent else name


def _fuse(gm: fx.GraphModule, linears: list[fx.Node]) -> None:
    graph = gm.graph
    first = linears[0]
    params = [_weight_and_bias(n) for n in linears]
    widths = [get_param(gm, w).shape[0] for w, _ in params]
    fused = []
    for i, what in ((0, "weight"), (1, "bias")):
        nodes = [p[i] for p in params]
        if nodes[0] is None:
            fused.append(None)
            continue
        target = _fused_name(gm, [n.target for n in nodes], what)
        set_param(gm, target, torch.cat([get_param(gm, n) for n in nodes], dim=0))
        with graph.inserting_before(first):
            fused.append(graph.get_attr(target))
    with graph.inserting_before(first):
        out = graph.call_function(aten.linear.default, (first.args[0], *(n for n in fused if n is not None)))
    start = 0
    for linear, width in zip(linears, widths):
        with graph.inserting_before(linear):
            part = graph.call_function(aten.slice.Tensor, (out, -1, start, start + width))
        part.meta = dict(linear.meta)
        linear.replace_all_uses_with(part)
        graph.erase_node(linear)
        start += width
    if "val" in first.meta:  # keep traced values on the new node, as capture left them on the others
        val = first.meta["val"]
        out.meta["val"] = val.new_empty((*val.shape[:-1], start))
    for weight, bias in params:
        for node in (weight, bias):
            if node is not None:
                drop_param(gm, node)


def fuse_projections(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    groups = _groups(gm)
    for linears in groups:
        _fuse(gm, linears)
    ctx.record("fuse_projections", len(groups))
    return gm
