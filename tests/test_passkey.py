"""The synthetic multi-passkey task and the bundled word tokenizer."""
import numpy as np
import pytest

from duo_compile.identify.passkey import (
    FILLER_PATH, NATO_ALPHABET, PASSKEY_MODEL_DIR, NEEDLE_TEMPLATE, QUESTION_TEMPLATE, ORDINALS, PasskeyTask,
    WordTokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer.from_pretrained(PASSKEY_MODEL_DIR)


def test_word_tokenizer_round_trip(tokenizer, tmp_path):
    text = "Remember this sequence of words, it's the third passkey to the vault: alpha zulu."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert "".join(tokenizer.decode(ids).split()) == "".join(text.split())
    assert tokenizer.encode(text)[0] == tokenizer.bos_token_id
    tokenizer.save_pretrained(tmp_path)
    again = WordTokenizer.from_pretrained(tmp_path)
    assert again.vocab == tokenizer.vocab and again.encode(text) == tokenizer.encode(text)
    assert tokenizer("alpha bravo", return_tensors="pt")["input_ids"].shape == (1, 3)


def test_bundled_filler_has_no_passkey_words(tokenizer):
    words = set(tokenizer.tokenize(FILLER_PATH.read_text(encoding="utf-8")))
    assert not words & set(NATO_ALPHABET)
    assert len(words) > 150  # a language, not a handful of tokens


def _check_sample(sample, task, context_length, num_passkeys, passkey_length):
    ids = sample.input_ids
    assert sample.context_length == sample.tail_start == context_length
    assert list(sample.depths) == sorted(sample.depths)
    assert all(0.05 <= d <= 0.95 for d in sample.depths)
    assert len(sample.needle_spans) == len(sample.answer_spans) == num_passkeys
    for (ns, ne), (ps, pe), (as_, ae), key in zip(sample.needle_spans, sample.passkey_spans, sample.answer_spans,
                                                  sample.passkeys):
        assert ns <= ps < pe <= ne <= sample.tail_start <= as_
        assert list(ids[ps:pe]) == list(ids[as_:ae])  # the answer is the needle's passkey
        assert list(ids[ps:pe]) == [t for w in key for t in task.alphabet[w]]
        assert len(key) == passkey_length
    positions = sample.label_positions
    assert positions[0] == sample.tail_start - 1 and positions[-1] == sample.length - 2
    for (as_, ae), pos in zip(sample.answer_spans, sample.answer_positions):
        assert list(pos + 1) == list(range(as_, ae))


def test_text_task_layout(tokenizer):
    task = PasskeyTask.from_tokenizer(tokenizer, num_passkeys=10, vocab_size=320)
    assert task.mode == "text" and task.bos == [tokenizer.bos_token_id]
    rng = np.random.default_rng(0)
    sample = task.sample(rng, 700, num_passkeys=3, passkey_length=5)
    _check_sample(sample, task, 700, 3, 5)
    assert sample.length <= 700 + task.max_tail_length(3, 5)
    text = tokenizer.decode(sample.input_ids)
    assert "second passkey to the vault" in text and text.count("Passkey :") == 3
    # Seeded: the same generator state gives the same sample.
    again = task.sample(np.random.default_rng(0), 700, num_passkeys=3, passkey_length=5)
    assert np.array_equal(sample.input_ids, again.input_ids)


def test_fixed_depths(tokenizer):
    task = PasskeyTask.from_tokenizer(tokenizer, num_passkeys=1)
    for depth in (0.0, 0.5, 1.0):
        s = task.sample(np.random.default_rng(1), 300, num_passkeys=1, passkey_length=4, depths=[depth])
        start = s.needle_spans[0][0]
        assert abs(start - 1 - depth * (300 - 1 - (s.needle_spans[0][1] - start))) <= 1


def test_generated_task_for_tiny_vocab():
    task = PasskeyTask.generated(96, num_passkeys=3, seed=0, exclude=[0, 1, 2])
    assert task.mode == "generated"
    pieces = [set(t for p in task.needle_prefix for t in p), set(t for a in task.alphabet for t in a),
              set(task.filler.tolist())]
    assert not (pieces[1] & pieces[2]) and not (pieces[0] & pieces[2]) and not (pieces[0] & pieces[1])
    assert not {0, 1, 2} & set().union(*pieces)
    sample = task.sample(np.random.default_rng(3), 80, num_passkeys=3, passkey_length=3)
    _check_sample(sample, task, 80, 3, 3)
    assert sample.input_ids.max() < 96


def test_generated_task_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="too small"):
        PasskeyTask.generated(20, num_passkeys=3)


def test_tokenizer_that_cannot_encode_the_task():
    no_nato = WordTokenizer.build(["the quick brown fox Remember this sequence , it ' s"])
    with pytest.raises(ValueError, match="cannot encode the task"):
        PasskeyTask.from_tokenizer(no_nato, num_passkeys=2)


def test_filler_falls_back_to_generated_tokens():
    texts = [" ".join(NATO_ALPHABET), ". ?"]
    texts += [NEEDLE_TEMPLATE.format(ordinal=o) + QUESTION_TEMPLATE.format(ordinal=o) for o in ORDINALS[:2]]
    task_only = WordTokenizer.build(texts)  # knows the task, not the filler's words
    task = PasskeyTask.from_tokenizer(task_only, num_passkeys=2)
    assert task.mode == "text+generated-filler"
    assert task_only.unk_token_id not in set(task.filler.tolist())
    _check_sample(task.sample(np.random.default_rng(0), 200, num_passkeys=2, passkey_length=3), task, 200, 2, 3)


def test_context_too_short_for_needles(tokenizer):
    task = PasskeyTask.from_tokenizer(tokenizer, num_passkeys=4)
    with pytest.raises(ValueError, match="too short"):
        task.sample(np.random.default_rng(0), 50, num_passkeys=4, passkey_length=5)
