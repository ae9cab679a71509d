"""Tensor parallelism (#21): the head placement on its own, then two ranks on gloo against one process.

The two-rank cases all run in one launch of ``tests/tp_worker.py`` per rank (process start and imports cost more
than the cases); the test starts them with torchrun's environment on a free port of 127.0.0.1, bounded in time,
and asserts on what each rank wrote.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import duo_compile
from duo_compile.masks import PATTERNS_DIR, HeadMasks
from duo_compile.parallel.placement import (
    balanced_placement,
    imbalance,
    natural_placement,
    rank_counts,
)
from tests.tiny_models import mixed_gates, tiny_model
from tests.tp_worker import ENGINES

RANKS = 2
LAUNCH_TIMEOUT_S = 400  # both ranks together; they take well under a minute on two idle cores
REQUESTS = ("greedy", "chunked_prefill", "left_padded", "sampling")


# ---------------------------------------------------------------------------------------------- placement
def _check_valid(retrieval: np.ndarray, placement, size: int) -> None:
    per_rank = retrieval.shape[1] // size
    for layer, ranks in enumerate(placement):
        assert sorted(h for heads in ranks for h in heads) == list(range(retrieval.shape[1]))
        for heads in ranks:
            assert len(heads) == per_rank
            kinds = [bool(retrieval[layer, h]) for h in heads]
            assert kinds == sorted(kinds, reverse=True)  # retrieval first


@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("pattern", sorted(p.name for p in PATTERNS_DIR.iterdir() if p.is_dir()))
def test_balanced_placement_spreads_retrieval_heads_evenly_on_the_authors_patterns(pattern, size):
    """Same number of heads per rank; per layer the retrieval counts differ by at most one; over the model every
    rank holds the same retrieval KV (to within one head); never worse than the natural split."""
    retrieval = HeadMasks.from_tsv(PATTERNS_DIR / pattern / "full_attention_heads.tsv").binarize(sparsity=0.5).retrieval
    placement = balanced_placement(retrieval, size)
    _check_valid(retrieval, placement, size)
    _check_valid(retrieval, natural_placement(retrieval, size), size)
    counts = rank_counts(retrieval, placement)
    assert (counts.max(axis=1) - counts.min(axis=1)).max() <= 1
    assert counts.sum(axis=0).max() - counts.sum(axis=0).min() <= 1
    balanced, natural = imbalance(retrieval, placement), imbalance(retrieval, natural_placement(retrieval, size))
    assert balanced.step <= natural.step and balanced.memory <= natural.memory
    assert all(b <= n for b, n in zip(balanced.per_layer, natural.per_layer))


def test_balanced_placement_fixes_a_layer_the_natural_split_leaves_uneven():
    retrieval = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 1, 0]], dtype=bool)
    assert rank_counts(retrieval, natural_placement(retrieval, 2)).tolist() == [[4, 0], [2, 2]]
    placement = balanced_placement(retrieval, 2)
    assert rank_counts(retrieval, placement).tolist() == [[2, 2], [2, 2]]
    assert placement[0] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert imbalance(retrieval, natural_placement(retrieval, 2)).per_layer == [2.0, 1.0]
    assert imbalance(retrieval, placement).step == 1.0


def test_balanced_placement_gives_the_extra_retrieval_head_to_the_rank_with_fewest_so_far():
    """Three retrieval heads over two ranks in every layer: the rank with one more alternates, so the KV memory of
    the two ranks over the model is equal although every layer is uneven."""
    retrieval = np.array([[1, 1, 1, 0]] * 4, dtype=bool)
    counts = rank_counts(retrieval, balanced_placement(retrieval, 2))
    assert counts.tolist() == [[2, 1], [1, 2], [2, 1], [1, 2]]
    result = imbalance(retrieval, balanced_placement(retrieval, 2))
    assert result.memory == 1.0 and result.step == pytest.approx(4 / 3)


def test_placement_refuses_heads_that_do_not_split_evenly():
    with pytest.raises(ValueError, match="3 KV heads per layer cannot be split evenly over 2 ranks"):
        balanced_placement(np.ones((2, 3), dtype=bool), 2)


def test_tensor_parallel_without_a_process_group_is_refused_before_any_work():
    model = tiny_model("llama", gqa=True)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs an initialised default process group"):
        duo_compile.compile(model, mixed_gates(3, 2), tensor_parallel_size=2, backend="eager")
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1, got 0"):
        duo_compile.compile(model, mixed_gates(3, 2), tensor_parallel_size=0, backend="eager")


# ------------------------------------------------------------------------------------------- two ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Start ``tests/tp_worker.py`` as ranks 0 and 1 (gloo), wait for both (bounded), return their results."""
    out = str(tmp_path_factory.mktemp("tp") / "result")
    env = dict(os.environ, WORLD_SIZE=str(RANKS), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.tp_worker", out], env=dict(env, RANK=str(r),
                              LOCAL_RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(RANKS)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    finally:
        for proc in procs:
            proc.kill()
    results = []
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{logs[rank][-3000:]}"
        with open(f"{out}.{rank}.json") as f:
            results.append(json.load(f))
        assert "crash" not in results[-1], results[-1]["crash"]
    return results


@pytest.mark.parametrize("request_name", REQUESTS)
@pytest.mark.parametrize("engine", [e[0] for e in ENGINES])
def test_sharded_engine_gives_the_single_process_tokens_and_scores_on_every_rank(ranks, engine, request_name):
    """Greedy and sampled (one seed: rank 0's), batch 2, whole and chunked prefill, a left-padded batch; rank 1
    passes no input_ids for the greedy request (rank 0's are used)."""
    for rank, result in enumerate(ranks):
        case = result[f"{engine}/{request_name}"]
        assert case["tokens_equal"] and case["ranks_agree"], (rank, case)
        assert case["max_score_diff"] <= 1e-5, (rank, case)


@pytest.mark.parametrize("engine", [e[0] for e in ENGINES])
def test_each_rank_holds_its_heads_caches_with_retrieval_heads_balanced(ranks, engine):
    """Summed over the ranks, each layer's retrieval and streaming caches hold the single engine's heads (each
    head on one rank); per layer the ranks' retrieval heads differ by at most one."""
    cases = [result[f"{engine}/placement"] for result in ranks]
    summed = {}
    for case in cases:
        for key, heads in case["cache_heads"].items():
            summed[key] = summed.get(key, 0) + heads
        assert all(max(layer) - min(layer) <= 1 for layer in case["balanced"])
    assert summed == cases[0]["single_cache_heads"]
    if engine.startswith("llama_mha"):  # its mixed layer's retrieval heads are the first two: natural is uneven
        assert ranks[0][f"{engine}/placement"]["natural"][1] == [2, 0]
        assert ranks[0][f"{engine}/placement"]["balanced"][1] == [1, 1]


def test_process_group_errors(ranks):
    """A process group of another size; a rank given another model or other masks (every rank raises, before any
    capture); KV heads that do not split over the ranks; exporting one rank's share."""
    for rank, result in enumerate(ranks):
        assert result["export_refused"].startswith(f"this engine is rank {rank}'s share of a tensor-parallel engine")
        errors = result["errors"]
        assert errors["wrong_size"] == "tensor_parallel_size=4 but the default process group has 2 ranks; they must be equal"
        assert "differing from rank 0: rank 1: model)" in errors["models_differ"]
        assert "differing from rank 0: rank 1: masks)" in errors["masks_differ"]
        assert errors["kv_heads_indivisible"] == "tensor_parallel_size=2 does not divide the model's num_key_value_heads=3"
