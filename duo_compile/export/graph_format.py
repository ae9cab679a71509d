"""The rewritten graph as JSON, node by node: what an engine package stores so that ``load`` rebuilds in
milliseconds the ``fx.GraphModule`` that ``compile`` made.

The graph ``compile`` runs is an ATen-level fx graph: placeholders (the engine's inputs), ``get_attr`` nodes
(its weights), calls of ops (``torch.ops.<namespace>.<op>.<overload>``: ATen's and the duo attention ops) and of
a few Python functions (``operator``'s, and the project's own helpers), and one output. Each node is written with
its name, kind, target and arguments; an argument is a JSON value, or a tagged object for what JSON lacks (a
node, a tuple, a torch dtype / layout / memory format, a device, a non-finite float). ``to_module`` builds the
graph again in the same order under the same names, so its generated code, and the order in which it takes its
weights as inputs of the compiled graphs (runtime/inductor_graph.py), are the exporting process's.

Why not ``torch.export.load``: it rebuilds every node's symbolic-shape metadata (sympy expressions parsed
again, fake tensors made again), which the engine does not use, and its time
grows with the model's depth (benchmarks/DECISIONS.md#engine-package). Loading a call target resolves only
registered ops and functions of ``ALLOWED_MODULES``: a damaged or foreign file cannot name another function.
"""
from __future__ import annotations

import importlib
import math
import operator  # noqa: F401  (a module targets may name)
from typing import Any

import torch
from torch import fx

VERSION = 1
# Modules whose functions a graph may call (beside registered ops).
ALLOWED_MODULES = ("operator", "math", "duo_compile.")
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class GraphFormatError(ValueError):
    """A graph that cannot be written (an argument or target this format has no form for) or read back."""


# --------------------------------------------------------------------------------------------------- writing
def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"op:{target.namespace}::{target._opname}.{target._overloadname}"
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if callable(target) and module and "<" not in qualname and _allowed(module):
        return f"fn:{module}:{qualname}"
    raise GraphFormatError(f"the graph calls {target!r}, which the package format cannot name (an op or a function "
                           f"of {', '.join(ALLOWED_MODULES)})")


def _allowed(module: str) -> bool:
    return any(module == m or (m.endswith(".") and module.startswith(m)) for m in ALLOWED_MODULES)


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, _TORCH_ENUMS):
        return {"torch": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise GraphFormatError(f"the graph has an argument {value!r} of type {type(value).__name__}, which the package "
                           f"format cannot store")


def to_json(module: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """``module``'s graph as a JSON-ready record, and the tensors its ``get_attr`` nodes read (by target)."""
    nodes, tensors, parameters = [], {}, set(dict(module.named_parameters()))
    for node in module.graph.nodes:
        entry = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = _target_name(node.target)
        elif node.op in ("placeholder", "get_attr", "output"):
            entry["target"] = node.target
        else:
            raise GraphFormatError(f"the graph has a {node.op} node ({node.name}); the package format stores "
                                   f"placeholder, get_attr, call_function and output nodes")
        if node.op == "get_attr":
            tensors[node.target] = _attribute(module, node.target)
        entry["args"] = _encode(list(node.args))
        entry["kwargs"] = {key: _encode(value) for key, value in node.kwargs.items()}
        nodes.append(entry)
    record = {"version": VERSION, "nodes": nodes, "parameters": sorted(set(tensors) & parameters)}
    return record, {name: tensor.detach() for name, tensor in tensors.items()}


def _attribute(module: torch.nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    value = getattr(module.get_submodule(owner) if owner else module, name)
    if not isinstance(value, torch.Tensor):
        raise GraphFormatError(f"the graph reads attribute {target!r}, a {type(value).__name__}, not a tensor")
    return value


# --------------------------------------------------------------------------------------------------- reading
def _resolve(name: str) -> Any:
    kind, _, rest = name.partition(":")
    if kind == "op":
        namespace, _, op = rest.partition("::")
        op_name, _, overload = op.partition(".")
        packet = getattr(getattr(torch.ops, namespace, None), op_name, None) if namespace and op_name else None
        target = getattr(packet, overload, None) if packet is not None else None
        if isinstance(target, torch._ops.OpOverload):
            return target
        raise GraphFormatError(f"the graph calls op {rest}, which is not registered here")
    module, _, qualname = rest.partition(":")
    if kind == "fn" and module and qualname and _allowed(module):
        target = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part, None)
        if callable(target):
            return target
    raise GraphFormatError(f"the graph calls {name!r}, which is not an op or a function this format may call")


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise GraphFormatError(f"unknown argument form {value!r}")
    (tag, inner), = value.items()
    if tag == "node" and inner in env:
        return env[inner]
    if tag == "tuple" and isinstance(inner, list):
        return tuple(_decode(v, env) for v in inner)
    if tag == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if tag == "torch" and isinstance(getattr(torch, str(inner), None), _TORCH_ENUMS):
        return getattr(torch, inner)
    if tag == "device" and isinstance(inner, str):
        return torch.device(inner)
    raise GraphFormatError(f"unknown argument form {value!r}")


def to_module(record: dict, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The ``fx.GraphModule`` of ``record`` (``to_json``) reading ``tensors``: its parameters as (frozen)
    parameters, the other tensors as buffers. GraphFormatError if the record is not one this version wrote, names
    a node before defining it, or calls what ``_resolve`` refuses."""
    if not isinstance(record, dict) or record.get("version") != VERSION or not isinstance(record.get("nodes"), list):
        raise GraphFormatError(f"not a graph record of format version {VERSION}")
    graph, env = fx.Graph(), {}
    try:
        for entry in record["nodes"]:
            op, target = entry["op"], entry["target"]
            args = tuple(_decode(entry["args"], env))
            kwargs = {key: _decode(value, env) for key, value in entry["kwargs"].items()}
            if op == "call_function":
                target = _resolve(target)
            elif op == "get_attr" and target not in tensors:
                raise GraphFormatError(f"the graph reads {target!r}, which the weights do not hold")
            elif op not in ("placeholder", "get_attr", "output"):
                raise GraphFormatError(f"unknown node kind {op!r}")
            node = graph.create_node(op, target, args, kwargs, name=entry["name"])
            env[entry["name"]] = node
    except (KeyError, TypeError, AttributeError) as err:
        raise GraphFormatError(f"malformed graph record ({type(err).__name__}: {err})") from None
    parameters = set(record.get("parameters", []))
    root = {name: torch.nn.Parameter(tensor, requires_grad=False) if name in parameters else tensor
            for name, tensor in tensors.items()}
    graph.lint()
    return fx.GraphModule(root, graph)
