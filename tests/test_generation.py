"""Engine.generate against Hugging Face's model.generate: sampling, processors, stopping, streamers, configs, errors;
text in and text out through the CLI.

The engine under test has only retrieval heads, so it computes the model's own attention and every difference from
``model.generate`` would be the decode loop's (tiny random Llama, fp32, CPU, eager backend). Sampling is compared
token for token: ``torch.manual_seed`` before each call, same settings. The CLI test compiles the tiny Llama from a
model directory that holds it with this file's tokenizer and a chat template, exports it as ONNX (the quickest
export on a CPU), and runs text prompts through the engine file.
"""
from __future__ import annotations

import copy
import functools
import threading

import pytest
import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, TextIteratorStreamer
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

import duo_compile
from duo_compile.runtime import generation
from tests.tiny_models import tiny_model

VOCAB, PROMPT, NEW, MAX_LEN = 96, 12, 10, 64


@functools.lru_cache(maxsize=None)
def _model():
    return tiny_model("llama", gqa=True)


@functools.lru_cache(maxsize=None)
def _tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer for the tiny vocabulary: ids 0-3 special, 4-9 the letters a-f, i >= 10 the word ``w<i>``; decode
    concatenates (so any text of those pieces round-trips, which StopStringCriteria relies on)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate("abcdef")},
             **{f"w{i}": i for i in range(10, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Split(Regex(r"w\d+|\S"), behavior="isolated")])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@functools.lru_cache(maxsize=None)
def _engine():
    return duo_compile.compile(_model(), duo_compile.HeadMasks.all_retrieval(3, 2), max_seq_len=MAX_LEN,
                               backend="eager", tokenizer=_tokenizer())


def _ids(batch: int = 2, length: int = PROMPT, seed: int = 0) -> torch.Tensor:
    # ids from 4 up: the tokenizer's letters and words (so stop strings and streamers see text)
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf(ids, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return _model().generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def _ours(ids, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return _engine().generate(ids, **kwargs)


def _assert_same_output(got, want):
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
        return
    assert torch.equal(got.sequences, want.sequences)
    for name in ("scores", "logits"):
        ours, theirs = getattr(got, name), getattr(want, name)
        assert (ours is None) == (theirs is None), name
        if theirs is None:
            continue
        assert len(ours) == len(theirs), name
        for a, b in zip(ours, theirs):
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"{name}: different tokens filtered"
            torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-4, rtol=0)


@pytest.fixture
def with_generation_config(monkeypatch):
    """Give the model and the engine the same generation config (what compile copies), restored afterwards."""

    def apply(**fields):
        config = copy.deepcopy(_model().generation_config)
        config.update(**fields)
        monkeypatch.setattr(_model(), "generation_config", config)
        monkeypatch.setattr(_engine(), "generation_config", copy.deepcopy(config))
        return config

    return apply


# ------------------------------------------------------------------------------------------------ defaults
def test_compile_keeps_the_models_generation_config_and_the_tokenizer():
    engine = _engine()
    assert engine.tokenizer is _tokenizer()
    assert engine.generation_config is not _model().generation_config  # a copy: the engine is a snapshot
    assert engine.generation_config.to_dict() == _model().generation_config.to_dict()


def _free_run(ids, new=NEW):
    return _engine().generate(ids, max_new_tokens=new, eos_token_id=None)


def test_greedy_equals_hf_generate_with_the_models_generation_config(with_generation_config):
    """The model's generation config is the default for both: its eos id stops row 1 early, its pad id fills it;
    processed scores and raw logits are returned as Hugging Face returns them."""
    ids = _ids()
    free = _free_run(ids)
    row0, row1 = free[0, PROMPT:].tolist(), free[1, PROMPT:].tolist()
    step = next(k for k in range(1, NEW - 1) if row1[k] not in row0 and row1[k] not in row1[:k])
    eos = row1[step]  # row 1 produces it first at this step, row 0 never
    with_generation_config(eos_token_id=eos, pad_token_id=0, max_new_tokens=NEW)
    options = dict(output_scores=True, output_logits=True, return_dict_in_generate=True)
    want, got = _hf(ids, **options), _ours(ids, **options)
    _assert_same_output(got, want)
    assert got.sequences[1, PROMPT + step] == eos and (got.sequences[1, PROMPT + step + 1:] == 0).all()
    assert torch.equal(got.sequences[0], free[0])  # greedy tokens as before
    assert torch.equal(_ours(ids), want.sequences)  # defaults alone: max_new_tokens and eos from the config


SAMPLING = {
    "plain": dict(do_sample=True),
    "temperature-top-k-top-p": dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    "min-p-repetition-ngram": dict(do_sample=True, min_p=0.05, repetition_penalty=1.3, no_repeat_ngram_size=2),
    "num-return-sequences": dict(do_sample=True, num_return_sequences=3, temperature=1.5, top_k=0),
}


@pytest.mark.parametrize("case", list(SAMPLING))
def test_sampling_is_token_identical_to_hf_generate_with_the_same_seed(case):
    ids = _ids()
    options = dict(max_new_tokens=NEW, output_scores=True, output_logits=True, return_dict_in_generate=True,
                   **SAMPLING[case])
    want, got = _hf(ids, seed=5, **options), _ours(ids, seed=5, **options)
    _assert_same_output(got, want)
    assert got.sequences.shape[0] == ids.shape[0] * SAMPLING[case].get("num_return_sequences", 1)
    # The same seed again gives the same tokens; the global RNG advanced exactly as Hugging Face advanced it.
    after_hf = torch.get_rng_state()
    again = _ours(ids, seed=5, **options)
    assert torch.equal(again.sequences, got.sequences) and torch.equal(torch.get_rng_state(), after_hf)


def test_generation_config_argument_and_max_length_like_hf(with_generation_config):
    ids = _ids()
    config = GenerationConfig(do_sample=True, top_k=7, max_length=PROMPT + 6, pad_token_id=0)
    _assert_same_output(_ours(ids, seed=1, generation_config=config), _hf(ids, seed=1, generation_config=config))
    assert _ours(ids, max_length=PROMPT + 4).shape == (2, PROMPT + 4)
    assert _ours(ids, max_length=PROMPT + 4, max_new_tokens=2).shape == (2, PROMPT + 2)  # max_new_tokens wins
    assert _ours(ids).shape == (2, PROMPT + 20)  # transformers' default: 20 new tokens
    with_generation_config(max_new_tokens=3, do_sample=True, temperature=0.5)  # the model's defaults
    _assert_same_output(_ours(ids, seed=2, return_dict_in_generate=True),
                        _hf(ids, seed=2, return_dict_in_generate=True))
    assert _ours(ids).shape == (2, PROMPT + 3)
    assert torch.equal(_ours(ids, max_new_tokens=0), ids)  # the engine's extension: the prompt alone


def test_generator_makes_sampling_reproducible_without_touching_the_global_rng():
    ids = _ids()
    state = torch.get_rng_state()
    runs = [_ours(ids, max_new_tokens=NEW, do_sample=True, generator=torch.Generator().manual_seed(s))
            for s in (11, 11, 12)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.equal(torch.get_rng_state(), state)
    # the generator is what torch.multinomial draws from: the same generator state as the global RNG's, same tokens
    torch.manual_seed(11)
    assert torch.equal(_hf(ids, max_new_tokens=NEW, do_sample=True), runs[0])


# --------------------------------------------------------------------------------- processors and criteria
class _Ban(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.index_fill(1, torch.tensor([self.token]), float("-inf"))


class _StopAfter(StoppingCriteria):
    """Row r is done once it has produced token ``token``."""

    def __init__(self, token: int, prompt: int):
        self.token, self.prompt = token, prompt

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt:] == self.token).any(dim=1)


def test_user_logits_processor_and_stopping_criteria_like_hf():
    ids = _ids()
    free = _free_run(ids)
    banned, stop = int(free[0, PROMPT]), int(free[1, PROMPT + 2])
    options = dict(max_new_tokens=NEW, pad_token_id=0, do_sample=True, output_scores=True,
                   return_dict_in_generate=True, logits_processor=LogitsProcessorList([_Ban(banned)]),
                   stopping_criteria=StoppingCriteriaList([_StopAfter(stop, PROMPT)]))
    got, want = _ours(ids, seed=3, **options), _hf(ids, seed=3, **options)
    _assert_same_output(got, want)
    assert banned not in got.sequences[:, PROMPT:].tolist()
    # A user's MaxLengthCriteria replaces the one built from max_new_tokens, as in Hugging Face.
    options = dict(max_new_tokens=NEW, stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(PROMPT + 4)]))
    got, want = _ours(ids, **options), _hf(ids, **options)
    assert torch.equal(got, want) and got.shape == (2, PROMPT + 4)


def test_stop_strings_stop_like_hf():
    ids = _ids()
    free = _free_run(ids)
    seq = free[0].tolist()
    pair = seq[PROMPT + 3:PROMPT + 5]
    stop = "".join(_tokenizer().convert_ids_to_tokens(pair))  # two words row 0 produces, written without a space
    end = next(j + 1 for j in range(PROMPT, len(seq)) if seq[j - 1:j + 1] == pair)  # where row 0 first ends in it
    options = dict(max_new_tokens=NEW, stop_strings=[stop])
    want = _hf(ids, tokenizer=_tokenizer(), **options)
    assert torch.equal(_ours(ids, **options), want)  # the engine's own tokenizer
    assert torch.equal(_ours(ids[:1], **options), free[:1, :end])  # row 0 alone stops right after the string
    assert torch.equal(_ours(ids[:1], tokenizer=_tokenizer(), **options), free[:1, :end])


# ------------------------------------------------------------------------------------------------ streamers
class _Recorder(BaseStreamer):
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def end(self):
        self.calls.append(("end", None))


def test_streamer_gets_the_prompt_then_each_token_then_end_like_hf():
    ids = _ids()
    ours, theirs = _Recorder(), _Recorder()
    out = _ours(ids, seed=4, max_new_tokens=NEW, do_sample=True, streamer=ours)
    _hf(ids, seed=4, max_new_tokens=NEW, do_sample=True, streamer=theirs)
    assert [kind for kind, _ in ours.calls] == ["put"] * (NEW + 1) + ["end"]
    assert torch.equal(ours.calls[0][1], ids)
    for step, (_, tokens) in enumerate(ours.calls[1:-1]):
        assert torch.equal(tokens, out[:, PROMPT + step])  # [batch], in order
    assert len(ours.calls) == len(theirs.calls)
    assert all(a[0] == b[0] and (a[1] is None or torch.equal(a[1], b[1])) for a, b in zip(ours.calls, theirs.calls))


def test_text_iterator_streamer_yields_the_generated_text():
    ids = _ids(1)
    streamer = TextIteratorStreamer(_tokenizer(), skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=_ours(ids, max_new_tokens=NEW, streamer=streamer)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == _tokenizer().decode(result["out"][0, PROMPT:], skip_special_tokens=True)
    assert len(text) >= NEW


# --------------------------------------------------------------------------------------------------- errors
REFUSED = {
    "num-beams": (dict(num_beams=2), r"num_beams=2: beam search is not supported"),
    "output-attentions": (dict(output_attentions=True), r"output_attentions=True is not supported"),
    "output-hidden-states": (dict(output_hidden_states=True), r"output_hidden_states=True is not supported"),
    "unknown-keyword": (dict(temprature=0.5), r"cannot honour: temprature"),
    "assistant-model": (dict(assistant_model=object()), r"cannot honour: assistant_model"),
    "model-input": (dict(position_ids=torch.zeros(2, PROMPT)), r"cannot honour: position_ids"),
    "greedy-num-return-sequences": (dict(num_return_sequences=2), r"num_return_sequences"),
    "contrastive": (dict(penalty_alpha=0.6, top_k=4), r"'contrastive_search' \(set by penalty_alpha"),
    "guidance": (dict(guidance_scale=1.5), r"guidance_scale=1\.5: classifier-free guidance is not supported"),
    "cache-implementation": (dict(cache_implementation="static"), r"cache_implementation cannot be honoured"),
    "no-cache": (dict(use_cache=False), r"use_cache=False cannot be honoured"),
    "bad-temperature": (dict(do_sample=True, temperature=0.0), r"temperature"),
    "bad-top-k": (dict(do_sample=True, top_k=-1), r"top_k"),
    "generation-config-type": (dict(generation_config={"do_sample": True}), r"must be a transformers GenerationConfig"),
    "generator-type": (dict(do_sample=True, generator=7), r"generator must be a torch\.Generator on cpu, got 7"),
    "streamer-type": (dict(streamer=object()), r"streamer must have put\(\) and end\(\)"),
    "processor-type": (dict(logits_processor="x"), r"logits_processor must be a LogitsProcessorList"),
    "max-length-short": (dict(max_new_tokens=None, max_length=PROMPT - 1),
                         rf"max_length {PROMPT - 1} is shorter than the prompt"),
    "max-length-long": (dict(max_new_tokens=None, max_length=MAX_LEN + 1),
                        rf"= {MAX_LEN + 1} exceeds max_seq_len={MAX_LEN}"),
    "holed-mask": (dict(attention_mask=torch.tensor([[1, 0] + [1] * (PROMPT - 2)] * 2)),
                   r"attention_mask row 0 is not left or right padding"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_the_engine_cannot_honour_is_refused_by_name_before_any_work(case):
    engine = _engine()
    engine.generate(_ids(), max_new_tokens=2)  # caches allocated for batch 2
    caches, rng = [c.clone() for c in engine.caches], torch.get_rng_state()
    overrides, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        engine.generate(_ids(), **{"max_new_tokens": NEW, **overrides})
    assert all(torch.equal(a, b) for a, b in zip(engine.caches, caches))
    assert torch.equal(torch.get_rng_state(), rng)


def test_stop_strings_without_a_tokenizer_are_refused(monkeypatch):
    monkeypatch.setattr(_engine(), "tokenizer", None)
    with pytest.raises(ValueError, match=r"stop strings.*tokenizer"):
        _engine().generate(_ids(), max_new_tokens=NEW, stop_strings=["w5"])


# ------------------------------------------------------------------------------------------------ host syncs
def test_the_decode_loop_reads_the_device_only_to_stop_early(monkeypatch):
    """Counted: host reads of tensors (bool, item, tolist, int, float, cpu, numpy) by the decode loop and by
    transformers' processors and criteria it calls, from prefill to the end. None when decoding to the max length,
    greedy or sampled; one per step but the last for the eos check; one copy per token (and the prompt) for a
    streamer."""
    import os
    import sys

    import transformers.generation

    hf_folder = os.path.dirname(transformers.generation.__file__) + os.sep
    state = {"decoding": False, "reads": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if state["decoding"] and (caller == generation.__file__ or caller.startswith(hf_folder)):
                state["reads"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "cpu", "numpy"):
        counting(name)
    decode = generation.decode

    def watched(*args, **kwargs):
        state["decoding"] = True
        try:
            return decode(*args, **kwargs)
        finally:
            state["decoding"] = False

    monkeypatch.setattr(generation, "decode", watched)
    ids = _ids()
    eos = min(set(range(4, VOCAB)) - set(_free_run(ids)[:, PROMPT:].flatten().tolist()))  # never produced
    for options, expected in [(dict(), 0), (dict(do_sample=True, temperature=0.8, top_p=0.9), 0),
                              (dict(eos_token_id=eos, pad_token_id=0), NEW - 1),
                              (dict(streamer=_Recorder()), NEW + 1)]:
        state["reads"] = 0
        _ours(ids, max_new_tokens=NEW, **options)
        assert state["reads"] == expected, options


# ------------------------------------------------------------------------------------ engine file and CLI
@pytest.fixture(scope="module")
def cli_engine_file(tmp_path_factory):
    """``duo-compile compile`` of the tiny Llama saved as a model directory (eos id 2, pad id 0 in its configs)
    with this file's tokenizer and a chat template; mixed masks; ONNX engine file."""
    from duo_compile.cli import main
    from tests.tiny_models import mixed_gates

    folder = tmp_path_factory.mktemp("cli")
    model_dir = folder / "model"
    model = tiny_model("llama", gqa=True)
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = 2, 0
    model.save_pretrained(model_dir)
    tokenizer = copy.deepcopy(_tokenizer())
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}a b :"
    tokenizer.save_pretrained(model_dir)
    duo_compile.HeadMasks.from_gates(mixed_gates(3, 2)).to_tsv(folder / "masks.tsv")
    path = folder / "tiny.onnx"
    assert main(["compile", str(model_dir), "--masks", str(folder / "masks.tsv"), "--sink", "4", "--recent", "8",
                 "--max-seq-len", "64", "--dtype", "float32", "-o", str(path), "--backend", "onnx"]) == 0
    return path, tokenizer


def test_engine_file_carries_the_tokenizer_and_the_generation_config(cli_engine_file):
    path, tokenizer = cli_engine_file
    engine = duo_compile.load(path)
    assert engine.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert engine.tokenizer.chat_template == tokenizer.chat_template
    text = "w12 a b w40 c w77 d"
    assert engine.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (engine.generation_config.eos_token_id, engine.generation_config.pad_token_id) == (2, 0)  # the model dir's


def test_cli_run_streams_text_from_a_text_prompt(cli_engine_file, capsys, tmp_path):
    from duo_compile.cli import main

    path, tokenizer = cli_engine_file
    engine = duo_compile.load(path)
    prompt = "w12 a b w40 c w77 d"

    def run(*args):
        capsys.readouterr()
        assert main(["run", str(path), "--max-new-tokens", "8", *args]) == 0
        return capsys.readouterr().out

    def expected(ids, **options):
        out = engine.generate(ids, max_new_tokens=8, **options)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert run("--prompt", prompt) == expected(ids)  # greedy: the engine's generate, decoded, streamed
    (tmp_path / "prompt.txt").write_text(prompt)
    assert run("--file", str(tmp_path / "prompt.txt")) == expected(ids)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_dict=True, return_tensors="pt")["input_ids"]
    assert run("--chat", "--prompt", prompt) == expected(chat)
    sampled = run("--prompt", prompt, "--do-sample", "--temperature", "1.5", "--top-k", "50", "--seed", "3")
    torch.manual_seed(3)
    assert sampled == expected(ids, do_sample=True, temperature=1.5, top_k=50)
    assert run("--prompt", prompt, "--do-sample", "--temperature", "1.5", "--top-k", "50", "--seed", "3") == sampled
    assert run("--ids", "1,5,6").split()[:3] == ["1", "5", "6"]  # ids in, ids out, as before


def test_cli_run_errors_name_what_is_missing(cli_engine_file, tmp_path, capsys):
    from duo_compile.cli import main

    path, _ = cli_engine_file
    assert main(["run", str(path), "--chat", "--ids", "1,2"]) == 2
    assert "--chat applies to a text prompt" in capsys.readouterr().err
    assert main(["run", str(path), "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    from duo_compile.cli import _prompt_ids, build_parser

    args = build_parser().parse_args(["run", str(path), "--prompt", "hello"])
    with pytest.raises(ValueError, match=r"has no tokenizer .*: give the prompt as --ids"):
        _prompt_ids(args, None)
