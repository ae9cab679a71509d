"""Determinism and isolation on CPU.

- The same inputs give bitwise-identical sequences and scores: call after call, engine after engine (compiled
  again from the same model and masks), process after process, and with the inductor backend.
- Engines are independent: two engines in one process (different masks, modes and batch sizes) interleaved call
  by call, or step by step, give bitwise what each gives alone; their caches share no memory. An engine reused
  for a shorter prompt or another batch size carries nothing over from the previous call.
- compile() leaves the user's model as it was (weights, attention implementation, train/eval mode).

Bitwise claims are for one machine and a fixed torch thread count (tests/conftest.py pins it to 1).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import duo_compile
from tests.shared_capture import compile_reuses_captures
from tests.tiny_models import mixed_gates, tiny_model


SINK, RECENT, MAX_LEN, PROMPT, NEW = 4, 8, 96, 30, 24
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def _model():
    return tiny_model("qwen2", gqa=True)


MASKS_A = duo_compile.HeadMasks.from_gates(mixed_gates(3, 2))
MASKS_B = duo_compile.HeadMasks.from_gates(np.array([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))


def _compile(masks, mode="window", backend="eager", chunk=None, fresh_capture=False):
    """An engine of ``_model()``, its graph copied from the model's one capture (tests/shared_capture.py) unless
    ``fresh_capture``: engine A2 is compiled again from the start, capture included."""
    with contextlib.nullcontext() if fresh_capture else compile_reuses_captures():
        return duo_compile.compile(_model(), masks, sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                                   prefill_chunk_size=chunk, streaming_mode=mode, backend=backend)


@functools.lru_cache(maxsize=None)
def _engine_a():
    return _compile(MASKS_A, "window", chunk=7)


@functools.lru_cache(maxsize=None)
def _engine_a2():
    """A second, separate compile of engine A's configuration."""
    return _compile(MASKS_A, "window", chunk=7, fresh_capture=True)


@functools.lru_cache(maxsize=None)
def _engine_b():
    return _compile(MASKS_B, "chunk", chunk=11)


def _ids(batch: int, length: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _run(engine, ids, new=NEW):
    out = engine.generate(ids, max_new_tokens=new, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


def _digest(sequences: torch.Tensor, scores: torch.Tensor) -> str:
    return hashlib.sha256(sequences.numpy().tobytes() + scores.numpy().tobytes()).hexdigest()


def _assert_bitwise(got, want) -> None:
    assert torch.equal(got[0], want[0]), "sequences differ"
    assert torch.equal(got[1], want[1]), "scores differ (not bitwise identical)"


# ------------------------------------------------------------------------------------------ run to run
def test_same_inputs_bitwise_identical_call_to_call_and_engine_to_engine():
    ids = _ids(2)
    first = _run(_engine_a(), ids)
    _assert_bitwise(_run(_engine_a(), ids), first)
    _assert_bitwise(_run(_engine_a(), ids.clone()), first)
    _assert_bitwise(_run(_engine_a2(), ids), first)  # a second compile of the same model, masks and config


_SUBPROCESS = textwrap.dedent(
    """
    import hashlib, torch, duo_compile
    from tests.tiny_models import tiny_model, mixed_gates
    torch.set_num_threads(1)
    model = tiny_model("qwen2", gqa=True)
    engine = duo_compile.compile(model, duo_compile.HeadMasks.from_gates(mixed_gates(3, 2)), sink_size={SINK},
                                 recent_size={RECENT}, max_seq_len={MAX_LEN}, prefill_chunk_size=7, backend="eager")
    ids = torch.randint(0, 96, (2, {PROMPT}), generator=torch.Generator().manual_seed(0))
    out = engine.generate(ids, max_new_tokens={NEW}, output_scores=True, return_dict_in_generate=True)
    blob = out.sequences.numpy().tobytes() + torch.stack(out.scores).numpy().tobytes()
    print("DIGEST", hashlib.sha256(blob).hexdigest())
    """
).format(SINK=SINK, RECENT=RECENT, MAX_LEN=MAX_LEN, PROMPT=PROMPT, NEW=NEW)


@pytest.fixture(scope="module", autouse=True)
def fresh_process():
    """The fresh process of ``test_same_inputs_bitwise_identical_process_to_process``, started with this module's
    first test so that its start-up and compile run beside this process's own (on another core)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _SUBPROCESS], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_same_inputs_bitwise_identical_process_to_process(fresh_process):
    """A fresh Python process (new model build, new compile) produces the very same bytes."""
    want = _digest(*_run(_engine_a(), _ids(2)))
    stdout, stderr = fresh_process.communicate(timeout=300)
    assert fresh_process.returncode == 0, stderr[-3000:]
    got = [line.split()[1] for line in stdout.splitlines() if line.startswith("DIGEST")]
    assert got == [want]


def test_inductor_backend_is_bitwise_deterministic_and_matches_eager():
    """The one inductor compile of this file: prefill in 1-token chunks, so every call has T == 1 (one graph)."""
    engine = _compile(MASKS_A, "window", backend="inductor", chunk=1)
    ids = _ids(2, length=6, seed=5)
    first = _run(engine, ids, new=12)
    _assert_bitwise(_run(engine, ids, new=12), first)
    eager = _run(_engine_a(), ids, new=12)
    assert torch.equal(first[0], eager[0])
    assert ((first[1] - eager[1]).abs().max() / eager[1].abs().max()).item() < 1e-4


# ------------------------------------------------------------------------------------------- isolation
def test_two_engines_interleaved_generate_calls_do_not_corrupt_each_other():
    a, b = _engine_a(), _engine_b()
    ids_a, ids_b = _ids(2, seed=1), _ids(3, length=41, seed=2)
    alone_a = _run(a, ids_a)
    alone_b = _run(b, ids_b)
    tensors_a, tensors_b = [c.data_ptr() for c in a.caches], [c.data_ptr() for c in b.caches]
    for _ in range(2):
        _assert_bitwise(_run(a, ids_a), alone_a)
        _assert_bitwise(_run(b, ids_b), alone_b)
    # Static caches: allocated once per batch size, reused by every later call.
    assert [c.data_ptr() for c in a.caches] == tensors_a and [c.data_ptr() for c in b.caches] == tensors_b
    # Caches: one set per engine, no shared storage.
    ptrs_a = {c.untyped_storage().data_ptr() for c in a.caches}
    ptrs_b = {c.untyped_storage().data_ptr() for c in b.caches}
    assert len(ptrs_a) == len(a.caches) and len(ptrs_b) == len(b.caches) and not ptrs_a & ptrs_b


def test_two_engines_interleaved_step_by_step_do_not_corrupt_each_other():
    """Interleave at the finest grain: allocate, prefill and each decode step alternate between the engines."""
    a, b = _engine_a(), _engine_b()
    ids_a, ids_b = _ids(2, seed=3), _ids(3, length=41, seed=4)
    alone_a, alone_b = _run(a, ids_a), _run(b, ids_b)

    runs = [(a, ids_a, 7, []), (b, ids_b, 11, [])]
    for engine, ids, _, _ in runs:
        engine.allocate(ids.shape[0])
    for engine, ids, chunk, scores in runs:
        scores.append(engine.prefill(ids, chunk).float())
    seqs = [ids for _, ids, _, _ in runs]
    for _ in range(NEW - 1):
        for i, (engine, _, _, scores) in enumerate(runs):
            token = scores[-1].argmax(-1)[:, None]
            seqs[i] = torch.cat([seqs[i], token], dim=1)
            scores.append(engine.step(token, seqs[i].shape[1] - 1).float())
    for i, (_, _, _, scores) in enumerate(runs):
        seqs[i] = torch.cat([seqs[i], scores[-1].argmax(-1)[:, None]], dim=1)
    _assert_bitwise((seqs[0], torch.stack(runs[0][3])), alone_a)
    _assert_bitwise((seqs[1], torch.stack(runs[1][3])), alone_b)


def test_two_engines_with_the_same_config_are_independent():
    a, b = _engine_a(), _engine_a2()
    ids_1, ids_2 = _ids(2, seed=6), _ids(2, seed=7)
    alone_1, alone_2 = _run(a, ids_1), _run(a, ids_2)
    _assert_bitwise(_run(b, ids_2), alone_2)
    _assert_bitwise(_run(a, ids_1), alone_1)  # b's run did not touch a's caches
    assert not {c.data_ptr() for c in a.caches} & {c.data_ptr() for c in b.caches}


def test_reused_engine_carries_nothing_over_between_calls():
    """A long run, then a short prompt (stale keys beyond it in every cache), then another batch size."""
    engine, fresh = _engine_b(), _compile(MASKS_B, "chunk", chunk=11)
    long_ids, short_ids, other_batch = _ids(3, length=60, seed=8), _ids(3, length=5, seed=9), _ids(1, seed=10)
    want_short, want_other = _run(fresh, short_ids, new=30), _run(fresh, other_batch)
    _run(engine, long_ids, new=30)
    _assert_bitwise(_run(engine, short_ids, new=30), want_short)
    _assert_bitwise(_run(engine, other_batch), want_other)
    _assert_bitwise(_run(engine, short_ids, new=30), want_short)


def test_compile_leaves_the_model_unchanged():
    model = tiny_model("llama", gqa=False, seed=3)
    model.config._attn_implementation = "eager"
    model.train()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    engine = duo_compile.compile(model, duo_compile.HeadMasks.from_gates(mixed_gates(3, 4)), sink_size=SINK,
                                 recent_size=RECENT, max_seq_len=MAX_LEN, backend="eager")
    engine.generate(_ids(1), max_new_tokens=3)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "compile changed the model's weights"
    assert model.training and model.config._attn_implementation == "eager"
