"""State the passes share: what was found, the retrieval/streaming split, and what each pass changed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import fx


@dataclass
class AttentionSite:
    """One attention node and the graph values around it (found by ``find_attention``).

    ``q`` is ``[B, num_heads, T, head_dim]`` after RoPE; ``k``/``v`` are the per-KV-head tensors
    ``[B, num_kv_heads, T, head_dim]`` (looked through repeat_kv); the ``*_proj`` nodes are the linear layers
    that produce them and consume the attention output (one node for q, k and v when the model projects them
    with one linear layer, ``segments`` then saying which columns are which).
    """

    layer: int
    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_proj: fx.Node
    k_proj: fx.Node
    v_proj: fx.Node
    o_proj: fx.Node
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    # Sliding window of this layer's mask (keys a query sees, itself included), 0 for causal attention.
    window: int = 0
    # Per value ("q", "k", "v"): parameters between its projection and SDPA that hold one block per head (a norm
    # over the whole projection), permuted with the heads by reorder_heads.
    head_params: dict = field(default_factory=dict)
    # Per value, its (start, end) columns of a projection shared by q, k and v (Phi-3's qkv_proj), else None.
    segments: dict | None = None

    @property
    def groups(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class CacheSpec:
    """One cache tensor the rewritten graph takes as input: ``[batch, num_kv_heads, slots, head_dim]``.

    ``slots`` is None for retrieval caches (sized by the runtime's ``max_seq_len``) and ``sink + recent`` for
    streaming caches; ``window`` is the layer's sliding window for a window layer's cache (a ring of ``window``
    slots, no sink: ``slots == window``), else 0.
    """

    name: str
    layer: int
    kind: str  # "retrieval" or "streaming"
    tensor: str  # "k" or "v"
    num_kv_heads: int
    head_dim: int
    slots: int | None
    window: int = 0


class Skipped(int):
    """The count recorded for a pass its switch turned off (``SKIPPED``, the one instance): it prints as
    ``skipped``, and ``count is SKIPPED`` tells it from a pass that ran and matched nothing, yet it equals 0, so
    code that adds counts up, compares them with 0 or stores them as integers keeps working."""

    def __new__(cls) -> Skipped:
        return super().__new__(cls, 0)

    def __repr__(self) -> str:
        return "skipped"

    __str__ = __repr__

    def __reduce__(self) -> str:
        return "SKIPPED"  # copies and pickles are the module's instance


SKIPPED = Skipped()


@dataclass
class PassContext:
    """Inputs of the pipeline (binary retrieval mask per layer/KV head, window sizes, mode) and its records."""

    retrieval: np.ndarray  # bool [num_layers, num_kv_heads], in the model's original head order
    sink_size: int
    recent_size: int
    streaming_mode: str = "window"  # or "chunk"
    expected_layers: int | None = None
    # The engine's longest sequence: a mask's window at least this long is causal attention for the engine.
    max_seq_len: int | None = None
    # Per layer, the sliding window the model's config declares (0: full attention; empty: none), which the
    # masks found in the graph must match (models.hf.ModelInfo.layer_windows).
    declared_windows: tuple = ()
    # Switches of the optional passes (see pipeline.OPTIONAL); a pass switched off is recorded as SKIPPED.
    # Pass 3 (tensor_parallel): this rank's share under tensor parallelism (parallel.group.TensorParallel), or None.
    tensor_parallel: Any = None
    fuse_projections: bool = True  # pass 7 (costs a second copy of q/k/v and gate/up while the model lives)
    fuse_rope: bool = True  # pass 8
    # Paged retrieval caches (pools of pages of this many positions, read through a block table), or None.
    page_size: int | None = None
    sites: list[AttentionSite] = field(default_factory=list)
    # After reorder_heads: per layer, the KV heads [0, n) are retrieval and [n, num_kv_heads) streaming.
    retrieval_counts: list[int] = field(default_factory=list)
    # Per layer, the original index of each KV head in its new position.
    head_order: list[list[int]] = field(default_factory=list)
    cache_specs: list[CacheSpec] = field(default_factory=list)
    # Per pass, how many things it changed (its unit: sites, layers, groups...), or SKIPPED.
    changed: dict[str, int] = field(default_factory=dict)

    def record(self, pass_name: str, count: int) -> None:
        self.changed[pass_name] = count
