"""The OpenAI request bodies the server takes, checked field by field, and their meaning as ``generate`` arguments.

Unknown fields are refused (``extra="forbid"``), as are values the server cannot honour (``n > 1``, ``best_of``,
``logprobs``, ``echo``, ``logit_bias``, ...): a 400 naming the field rather than a silently different answer.
Sampling follows OpenAI's defaults (temperature 1, top_p 1): ``temperature`` 0 is greedy. ``top_k``, ``min_p``
and ``repetition_penalty`` are taken too, as vLLM takes them; each becomes the transformers warper or processor
``model.generate`` builds for it (runtime/generation.py), and ``stop`` a stopping criterion on the decoded text (text.py).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class BadRequest(ValueError):
    """A request the server refuses: 400 with OpenAI's error body; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields common to completions and chat."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # Accepted at their neutral value only (what OpenAI's clients may send by default).
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    logprobs: Literal[False] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops or None

    def generate_kwargs(self, tokenizer) -> dict:
        """``generate`` arguments for the sampling settings (the caller adds the token count and ``stop``)."""
        kwargs: dict = {}
        if self.temperature == 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
            if self.top_k is not None and self.top_k > 0:
                kwargs["top_k"] = self.top_k
            if self.min_p:
                kwargs["min_p"] = self.min_p
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.stop and tokenizer is None:
            raise BadRequest("stop needs the model's tokenizer, and this model has none", "stop")
        return kwargs


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: Literal[False] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompt_of_one(self) -> str | list[int]:
        """The one prompt (a string or token ids); a batch of several is refused (one request, one prompt)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise BadRequest(f"prompt holds {len(prompt)} prompts: send one per request", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise BadRequest("prompt is empty", "prompt")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
