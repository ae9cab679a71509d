"""Head identification (duo_compile.identify): gated attention, the optimisation's mechanics, files, errors."""
import importlib
import json

import numpy as np
import pytest
import torch

from duo_compile.identify import (
    attention_layout, gated_attention, identify, needle_attention_mass, streaming_attention_mask,
)
from duo_compile.masks import HeadMasks
from duo_compile.identify.passkey import PASSKEY_MODEL_DIR, PasskeyTask, WordTokenizer
from tests.tiny_models import ARCHS, tiny_model

# duo_compile.identify is the function (the public API); the optimisation module is reached through importlib.
identify_module = importlib.import_module("duo_compile.identify.optimize")

SHORT = dict(context_lengths=[48, 64], num_passkeys=2, passkey_length=3, sink_size=4, recent_size=8,
             progress=False)


def test_streaming_mask_rule():
    mask = streaming_attention_mask(6, 10, sink_size=2, recent_size=3)
    for i in range(6):
        p = 4 + i
        expected = [(j < 2 or p - 3 < j) and j <= p for j in range(10)]
        assert mask[i].tolist() == expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("gqa", [True, False])
def test_gated_attention_matches_model_and_restores(arch, gqa):
    model = tiny_model(arch, gqa)
    ids = torch.randint(0, 96, (2, 24))
    reference = model(ids).logits
    layers, kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    with gated_attention(model, torch.ones(layers, kv), sink_size=2, recent_size=4):
        assert model.config._attn_implementation == identify_module.ATTENTION_NAME
        torch.testing.assert_close(model(ids).logits, reference)
    # sink + recent covering the sequence: streaming heads are full attention.
    with gated_attention(model, torch.zeros(layers, kv), sink_size=4, recent_size=24):
        torch.testing.assert_close(model(ids).logits, reference)
    with gated_attention(model, torch.zeros(layers, kv), sink_size=2, recent_size=4):
        assert not torch.allclose(model(ids).logits, reference, atol=1e-3)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(ids).logits, reference)


def _dense_mask_reference(model, ids, retrieval, sink, recent):
    """Eager reference: per-head masks through a plain attention function (independent of the gated path)."""
    from transformers import AttentionInterface

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, 1)
        v = value.repeat_interleave(groups, 1)
        n = query.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        window = streaming_attention_mask(n, n, sink, recent)
        is_retrieval = torch.as_tensor(retrieval[module.layer_idx]).repeat_interleave(groups)
        allowed = torch.where(is_retrieval[:, None, None], causal, window)
        scores = (query @ k.transpose(-1, -2)) * scaling
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2).contiguous(), None

    AttentionInterface.register("duo_test_reference", reference)
    old = model.config._attn_implementation
    model.set_attn_implementation("duo_test_reference")
    try:
        return model(ids).logits
    finally:
        model.set_attn_implementation(old)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_binary_gates_match_dense_mask_reference(arch):
    model = tiny_model(arch, gqa=True)
    ids = torch.randint(0, 96, (2, 30))
    retrieval = np.array([[1, 0], [0, 1], [0, 0]], dtype=bool)
    expected = _dense_mask_reference(model, ids, retrieval, sink=3, recent=5)
    with gated_attention(model, retrieval.astype(np.float64), sink_size=3, recent_size=5):
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # Fractional gates mix the two outputs; with gradients the same numbers come out.
    gates = torch.full((3, 2), 0.3, requires_grad=True)
    with gated_attention(model, gates, sink_size=3, recent_size=5):
        with_grad = model(ids).logits
    with torch.no_grad(), gated_attention(model, gates, sink_size=3, recent_size=5):
        without_grad = model(ids).logits
    torch.testing.assert_close(with_grad, without_grad)


def test_gated_attention_matches_oracle_if_available():
    oracle = pytest.importorskip("duo_compile.oracle")
    model = tiny_model("llama", gqa=True)
    ids = torch.randint(0, 96, (1, 40))
    retrieval = np.array([[1, 0], [0, 1], [1, 0]], dtype=bool)
    expected = oracle.oracle_logits(model, retrieval, ids, sink_size=4, recent_size=8)
    with gated_attention(model, retrieval.astype(np.float64), sink_size=4, recent_size=8):
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,gqa", [("llama", True), ("mistral", False), ("qwen2", True)])
def test_few_steps_move_gates_and_restore_model(arch, gqa):
    model = tiny_model(arch, gqa)
    ids = torch.randint(0, 96, (1, 20))
    before = model(ids).logits
    masks = identify(model, num_steps=4, seed=0, **SHORT)
    assert isinstance(masks, HeadMasks)
    assert masks.shape == (3, model.config.num_key_value_heads)
    assert np.all(masks.gates < 1.0) and np.all(masks.gates >= 0.0)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert model.config._attn_implementation == "sdpa" and not model.training
    torch.testing.assert_close(model(ids).logits, before)


def test_loss_decreases_on_a_fixed_sample(tmp_path):
    model = tiny_model("llama", gqa=True)
    identify(model, num_steps=20, seed=0, num_samples=1, output_dir=tmp_path, lr=0.05, **SHORT)
    history = json.loads((tmp_path / "history.json").read_text())
    losses = [row["loss"] for row in history]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < losses[0] - 5e-4
    assert history[0]["distill"] == 0.0  # gates start at 1: the student is the teacher


def test_output_files_round_trip(tmp_path):
    model = tiny_model("qwen2", gqa=False)
    masks = identify(model, num_steps=3, seed=1, output_dir=tmp_path, **SHORT)
    loaded = HeadMasks.from_tsv(tmp_path / "full_attention_heads.tsv")
    assert loaded == masks
    rows = (tmp_path / "full_attention_heads.tsv").read_text().strip().splitlines()
    assert len(rows) == 3 and all(len(r.split("\t")) == 4 for r in rows)  # rows = layers, columns = KV heads
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sink_size"] == 4 and config["recent_size"] == 8 and config["num_steps"] == 3
    assert config["reg_weight"] == 0.05 and config["lr"] == 0.02


def test_seeded_runs_are_reproducible():
    a = identify(tiny_model("llama"), num_steps=3, seed=5, **SHORT)
    b = identify(tiny_model("llama"), num_steps=3, seed=5, **SHORT)
    c = identify(tiny_model("llama"), num_steps=3, seed=6, **SHORT)
    assert a == b and a != c


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    uninterrupted = identify(tiny_model("llama"), num_steps=6, seed=3, output_dir=tmp_path / "a",
                             checkpoint_every=3, **SHORT)
    real_step = identify_module._train_step
    calls = {"n": 0}

    def crash_after_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(identify_module, "_train_step", crash_after_four)
    model = tiny_model("llama")
    with pytest.raises(KeyboardInterrupt):
        identify(model, num_steps=6, seed=3, output_dir=tmp_path / "b", checkpoint_every=3, **SHORT)
    assert all(p.requires_grad for p in model.parameters())
    monkeypatch.setattr(identify_module, "_train_step", real_step)
    resumed = identify(model, num_steps=6, seed=3, output_dir=tmp_path / "b", checkpoint_every=3, resume=True,
                       **SHORT)
    assert resumed == uninterrupted
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="other arguments"):
        identify(model, num_steps=6, seed=4, output_dir=tmp_path / "b", resume=True, **SHORT)


def test_gradient_checkpointing_gives_the_same_gates():
    plain = identify(tiny_model("llama"), num_steps=3, seed=2, **SHORT)
    model = tiny_model("llama")
    checkpointed = identify(model, num_steps=3, seed=2, gradient_checkpointing=True, **SHORT)
    np.testing.assert_allclose(checkpointed.gates, plain.gates, atol=1e-6)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


# ---------------------------------------------------------------------- errors before training


def test_error_no_attention():
    with pytest.raises(ValueError, match="no attention found"):
        identify(torch.nn.Linear(4, 4), num_steps=1, **SHORT)


def test_error_attention_outside_the_interface():
    class Bypass(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states, None

    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn = Bypass()
    with pytest.raises(ValueError, match=r"no attention found in layers \[0, 1, 2\]"):
        identify(model, num_steps=1, **SHORT)


def test_error_tokenizer_cannot_encode_the_task():
    tokenizer = WordTokenizer.build(["some words but no passkey alphabet"])
    with pytest.raises(ValueError, match="cannot encode the task"):
        identify(tiny_model("llama"), tokenizer, num_steps=1, **SHORT)


def test_error_tokenizer_ids_beyond_the_model_vocab():
    tokenizer = WordTokenizer.from_pretrained(PASSKEY_MODEL_DIR)  # ~320 ids, tiny model has 96
    with pytest.raises(ValueError, match="vocab_size 96"):
        identify(tiny_model("llama"), tokenizer, num_steps=1, **SHORT)


def test_error_context_beyond_positions():
    args = dict(SHORT, context_lengths=[64, 600])
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        identify(tiny_model("llama"), num_steps=1, **args)


@pytest.mark.parametrize("reg_weight", [-0.01, float("nan")])
def test_error_negative_reg_weight(reg_weight):
    with pytest.raises(ValueError, match="reg_weight"):
        identify(tiny_model("llama"), num_steps=1, reg_weight=reg_weight, **SHORT)


def test_errors_are_raised_before_any_training(monkeypatch):
    monkeypatch.setattr(identify_module, "_train_step", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError):
        identify(tiny_model("llama"), num_steps=1, reg_weight=-1.0, **SHORT)
    with pytest.raises(ValueError):
        identify(tiny_model("llama"), num_steps=1, **dict(SHORT, context_lengths=[10_000]))


# ---------------------------------------------------------------------- the attention-score baseline


def test_needle_attention_mass_shape_and_range():
    model = tiny_model("mistral", gqa=True)
    task = PasskeyTask.generated(96, num_passkeys=1, exclude=[0, 1, 2])
    samples = [task.sample(np.random.default_rng(i), 60, num_passkeys=1, passkey_length=3) for i in range(3)]
    mass = needle_attention_mass(model, samples, batch_size=2)
    assert mass.shape == (3, 2)
    assert np.all(mass >= 0) and np.all(mass <= 1) and mass.sum() > 0
    assert attention_layout(model).groups == 2


# ---------------------------------------------------------------------- the bundled passkey model

def test_identify_on_the_bundled_model_short_schedule(tmp_path):
    from duo_compile.identify.passkey import load_passkey_model

    model, tokenizer = load_passkey_model()
    masks = identify(model, tokenizer, num_steps=4, context_lengths=[400], num_passkeys=2, passkey_length=5,
                     sink_size=16, recent_size=64, num_samples=1, lr=0.05, output_dir=tmp_path, progress=False)
    assert masks.shape == (model.config.num_hidden_layers, model.config.num_key_value_heads)
    # Gates start at 1 and move; heads the distillation loss needs may stay clamped at 1 (a real model has some).
    assert (masks.gates < 1.0).any() and masks.gates.mean() < 1.0
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"]
    assert HeadMasks.from_tsv(tmp_path / "full_attention_heads.tsv") == masks
    assert json.loads((tmp_path / "config.json").read_text())["task"] == "text"


def test_bundled_model_retrieves_and_streaming_does_not():
    from duo_compile.identify.needle import passkey_accuracy
    from duo_compile.identify.passkey import load_passkey_model

    model, tokenizer = load_passkey_model()
    task = PasskeyTask.from_tokenizer(tokenizer, num_passkeys=1, vocab_size=model.config.vocab_size)
    samples = [task.sample(np.random.default_rng(i), 1024, num_passkeys=1, passkey_length=5, depths=[d])
               for i, d in enumerate([0.2, 0.4, 0.6])]
    layers, kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    full, _ = passkey_accuracy(model, samples, None, sink_size=64, recent_size=256)
    streaming, _ = passkey_accuracy(model, samples, np.zeros((layers, kv)), sink_size=64, recent_size=256)
    assert full.mean() == 1.0 and streaming.mean() == 0.0
