"""Which rank holds which KV heads under tensor parallelism, so that retrieval heads are spread evenly.

Tensor parallelism splits every layer's KV heads (each with its GQA group of query heads) into ``size`` equal
blocks, one per rank. Under DuoAttention a retrieval head keeps and reads its whole KV cache while a streaming head
reads only ``sink + recent`` tokens, so a rank's attention time and KV memory grow with its retrieval heads. The
ranks meet at an all-reduce after every layer's attention, so each layer runs at the pace of its rank with the
most retrieval heads: per layer, that maximum is what placement minimises.

``natural_placement``: the blocks in the model's head order (what splitting the projections in order gives).
``balanced_placement``: per layer, every rank gets ``floor(r / size)`` or ``ceil(r / size)`` of the layer's ``r``
retrieval heads (the least any placement can give the fullest rank); the ``r mod size`` ranks that get one more
are those with the fewest retrieval heads over the layers so far, so the KV memory per rank over the whole model
stays even too. Within a rank the heads are listed retrieval first (each in the model's order), the layout the
passes expect of a layer.

Pure functions of the binary masks: every rank computes the same placement without communicating.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Imbalance", "balanced_placement", "imbalance", "natural_placement", "rank_counts"]

# Per layer, per rank, the model's indices of the rank's KV heads (retrieval first).
Placement = list[list[list[int]]]


def _check(retrieval: np.ndarray, size: int) -> np.ndarray:
    retrieval = np.asarray(retrieval)
    if retrieval.ndim != 2 or retrieval.dtype != bool:
        raise ValueError(f"retrieval must be a bool array [num_layers, num_kv_heads], got {retrieval.dtype} "
                         f"{retrieval.shape}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"the number of ranks must be an integer >= 1, got {size!r}")
    if retrieval.shape[1] % size:
        raise ValueError(f"{retrieval.shape[1]} KV heads per layer cannot be split evenly over {size} ranks")
    return retrieval


def _retrieval_first(heads: list[int], is_retrieval: np.ndarray) -> list[int]:
    return [h for h in heads if is_retrieval[h]] + [h for h in heads if not is_retrieval[h]]


def natural_placement(retrieval: np.ndarray, size: int) -> Placement:
    """Rank ``i`` holds KV heads ``[i * H / size, (i + 1) * H / size)`` of every layer (retrieval first)."""
    retrieval = _check(retrieval, size)
    per_rank = retrieval.shape[1] // size
    return [[_retrieval_first(list(range(i * per_rank, (i + 1) * per_rank)), row) for i in range(size)]
            for row in retrieval]


def balanced_placement(retrieval: np.ndarray, size: int) -> Placement:
    """Every rank the same number of heads and, per layer, of retrieval heads as near equal as the count allows
    (``max - min <= 1``), the extra ones going to the ranks with the fewest retrieval heads so far (lowest rank
    first among equals). Heads keep the model's order within their kind, so a layer whose natural blocks are
    already balanced may still move heads: only the counts matter."""
    retrieval = _check(retrieval, size)
    per_rank = retrieval.shape[1] // size
    totals = [0] * size  # retrieval heads per rank over the layers placed so far
    placement = []
    for row in retrieval:
        heads_r = [h for h in range(len(row)) if row[h]]
        heads_s = [h for h in range(len(row)) if not row[h]]
        base, extra = divmod(len(heads_r), size)
        favoured = set(sorted(range(size), key=lambda i: (totals[i], i))[:extra])
        counts = [base + (i in favoured) for i in range(size)]
        layer, r_next, s_next = [], 0, 0
        for i in range(size):
            mine = heads_r[r_next: r_next + counts[i]] + heads_s[s_next: s_next + per_rank - counts[i]]
            r_next, s_next = r_next + counts[i], s_next + per_rank - counts[i]
            totals[i] += counts[i]
            layer.append(mine)
        placement.append(layer)
    return placement


def rank_counts(retrieval: np.ndarray, placement: Placement) -> np.ndarray:
    """Retrieval KV heads per layer per rank, int ``[num_layers, size]``."""
    retrieval = np.asarray(retrieval, dtype=bool)
    return np.array([[int(retrieval[layer, heads].sum()) for heads in ranks]
                     for layer, ranks in enumerate(placement)])


@dataclass(frozen=True)
class Imbalance:
    """How uneven a placement's retrieval heads are, as max over ranks / mean over ranks (1.0 = even).

    ``per_layer``: per layer, the fullest rank's retrieval KV heads over the mean (1.0 for a layer without any).
    ``step``: summed over layers, the fullest rank's count over the mean: the retrieval KV the slowest rank reads
    per decode step (ranks wait for each other at every layer) relative to an even split.
    ``memory``: the rank holding the most retrieval KV over the whole model, over the mean.
    """

    per_layer: list[float]
    step: float
    memory: float


def imbalance(retrieval: np.ndarray, placement: Placement) -> Imbalance:
    counts = rank_counts(retrieval, placement)
    mean = counts.mean(axis=1)
    per_layer = [float(m / a) if a > 0 else 1.0 for m, a in zip(counts.max(axis=1), mean)]
    total = mean.sum()
    step = float(counts.max(axis=1).sum() / total) if total > 0 else 1.0
    memory = float(counts.sum(axis=0).max() / total) if total > 0 else 1.0
    return Imbalance(per_layer, step, memory)
