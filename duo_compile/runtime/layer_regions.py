"""Cut an engine graph into one region per decoder layer, so that Inductor compiles each distinct layer once.

A transformer's decoder layers run the same ops on their own weights; compiled as one graph, Inductor traces,
lowers and generates code for every layer anew, and its compile time grows with the model's depth
(benchmarks/DECISIONS.md#layer-regions). Cut at layer boundaries, with the weights as inputs, the layers that are
the same program share one compiled graph: a 32-layer model compiles a handful of regions (the first layer, which
also embeds the tokens and computes the rotary tables, the last, which also takes the final norm and the logits,
and one per distinct middle layer: DuoAttention's layers differ in how many heads are retrieval heads).

Where the cuts go: a node that reads a weight of decoder layer ``i`` (a weight whose module path has ``i`` as its
first numeric component, as in ``model.layers.7.mlp.down_proj.weight``) belongs to region ``i``; every other node
goes to the earliest region that uses its value, but never before a region it reads from. So the residual add
after a layer's last projection moves into the next layer's region, beside the norm it feeds (Inductor fuses them
as before), and values computed once for every layer (rotary tables, positions) are computed in the first region
and read by the others. Shape arithmetic (``sym_size`` and integer math on it) is not a value passed between
regions: each region that needs it recomputes it from its own inputs. Only tensors cross regions (a region's
compiled graph takes tensors): the elements of a multi-output op are taken in the op's region, and a graph where
some other value would cross (a number read off a tensor) is compiled whole, as is a graph whose weights name no
layers: one region.

Layers that differ only in how many of their heads are retrieval heads differ in one constant, the head count
``duo::attention_cached`` splits at; ``heads_from_cache_shapes`` has the op read it off the retrieval cache's head
dimension instead (the count it equals), so that such layers are one program and one compiled graph serves them
(counts of 1, where the symbolic-shape engine specialises a size, get a variant of their own).

``split`` returns the regions and how values flow: a value table whose first entries are the graph's inputs, each
region reading some entries and writing others, the graph's output read from it at the end. ``Region.key`` is
equal for two regions exactly when one compiled graph can run both: the same nodes in the same order with the same
targets and constants, and weights of the same shapes, strides and dtypes.
"""
from __future__ import annotations

import hashlib
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_SHAPE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default,
              torch.ops.aten.sym_storage_offset.default}
# Where integer math on sizes comes from in a graph: operator's functions report the module ``_operator``; torch
# has sym_max, sym_min, ...
_SHAPE_MODULES = {operator.__name__, operator.mul.__module__, math.__name__, "builtins", "torch"}


def weight_layer(target: str) -> int | None:
    """The decoder layer a weight belongs to: the first numeric component of its path, None if it has none."""
    found = _LAYER.search(target)
    return None if found is None else int(found.group(1))


@dataclass
class Region:
    """One region: ``graph`` takes the value table's entries ``reads`` and then the weights ``weights`` (indices
    into the whole graph's weights) and returns a tuple, stored to the entries ``writes``; ``frees``: the entries no
    later region nor the output reads (dropped after this region runs, so memory is held no longer than in one
    graph); ``key``: equal for regions one compiled graph runs (module docstring)."""

    graph: fx.GraphModule
    reads: list[int]
    weights: list[int]
    writes: list[int]
    frees: list[int]
    key: tuple


def heads_from_cache_shapes(graph: fx.GraphModule) -> None:
    """Rewrite ``graph`` in place: every ``duo::attention_cached`` takes its retrieval head count as the size of
    its retrieval key cache's head dimension (dimension 1, in both the per-row and the paged layout) instead of as
    a constant."""
    from duo_compile.kernels.ops import OPS

    heads_arg = 10  # q, k, v, four caches, cache_start, valid, scale, then retrieval_kv_heads
    for node in list(graph.graph.nodes):
        if (node.target is OPS["attention_cached"] and len(node.args) > heads_arg
                and isinstance(node.args[heads_arg], int)):
            with graph.graph.inserting_before(node):
                size = graph.graph.call_function(torch.ops.aten.sym_size.int, (node.args[3], 1))
            node.update_arg(heads_arg, size)
    graph.recompile()


def _is_shape(node: fx.Node) -> bool:
    """Shape arithmetic: sizes read off a tensor and integer math on them (recomputed in each region)."""
    if node.op != "call_function":
        return False
    if node.target in _SHAPE_OPS:
        return True
    module = getattr(node.target, "__module__", None)
    return module in _SHAPE_MODULES and not isinstance(node.target, torch._ops.OpOverload) and all(
        _is_shape(arg) for arg in node.all_input_nodes)


def _regions_of(nodes: list[fx.Node], layer_of: dict[fx.Node, int]) -> tuple[dict[fx.Node, int], int]:
    """Each computing node's region (module docstring), and how many regions there are."""
    layers = sorted(set(layer_of.values()))
    index = {layer: i for i, layer in enumerate(layers)}
    last = max(len(layers) - 1, 0)
    earliest: dict[fx.Node, int] = {}  # no earlier than what it reads
    for node in nodes:
        if node.op == "placeholder":
            earliest[node] = 0
        elif node.op != "output":
            own = [index[layer_of[a]] for a in node.all_input_nodes if a in layer_of]
            earliest[node] = max([0, *own, *(earliest[a] for a in node.all_input_nodes)])
    region: dict[fx.Node, int] = {}
    wanted: dict[fx.Node, int] = {}  # the earliest region that uses the value
    for node in reversed(nodes):
        if node.op in ("placeholder", "output"):
            continue
        uses = [last if user.op == "output" else wanted[user] if _is_shape(user) else region[user]
                for user in node.users]
        wanted[node] = min(uses, default=earliest[node])
        if not _is_shape(node):
            reads_layer = any(a in layer_of for a in node.all_input_nodes)
            region[node] = earliest[node] if reads_layer else max(earliest[node], wanted[node])
    for node in nodes:  # an element of a multi-output op is taken where the op runs: only tensors cross regions
        if node.target is operator.getitem and node in region and node.args[0] in region:
            region[node] = region[node.args[0]]
    return region, last + 1


def _tensor(node: fx.Node) -> bool:
    """Whether ``node``'s value is a tensor as far as the graph's metadata tells (a node without it counts as one)."""
    value = node.meta.get("val", node.meta.get("example_value"))
    return value is None or isinstance(value, torch.Tensor)


def _constant(value):
    """A hashable stand-in for a node argument that is not a node (for ``Region.key``)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_constant(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _constant(v)) for k, v in value.items()))
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _key(graph: fx.Graph, weights: Sequence[torch.Tensor]) -> tuple:
    numbers: dict[fx.Node, int] = {}
    parts = []
    for node in graph.nodes:
        numbers[node] = len(numbers)
        args = fx.map_arg((node.args, node.kwargs), lambda n: ("node", numbers[n]))
        target = node.target if isinstance(node.target, str) else (
            f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', node.target)}"
            if not isinstance(node.target, torch._ops.OpOverload) else str(node.target))
        parts.append((node.op, "" if node.op == "placeholder" else target, _constant(args)))
    layouts = tuple((tuple(w.shape), tuple(w.stride()), str(w.dtype)) for w in weights)
    return tuple(parts), layouts


def digest(key: tuple) -> str:
    """A short name for a region key that stays the same from process to process (an engine package records its
    region classes by it)."""
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def split(lifted: fx.GraphModule, inputs: int, weight_targets: Sequence[str],
          weights: Sequence[torch.Tensor], by_layer: bool = True) -> tuple[list[Region], list[int]]:
    """The regions of ``lifted`` (``inductor_graph.lift_weights``'s graph: ``inputs`` engine inputs, then one
    input per weight, named by ``weight_targets``), in the order they run, and the value table entries that make the
    graph's output tuple. ``by_layer=False``: one region, the whole graph."""
    nodes = list(lifted.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    weight_nodes = placeholders[inputs:]
    weight_index = {node: i for i, node in enumerate(weight_nodes)}
    layer_of = {node: layer for node, target in zip(weight_nodes, weight_targets, strict=True)
                if (layer := weight_layer(target)) is not None} if by_layer else {}
    region_of, count = _regions_of(nodes, layer_of)
    output = next(n for n in nodes if n.op == "output")

    entry = {node: i for i, node in enumerate(placeholders[:inputs])}  # value table entries

    def imports(members: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
        """What a region reads from outside it: values (first use order), then weights (first use order)."""
        seen, values, used_weights = set(), [], []

        def visit(arg: fx.Node) -> None:
            if arg in seen:
                return
            seen.add(arg)
            if arg in weight_index:
                used_weights.append(arg)
            elif _is_shape(arg):
                for inner in arg.all_input_nodes:
                    visit(inner)
            elif arg.op == "placeholder" or region_of[arg] != region_of[members[0]]:
                values.append(arg)

        for node in members:
            for arg in node.all_input_nodes:
                visit(arg)
        return values, used_weights

    members = [[n for n in nodes if n in region_of and region_of[n] == r] for r in range(count)]
    members = [m for m in members if m]
    reads = [imports(m) for m in members]
    if len(members) > 1 and not all(_tensor(v) for values, _ in reads for v in values):
        # A value the graph's metadata says is no tensor (a number read off a tensor, say) would cross regions,
        # and a region's compiled graph takes tensors only: compile the graph whole instead.
        return split(lifted, inputs, weight_targets, weights, by_layer=False)
    needed = {node for values, _ in reads for node in values} | set(output.all_input_nodes)
    regions: list[Region] = []
    for group, (values, used_weights) in zip(members, reads):
        graph, env = fx.Graph(), {}
        for node in [*values, *used_weights]:
            env[node] = graph.placeholder(node.name)

        def local(arg: fx.Node) -> fx.Node:
            if arg not in env:  # shape arithmetic on this region's own inputs
                env[arg] = graph.node_copy(arg, local)
            return env[arg]

        for node in group:
            env[node] = graph.node_copy(node, local)
        writes = [node for node in group if node in needed]
        graph.output(tuple(env[node] for node in writes))
        for node in writes:
            entry[node] = len(entry)
        region_weights = [weights[weight_index[w]] for w in used_weights]
        regions.append(Region(fx.GraphModule(torch.nn.Module(), graph), [entry[v] for v in values],
                              [weight_index[w] for w in used_weights], [entry[n] for n in writes], [],
                              _key(graph, region_weights)))
    kept = {entry[node] for node in output.all_input_nodes}
    for region in reversed(regions):  # an entry is freed by its last reader
        region.frees = [i for i in dict.fromkeys(region.reads) if i not in kept and i >= inputs]
        kept.update(region.reads)
    outputs = output.args[0]
    return regions, [entry[node] for node in (outputs if isinstance(outputs, (tuple, list)) else (outputs,))]
