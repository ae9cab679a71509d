"""The decode loop behind ``Engine.generate``: Hugging Face's ``generate`` semantics on the engine's static caches.

Taken from transformers as they are (not re-implemented), so that every argument means what it means to
``model.generate``:

- the merge of keyword arguments, ``generation_config=`` and the engine's own ``generation_config`` (the model's,
  kept by ``compile`` and carried by engine files) over transformers' global defaults
  (``GenerationMixin._prepare_generation_config``), the special tokens (``_prepare_special_tokens``: eos ids as a
  list, pad defaulting to the first eos id) and the lengths (``_prepare_generated_length``: ``max_new_tokens``
  before ``max_length``, ``min_new_tokens``);
- the logits processors and warpers, the same classes in the same order as ``model.generate`` builds them, with the
  user's ``logits_processor`` merged in the same way (``_get_logits_processor``): repetition penalty, no-repeat
  n-grams, min length, bad words, ... then temperature, top-k, top-p, min-p, typical-p, ... when sampling;
- the stopping criteria (``_get_stopping_criteria``): ``MaxLengthCriteria``, ``MaxTimeCriteria``,
  ``StopStringCriteria`` (``stop_strings`` with ``tokenizer=``, default ``engine.tokenizer``), ``EosTokenCriteria``,
  merged with the user's ``stopping_criteria``;
- the output class ``GenerateDecoderOnlyOutput``.

Those helpers are methods of the model class; they are called on ``_Host``, which holds the few attributes they
read (the generation defaults, the device, a decoder-only config). They are the same in transformers 5.17 and 5.25.

``decode`` is Hugging Face's ``GenerationMixin._sample`` step for step: the processors get an fp32 copy of the
last logits, then softmax and ``torch.multinomial`` (sampling) or argmax (greedy); finished rows get the pad id
when an eos criterion exists; the criteria see the sequences so far (and the processed scores when they are
returned); a streamer gets ``put(prompt)``, then each new token ``[batch]``, then ``end()``. So the same seed gives
``model.generate``'s tokens. What differs: the model runs through the engine (``prefill`` in chunks, then one
``Engine.step`` per token on the static caches); ``generator=`` may replace the global RNG of ``torch.multinomial``;
the number of steps is fixed on the host from the max length; ``max_new_tokens=0`` returns the prompt (Hugging
Face refuses it).

Host syncs per token (what makes the host wait for the device): the loop reads "are all rows finished" once per
token only when something other than the max length can finish rows (eos ids, stop strings, ``max_time``, the
user's stopping criteria), as Hugging Face does; greedy or sampled decoding to the max length reads nothing. A
streamer needs every token on the host (one copy per token), and ``no_repeat_ngram_size`` reads the sequences on
the host every step (its Hugging Face processor does). ``tests/test_generation.py`` counts them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.stopping_criteria import MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

from duo_compile.checks import check_int
from duo_compile.parallel import group as parallel_group
from duo_compile.runtime import padding

__all__ = ["Plan", "plan", "decode"]

# Keyword arguments that ask for a cache or compilation of the model's own: the engine has its static split cache
# and its compiled graph, so they cannot be honoured. (From a GenerationConfig object, where models' configs carry
# them routinely, they are ignored.)
_ENGINE_OWNS = ("cache_implementation", "cache_config", "max_cache_len", "compile_config")
# What a generation mode other than greedy/sampling is switched on by, for the error message.
_MODE_ARGUMENTS = {
    GenerationMode.CONTRASTIVE_SEARCH: "penalty_alpha with top_k > 1 (contrastive search)",
    GenerationMode.ASSISTED_GENERATION: "prompt_lookup_num_tokens / assistant_early_exit / use_mtp (assisted "
                                        "generation)",
    GenerationMode.DOLA_GENERATION: "dola_layers (DoLa decoding)",
    GenerationMode.CONSTRAINED_BEAM_SEARCH: "constraints / force_words_ids (constrained beam search)",
}


class _HostConfig:
    """The model config as GenerationMixin's helpers read it: a decoder-only model of ``vocab_size`` tokens, with no
    legacy generation parameters and no ``max_position_embeddings`` (the engine's ``max_seq_len`` is checked
    instead, and the default length is not shortened to fit)."""

    is_encoder_decoder = False

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_text_config(self, *args, **kwargs) -> _HostConfig:
        return self

    def _get_generation_parameters(self) -> dict:
        return {}


class _Host:
    """Stands in for the model when calling transformers' own generation helpers (they read only these)."""

    _prepare_generation_config = GenerationMixin._prepare_generation_config
    _prepare_special_tokens = GenerationMixin._prepare_special_tokens
    _prepare_generated_length = GenerationMixin._prepare_generated_length
    _get_logits_processor = GenerationMixin._get_logits_processor
    _get_stopping_criteria = GenerationMixin._get_stopping_criteria
    _merge_criteria_processor_list = GenerationMixin._merge_criteria_processor_list

    def __init__(self, engine):
        self.config = _HostConfig(engine.info.vocab_size)
        defaults = getattr(engine, "generation_config", None)
        self.generation_config = defaults if isinstance(defaults, GenerationConfig) else GenerationConfig()
        self.device = engine.device


@dataclasses.dataclass
class Plan:
    """A checked request: everything ``decode`` needs, decided before any work."""

    input_ids: torch.Tensor  # [batch * num_return_sequences, prompt], the caller's dtype (padding included)
    rows: padding.Rows  # where each row's real tokens are (padded: left or right padding, padding.py)
    new_tokens: int  # steps to run unless every row finishes first
    chunk: int | None  # prefill chunk size
    config: GenerationConfig  # the merged configuration, special tokens prepared
    processors: LogitsProcessorList
    criteria: StoppingCriteriaList
    check_stop: bool  # a criterion other than the max length can finish rows: read "all finished?" every step
    pad: torch.Tensor | None  # finished rows get this id (only when an eos criterion exists, as in Hugging Face)
    generator: torch.Generator | None
    streamer: Any


# ------------------------------------------------------------------------------------------------------ checks
def token_ids(name: str, value) -> tuple[int, ...]:
    """eos/pad ids as Hugging Face takes them: None, one int, a list of ints or a tensor."""
    if value is None:
        return ()
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if not isinstance(values, Sequence) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
    return tuple(values)


def _check_input_ids(engine, input_ids, attention_mask) -> padding.Rows:
    """Check ``input_ids`` and ``attention_mask`` (left or right padding, padding.py); return where each row's real
    tokens are. Only real tokens must be in the vocabulary: padding ids are never fed to the model."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D tensor [batch, length], got {shape}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    if input_ids.device != engine.device:
        raise ValueError(f"input_ids are on {input_ids.device} but the engine runs on {engine.device}")
    rows = padding.check_attention_mask(attention_mask, input_ids)
    padding.check_real_tokens(input_ids, rows, engine.info.vocab_size)
    return rows


def _refuse_unsupported(config: GenerationConfig, unused: dict[str, Any]) -> None:
    """One clear ValueError for anything the engine cannot do, rather than ignoring it."""
    if config.output_attentions:
        raise ValueError("output_attentions=True is not supported: the engine's attention ops return no weights")
    if config.output_hidden_states:
        raise ValueError("output_hidden_states=True is not supported: the engine's graph returns only logits")
    unknown = sorted(k for k in unused if k not in ("output_attentions", "output_hidden_states"))
    if unknown:
        raise ValueError(
            f"generate() got argument(s) the engine cannot honour: {', '.join(unknown)} (neither an Engine.generate "
            f"argument nor a transformers GenerationConfig field; model inputs such as position_ids or a cache are "
            f"the engine's own)"
        )
    if config.num_beams is not None and config.num_beams > 1:
        raise ValueError(f"num_beams={config.num_beams}: beam search is not supported (greedy or do_sample=True)")
    if config.guidance_scale is not None and config.guidance_scale != 1:
        raise ValueError(f"guidance_scale={config.guidance_scale}: classifier-free guidance is not supported")
    if config.token_healing:
        raise ValueError("token_healing=True is not supported")
    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        cause = _MODE_ARGUMENTS.get(mode, "the generation config")
        raise ValueError(f"generation mode {mode.value!r} (set by {cause}) is not supported: greedy or sampling only")


def _as_list(kind, name: str, value):
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if isinstance(value, (list, tuple)):
        return kind(value)
    raise ValueError(f"{name} must be a {kind.__name__} (or a list), got {type(value).__name__}")


# -------------------------------------------------------------------------------------------------------- plan
def plan(
    engine,
    input_ids: torch.Tensor,
    generation_config: GenerationConfig | None = None,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    prefill_chunk_size: int | None = None,
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
    **kwargs,
) -> Plan:
    """Check a ``generate`` request and resolve it the way ``model.generate`` does; ValueError naming the argument
    for anything wrong or unsupported. Touches neither the caches nor any RNG."""
    rows = _check_input_ids(engine, input_ids, attention_mask)
    chunk = prefill_chunk_size if prefill_chunk_size is not None else engine.config.prefill_chunk_size
    if chunk is not None:
        chunk = check_int("prefill_chunk_size", chunk, 1)
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise ValueError(f"generation_config must be a transformers GenerationConfig, got {generation_config!r}")
    if generator is not None and not (isinstance(generator, torch.Generator)
                                      and generator.device.type == engine.device.type):
        raise ValueError(f"generator must be a torch.Generator on {engine.device.type}, got {generator!r}")
    if streamer is not None and not all(callable(getattr(streamer, name, None)) for name in ("put", "end")):
        raise ValueError(f"streamer must have put() and end() (e.g. transformers' TextStreamer), got {streamer!r}")
    if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
        raise ValueError(f"prefix_allowed_tokens_fn must be callable, got {prefix_allowed_tokens_fn!r}")
    logits_processor = _as_list(LogitsProcessorList, "logits_processor", logits_processor)
    stopping_criteria = _as_list(StoppingCriteriaList, "stopping_criteria", stopping_criteria)
    for name in _ENGINE_OWNS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} cannot be honoured: the engine decodes on its own static split KV cache")
    if kwargs.get("use_cache") is False:
        raise ValueError("use_cache=False cannot be honoured: the engine always decodes on its KV cache")

    # Lengths and special tokens are checked here, with the engine's wording, before transformers sees them (its
    # GenerationConfig refuses max_new_tokens=0, which the engine accepts, and fails on badly typed ids).
    lengths = {name: kwargs.pop(name) for name in ("max_new_tokens", "max_length") if name in kwargs}
    for name, value in lengths.items():
        if value is not None:
            check_int(name, value, 0)
    for name in ("eos_token_id", "pad_token_id"):
        if name in kwargs:
            _check_special(name, kwargs[name])

    host = _Host(engine)
    has_default_max_length = (
        lengths.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and host.generation_config.max_length is None
    )
    has_default_min_length = (
        kwargs.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and host.generation_config.min_length is None
    )
    try:
        config, unused = host._prepare_generation_config(generation_config, **kwargs)
    except TypeError as err:  # a badly typed value met a comparison in GenerationConfig.validate
        raise ValueError(f"invalid generation argument: {err}") from None
    for name, value in lengths.items():  # explicit arguments win, as kwargs do in Hugging Face
        setattr(config, name, value)
    _refuse_unsupported(config, unused)
    for name in ("max_new_tokens", "max_length", "min_new_tokens", "min_length"):
        if getattr(config, name) is not None:
            check_int(name, getattr(config, name), 0)
    repeats = check_int("num_return_sequences", config.num_return_sequences or 1, 1)

    eos = _check_special("eos_token_id", config.eos_token_id)
    pad = _check_special("pad_token_id", config.pad_token_id)
    pad_id = pad[0] if pad else (eos[0] if eos else None)
    if eos and not 0 <= pad_id < engine.info.vocab_size:  # finished rows feed pad_id back into the model
        raise ValueError(
            f"pad_token_id {pad_id}{'' if pad else ' (defaulted to eos_token_id[0])'} is outside the "
            f"vocabulary [0, {engine.info.vocab_size})"
        )
    prompt = input_ids.shape[1]
    host._prepare_special_tokens(config, None, device=engine.device, batch_size=input_ids.shape[0] * repeats)
    config = host._prepare_generated_length(
        generation_config=config,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name="input_ids",
        input_ids_length=prompt,
        inputs_tensor=input_ids,
    )
    if config.max_length < prompt:
        raise ValueError(f"max_length {config.max_length} is shorter than the prompt ({prompt} tokens)")

    long_ids = input_ids.long()  # processors index with the ids (gather/scatter need int64)
    processors = host._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt,
        encoder_input_ids=long_ids,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        logits_processor=logits_processor,
        device=engine.device,
        # As model.generate: the repetition penalty ignores each row's left padding (the mask as given, before
        # num_return_sequences repeats rows, which Hugging Face's processor then refuses as it does there).
        model_kwargs={} if attention_mask is None else {"attention_mask": attention_mask.to(engine.device)},
    )
    criteria = host._get_stopping_criteria(
        generation_config=config,
        stopping_criteria=stopping_criteria,
        tokenizer=tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None),
    )
    # The steps to run: Hugging Face stops when a MaxLengthCriteria fires (the user's replaces the default one),
    # after at least one token.
    limit = min((c.max_length for c in criteria if isinstance(c, MaxLengthCriteria)), default=config.max_length)
    new_tokens = limit - prompt if limit > prompt else (0 if config.max_length == prompt else 1)
    # The caches hold each row's real tokens only: a padded row's longest real prompt counts, not its padding.
    real_prompt = rows.longest if rows.padded else prompt
    total = real_prompt + new_tokens
    if total > engine.config.max_seq_len:
        raise ValueError(
            f"prompt length {real_prompt} + max_new_tokens {new_tokens} = {total} exceeds "
            f"max_seq_len={engine.config.max_seq_len}"
        )
    has_eos_criterion = any(hasattr(c, "eos_token_id") for c in criteria)
    if has_eos_criterion and config._pad_token_tensor is None:
        raise ValueError("stopping_criteria has an eos criterion but there is no pad_token_id for finished rows")
    if repeats > 1:
        input_ids = input_ids.repeat_interleave(repeats, dim=0)
        rows = padding.Rows(rows.lengths.repeat_interleave(repeats), rows.offsets.repeat_interleave(repeats),
                            rows.padded)
    return Plan(
        input_ids=input_ids,
        rows=rows,
        new_tokens=new_tokens,
        chunk=chunk,
        config=config,
        processors=processors,
        criteria=criteria,
        check_stop=any(not isinstance(c, MaxLengthCriteria) for c in criteria),
        pad=config._pad_token_tensor if has_eos_criterion else None,
        generator=generator,
        streamer=streamer,
    )


def _check_special(name: str, value) -> tuple[int, ...]:
    ids = token_ids(name, value)
    if name == "pad_token_id" and len(ids) > 1:
        raise ValueError(f"pad_token_id must be a single int, got {value!r}")
    return ids


# ------------------------------------------------------------------------------------------------------ decode
@torch.no_grad()
def decode(engine, plan: Plan):
    """Run a checked request on ``engine``: Hugging Face's ``_sample`` loop on the engine's caches."""
    config, streamer = plan.config, plan.streamer
    ids = plan.input_ids
    sequences = ids.long()
    want_dict = bool(config.return_dict_in_generate)
    scores = () if want_dict and config.output_scores else None
    raw_logits = () if want_dict and config.output_logits else None
    if streamer is not None:
        streamer.put(sequences.cpu())
    if plan.new_tokens > 0:
        engine.allocate(ids.shape[0])
        rows = plan.rows
        if rows.padded:  # each row from position 0, right-padded; decode steps at each row's own position
            lengths = rows.lengths.cpu()  # per-row positions stay on the host (no device sync per step)
            logits = engine.prefill(padding.right_aligned(ids, rows), plan.chunk, lengths)
        else:
            logits = engine.prefill(ids, plan.chunk)
        unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)
        for step in range(plan.new_tokens):
            next_token_logits = logits.to(copy=True, dtype=torch.float32)
            next_token_scores = plan.processors(sequences, next_token_logits)
            if scores is not None:
                scores += (next_token_scores,)
            if raw_logits is not None:
                raw_logits += (next_token_logits,)
            if config.do_sample:
                probs = torch.nn.functional.softmax(next_token_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1, generator=plan.generator).squeeze(1)
            else:
                next_tokens = torch.argmax(next_token_scores, dim=-1)
            if engine.tensor_parallel is not None:  # rank 0's token on every rank
                next_tokens = parallel_group.broadcast_tokens(next_tokens)
            if plan.pad is not None:  # finished rows continue with the pad id
                next_tokens = next_tokens * unfinished + plan.pad * (1 - unfinished)
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            unfinished = unfinished & ~plan.criteria(sequences, scores)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if step == plan.new_tokens - 1 or (plan.check_stop and bool(unfinished.max() == 0)):
                break
            if rows.padded:
                logits = engine.step(next_tokens[:, None].to(ids.dtype), lengths + step)
            else:
                logits = engine.step(next_tokens[:, None].to(ids.dtype), sequences.shape[1] - 1)
    if streamer is not None:
        streamer.end()
    sequences = sequences.to(ids.dtype)
    if not want_dict:
        return sequences
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=raw_logits)
