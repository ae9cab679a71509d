"""runtime/inductor_graph.py: Inductor on an fx graph without Dynamo. One compiled variant serves every length of
a symbolic dimension, sizes 1 get their own, a variant is chosen by its guards and remembered per input layout,
and a saved variant read back runs without compiling. The engine-level tests (test_compile, test_package) cover
the engine graph; here a two-op graph with one weight keeps each Inductor compile short."""
from __future__ import annotations

import pytest
import torch
from torch import fx

from duo_compile.runtime.inductor_graph import InductorGraph, Variant, lift_weights


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)),
                                         requires_grad=False)

    def forward(self, x, scale):
        return torch.relu(torch.nn.functional.linear(x, self.weight)) * scale


@pytest.fixture(scope="module")
def graph():
    return fx.symbolic_trace(_Tiny())


def _inputs(batch: int, length: int):
    generator = torch.Generator().manual_seed(batch * 100 + length)
    return torch.randn(batch, length, 4, generator=generator), torch.rand(batch, length, 1, generator=generator)


def test_lifted_graph_takes_the_weights_as_trailing_inputs(graph):
    lifted, targets, tensors = lift_weights(graph)
    assert targets == ["weight"] and tensors[0] is graph.weight
    assert [n.op for n in lifted.graph.nodes].count("get_attr") == 0
    x, scale = _inputs(2, 3)
    assert torch.equal(lifted(x, scale, graph.weight)[0], graph(x, scale))  # a tuple, whatever the graph returned


def test_one_variant_for_every_length_and_one_for_length_one(graph):
    run = InductorGraph(graph)
    for length in (3, 5, 8):
        x, scale = _inputs(2, length)
        torch.testing.assert_close(run(x, scale), graph(x, scale), rtol=1e-5, atol=1e-5)
    assert run.compiled == 1
    x, scale = _inputs(2, 1)
    torch.testing.assert_close(run(x, scale), graph(x, scale), rtol=1e-5, atol=1e-5)
    assert run.compiled == 2
    first, second = run.variants[0]
    assert first.accepts(_inputs(2, 9)) and not first.accepts(_inputs(2, 1)) and second.accepts(_inputs(2, 1))
    assert not first.accepts((torch.randn(2, 9, 4).transpose(0, 1), torch.rand(9, 2, 1)))  # strides guarded


def test_a_view_past_the_first_element_gets_a_variant_of_its_own(graph):
    """Inputs that start at their storage's first element compile with that offset fixed; views further in (cache
    rows other than the first: serve/warm_up.py runs one) share one more variant, whatever their offset."""
    run = InductorGraph(graph)
    x, scale = _inputs(4, 3)
    for rows in (slice(0, 2), slice(1, 3), slice(2, 4)):
        torch.testing.assert_close(run(x[rows], scale[rows]), graph(x[rows], scale[rows]), rtol=1e-5, atol=1e-5)
    assert run.compiled == 2


def test_a_layout_seen_before_does_not_evaluate_guards_again(graph, monkeypatch):
    run = InductorGraph(graph)
    x, scale = _inputs(2, 4)
    run(x, scale)
    evaluated = []
    monkeypatch.setattr(Variant, "accepts", lambda self, inputs: evaluated.append(1) or True)
    run(*_inputs(2, 4))
    assert evaluated == []
    run(*_inputs(2, 6))  # a new layout: its variant is looked up once
    assert evaluated == [1]


def test_a_saved_variant_read_back_runs_without_compiling(graph):
    """Read back at once, or deferred (a package's graphs other than its first) until the first call it runs."""
    made = InductorGraph(graph)
    x, scale = _inputs(3, 7)
    want = made(x, scale)
    (variant,) = made.variants[0]
    loaded = InductorGraph(graph, [[Variant.from_bytes(variant.guards, variant.to_bytes())]])
    assert torch.equal(loaded(x, scale), want) and loaded.compiled == 0
    deferred = InductorGraph(graph, [[Variant.deferred(variant.guards, variant.to_bytes())]])
    assert deferred.variants[0][0].artifact is None and deferred.variants[0][0].to_bytes() == variant.to_bytes()
    assert torch.equal(deferred(x, scale), want) and deferred.compiled == 0  # read at its first call
    assert deferred.variants[0][0].artifact is not None
    loaded(*_inputs(3, 1))  # no variant of the package holds length 1: compiled on first use
    assert loaded.compiled == 1


class _MethodCall(_Tiny):
    def forward(self, x, scale):
        return torch.nn.functional.linear(x, self.weight).relu() * scale  # a method call: Inductor's caches refuse it


def test_a_variant_inductors_caches_refused_runs_but_is_not_saved():
    from duo_compile.export import package_export

    module = _MethodCall()
    graph = fx.symbolic_trace(module)
    run = InductorGraph(graph)
    x, scale = _inputs(2, 3)
    torch.testing.assert_close(run(x, scale), module(x, scale), rtol=1e-5, atol=1e-5)
    assert run.variants[0][0].to_bytes() is None and package_export.compiled_members(run) == {}
