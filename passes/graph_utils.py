"""Small helpers over fx graphs shared by the passes."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import fx

aten = torch.ops.aten

LINEAR = aten.linear.default
# Ops that only change how a tensor is viewed: looked through when tracing a value back to its producer.
VIEW_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.clone.default,
    aten.contiguous.default,
}


def shape_of(node: fx.Node) -> tuple:
    """The traced shape of a node's value (symbolic sizes stay symbolic)."""
    val = node.meta.get("val")
    if val is None or not hasattr(val, "shape"):
        raise ValueError(f"node {node.name} ({node.target}) carries no traced tensor value")
    return tuple(val.shape)


def find_producers(start: fx.Node, stop: Callable[[fx.Node], bool], forward: bool = False) -> list[fx.Node]:
    """All nodes reachable from ``start`` (through inputs, or users if ``forward``) that satisfy ``stop``.

    The walk does not continue past a matching node, so e.g. ``stop=is_linear`` from a query returns the
    q projection and not the projections that fed the layer before it.
    """
    found, seen, todo = [], {start}, [start]
    while todo:
        node = todo.pop()
        nexts: Iterable[fx.Node] = node.users if forward else node.all_input_nodes
        for n in nexts:
            if n in seen:
                continue
            seen.add(n)
            if stop(n):
                found.append(n)
            else:
                todo.append(n)
    return found


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is LINEAR


def get_param(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    if node.op != "get_attr":
        raise ValueError(f"expected a parameter (get_attr), got {node.op} {node.name}")
    return gm.get_parameter(node.target) if _is_param(gm, node.target) else gm.get_buffer(node.target)


def set_param(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace a parameter by a new tensor (never in place: the user's model shares the old storage)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[name] = value


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return name in owner._parameters


def dead_code_elimination(gm: fx.GraphModule) -> int:
    """Remove unused pure nodes; returns how many were removed."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return before - len(gm.graph.nodes)
