"""Every bad input a user can give a public entry point: a clear error naming the bad value, before any work.

Entry points: ``duo_compile.compile``, ``Engine.generate`` (and the lower-level ``allocate``, ``prefill``,
``step``, ``kv_cache_bytes``), ``HeadMasks`` from files and arrays. For each refusal the tests check

- the exception type and that the message names the bad value (and, for shapes, both shapes);
- that nothing was done: ``compile`` refuses before capturing the model (capture is replaced by a tripwire),
  the engine's caches are the same tensors with the same contents, its batch size is unchanged;
- that the engine still works afterwards and gives the same output as before the refused call.
"""
from __future__ import annotations

import copy
import functools
import importlib
import math
import re
import sys

import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import duo_compile
from duo_compile.runtime.engine import Engine
from duo_compile.oracle import oracle_generate
from tests.tiny_models import mixed_gates, tiny_model


SINK, RECENT, MAX_LEN, VOCAB = 4, 8, 64, 96
GATES = mixed_gates(3, 2)
COMPILER = sys.modules["duo_compile.compiler"]


@functools.lru_cache(maxsize=None)
def _model():
    return tiny_model("llama", gqa=True)


def _ids(batch: int = 2, length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def engine():
    return duo_compile.compile(_model(), duo_compile.HeadMasks.from_gates(GATES), sink_size=SINK,
                               recent_size=RECENT, max_seq_len=MAX_LEN, backend="eager")


@pytest.fixture(scope="module")
def baseline(engine):
    """(input, output) of a good call, made before any refused one."""
    ids = _ids()
    return ids, engine.generate(ids, max_new_tokens=10)


@pytest.fixture
def untouched(engine, baseline):
    """Snapshot the engine; after the test, its caches and batch size are unchanged and it still works."""
    batch, ptrs, values = engine.batch_size, [c.data_ptr() for c in engine.caches], [c.clone() for c in engine.caches]
    yield
    assert engine.batch_size == batch
    assert [c.data_ptr() for c in engine.caches] == ptrs, "caches were reallocated"
    assert all(torch.equal(c, v) for c, v in zip(engine.caches, values)), "caches were written"
    ids, out = baseline
    assert torch.equal(engine.generate(ids, max_new_tokens=10), out), "engine gives another result afterwards"


@pytest.fixture
def no_capture(monkeypatch):
    """compile must refuse before doing any work: capturing the model is a test failure."""

    def tripwire(*args, **kwargs):
        raise AssertionError("compile captured the model before refusing its arguments")

    monkeypatch.setattr(COMPILER, "capture", tripwire)


# ------------------------------------------------------------------------------------------------ compile
def _gates_with(value, at=(0, 0)):
    gates = GATES.copy()
    gates[at] = value
    return gates


def _linear():
    return torch.nn.Linear(4, 4)


def _gemma2():
    config = Gemma2Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          hidden_size=64, intermediate_size=96, vocab_size=96, max_position_embeddings=512)
    return Gemma2ForCausalLM(config)


def _split_over_devices():
    model = tiny_model("llama", gqa=True)
    model.lm_head.to("meta")
    return model


COMPILE_CASES = {
    # masks
    "masks-too-few-layers": (dict(masks=duo_compile.HeadMasks.all_retrieval(2, 2)),
                             r"masks have shape \(2, 2\) but the model has 3 layers x 2 KV heads"),
    "masks-too-many-kv-heads": (dict(masks=np.ones((3, 4))),
                                r"masks have shape \(3, 4\) but the model has 3 layers x 2 KV heads"),
    "masks-nan-gate": (dict(masks=_gates_with(math.nan, (1, 1))), r"gate \S*nan\)? at \(layer, head\) = \(1, 1\)"),
    "masks-inf-gate": (dict(masks=_gates_with(math.inf)), r"gate \S*inf\)? at \(layer, head\) = \(0, 0\)"),
    "masks-gate-above-1": (dict(masks=_gates_with(1.5)), r"gate \S*1\.5\)? at .* not a finite number in \[0, 1\]"),
    "masks-gate-below-0": (dict(masks=_gates_with(-0.25)), r"gate \S*-0\.25\)? at "),
    "masks-not-binary": (dict(masks=_gates_with(0.5)), r"masks are not binary .*binarize"),
    "masks-1d": (dict(masks=np.ones(3)), r"gates must be 2-D \[num_layers, num_kv_heads\], got shape \(3,\)"),
    "masks-string": (dict(masks="retrieval"), r"gates must be a 2-D array of real numbers.*'retrieval'"),
    "masks-ragged-list": (dict(masks=[[1.0, 0.0], [1.0]]), r"gates must be a 2-D array of real numbers"),
    # sizes
    "sink-negative": (dict(sink_size=-1), r"sink_size must be an integer >= 0, got -1"),
    "sink-float": (dict(sink_size=1.5), r"sink_size must be an integer >= 0, got 1\.5"),
    "sink-bool": (dict(sink_size=True), r"sink_size must be an integer >= 0, got True"),
    "recent-zero": (dict(recent_size=0), r"recent_size must be an integer >= 1, got 0"),
    "recent-negative": (dict(recent_size=-8), r"recent_size must be an integer >= 1, got -8"),
    "recent-string": (dict(recent_size="8"), r"recent_size must be an integer >= 1, got '8'"),
    "max-seq-len-zero": (dict(max_seq_len=0), r"max_seq_len must be an integer >= 1, got 0"),
    "max-seq-len-negative": (dict(max_seq_len=-64), r"max_seq_len must be an integer >= 1, got -64"),
    "max-seq-len-float": (dict(max_seq_len=64.0), r"max_seq_len must be an integer >= 1, got 64\.0"),
    "chunk-zero": (dict(prefill_chunk_size=0), r"prefill_chunk_size must be an integer >= 1, got 0"),
    "chunk-float": (dict(prefill_chunk_size=2.5), r"prefill_chunk_size must be an integer >= 1, got 2\.5"),
    "mode-unknown": (dict(streaming_mode="windowed"),
                     r"streaming_mode must be one of \('window', 'chunk'\), got 'windowed'"),
    "mode-none": (dict(streaming_mode=None), r"streaming_mode must be one of .*got None"),
    "backend-unknown": (dict(backend="tensorrt"), r"backend must be one of \('inductor', 'eager'\), got 'tensorrt'"),
    "backend-case": (dict(backend="Eager"), r"got 'Eager'"),
    "fuse-not-bool": (dict(fuse_projections="no"), r"fuse_projections must be True or False, got 'no'"),
    "fuse-int": (dict(fuse_projections=1), r"fuse_projections must be True or False, got 1"),
    # models
    "model-not-a-module": (dict(model="llama"), r"model must be a torch\.nn\.Module, got str"),
    "model-not-hf": (dict(model=_linear), r"unsupported model Linear: duo_compile lowers Hugging Face causal LMs"),
    "model-soft-capping": (dict(model=_gemma2), r"unsupported: Gemma2ForCausalLM has attn_logit_softcapping=50\.0: "
                                                r"attention logit soft-capping"),
    "model-on-two-devices": (dict(model=_split_over_devices), r"spread over devices \['cpu', 'meta'\]"),
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_refuses_bad_arguments_before_any_work(case, no_capture):
    overrides, message = COMPILE_CASES[case]
    model = overrides.get("model", _model())
    if callable(model) and not isinstance(model, torch.nn.Module):
        model = model()  # built per test: some cases change the model
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    kwargs = dict(sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN, backend="eager")
    kwargs.update({k: v for k, v in overrides.items() if k not in ("model", "masks")})
    masks = overrides.get("masks", GATES)
    with pytest.raises(ValueError, match=message):
        duo_compile.compile(model, masks, **kwargs)
    assert getattr(getattr(model, "config", None), "_attn_implementation", None) == impl


def test_compile_accepts_a_model_with_eager_attention_and_restores_it():
    """Capture switches attention to SDPA for the export only; the engine still equals the oracle."""
    model = tiny_model("qwen2", gqa=False, seed=1)
    model.config._attn_implementation = "eager"
    masks = duo_compile.HeadMasks.from_gates(mixed_gates(3, 4))
    engine = duo_compile.compile(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                                 backend="eager")
    assert model.config._attn_implementation == "eager"
    ids = _ids(2, 30, seed=1)
    tokens, _ = oracle_generate(model, masks, ids, 8, sink_size=SINK, recent_size=RECENT)
    assert torch.equal(engine.generate(ids, max_new_tokens=8), tokens)


def test_compile_names_what_it_found_when_attention_is_not_sdpa():
    """Attention that bypasses SDPA (here: each layer keeps its own config pinned to "eager") is a clear error
    naming the ops found instead, and the model is left as it was."""
    model = tiny_model("llama", gqa=True)
    for layer in model.model.layers:
        layer.self_attn.config = copy.deepcopy(layer.self_attn.config)
        layer.self_attn.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match=r"no scaled_dot_product_attention node found .*softmax"):
        duo_compile.compile(model, GATES, sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN, backend="eager")
    assert model.config._attn_implementation == "sdpa" and not model.training
    assert all(layer.self_attn.config._attn_implementation == "eager" for layer in model.model.layers)


# ----------------------------------------------------------------------------------------------- generate
def _ids_with(value, at=(1, 5)):
    ids = _ids()
    ids[at] = value
    return ids


def _holed_mask():
    """Padding in the middle of row 0 (neither left nor right padding; left padding itself is accepted)."""
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, 5:8] = 0
    return mask


GENERATE_CASES = {
    "ids-list": (dict(input_ids=[[1, 2, 3]]), r"input_ids must be a 2-D tensor \[batch, length\], got list"),
    "ids-1d": (dict(input_ids=torch.arange(5)), r"2-D tensor \[batch, length\], got \(5,\)"),
    "ids-3d": (dict(input_ids=torch.zeros(1, 2, 3, dtype=torch.long)), r"got \(1, 2, 3\)"),
    "ids-float": (dict(input_ids=_ids().float()), r"int64 or int32 token ids, got torch\.float32"),
    "ids-bool": (dict(input_ids=_ids() > 50), r"got torch\.bool"),
    "ids-int16": (dict(input_ids=_ids().short()), r"got torch\.int16"),
    "ids-empty-length": (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), r"input_ids is empty \(shape \(2, 0\)\)"),
    "ids-empty-batch": (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), r"input_ids is empty \(shape \(0, 5\)\)"),
    "ids-other-device": (dict(input_ids=torch.zeros(2, 5, dtype=torch.long, device="meta")),
                         r"input_ids are on meta but the engine runs on cpu"),
    "ids-above-vocab": (dict(input_ids=_ids_with(VOCAB)), r"token id 96, outside the vocabulary \[0, 96\)"),
    "ids-negative": (dict(input_ids=_ids_with(-1)), r"token id -1, outside the vocabulary \[0, 96\)"),
    "new-negative": (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
    "new-float": (dict(max_new_tokens=2.0), r"max_new_tokens must be an integer >= 0, got 2\.0"),
    "new-bool": (dict(max_new_tokens=True), r"max_new_tokens must be an integer >= 0, got True"),
    "new-string": (dict(max_new_tokens="8"), r"max_new_tokens must be an integer >= 0, got '8'"),
    "too-long": (dict(input_ids=_ids(2, 60), max_new_tokens=10),
                 r"prompt length 60 \+ max_new_tokens 10 = 70 exceeds max_seq_len=64"),
    "prompt-too-long": (dict(input_ids=_ids(1, 65), max_new_tokens=0), r"= 65 exceeds max_seq_len=64"),
    "mask-holed": (dict(attention_mask=_holed_mask()), r"attention_mask row 0 is not left or right padding"),
    "mask-shape": (dict(attention_mask=torch.ones(2, 21)),
                   r"attention_mask must match input_ids \(2, 20\), got \(2, 21\)"),
    "mask-list": (dict(attention_mask=[[1] * 20] * 2), r"attention_mask must match input_ids \(2, 20\), got \[\[1"),
    "eos-string": (dict(eos_token_id="2"), r"eos_token_id must be an int or a list of ints, got '2'"),
    "eos-float": (dict(eos_token_id=1.5), r"eos_token_id must be an int or a list of ints, got 1\.5"),
    "eos-bool": (dict(eos_token_id=True), r"got True"),
    "eos-mixed-list": (dict(eos_token_id=[1, "x"]), r"got \[1, 'x'\]"),
    "pad-list": (dict(eos_token_id=3, pad_token_id=[1, 2]), r"pad_token_id must be a single int, got \[1, 2\]"),
    "pad-string": (dict(eos_token_id=3, pad_token_id="0"), r"pad_token_id must be an int or a list of ints, got '0'"),
    "pad-above-vocab": (dict(eos_token_id=3, pad_token_id=96), r"pad_token_id 96 is outside the vocabulary \[0, 96\)"),
    "pad-negative": (dict(eos_token_id=3, pad_token_id=-1), r"pad_token_id -1 is outside the vocabulary"),
    "pad-from-eos": (dict(eos_token_id=[500, 3]), r"pad_token_id 500 \(defaulted to eos_token_id\[0\]\)"),
    "chunk-zero": (dict(prefill_chunk_size=0), r"prefill_chunk_size must be an integer >= 1, got 0"),
    "chunk-float": (dict(prefill_chunk_size=2.5), r"prefill_chunk_size must be an integer >= 1, got 2\.5"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_refuses_bad_inputs_before_any_work(engine, untouched, case):
    overrides, message = GENERATE_CASES[case]
    kwargs = dict(input_ids=_ids(), max_new_tokens=10)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)


def test_refused_call_with_another_batch_size_does_not_reallocate(engine, untouched):
    with pytest.raises(ValueError, match="token id 96"):
        engine.generate(torch.full((5, 4), VOCAB), max_new_tokens=3)


def test_good_arguments_in_every_accepted_form(engine, baseline):
    """The forms the errors above contrast with: int32 ids, all-ones mask, eos as int/list/tensor, pad."""
    ids, out = baseline
    assert torch.equal(engine.generate(ids.int(), max_new_tokens=10), out.int())
    assert torch.equal(engine.generate(ids, max_new_tokens=10, attention_mask=torch.ones_like(ids)), out)
    eos = int(out[0, 20])  # row 0's first new token
    for form in (eos, [eos], (eos,), torch.tensor([eos])):
        got = engine.generate(ids, max_new_tokens=10, eos_token_id=form, pad_token_id=0)
        assert got[0, 20] == eos and bool((got[0, 21:] == 0).all())
    assert torch.equal(engine.generate(ids, max_new_tokens=0), ids)


# ------------------------------------------------------------------------------------ lower-level Engine API
@pytest.mark.parametrize("args, message", [
    ((0,), r"batch_size must be an integer >= 1, got 0"),
    ((-2,), r"batch_size must be an integer >= 1, got -2"),
    ((1.5,), r"batch_size must be an integer >= 1, got 1\.5"),
    ((True,), r"batch_size must be an integer >= 1, got True"),
    ((2, 0), r"max_seq_len must be an integer >= 1, got 0"),
    ((2, MAX_LEN + 1), r"max_seq_len 65 exceeds the engine's max_seq_len=64"),
    ((2, 32.0), r"max_seq_len must be an integer >= 1, got 32\.0"),
])
def test_allocate_refuses_bad_arguments(engine, untouched, args, message):
    with pytest.raises(ValueError, match=message):
        engine.allocate(*args)


def test_step_past_a_shorter_allocated_cache_is_refused(engine):
    """allocate(batch, max_seq_len) may make the caches shorter than the engine's limit: steps respect it."""
    engine.allocate(1, 16)
    try:
        engine.prefill(_ids(1, 16), 5)
        before = [c.clone() for c in engine.caches]
        with pytest.raises(ValueError, match=r"positions 16\.\.16 exceed the allocated cache length 16"):
            engine.step(_ids(1, 1), 16)
        with pytest.raises(ValueError, match=r"\[batch, 1\.\.16\] \(the cache length\), got shape \(1, 17\)"):
            engine.prefill(_ids(1, 17))
        assert all(torch.equal(c, b) for c, b in zip(engine.caches, before))
    finally:
        engine.allocate(2)  # back to what the other tests expect


def test_kv_cache_bytes_before_allocate_is_a_clear_error(engine):
    fresh = Engine(engine.graph, engine.cache_specs, engine.config, engine.info, engine.masks, engine.device,
                   engine.dtype)
    with pytest.raises(RuntimeError, match=r"no cache allocated yet: call generate\(\) or allocate"):
        fresh.kv_cache_bytes()


@pytest.mark.parametrize("tokens, start, error, message", [
    ((3, 1), 20, RuntimeError, r"caches are allocated for batch 2, got input batch 3"),
    ((2, 1), -1, ValueError, r"start must be an integer >= 0, got -1"),
    ((2, 1), 2.0, ValueError, r"start must be an integer >= 0, got 2\.0"),
    ((2, 1), MAX_LEN, ValueError, r"positions 64\.\.64 exceed the allocated cache length 64"),
    ((2, 5), MAX_LEN - 2, ValueError, r"positions 62\.\.66 exceed the allocated cache length 64"),
])
def test_step_refuses_bad_calls_before_writing(engine, untouched, tokens, start, error, message):
    with pytest.raises(error, match=message):
        engine.step(torch.zeros(tokens, dtype=torch.long), start)


def test_step_does_not_check_token_ids_but_fails_before_writing(engine, untouched):
    """Documented limit: step/prefill leave token-id checks to generate (they are the hot loop); an id outside the
    vocabulary fails in the embedding lookup, the graph's first op, so no cache is written."""
    with pytest.raises(IndexError):
        engine.step(torch.full((2, 1), VOCAB), 0)


@pytest.mark.parametrize("length, chunk, message", [
    (MAX_LEN + 1, 16, r"\[batch, 1\.\.64\] \(the cache length\), got shape \(2, 65\)"),
    (0, None, r"got shape \(2, 0\)"),
    (10, 0, r"chunk_size must be an integer >= 1, got 0"),
])
def test_prefill_refuses_bad_calls_before_writing(engine, untouched, length, chunk, message):
    with pytest.raises(ValueError, match=message):
        engine.prefill(torch.zeros(2, length, dtype=torch.long), chunk)


# ------------------------------------------------------------------------------------------ masks files
TSV_CASES = {
    "garbage-text": ("hello\tworld\n", r"line 1, column 1: 'hello' is not a number"),
    "binary-garbage": (b"\xff\xfe\x00\x01PK\x03\x04", r"not a text file of gates"),
    "empty": ("", r"empty file, no rows of gates"),
    "blank-lines-only": ("\n  \n\t\n", r"empty file"),
    "ragged-rows": ("1\t0\n1\t0\t1\n1\t0\n", r"line 2: ragged row with 3 values, but line 1 has 2"),
    "nan-gate": ("1\t0\nnan\t1\n1\t1\n", r"line 2, column 1: gate 'nan' is not finite"),
    "gate-out-of-range": ("1\t0\n1\t2.5\n1\t1\n", r"line 2, column 2: gate '2\.5' is outside \[0, 1\]"),
    "comma-separated": ("1,0\n0,1\n1,1\n", r"line 1, column 1: '1,0' is not a number"),
    "stray-tab": ("1\t0\t\n1\t0\n1\t1\n", r"line 1, column 3: '' is not a number"),
}


@pytest.mark.parametrize("case", list(TSV_CASES))
def test_bad_masks_file_names_the_file_line_and_value(tmp_path, case):
    content, message = TSV_CASES[case]
    path = tmp_path / f"{case}.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as info:
        duo_compile.HeadMasks.from_tsv(path)
    assert str(path) in str(info.value)


def test_missing_masks_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.tsv"):
        duo_compile.HeadMasks.from_tsv(tmp_path / "nowhere.tsv")


@pytest.mark.parametrize("gates, message", [
    (np.ones((2, 2)), r"masks have shape \(2, 2\) but the model has 3 layers x 2 KV heads"),
    (np.ones((4, 2)), r"masks have shape \(4, 2\) but the model has 3 layers x 2 KV heads"),
    (np.ones((3, 4)), r"masks have shape \(3, 4\) but the model has 3 layers x 2 KV heads"),
    (np.full((3, 2), 0.7), r"masks are not binary"),
])
def test_masks_file_that_does_not_fit_the_model_is_refused_by_compile(tmp_path, no_capture, gates, message):
    path = tmp_path / "gates.tsv"
    duo_compile.HeadMasks.from_gates(gates).to_tsv(path)
    masks = duo_compile.HeadMasks.from_tsv(path)
    with pytest.raises(ValueError, match=message):
        duo_compile.compile(_model(), masks, sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN, backend="eager")


# ---------------------------------------------------------------------------------------------------- CLI
CLI = importlib.import_module("duo_compile.cli")


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    """A local model directory and masks files, as a user of ``duo-compile compile`` has them."""
    folder = tmp_path_factory.mktemp("cli")
    _model().save_pretrained(folder / "model")
    duo_compile.HeadMasks.from_gates(GATES).to_tsv(folder / "good.tsv")
    duo_compile.HeadMasks.from_gates(np.ones((2, 2))).to_tsv(folder / "two_layers.tsv")
    duo_compile.HeadMasks.from_gates(np.full((3, 2), 0.7)).to_tsv(folder / "soft.tsv")
    (folder / "bad.tsv").write_text("hello\n")
    return folder


# (argv with {d} for the folder, stderr regex, refused before the model is loaded)
CLI_CASES = {
    "masks-garbage": ("compile {d}/model --masks {d}/bad.tsv -o {d}/out.pt2",
                      r"bad\.tsv, line 1, column 1: 'hello' is not a number", True),
    "masks-missing": ("compile {d}/model --masks {d}/missing.tsv -o {d}/out.pt2",
                      r"No such file or directory: '.*missing\.tsv'", True),
    "masks-not-binary": ("compile {d}/model --masks {d}/soft.tsv -o {d}/out.pt2",
                         r"not binary: give --sparsity or --threshold", True),
    "sparsity-out-of-range": ("compile {d}/model --masks {d}/soft.tsv --sparsity 1.5 -o {d}/out.pt2",
                              r"sparsity must be in \[0, 1\], got 1\.5", True),
    "sparsity-and-threshold": ("compile {d}/model --masks {d}/soft.tsv --sparsity 0.5 --threshold 0.5 -o {d}/out.pt2",
                               r"give exactly one of sparsity or threshold", True),
    "output-dir-missing": ("compile {d}/model --masks {d}/good.tsv -o {d}/nowhere/out.pt2",
                           r"cannot write the engine file to '.*nowhere/out\.pt2': directory .* does not exist", True),
    "output-is-a-dir": ("compile {d}/model --masks {d}/good.tsv -o {d}", r"it is a directory", True),
    "model-dir-missing": ("compile {d}/nomodel --masks {d}/good.tsv -o {d}/out.pt2",
                          r"model directory '.*nomodel' does not exist", True),
    "masks-wrong-layers": ("compile {d}/model --masks {d}/two_layers.tsv -o {d}/out.pt2 --max-seq-len 64",
                           r"masks have shape \(2, 2\) but the model has 3 layers x 2 KV heads", True),
    "sink-negative": ("compile {d}/model --masks {d}/good.tsv -o {d}/out.pt2 --sink -1",
                      r"--sink must be an integer >= 0, got -1", True),
    "recent-zero": ("compile {d}/model --masks {d}/good.tsv -o {d}/out.pt2 --recent 0",
                    r"--recent must be an integer >= 1, got 0", True),
    "max-seq-len-zero": ("compile {d}/model --masks {d}/good.tsv -o {d}/out.pt2 --max-seq-len 0",
                         r"--max-seq-len must be an integer >= 2 .*, got 0", True),
    "chunk-zero": ("compile {d}/model --masks {d}/good.tsv -o {d}/out.pt2 --chunk 0",
                   r"--chunk must be an integer >= 1, got 0", True),
    "run-missing-file": ("run {d}/missing.pt2 --ids 1,2", r"no engine file at '.*missing\.pt2'", True),
    "run-not-an-engine": ("run {d}/bad.tsv --ids 1,2", r"bad\.tsv: not a duo_compile engine file", True),
    "run-directory": ("run {d} --ids 1,2", r"is a directory, not an engine file", True),
    "run-bad-ids": ("run {d}/missing.pt2 --ids 1,a", r"--ids must be integers .*got '1,a'", True),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_bad_arguments_with_a_one_line_error(cli_dir, no_capture, monkeypatch, capsys, case):
    argv, message, before_load = CLI_CASES[case]
    if before_load:
        def tripwire(path):
            raise AssertionError("the CLI loaded the model before refusing its arguments")

        monkeypatch.setattr(CLI, "_load_model", tripwire)
    assert CLI.main(argv.format(d=cli_dir).split()) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (transformers may print a weight-loading progress bar before it)
    assert "Traceback" not in err and last.startswith(f"duo-compile {argv.split()[0]}: error: "), err
    assert re.search(message, last), err
    assert not (cli_dir / "out.pt2").exists() and not list(cli_dir.glob(".out.pt2*"))


@pytest.mark.parametrize("argv, message", [
    ("compile m --masks x.tsv -o o.pt2 --sink abc", r"argument --sink: invalid int value: 'abc'"),
    ("compile m --masks x.tsv -o o.pt2 --mode windowed", r"argument --mode: invalid choice: 'windowed'"),
    ("compile m --masks x.tsv -o o.pt2 --backend tflite", r"argument --backend: invalid choice: 'tflite'"),
    ("compile m -o o.pt2", r"the following arguments are required: --masks"),
    ("run e.pt2 --ids 1 --max-new-tokens many", r"argument --max-new-tokens: invalid int value: 'many'"),
    ("frobnicate", r"invalid choice: 'frobnicate'"),
])
def test_cli_usage_errors_name_the_argument(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        CLI.main(argv.split())
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
