"""Padded batches: ``generate(input_ids, attention_mask=...)`` with rows of different lengths (left or right padding)
runs every row as if it were alone (tiny random models, CPU, fp32).

Rows of 5, 12 and 30 tokens against sink 4 + recent 8: shorter than, equal to and longer than the streaming
window, so the ring wraps in one row while another is still filling its sink. Each row's new tokens are compared
with the eager oracle on that row alone (and with the engine on that row alone), for every family, MHA and GQA,
both streaming modes, whole and chunked prefill (chunks of 7: rows end in different chunks), left and right
padding. The returned sequences keep Hugging Face's layout: the input rows as given, then the new tokens.
"""
from __future__ import annotations

import pytest
import torch

import duo_compile
from duo_compile.oracle import oracle_generate
from duo_compile.runtime import padding
from tests.tiny_models import (
    cached_engine,
    cached_tiny_model,
    mixed_masks,
)

SINK, RECENT, NEW, CHUNK = 4, 8, 8, 7
MAX_LEN = 128  # test_compile.py's: the engines of cached_engine are compiled once for both files
LENGTHS = (5, 12, 30)  # < sink + recent, = sink + recent, > sink + recent


pytestmark = pytest.mark.usefixtures("one_capture_per_model")  # tests/shared_capture.py

_model = cached_tiny_model
_masks = mixed_masks


def _engine(arch, gqa, mode, backend="eager"):
    return cached_engine(arch, gqa, mode, backend, SINK, RECENT, MAX_LEN)


def _rows(seed=0, lengths=LENGTHS, vocab=96):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen) for n in lengths]


def _padded(rows, side: str, width: int | None = None, pad_id: int = 0):
    """(ids, mask) of the rows padded to ``width`` (default: the longest) on ``side``, as a tokenizer pads them."""
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, cols], mask[b, cols] = row, 1
    return ids, mask


def _check_rows(engine, model, rows, side, chunk, mode, alone=True):
    ids, mask = _padded(rows, side)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, prefill_chunk_size=chunk,
                          output_scores=True, return_dict_in_generate=True)
    width = ids.shape[1]
    assert out.sequences.shape == (len(rows), width + NEW)
    assert torch.equal(out.sequences[:, :width], ids)  # Hugging Face's layout: the input as given, then new tokens
    for b, row in enumerate(rows):
        tokens, scores = oracle_generate(model, _masks(model), row[None], NEW, sink_size=SINK, recent_size=RECENT,
                                         streaming_mode=mode, prefill_chunk_size=chunk)
        assert torch.equal(out.sequences[b, width:], tokens[0, len(row):]), f"row {b} ({len(row)} tokens, {side})"
        for step, (got, want) in enumerate(zip(out.scores, scores)):
            rel = ((got[b] - want[0]).abs().max() / want[0].abs().max()).item()
            assert rel < 1e-4, f"row {b} step {step}: relative score error {rel:.2e}"
        if alone:
            single = engine.generate(row[None], max_new_tokens=NEW, prefill_chunk_size=chunk)
            assert torch.equal(out.sequences[b, width:], single[0, len(row):])


FAMILIES = [(a, g) for a in ("llama", "mistral", "qwen2") for g in (True, False)]


@pytest.mark.parametrize("mode", ["window", "chunk"])
@pytest.mark.parametrize("arch,gqa", FAMILIES, ids=[f"{a}-{'gqa' if g else 'mha'}" for a, g in FAMILIES])
def test_padded_rows_equal_each_row_alone(arch, gqa, mode):
    """Eager backend: left and right padding, whole and chunked prefill; each row against the oracle on that row
    alone (tokens identical, scores within 1e-4) and against the engine on that row alone."""
    model, engine = _model(arch, gqa), _engine(arch, gqa, mode)
    rows = _rows(seed=len(arch) + gqa)
    for side in ("left", "right"):
        for chunk in (None, CHUNK):
            _check_rows(engine, model, rows, side, chunk, mode)


@pytest.mark.parametrize("arch,gqa,mode,side,chunk", [("llama", True, "window", "left", CHUNK),
                                                      ("qwen2", False, "chunk", "right", None)],
                         ids=["llama-gqa-window-left-chunked", "qwen2-mha-chunk-right-whole"])
def test_padded_rows_on_the_inductor_backend(arch, gqa, mode, side, chunk):
    _check_rows(_engine(arch, gqa, mode, "inductor"), _model(arch, gqa), _rows(seed=3), side, chunk, mode,
                alone=False)


def test_all_retrieval_left_padding_is_token_identical_to_hf_generate():
    """Every head retrieval: the engine equals the model's own generate on the same left-padded batch and mask."""
    model = _model("llama", True)
    engine = duo_compile.compile(model, duo_compile.HeadMasks.all_retrieval(3, 2), max_seq_len=MAX_LEN,
                                 backend="eager", prefill_chunk_size=CHUNK)
    ids, mask = _padded(_rows(seed=5), "left")
    eos = model.generation_config.eos_token_id
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    got = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)


def test_all_retrieval_left_padding_samples_like_hf_generate_with_the_same_seed():
    """Through generation.py: sampling with processors and warpers (which see the sequences with their padding, as
    in Hugging Face) on a left-padded batch gives model.generate's tokens and scores under the same seed."""
    model = _model("llama", True)
    engine = duo_compile.compile(model, duo_compile.HeadMasks.all_retrieval(3, 2), max_seq_len=MAX_LEN,
                                 backend="eager", prefill_chunk_size=CHUNK)
    ids, mask = _padded(_rows(seed=5), "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                  repetition_penalty=1.3, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(3)
    want = model.generate(ids, **kwargs)
    torch.manual_seed(3)
    got = engine.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for mine, theirs in zip(got.scores, want.scores, strict=True):
        finite = torch.isfinite(theirs)
        assert torch.equal(torch.isfinite(mine), finite)
        torch.testing.assert_close(mine[finite], theirs[finite], atol=1e-4, rtol=1e-4)


def test_a_streamer_with_a_padded_batch_is_held_to_batch_size_one_like_hf():
    """Hugging Face's streamers take one row; a padded batch of one row streams its new tokens."""
    from transformers import TextStreamer

    engine = _engine("llama", True, "window")
    ids, mask = _padded(_rows(seed=5), "left")

    class Tok:
        def decode(self, tokens, **kwargs):
            return " ".join(str(t) for t in tokens)

    with pytest.raises(ValueError, match="only supports batch size 1"):
        engine.generate(ids, attention_mask=mask, max_new_tokens=2, streamer=TextStreamer(Tok()))
    seen = []

    class Collect:
        def put(self, value):
            seen.append(value.clone())

        def end(self):
            seen.append(None)

    row = 1  # a row with padding on the left
    out = engine.generate(ids[row:row + 1], attention_mask=mask[row:row + 1], max_new_tokens=3, streamer=Collect())
    assert torch.equal(seen[0], ids[row:row + 1]) and seen[-1] is None
    assert torch.equal(torch.cat([t.reshape(-1) for t in seen[1:-1]]), out[0, ids.shape[1]:])
    alone = engine.generate(ids[row:row + 1][mask[row:row + 1].bool()][None], max_new_tokens=3)
    assert torch.equal(out[0, ids.shape[1]:], alone[0, -3:])


def test_every_row_padded_equals_the_unpadded_batch():
    """Rows of equal length with a padding column they all share: the same tokens as without it."""
    engine = _engine("llama", True, "window")
    rows = _rows(seed=7, lengths=(20, 20))
    ids, mask = _padded(rows, "left", width=23)
    plain = engine.generate(torch.stack(rows), max_new_tokens=NEW)
    padded = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(padded[:, 23:], plain[:, 20:]) and torch.equal(padded[:, :23], ids)


def test_eos_stops_each_padded_row_on_its_own():
    model, engine = _model("llama", True), _engine("llama", True, "window")
    rows = _rows(seed=11)
    ids, mask = _padded(rows, "left")
    free = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    eos = int(free[1, ids.shape[1] + 2])  # row 1 produces this token at step 2
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=95)
    for b, row in enumerate(rows):
        tokens, _ = oracle_generate(model, _masks(model), row[None], NEW, sink_size=SINK, recent_size=RECENT,
                                    eos_token_id=eos, pad_token_id=95)
        new = tokens[0, len(row):]
        got = out[b, ids.shape[1]:]
        assert torch.equal(got[: len(new)], new)  # the oracle stops when its one row is done
        assert bool((got[len(new):] == 95).all())


def test_an_idle_row_is_neither_computed_into_nor_cached():
    """Engine.step with per-row starts and valid (what a continuous-batching server drives): a row with valid 0
    keeps its caches as they were, and the other rows get the same logits as when every row runs."""
    engine = _engine("llama", True, "window")
    rows = _rows(seed=13)
    ids, mask = _padded(rows, "right")
    lengths = mask.sum(1)
    engine.allocate(3)
    engine.prefill(ids, CHUNK, lengths)
    before = [c.clone() for c in engine.caches]
    tokens = torch.tensor([[3], [4], [5]])
    all_rows = engine.step(tokens, lengths)
    after_all = [c.clone() for c in engine.caches]
    for cache, saved in zip(engine.caches, before):
        cache.copy_(saved)
    idle = engine.step(tokens, lengths, valid=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(idle[[0, 2]], all_rows[[0, 2]], rtol=0, atol=0)
    for cache, saved, full in zip(engine.caches, before, after_all):
        assert torch.equal(cache[1], saved[1])  # the idle row wrote nothing
        assert torch.equal(cache[[0, 2]], full[[0, 2]])


# ------------------------------------------------------------------------------------------- refused masks
def _mask(*rows):
    return torch.tensor(rows)


REFUSED = {
    "hole": (_mask([1, 1, 0, 1, 1], [1, 1, 1, 1, 1]), r"attention_mask row 0 is not left or right padding \(11011\)"),
    "both-sides": (_mask([1, 1, 1, 1, 1], [0, 1, 1, 1, 0]), r"row 1 is not left or right padding \(01110\)"),
    "empty-row": (_mask([1, 1, 1, 1, 1], [0, 0, 0, 0, 0]), r"attention_mask row 1 has no real token \(all zeros\)"),
    "not-binary": (_mask([1, 1, 1, 1, 2], [1, 1, 1, 1, 1]), r"attention_mask must hold only 0 \(padding\) and 1"),
    "shape": (_mask([1, 1, 1, 1], [1, 1, 1, 1]), r"attention_mask must match input_ids \(2, 5\), got \(2, 4\)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_masks_that_are_not_left_or_right_padding_are_refused_before_any_cache_write(case):
    mask, message = REFUSED[case]
    engine = _engine("llama", True, "window")
    engine.allocate(2)
    before = [c.clone() for c in engine.caches]
    with pytest.raises(ValueError, match=message) as err:
        engine.generate(torch.ones(2, 5, dtype=torch.long), attention_mask=mask, max_new_tokens=3)
    assert "\n" not in str(err.value)
    assert all(torch.equal(c, b) for c, b in zip(engine.caches, before))


def test_padding_ids_outside_the_vocabulary_are_ignored_but_real_ones_are_not():
    engine = _engine("llama", True, "window")
    ids, mask = _padded(_rows(seed=17, lengths=(6, 3)), "left", pad_id=-100)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert torch.equal(out[:, :6], ids)
    ids[1, 5] = 96
    with pytest.raises(ValueError, match=r"token id 96, outside the vocabulary \[0, 96\)"):
        engine.generate(ids, attention_mask=mask, max_new_tokens=2)


# ------------------------------------------------------------------------------------------- padding.py
def test_right_aligned_puts_each_rows_tokens_first():
    ids = torch.tensor([[0, 0, 7, 8], [5, 6, 7, 8], [9, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    rows = padding.check_attention_mask(mask, ids)
    assert rows.padded and rows.lengths.tolist() == [2, 4, 1] and rows.offsets.tolist() == [2, 0, 0]
    assert padding.right_aligned(ids, rows, fill=0).tolist() == [[7, 8, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert padding.chunk_valid(rows.lengths, 2, 2).tolist() == [0, 2, 0]
    assert not padding.check_attention_mask(None, ids).padded


def test_last_logits_keep_each_rows_last_real_chunk():
    last = padding.LastLogits()
    last.update(torch.tensor([[1.0], [2.0]]), torch.tensor([3, 3]))
    last.update(torch.tensor([[5.0], [6.0]]), torch.tensor([0, 1]))  # row 0 ended in the first chunk
    assert last.logits.tolist() == [[1.0], [6.0]]
