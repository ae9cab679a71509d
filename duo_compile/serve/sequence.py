"""One request inside the scheduler: its prompt, where it is in its cache row, and how it picks each next token.

A request's settings are resolved by ``runtime/generation.plan``, the same code behind ``Engine.generate``: the
merged ``GenerationConfig``, transformers' own logits processors and warpers (repetition penalty, temperature,
top-k, top-p, min-p, ...) and stopping criteria (max length, eos ids, stop strings). ``choose`` is one step of
``generation.decode`` for a batch of one row: the processors get an fp32 copy of the row's last logits, then
``torch.multinomial`` over their softmax (sampling, with the request's own ``torch.Generator``) or argmax (greedy),
then the criteria see the sequence so far. So a request decoded here gives the tokens ``Engine.generate`` gives
that prompt alone (greedy: token for token; sampling: the same draws for the same generator state).
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.generation import StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxLengthCriteria

from duo_compile.runtime import generation

_next_id = itertools.count()

# Why a sequence ended (OpenAI's finish_reason words, plus the server's own two).
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


@dataclass(frozen=True)
class Update:
    """What one scheduler step did to one sequence: a new token (or None), and why it ended (None: it goes on)."""

    sequence: Sequence
    token: int | None
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """A request: ``prompt`` token ids and a checked ``generation.Plan``. The scheduler sets ``slot`` (its row of
    the streaming caches), ``pages`` (its retrieval pages, in order: its block-table row) and ``cached`` (how many
    of its tokens the caches hold); ``tokens`` are those generated so far.

    ``on_update`` (optional) is called with each ``Update`` by whoever runs the scheduler (serve/loop.py calls it
    from the engine thread)."""

    prompt: list[int]
    plan: generation.Plan
    on_update: Callable[[Update], None] | None = None
    id: int = field(default_factory=lambda: next(_next_id))
    arrival: float = field(default_factory=time.monotonic)
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    cached: int = 0
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self):
        self._ids = torch.tensor([self.prompt], dtype=torch.long, device=self.plan.input_ids.device)
        # Criteria other than the length (eos, stop strings, max_time, the caller's): they end a sequence early.
        self._stops = StoppingCriteriaList(c for c in self.plan.criteria if not isinstance(c, MaxLengthCriteria))

    @classmethod
    def from_generate_args(cls, engine, prompt: list[int], on_update=None, **generate_kwargs) -> Sequence:
        """Check a request as ``engine.generate(prompt, **generate_kwargs)`` would (ValueError naming the argument,
        before any work): streamers, padded batches and ``num_return_sequences > 1`` are not for one row."""
        for name in ("streamer", "attention_mask", "return_dict_in_generate", "output_scores", "output_logits"):
            if generate_kwargs.get(name):
                raise ValueError(f"{name} is not supported for a served request")
        ids = torch.tensor([prompt], dtype=torch.long, device=engine.device)
        plan = generation.plan(engine, ids, **generate_kwargs)
        if plan.input_ids.shape[0] != 1:
            raise ValueError("num_return_sequences must be 1 for a served request")
        return cls(list(prompt), plan, on_update)

    # ------------------------------------------------------------------------------------------------ state
    @property
    def max_new_tokens(self) -> int:
        return self.plan.new_tokens

    @property
    def context_length(self) -> int:
        """How many tokens must be cached before the next decode step: the prompt, then every generated token but
        the last (which that step feeds). After a preemption all of them are prefilled again (recomputed)."""
        return len(self.prompt) + max(len(self.tokens) - 1, 0)

    @property
    def prefilling(self) -> bool:
        """True while some of the context is not yet in the cache."""
        return self.cached < self.context_length

    def token_ids(self, begin: int, end: int) -> list[int]:
        """Tokens ``begin .. end - 1`` of the prompt followed by the generated tokens."""
        n = len(self.prompt)
        return self.prompt[begin:end] + self.tokens[max(begin - n, 0):max(end - n, 0)]

    @property
    def length(self) -> int:
        """Tokens the sequence will have at most, prompt included: what its cache row must hold."""
        return len(self.prompt) + self.max_new_tokens

    # ----------------------------------------------------------------------------------------------- tokens
    @torch.no_grad()
    def choose(self, logits: torch.Tensor) -> tuple[int, str | None]:
        """The next token from this row's last logits ``[vocab]`` and whether the sequence ends with it (the
        reason, else None)."""
        plan = self.plan
        scores = plan.processors(self._ids, logits[None].to(copy=True, dtype=torch.float32))
        if plan.config.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=plan.generator)[0]
        else:
            token = torch.argmax(scores, dim=-1)
        self._ids = torch.cat([self._ids, token.view(1, 1)], dim=-1)
        value = int(token)
        self.tokens.append(value)
        if len(self._stops) and bool(self._stops(self._ids, None).any()):
            return value, STOP
        if len(self.tokens) >= self.max_new_tokens:
            return value, LENGTH
        return value, None
