"""The eager oracle (duo_compile.oracle): the mask rule by hand, and the oracle against the plain model."""
from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch

from duo_compile import oracle
from duo_compile.oracle import (
    layer_visibility,
    oracle_generate,
    oracle_logits,
    streaming_visibility,
)
from tests.tiny_models import ARCHS, mixed_gates, tiny_model

VOCAB = 96


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def _impls(model) -> list:
    return [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")]


def _full(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _all(value: bool, model) -> np.ndarray:
    cfg = model.config
    return np.full((cfg.num_hidden_layers, cfg.num_key_value_heads), value)


_MODELS: dict = {}


def _model(arch: str, gqa: bool):
    if (arch, gqa) not in _MODELS:
        _MODELS[(arch, gqa)] = tiny_model(arch, gqa)
    return _MODELS[(arch, gqa)]


CASES = [(arch, gqa) for arch in ARCHS for gqa in (False, True)]
CASE_IDS = [f"{arch}-{'gqa' if gqa else 'mha'}" for arch, gqa in CASES]


# ---------------------------------------------------------------------------------------------- the rule by hand
def test_window_mask_by_hand():
    got = streaming_visibility(8, sink_size=2, recent_size=3).int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],  # p=4: sink {0,1} + recent {2,3,4}
            [1, 1, 0, 1, 1, 1, 0, 0],  # p=5: sink + {3,4,5}
            [1, 1, 0, 0, 1, 1, 1, 0],
            [1, 1, 0, 0, 0, 1, 1, 1],
        ]
    )
    assert torch.equal(got, expected)


def test_chunk_mask_by_hand():
    # prompt of 8 tokens in chunks of 4, then 2 generated tokens; sink 1, recent 2
    got = streaming_visibility(
        10, sink_size=1, recent_size=2, streaming_mode="chunk", prefill_chunk_size=4, prompt_length=8
    ).int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # chunk 0 (c=0): full causal
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 0, 1, 1, 1, 0, 0, 0, 0, 0],  # chunk 1 (c=4): sink {0} + {2,3} + the chunk so far
            [1, 0, 1, 1, 1, 1, 0, 0, 0, 0],
            [1, 0, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 0, 1, 1, 1, 1, 1, 1, 0, 0],
            [1, 0, 0, 0, 0, 0, 1, 1, 1, 0],  # generated p=8 (c=8): sink + {6,7} + itself
            [1, 0, 0, 0, 0, 0, 0, 1, 1, 1],  # generated p=9: sink + {7,8} + itself
        ]
    )
    assert torch.equal(got, expected)


def test_chunk_mask_one_chunk_is_causal_for_prompt():
    got = streaming_visibility(12, sink_size=1, recent_size=2, streaming_mode="chunk")
    assert torch.equal(got, torch.ones(12, 12, dtype=torch.bool).tril())


def test_layer_visibility_mixes_heads():
    got = layer_visibility([True, False], 6, sink_size=1, recent_size=2)
    assert got.shape == (2, 6, 6)
    assert torch.equal(got[0], torch.ones(6, 6, dtype=torch.bool).tril())
    assert torch.equal(got[1], streaming_visibility(6, sink_size=1, recent_size=2))
    assert not bool(got[1, 5, 2])  # p=5 sees sink {0} and {4,5} only


# ------------------------------------------------------------------------------------------- against the model
@pytest.mark.parametrize("arch,gqa", CASES, ids=CASE_IDS)
def test_all_retrieval_equals_model(arch, gqa):
    model = _model(arch, gqa)
    ids = _ids(2, 24)
    for mode, chunk in (("window", None), ("chunk", 8)):
        got = oracle_logits(
            model, _all(True, model), ids, sink_size=2, recent_size=3, streaming_mode=mode, prefill_chunk_size=chunk
        )
        assert got.shape == (2, 24, VOCAB) and got.dtype == torch.float32
        torch.testing.assert_close(got, _full(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,gqa", CASES, ids=CASE_IDS)
def test_sink_plus_recent_covering_sequence_equals_full(arch, gqa):
    model = _model(arch, gqa)
    ids = _ids(1, 20)
    for retrieval in (_all(False, model), mixed_gates(3, model.config.num_key_value_heads)):
        got = oracle_logits(model, retrieval, ids, sink_size=4, recent_size=16)
        torch.testing.assert_close(got, _full(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,gqa", CASES, ids=CASE_IDS)
def test_small_window_differs_from_full(arch, gqa):
    model = _model(arch, gqa)
    ids = _ids(1, 60)
    got = oracle_logits(model, mixed_gates(3, model.config.num_key_value_heads), ids, sink_size=4, recent_size=8)
    full = _full(model, ids)
    # positions < sink + recent see everything; later ones must change
    torch.testing.assert_close(got[:, :12], full[:, :12], atol=1e-5, rtol=0)
    assert (got[:, 12:] - full[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch,gqa", CASES, ids=CASE_IDS)
def test_chunk_mode_one_chunk_prompt_equals_full(arch, gqa):
    model = _model(arch, gqa)
    ids = _ids(2, 40)
    full = _full(model, ids)
    for chunk in (None, 40, 64):
        got = oracle_logits(
            model, _all(False, model), ids, sink_size=2, recent_size=4, streaming_mode="chunk", prefill_chunk_size=chunk
        )
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    # the same tokens with the last 8 as generated tokens: the prompt part is still full attention, the rest is not
    got = oracle_logits(model, _all(False, model), ids, sink_size=2, recent_size=4, streaming_mode="chunk", prompt_length=32)
    torch.testing.assert_close(got[:, :32], full[:, :32], atol=1e-5, rtol=0)
    assert (got[:, 32:] - full[:, 32:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_window_and_chunk_differ_when_chunked(arch):
    model = _model(arch, True)
    ids = _ids(1, 60)
    retrieval = mixed_gates(3, 2)
    kw = dict(sink_size=4, recent_size=8, prefill_chunk_size=16)
    window = oracle_logits(model, retrieval, ids, streaming_mode="window", **kw)
    chunk = oracle_logits(model, retrieval, ids, streaming_mode="chunk", **kw)
    assert (window - chunk).abs().max() > 1e-3
    # window mode ignores the chunking
    torch.testing.assert_close(window, oracle_logits(model, retrieval, ids, sink_size=4, recent_size=8), atol=0, rtol=0)


def test_window_mode_matches_hf_sliding_window():
    """Independent check of the rule on real weights: sink 0 + recent W is Mistral's own sliding window W."""
    model = tiny_model("mistral", True)
    ids = _ids(1, 40)
    got = oracle_logits(model, _all(False, model), ids, sink_size=0, recent_size=8)
    model.config.sliding_window = 8
    try:
        expected = _full(model, ids)
    finally:
        model.config.sliding_window = None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - _full(model, ids)).abs().max() > 1e-3


def test_retrieval_input_forms():
    model = _model("llama", True)
    ids = _ids(1, 30)
    gates = mixed_gates(3, 2)
    expected = oracle_logits(model, gates.astype(bool), ids, sink_size=2, recent_size=4)

    class Masks:  # duck-typed duo_compile.masks.HeadMasks
        retrieval = gates.astype(bool)

    for form in (gates, torch.from_numpy(gates.astype(bool)), Masks()):
        torch.testing.assert_close(oracle_logits(model, form, ids, sink_size=2, recent_size=4), expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch,gqa", [("llama", False), ("mistral", True), ("qwen2", True)])
def test_all_retrieval_generate_equals_hf(arch, gqa):
    model = _model(arch, gqa)
    ids = _ids(2, 12)
    seqs, scores = oracle_generate(model, _all(True, model), ids, 10, sink_size=2, recent_size=3)
    hf = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert seqs.shape == (2, 22)
    assert torch.equal(seqs, hf.sequences)
    assert len(scores) == 10 and all(s.shape == (2, VOCAB) and s.dtype == torch.float32 for s in scores)
    for ours, theirs in zip(scores, hf.scores):
        torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)


def test_generate_eos_and_pad_like_hf():
    model = _model("llama", True)
    ids = _ids(2, 10, seed=3)
    free, _ = oracle_generate(model, _all(True, model), ids, 8, sink_size=2, recent_size=3)
    eos = int(free[1, 13])  # the token row 1 produces at step 3: row 1 stops there, row 0 never produces it
    assert eos not in free[0, 10:].tolist() and eos not in free[1, 10:13].tolist()
    seqs, scores = oracle_generate(
        model, _all(True, model), ids, 8, sink_size=2, recent_size=3, eos_token_id=eos, pad_token_id=0
    )
    hf = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    assert torch.equal(seqs, hf)
    assert torch.equal(seqs[0], free[0])  # row 0 is unaffected
    assert seqs[1, 10:].tolist() == free[1, 10:14].tolist() + [0] * 4  # row 1: eos at step 3, then pad
    assert len(scores) == 8


def test_generate_stops_when_all_rows_done():
    model = _model("llama", True)
    ids = _ids(2, 10, seed=3)[1:]
    free, _ = oracle_generate(model, _all(True, model), ids, 6, sink_size=2, recent_size=3)
    eos = int(free[0, 13])
    seqs, scores = oracle_generate(model, _all(True, model), ids, 6, sink_size=2, recent_size=3, eos_token_id=[eos, 999])
    assert free[0, 10:].tolist().index(eos) == 3
    assert seqs.shape == (1, 14) and len(scores) == 4
    assert int(seqs[0, -1]) == eos


def test_generate_streaming_uses_prompt_length_for_chunks():
    """Chunk mode in generation: the prompt is one chunk (full attention), each new token its own chunk."""
    model = _model("qwen2", True)
    ids = _ids(1, 30)
    retrieval = _all(False, model)
    kw = dict(sink_size=2, recent_size=4, streaming_mode="chunk")
    seqs, scores = oracle_generate(model, retrieval, ids, 4, **kw)
    full = oracle_logits(model, retrieval, seqs, prompt_length=30, **kw)
    for step, s in enumerate(scores):
        torch.testing.assert_close(s, full[:, 29 + step], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[0], _full(model, ids)[:, -1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ model left unchanged
def test_attention_implementation_restored():
    model = tiny_model("llama", True)
    before = _impls(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    oracle_logits(model, mixed_gates(3, 2), _ids(1, 16), sink_size=2, recent_size=4)
    oracle_generate(model, mixed_gates(3, 2), _ids(1, 8), 2, sink_size=2, recent_size=4)
    assert _impls(model) == before == ["sdpa"] * len(before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # restored also when the forward fails (token id out of range)
    with pytest.raises(IndexError):
        oracle_logits(model, mixed_gates(3, 2), torch.tensor([[VOCAB + 5]]), sink_size=2, recent_size=4)
    assert _impls(model) == before


def test_attention_function_outside_oracle_raises():
    model = tiny_model("llama", True)
    model.config._attn_implementation = oracle.ATTENTION_NAME  # registered by earlier calls
    oracle._register()
    with pytest.raises(RuntimeError, match="outside duo_compile.oracle"):
        model(input_ids=_ids(1, 4), use_cache=False)


# ---------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(streaming_mode="sliding"), "'sliding'"),
        (dict(sink_size=-1), "sink_size.*-1"),
        (dict(recent_size=0), "recent_size.*0"),
        (dict(prefill_chunk_size=0), "prefill_chunk_size.*0"),
        (dict(prompt_length=17), "prompt_length.*17"),
        (dict(retrieval=np.ones((2, 2), bool)), r"\(2, 2\).*\(3, 2\)"),
        (dict(retrieval=np.ones((3, 4), bool)), r"\(3, 4\)"),
        (dict(retrieval=np.full((3, 2), 0.5)), "0.5"),
        (dict(retrieval=np.ones(6, bool)), r"\(6,\)"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    model = _model("llama", True)
    args = dict(retrieval=np.ones((3, 2), bool), sink_size=2, recent_size=4)
    args.update(kwargs)
    retrieval = args.pop("retrieval")
    with pytest.raises(ValueError, match=match):
        oracle_logits(model, retrieval, _ids(1, 16), **args)
    assert _impls(model) == ["sdpa"] * len(_impls(model))


def test_bad_generate_inputs_raise():
    model = _model("llama", True)
    with pytest.raises(ValueError, match="max_new_tokens.*-1"):
        oracle_generate(model, np.ones((3, 2), bool), _ids(1, 4), -1, sink_size=2, recent_size=4)
    with pytest.raises(ValueError, match="'nope'"):
        oracle_generate(model, np.ones((3, 2), bool), _ids(1, 4), 2, sink_size=2, recent_size=4, streaming_mode="nope")
    with pytest.raises(ValueError, match=r"input_ids.*\(4,\)"):
        oracle_logits(model, np.ones((3, 2), bool), torch.arange(4), sink_size=2, recent_size=4)


# ---------------------------------------------------------------------------------------------- independence
def test_oracle_does_not_import_the_compiler():
    tree = ast.parse(pathlib.Path(oracle.__file__).read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(("." * node.level) + (node.module or ""))
    assert not [m for m in modules if m.startswith((".", "duo_compile", "kernels", "passes"))], modules
