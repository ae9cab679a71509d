"""One torch.export capture per model per test process, for tests whose subject is not the capture itself.

``capture`` (duo_compile/capture.py) reads nothing but the model: the same module with the same weights gives the
same graph, which refers to the model's own parameters and buffers. ``captured`` returns a copy of the graph
captured once, referring to those same parameters and buffers as a fresh capture does (any other tensor of the
graph is copied): the passes rewrite the graph they get in place, so a copy keeps each caller's rewrites to itself,
and a pass that wrote into the model's weights would still show on the model. Callers must not modify a model after
its first capture. Tests of capture itself, of compiling twice (test_determinism's engine A2) and of what an engine
shares with the model keep fresh captures.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings

import pytest
from torch import fx

from duo_compile import compiler
from duo_compile.capture import capture


@functools.cache
def _captured(model, last_logits_only: bool, repeat_layers: bool) -> fx.GraphModule:
    return capture(model, last_logits_only=last_logits_only, repeat_layers=repeat_layers)


def captured(model, *, last_logits_only: bool = True, repeat_layers: bool = True) -> fx.GraphModule:
    """``capture(model, ...)``, from a graph captured once per model and arguments."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    with warnings.catch_warnings():  # torch's pytree specs warn about their own deprecated check when copied
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        return copy.deepcopy(_captured(model, last_logits_only, repeat_layers), shared)


@contextlib.contextmanager
def compile_reuses_captures():
    """``duo_compile.compile`` takes its graph from ``captured`` for the duration: every other step (checks, passes,
    weight copies, the engine) runs as it does, once per call."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiler, "capture", captured)
        yield
