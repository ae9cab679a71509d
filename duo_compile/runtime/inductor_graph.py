"""The engine's graph compiled by Inductor directly, without Dynamo: one compiled variant per class of input
shapes, each one an artifact an engine package can store and ``load`` can read back.

The graph the passes leave is already an ATen-level fx graph. ``torch.compile`` would trace it again with Dynamo,
instruction by instruction over fake tensors, before Inductor sees it; for a deep model that retrace is most of a
first step's time, and of a loaded package's first step (benchmarks/DECISIONS.md#inductor-without-dynamo). Here
the graph goes to Inductor as it is (``torch._inductor.standalone_compile``), and what Inductor makes of it is a
``CompiledArtifact``: ``load`` reads one back without tracing or compiling anything.

Regions: the graph is cut into one region per decoder layer (layer_regions.py) and each class of regions that are
the same program compiles once, run by every region of the class on its own weights: Inductor's compile time, all
Python work per node, follows the number of distinct layers rather than the model's depth. A call runs the
regions in order, passing values between them through a table whose entries are dropped after their last reader.

Inputs: the graph's ``get_attr`` tensors (the weights) become trailing inputs of the compiled graphs, so a variant
holds no weights and compiling copies none. Every dimension of the engine's own inputs gets a symbol, as
``torch.compile(dynamic=True)`` gives them; the symbolic-shape engine specialises sizes 0 and 1 (a decode step,
T == 1, and batch 1 get variants of their own), storage offsets 0 and 1 (views further into their storage, such
as cache rows other than the first, share one variant of their own) and whatever the graph itself fixes. Weights
keep static shapes.

Variants: each keeps the guard expression its symbolic-shape engine produced over its region's inputs (sizes,
strides, storage offsets and the relations between them). Each region runs the first variant of its class whose
guards its inputs pass, and compiles a new one when none does; the choices are remembered per layout of the
engine's inputs, so after the first call of a layout a call costs one dictionary lookup and a call per region.
"""
from __future__ import annotations

import operator
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from duo_compile.runtime import layer_regions

LAYOUTS_KEPT = 256  # input layouts whose variant is remembered (prefill chunks come in many lengths)


@dataclass
class Variant:
    """One compiled graph: ``artifact`` (a ``torch._inductor.CompiledArtifact``) runs every call whose inputs pass
    ``guards`` (a Python expression over ``L['t0']``, ``L['t1']``, ... its region's inputs; None: every call).
    A deferred variant (``deferred``) holds the artifact's bytes in ``data`` and ``artifact`` None until ``ready``
    reads them, at the first call it runs: an engine package's graphs for steps a process may never take (a
    server's) cost nothing until taken."""

    guards: str | None
    artifact: object
    data: bytes | None = field(default=None, repr=False)
    _code: object = field(default=None, repr=False)

    @staticmethod
    def deferred(guards: str | None, data: bytes) -> Variant:
        return Variant(guards, None, data)

    def ready(self) -> Variant:
        """This variant, its artifact read from ``data`` if it was deferred."""
        if self.artifact is None:
            self.artifact = Variant.from_bytes(self.guards, self.data).artifact
            self.data = None
        return self

    def accepts(self, inputs: Sequence[torch.Tensor]) -> bool:
        if self.guards is None:
            return True
        if self._code is None:
            self._code = compile(self.guards, "<guards>", "eval")
        return bool(_guard_evaluator().evaluate_guards_expression(self._code, inputs))

    def to_bytes(self) -> bytes | None:
        """The artifact as bytes (``CompiledArtifact.save``'s binary form), or None when Inductor made it without
        its compile caches (a graph they refuse) and so cannot save it."""
        if self.artifact is None:
            return self.data
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "variant.bin")
            try:
                self.artifact.save(path=path, format="binary")
            except (RuntimeError, AssertionError):
                return None
            with open(path, "rb") as f:
                return f.read()

    @staticmethod
    def from_bytes(guards: str | None, data: bytes) -> Variant:
        """The variant ``to_bytes`` saved. Raises (AssertionError, RuntimeError, ...) when this torch cannot read
        it, e.g. one made by another torch build."""
        from torch._inductor import CompiledArtifact

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "variant.bin")
            with open(path, "wb") as f:
                f.write(data)
            return Variant(guards, CompiledArtifact.load(path=path, format="binary"))


_EVALUATOR = None


def _guard_evaluator():
    """A symbolic-shape engine, only to evaluate guard expressions (its own state is not used)."""
    global _EVALUATOR
    if _EVALUATOR is None:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        _EVALUATOR = ShapeEnv()
    return _EVALUATOR


def lift_weights(graph: fx.GraphModule) -> tuple[fx.GraphModule, list[str], list[torch.Tensor]]:
    """A copy of ``graph`` that takes its ``get_attr`` tensors as trailing inputs (one per target) and returns a
    tuple; those targets, and the tensors they name now."""
    lifted, env = fx.Graph(), {}
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            env[node] = lifted.placeholder(node.name)
    targets = list(dict.fromkeys(node.target for node in graph.graph.nodes if node.op == "get_attr"))
    inputs = {target: lifted.placeholder(f"weight_{i}") for i, target in enumerate(targets)}
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            env[node] = inputs[node.target]
        elif node.op == "output":  # always a tuple: a loaded artifact returns a list whatever the graph returned
            value = fx.map_arg(node.args[0], lambda n: env[n])
            lifted.output((value,) if isinstance(value, fx.Node) else tuple(value))
        elif node.op != "placeholder":
            env[node] = lifted.node_copy(node, lambda n: env[n])
    tensors = [operator.attrgetter(target)(graph) for target in targets]
    return fx.GraphModule(torch.nn.Module(), lifted), targets, tensors


def _layout(inputs: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.shape, t.stride(), t.storage_offset(), t.dtype, t.device) for t in inputs)


class InductorGraph:
    """Runs an engine graph as ``run(*inputs)``, compiled by Inductor region by region (layer_regions.py) and per
    class of input shapes (module docstring).

    ``classes``: one graph per class of regions that one compiled graph runs (``class_of``: each region's class;
    ``class_digests``: their ``layer_regions.digest``). ``variants``: per class, compiled graphs to start from (an
    engine package's); more are compiled when a call needs one. ``compiled``: how many this object compiled (not
    loaded). ``by_layer=False`` compiles the graph whole, as one region (a benchmark's baseline beside the split).
    """

    def __init__(self, graph: fx.GraphModule, variants: Sequence[Sequence[Variant]] = (), by_layer: bool = True):
        lifted, self.weight_targets, self.weights = lift_weights(graph)
        layer_regions.heads_from_cache_shapes(lifted)
        inputs = sum(1 for node in graph.graph.nodes if node.op == "placeholder")
        self.regions, self._outputs = layer_regions.split(lifted, inputs, self.weight_targets, self.weights,
                                                          by_layer)
        self._one_output = isinstance(next(n for n in graph.graph.nodes if n.op == "output").args[0], fx.Node)
        keys = list(dict.fromkeys(region.key for region in self.regions))
        self.class_of = [keys.index(region.key) for region in self.regions]
        self.class_digests = [layer_regions.digest(key) for key in keys]
        # Each class compiles the graph of its first region; the others run what it compiled on their own weights.
        self._leads = [self.regions[self.class_of.index(i)] for i in range(len(keys))]
        self.classes = [lead.graph for lead in self._leads]
        if variants and len(variants) != len(keys):
            raise ValueError(f"variants for {len(variants)} region classes; the graph has {len(keys)}")
        self.variants = [list(held) for held in variants] if variants else [[] for _ in keys]
        self.compiled = 0
        self._region_weights = [[self.weights[i] for i in region.weights] for region in self.regions]
        self._entries = inputs + sum(len(region.writes) for region in self.regions)
        self._layouts: OrderedDict[tuple, list[Variant]] = OrderedDict()

    @property
    def held(self) -> int:
        """How many compiled graphs this object holds, all classes together."""
        return sum(len(held) for held in self.variants)

    def __call__(self, *inputs: torch.Tensor):
        key = _layout(inputs)
        plan = self._layouts.get(key)
        chosen = [] if plan is None else plan
        values = [*inputs, *([None] * (self._entries - len(inputs)))]
        for i, region in enumerate(self.regions):
            args = [values[j] for j in region.reads]
            if plan is None:
                chosen.append(self._variant(self.class_of[i], args))
            outputs = chosen[i].artifact(*args, *self._region_weights[i])
            for j, value in zip(region.writes, outputs, strict=True):
                values[j] = value
            for j in region.frees:
                values[j] = None
            del args, outputs
        if plan is None:
            self._layouts[key] = chosen
            if len(self._layouts) > LAYOUTS_KEPT:
                self._layouts.popitem(last=False)
        if self._one_output:
            return values[self._outputs[0]]
        return tuple(values[j] for j in self._outputs)

    def _variant(self, cls: int, inputs: Sequence[torch.Tensor]) -> Variant:
        """A variant of region class ``cls`` whose guards ``inputs`` pass, compiled if none held does."""
        held = next((v for v in self.variants[cls] if v.accepts(inputs)), None)
        if held is not None:
            return held.ready()
        lead = self._leads[cls]
        variant = compile_variant(lead.graph, inputs, [self.weights[i] for i in lead.weights])
        if not variant.accepts(inputs):  # guards that reject the inputs they came from: a compile we cannot use
            raise RuntimeError("Inductor compiled a graph whose shape guards reject the inputs it was compiled for")
        self.variants[cls].append(variant)
        self.compiled += 1
        return variant


def compile_variant(lifted: fx.GraphModule, inputs: Sequence[torch.Tensor],
                    weights: Sequence[torch.Tensor]) -> Variant:
    """Inductor's graph for ``lifted`` (a graph taking ``inputs`` then ``weights``) over inputs laid out as
    ``inputs``: each of their dimensions a symbol, the weights' shapes constants."""
    from torch._dynamo.source import LocalSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    # No duck sizing: two dimensions that happen to be equal in this call are not assumed equal in the next.
    shape_env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=shape_env)
    fakes = [
        mode.from_tensor(t, source=LocalSource(f"t{i}"),
                         symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * t.dim()))
        for i, t in enumerate(inputs)
    ]
    fixed = [mode.from_tensor(w, static_shapes=True) for w in weights]
    with torch._guards.tracing(torch._guards.TracingContext(mode)):
        artifact = torch._inductor.standalone_compile(lifted, [*fakes, *fixed], dynamic_shapes="from_tracing_context",
                                                      options={})
    return Variant(shape_env.produce_guards_expression(fakes, ignore_static=False), artifact)
