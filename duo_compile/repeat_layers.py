"""Capture a deep model in the time of a shallow one: export its first ``TRACED`` decoder layers, then repeat the
last traced layer's nodes for every layer after it, each copy reading its own layer's weights.

torch.export pays per traced op (fake tensors, symbolic shapes), so capturing a model costs time in proportion
to its depth, though every decoder layer of a Llama-like model runs the same ops on its own weights
(benchmarks/DECISIONS.md#capture-repeats-layers). Repeating is used only when it gives the graph a full export
would give:

* every decoder layer is of one class, with the same attributes (``layer_idx`` aside, which only indexes a KV cache
  capture does not use), the same parameter and buffer names, shapes and dtypes, and no hooks, in every
  submodule;
* in the short graph, the last two traced layers are the same graph: op for op the same targets and constants,
  the same shared inputs (positions, rotary tables, masks), each its own layer's weights, and one chain of
  hidden states from layer to layer (so a value computed from ``layer_idx`` would show as a difference).

Otherwise (or when the short model does not export) ``capture`` exports the whole model, as it did before.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx

from duo_compile.models.hf import read_shape

TRACED = 3  # layer 0, then two layers to compare; the last one is repeated
_CAPTURE_PREFIX = "model."  # CausalLMForCapture holds the model as ``self.model``


def _plain_attributes(module: torch.nn.Module) -> dict:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "layer_idx" and not isinstance(v, torch.Tensor)}


def _layer_signature(layer: torch.nn.Module) -> list:
    """What must agree between two layers for their traced graphs to agree (besides ``layer_idx``)."""
    signature = []
    for name, module in layer.named_modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs)
        signature.append((name, type(module), _plain_attributes(module), any(bool(h) for h in hooks)))
    signature += [(name, "tensor", tuple(t.shape), t.dtype, t.device)
                  for name, t in (*layer.named_parameters(), *layer.named_buffers())]
    return signature


@dataclass
class Plan:
    """Where the decoder layers are: ``path`` (of the ModuleList in the model) and the layers themselves."""

    path: str
    layers: torch.nn.ModuleList

    @contextlib.contextmanager
    def first_layers(self, model: torch.nn.Module) -> Iterator[None]:
        """The model with only its first ``TRACED`` decoder layers for the duration (the layers list restored)."""
        parent_name, _, name = self.path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, name, torch.nn.ModuleList(list(self.layers)[:TRACED]))
        try:
            yield
        finally:
            setattr(parent, name, self.layers)


def plan(model: torch.nn.Module) -> Plan | None:
    """A Plan if the model's decoder layers are interchangeable and more than ``TRACED``; else None."""
    try:
        num_layers = read_shape(model).num_layers
    except ValueError:
        return None
    if num_layers <= TRACED:
        return None
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers and name.endswith("layers")]
    if len(lists) != 1:
        return None
    path, layers = lists[0]
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) if config is not None else None
    if layer_types is not None and len(set(layer_types)) > 1:
        return None
    try:
        first = _layer_signature(layers[1])
        if any(_layer_signature(layer) != first for layer in layers[1:]) or _layer_signature(layers[0]) != first:
            return None
    except (TypeError, ValueError, RuntimeError):  # an attribute that cannot be compared: do not guess
        return None
    return Plan(path, layers)


def _in_layer(node: fx.Node, prefix: str) -> bool:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if path == prefix or str(path).startswith(prefix + "."):
            return True
    return False


def _layer_nodes(gm: fx.GraphModule, prefix: str, index: int) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and _in_layer(n, f"{prefix}.{index}")]


def _same_graph(gm: fx.GraphModule, prefix: str, before: list[fx.Node], a: list[fx.Node], b: list[fx.Node]) -> bool:
    """Layer ``b`` is layer ``a`` one step later: same ops and constants; where ``a`` reads its predecessor
    ``before`` (node p), ``b`` reads ``a``'s node p; where ``a`` reads its own weights, ``b`` reads the same names of
    its own layer; everything else is the same shared node."""
    if len(a) != len(b) or not a:
        return False
    index_a, index_b = layer_index(a[0], prefix), layer_index(b[0], prefix)
    pos_before, pos_a = {n: i for i, n in enumerate(before)}, {n: i for i, n in enumerate(a)}

    def same(x, y) -> bool:
        if isinstance(x, fx.Node) != isinstance(y, fx.Node):
            return False
        if isinstance(x, fx.Node):
            if x in pos_a:
                return y is b[pos_a[x]]
            if x in pos_before:
                return y is a[pos_before[x]]
            if x.op == "get_attr" and x.target.startswith(f"{prefix}.{index_a}."):
                return y.op == "get_attr" and y.target == _renamed(x.target, prefix, index_a, index_b)
            return x is y
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return type(x) is type(y) and x == y

    return all(
        x.op == y.op and x.target == y.target and same(x.args, y.args) and same(x.kwargs, y.kwargs)
        for x, y in zip(a, b)
    )


def layer_index(node: fx.Node, prefix: str) -> int:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        found = re.match(re.escape(prefix) + r"\.(\d+)(\.|$)", str(path))
        if found:
            return int(found.group(1))
    raise ValueError(f"node {node.name} is in no decoder layer")


def _renamed(target: str, prefix: str, old: int, new: int) -> str:
    return f"{prefix}.{new}." + target[len(f"{prefix}.{old}."):]


def _set_tensor(gm: fx.GraphModule, target: str, tensor: torch.Tensor) -> None:
    *path, name = target.split(".")
    module = gm
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if isinstance(tensor, torch.nn.Parameter):
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor)


def repeat(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule | None:
    """The graph of the whole model from ``gm``, the graph of its first ``TRACED`` layers: the last traced layer's
    nodes copied once per further layer (its weights renamed to that layer's), the nodes after the layers reading
    the last copy. None where the checks in the module docstring fail (``gm`` is then left unchanged)."""
    prefix = _CAPTURE_PREFIX + plan.path
    layers = [_layer_nodes(gm, prefix, i) for i in range(TRACED)]
    before, previous, template = layers[-3], layers[-2], layers[-1]
    if not _same_graph(gm, prefix, before, previous, template):
        return None
    inside = set(template)
    outputs = [i for i, n in enumerate(template) if any(u not in inside for u in n.users)]
    users_after = {u for i in outputs for u in template[i].users if u not in inside}
    chain = set(previous) | inside
    if any(u in set(previous) or u in set(before) for u in users_after) or any(
            u not in chain for n in previous for u in n.users):
        return None  # not a chain: something besides the next layer reads a layer's values
    anchor = template[-1].next
    current: list[fx.Node] = template
    with gm.graph.inserting_before(anchor):
        for index in range(TRACED, len(plan.layers)):
            current = _copy_layer(gm, plan, prefix, template, previous, current, index)
    for i in outputs:
        template[i].replace_all_uses_with(current[i], delete_user_cb=lambda user: user in users_after)
    gm.graph.lint()
    gm.recompile()
    return gm


def _copy_layer(gm: fx.GraphModule, plan: Plan, prefix: str, template: list[fx.Node], previous: list[fx.Node],
                current: list[fx.Node], index: int) -> list[fx.Node]:
    """Copy ``template`` (the last traced layer) as layer ``index``: where the template reads ``previous`` (its
    predecessor's node p), the copy reads ``current``'s node p; the template's weights become layer ``index``'s,
    registered on ``gm`` under the names a full export gives them."""
    last_traced = TRACED - 1
    pos_previous = {n: i for i, n in enumerate(previous)}
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, fx.Node] = {}

    def arg(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node in pos_previous:
            return current[pos_previous[node]]
        if node.op == "get_attr" and node.target.startswith(f"{prefix}.{last_traced}."):
            target = _renamed(node.target, prefix, last_traced, index)
            if target not in attrs:
                rest = target[len(f"{prefix}.{index}."):]
                layer = plan.layers[index]
                try:
                    tensor = layer.get_parameter(rest)
                except AttributeError:
                    tensor = layer.get_buffer(rest)
                _set_tensor(gm, target, tensor)
                attrs[target] = gm.graph.get_attr(target)
                attrs[target].meta = dict(node.meta)
            return attrs[target]
        return node

    copies = []
    for node in template:
        new = gm.graph.node_copy(node, arg)
        new.meta = dict(node.meta)
        stack = node.meta.get("nn_module_stack")
        if stack:
            new.meta["nn_module_stack"] = {
                key: (str(path).replace(f"{prefix}.{last_traced}", f"{prefix}.{index}", 1), kind)
                for key, (path, kind) in stack.items()
            }
        env[node] = new
        copies.append(new)
    return copies
