"""Long decoding: thousands of steps past the streaming ring's wrap-around, and what happens at max_seq_len.

The engine decodes step by step; the oracle (``oracle_logits``) then runs ONE full forward over the finished
sequence, which gives the logits of every position at once. So every decode step is compared with the oracle
(checkpoints every step), at the cost of a single O(T^2) forward instead of T of them.

With ``recent_size=8`` the ring wraps around every 8 tokens: 2000 steps wrap it 250 times (the long profile,
``DUO_HYPOTHESIS_PROFILE=long``, decodes 6000). Caches start filled with a sentinel, so the tests also see that
nothing is written past the last position and that unwritten slots never change an output.
"""
from __future__ import annotations

import functools

import pytest
import torch

import duo_compile
from duo_compile.oracle import oracle_logits
from tests.reliability import relative_error, scale
from tests.tiny_models import tiny_model


SINK, RECENT = 4, 8
STEPS = scale(ci=2000, long=6000)
GATES = [[1.0, 0.0], [0.0, 0.0]]  # layer 0: one retrieval + one streaming head; layer 1: all streaming
SENTINEL = 1234.5


pytestmark = pytest.mark.usefixtures("one_capture_per_model")  # tests/shared_capture.py


@functools.lru_cache(maxsize=None)
def _model():
    return tiny_model("llama", gqa=True, num_layers=2)


def _masks():
    return duo_compile.HeadMasks.from_gates(GATES)


def _engine(mode: str, max_seq_len: int, chunk: int | None = None):
    return duo_compile.compile(_model(), _masks(), sink_size=SINK, recent_size=RECENT, max_seq_len=max_seq_len,
                               prefill_chunk_size=chunk, streaming_mode=mode, backend="eager")


def _fill_sentinel(engine, batch: int) -> None:
    engine.allocate(batch)
    for cache in engine.caches:
        cache.fill_(SENTINEL)


def _retrieval_caches(engine):
    return [c for spec, c in zip(engine.cache_specs, engine.caches) if spec.kind == "retrieval"]


def _assert_every_step_matches(scores: list[torch.Tensor], oracle: torch.Tensor, first: int) -> None:
    """scores[i] are the logits after position first + i; oracle is [B, T, V] over the whole sequence."""
    worst = max(relative_error(s, oracle[:, first + i]) for i, s in enumerate(scores))
    assert worst < 1e-4, f"worst relative score error over {len(scores)} steps: {worst:.2e}"


def test_greedy_decode_thousands_of_steps_window_mode_matches_oracle():
    """Window mode, greedy generate() to exactly max_seq_len: every step's scores and token equal the oracle's."""
    prompt_len, batch = 24, 2
    max_seq_len = prompt_len + STEPS  # the request fills the retrieval cache exactly
    engine = _engine("window", max_seq_len)
    _fill_sentinel(engine, batch)
    ids = torch.randint(0, 96, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    out = engine.generate(ids, max_new_tokens=STEPS, output_scores=True, return_dict_in_generate=True)
    seq = out.sequences
    assert seq.shape == (batch, max_seq_len) and len(out.scores) == STEPS

    # One oracle forward over every position whose logits the engine produced (the last token is never fed).
    oracle = oracle_logits(_model(), _masks(), seq[:, :-1], sink_size=SINK, recent_size=RECENT)
    _assert_every_step_matches(out.scores, oracle, prompt_len - 1)
    assert torch.equal(oracle[:, prompt_len - 1:].argmax(-1), seq[:, prompt_len:]), "greedy tokens differ"

    # Retrieval caches: every position but the last was written; the last slot still holds the sentinel.
    for cache in _retrieval_caches(engine):
        assert not bool((cache[:, :, : max_seq_len - 1] == SENTINEL).any())
        assert bool((cache[:, :, max_seq_len - 1:] == SENTINEL).all())


def test_forced_tokens_thousands_of_steps_chunk_mode_matches_oracle():
    """Chunk mode, chunked prefill then step() with random (forced) tokens: the ring sees fresh keys every step."""
    prompt_len, chunk, batch = 30, 7, 1
    total = prompt_len + STEPS
    max_seq_len = total + 50
    engine = _engine("chunk", max_seq_len, chunk)
    _fill_sentinel(engine, batch)
    seq = torch.randint(0, 96, (batch, total), generator=torch.Generator().manual_seed(2))
    logits = [engine.prefill(seq[:, :prompt_len], chunk)]
    for pos in range(prompt_len, total):
        logits.append(engine.step(seq[:, pos : pos + 1], pos))

    oracle = oracle_logits(_model(), _masks(), seq, sink_size=SINK, recent_size=RECENT, streaming_mode="chunk",
                           prefill_chunk_size=chunk, prompt_length=prompt_len)
    _assert_every_step_matches(logits, oracle, prompt_len - 1)

    # Nothing written past position total - 1: the rest of each retrieval cache is the untouched sentinel.
    for cache in _retrieval_caches(engine):
        assert not bool((cache[:, :, :total] == SENTINEL).any())
        assert bool((cache[:, :, total:] == SENTINEL).all())
    # Streaming caches: the sink slots hold positions 0..3 and the ring the last 8 positions: all written.
    for spec, cache in zip(engine.cache_specs, engine.caches):
        if spec.kind == "streaming":
            assert cache.shape[2] == SINK + RECENT and not bool((cache == SENTINEL).any())


# ------------------------------------------------------------------------------------------- max_seq_len
MAX_LEN = 64


@pytest.fixture(scope="module")
def small_engine():
    return _engine("window", MAX_LEN)


def _snapshot(engine):
    return engine.batch_size, [c.data_ptr() for c in engine.caches], [c.clone() for c in engine.caches]


def _assert_untouched(engine, snap) -> None:
    batch, ptrs, values = snap
    assert engine.batch_size == batch
    assert [c.data_ptr() for c in engine.caches] == ptrs, "caches were reallocated"
    assert all(torch.equal(c, v) for c, v in zip(engine.caches, values)), "caches were written"


def test_request_that_fits_exactly_runs_and_one_more_token_is_refused_before_any_work(small_engine):
    engine = small_engine
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    full = engine.generate(ids, max_new_tokens=MAX_LEN - 40)  # prompt + new == max_seq_len: allowed
    assert full.shape == (2, MAX_LEN)
    snap = _snapshot(engine)
    with pytest.raises(ValueError, match=r"prompt length 40 \+ max_new_tokens 25 = 65 exceeds max_seq_len=64"):
        engine.generate(ids, max_new_tokens=MAX_LEN - 40 + 1)
    _assert_untouched(engine, snap)
    # A too-long request with another batch size must not reallocate (or free) the caches either.
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        engine.generate(torch.randint(0, 96, (3, 70)), max_new_tokens=0)
    _assert_untouched(engine, snap)
    assert torch.equal(engine.generate(ids, max_new_tokens=MAX_LEN - 40), full)  # still works, same result


def test_step_at_max_seq_len_is_refused_and_writes_nothing(small_engine):
    engine = small_engine
    ids = torch.randint(0, 96, (1, MAX_LEN), generator=torch.Generator().manual_seed(4))
    engine.allocate(1)
    engine.prefill(ids[:, : MAX_LEN - 1], 16)
    engine.step(ids[:, MAX_LEN - 1 :], MAX_LEN - 1)  # the last slot: allowed
    snap = _snapshot(engine)
    for tokens, start in ((ids[:, :1], MAX_LEN), (ids[:, :2], MAX_LEN - 1), (ids[:, :1], 10 * MAX_LEN)):
        with pytest.raises(ValueError, match=rf"positions {start}\.\.{start + tokens.shape[1] - 1} exceed "
                                             rf"the allocated cache length {MAX_LEN}"):
            engine.step(tokens, start)
        _assert_untouched(engine, snap)
    with pytest.raises(ValueError, match="start must be an integer >= 0, got -1"):
        engine.step(ids[:, :1], -1)
    _assert_untouched(engine, snap)


def test_prefill_longer_than_max_seq_len_is_refused_before_the_first_chunk(small_engine):
    engine = small_engine
    engine.allocate(1)
    snap = _snapshot(engine)
    with pytest.raises(ValueError, match=r"\[batch, 1\.\.64\] \(the cache length\), got shape \(1, 70\)"):
        engine.prefill(torch.randint(0, 96, (1, 70)), 16)
    _assert_untouched(engine, snap)
