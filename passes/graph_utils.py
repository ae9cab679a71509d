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


def linear_bias(linear: fx.Node) -> fx.Node | None:
    """The bias node of an ``aten.linear`` (positional or keyword), or None."""
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return bias if isinstance(bias, fx.Node) else None


def owner_of(gm: fx.GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    """The module holding a ``get_attr`` target and the attribute's name in it."""
    owner_path, _, name = target.rpartition(".")
    return (gm.get_submodule(owner_path) if owner_path else gm), name


def get_param(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    if node.op != "get_attr":
        raise ValueError(f"expected a parameter (get_attr), got {node.op} {node.name}")
    owner, name = owner_of(gm, node.target)
    return owner._parameters[name] if name in owner._parameters else owner._buffers[name]


def set_param(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace a buffer or parameter by a new tensor, or add a new parameter (never in place: the user's model
    shares the old storage)."""
    owner, name = owner_of(gm, target)
    if name in owner._buffers:
        owner._buffers[name] = value
    else:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)


def drop_param(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a ``get_attr`` node and delete what it read from its owner module."""
    owner, name = owner_of(gm, node.target)
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)
    gm.graph.erase_node(node)


def clean_up(gm: fx.GraphModule, recompile: bool = True) -> int:
    """What the pipeline does after every pass (so no pass does it itself): remove the nodes nothing reads any
    more (pure ones: ops that write a cache stay), check the graph and (``recompile``) regenerate the module's
    code. Returns how many nodes were removed."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    if recompile:
        gm.recompile()
    return before - len(gm.graph.nodes)
