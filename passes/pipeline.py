"""The pass pipeline, as data: the order the passes run in and why.

1. find_attention  - everything else needs to know where attention is and what feeds it.
2. reorder_heads   - must run before splitting, so each head group becomes one contiguous slice (under tensor
   parallelism it keeps only this rank's heads, so every later pass sees only those).
3. tensor_parallel - only with tensor_parallel_size > 1: this rank's share of each MLP, and an all-reduce after
   o_proj and down_proj; before fuse_projections, which would merge gate/up before they are split.
4. split_attention - rewrites attention into duo ops over the whole sequence (no cache yet).
5. kv_layout       - turns the cacheless ops into cached ones and adds the caches as graph inputs.
6. merge_head_groups - a mixed layer's two cached ops and their concatenation become one op again.
7. fuse_projections - linears on one input become one (q/k/v, gate/up); the passes before it find
   attention through the separate q/k/v projections.
8. fuse_rope       - last: the cached ops take q/k before RoPE and rotate them themselves; it needs the final
   attention ops (merged) and finds the rotation right in front of them.

After every pass ``run_pass`` cleans the graph up (``graph_utils.clean_up``: dead code removed, graph linted, code
regenerated), so a pass only rewrites what it matches and leaves the nodes it made dead for the clean-up; call a
pass through ``run_pass`` (or ``clean_up`` after it) to get a graph module that runs. ``run_passes`` regenerates
the code once, after its last pass: no pass runs the module, and generating Python code for a graph of a
many-layer model is most of what the passes cost (benchmarks/DECISIONS.md#capture-repeats-layers).

The passes in ``OPTIONAL`` have a switch in the context, a field of the pass's name (a bool; for tensor_parallel
the rank's share, None when off); one switched off does not run and is recorded as ``SKIPPED`` in ``ctx.changed``
(equal to 0, printed ``skipped``), not as a pass that matched nothing.

Debugging: set ``DUO_COMPILE_DUMP_GRAPHS`` to a folder and every pass that runs writes the graph before and after
it there, ``NN_<pass>_before.txt`` and ``NN_<pass>_after.txt`` (NN its number above; the graph's nodes, then the
Python code generated from them). The folder is created if needed; files of an earlier run are overwritten.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import fx

from .context import SKIPPED, PassContext
from .find_attention import find_attention
from .fuse_projections import fuse_projections
from .fuse_rope import fuse_rope
from .graph_utils import clean_up
from .kv_layout import kv_layout
from .merge_head_groups import merge_head_groups
from .reorder_heads import reorder_heads
from .split_attention import split_attention
from .tensor_parallel import tensor_parallel

Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]

PIPELINE: list[tuple[str, Pass]] = [
    ("find_attention", find_attention),
    ("reorder_heads", reorder_heads),
    ("tensor_parallel", tensor_parallel),
    ("split_attention", split_attention),
    ("kv_layout", kv_layout),
    ("merge_head_groups", merge_head_groups),
    ("fuse_projections", fuse_projections),
    ("fuse_rope", fuse_rope),
]


# Passes a PassContext can switch off, each by its field of the pass's name (off when false or None).
OPTIONAL = ("tensor_parallel", "fuse_projections", "fuse_rope")
DUMP_GRAPHS = "DUO_COMPILE_DUMP_GRAPHS"


def _number(name: str) -> int:
    """The pass's number in the docstring's list (its place in PIPELINE, from 1)."""
    names = [pass_name for pass_name, _ in PIPELINE]
    if name not in names:
        raise ValueError(f"unknown pass {name!r}; passes are {names}")
    return names.index(name) + 1


def _dump(gm: fx.GraphModule, number: int, name: str, when: str) -> None:
    folder = os.environ.get(DUMP_GRAPHS)
    if folder:
        gm.recompile()  # gm.code is the code generated last
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{number:02d}_{name}_{when}.txt").write_text(f"{gm.graph}\n\n{gm.code}")


def run_pass(name: str, gm: fx.GraphModule, ctx: PassContext, *, recompile: bool = True) -> fx.GraphModule:
    """Run the pass named ``name`` as the pipeline does: recorded as skipped if its switch is off, else run,
    cleaned up after (its code regenerated if ``recompile``), and dumped before and after if
    ``DUO_COMPILE_DUMP_GRAPHS`` names a folder."""
    number = _number(name)
    if name in OPTIONAL and not getattr(ctx, name):
        ctx.record(name, SKIPPED)
        return gm
    _dump(gm, number, name, "before")
    gm = PIPELINE[number - 1][1](gm, ctx)
    clean_up(gm, recompile)
    _dump(gm, number, name, "after")
    return gm


def run_passes(gm: fx.GraphModule, ctx: PassContext, until: str | None = None) -> fx.GraphModule:
    """Run the pipeline in order (each pass through ``run_pass``), stopping after the pass named ``until`` (all of
    them by default)."""
    if until is not None:
        _number(until)  # an unknown name is an error before any pass runs
    for name, _ in PIPELINE:
        gm = run_pass(name, gm, ctx, recompile=False)
        if name == until:
            break
    gm.recompile()
    return gm
