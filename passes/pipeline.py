"""The pass pipeline, as data: the order the passes run in and why.

1. find_attention  - everything else needs to know where attention is and what feeds it.
2. reorder_heads   - must run before splitting, so each head group becomes one contiguous slice.
3. split_attention - rewrites attention into duo ops over the whole sequence (no cache yet).
4. kv_layout       - turns the cacheless ops into cached ones and adds the caches as graph inputs.
5. merge_head_groups - a mixed layer's two cached ops and their concatenation become one op again.
6. fuse_projections - linears on one input become one (q/k/v, gate/up); the passes before it find
   attention through the separate q/k/v projections.
7. fuse_rope       - last: the cached ops take q/k before RoPE and rotate them themselves; it needs the final
   attention ops (merged) and finds the rotation right in front of them.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import fx

from .context import PassContext
from .find_attention import find_attention
from .fuse_projections import fuse_projections
from .fuse_rope import fuse_rope
from .kv_layout import kv_layout
from .merge_head_groups import merge_head_groups
from .reorder_heads import reorder_heads
from .split_attention import split_attention

Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]

PIPELINE: list[tuple[str, Pass]] = [
    ("find_attention", find_attention),
    ("reorder_heads", reorder_heads),
    ("split_attention", split_attention),
    ("kv_layout", kv_layout),
    ("merge_head_groups", merge_head_groups),
    ("fuse_projections", fuse_projections),
    ("fuse_rope", fuse_rope),
]


def run_passes(gm: fx.GraphModule, ctx: PassContext, until: str | None = None) -> fx.GraphModule:
    """Run the pipeline in order, stopping after the pass named ``until`` (all of them by default)."""
    names = [name for name, _ in PIPELINE]
    if until is not None and until not in names:
        raise ValueError(f"unknown pass {until!r}; passes are {names}")
    for name, fn in PIPELINE:
        gm = fn(gm, ctx)
        gm.graph.lint()
        if name == until:
            break
    gm.recompile()
    return gm
