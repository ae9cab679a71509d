"""The OpenAI-compatible HTTP API (FastAPI), in front of the engine thread (serve/loop.py).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent
events, ``data: {...}`` chunks then ``data: [DONE]``, as OpenAI's clients read them), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text, serve/metrics.py).

Each request is checked before it is queued (protocol.py for the body, then the prompt's tokens, the length
against the engine's ``max_seq_len`` and the generation settings through ``generation.plan``); a refusal is a 400
with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` naming the field. A full waiting
queue is a 429 with ``Retry-After``; a server shutting down answers 503. Each choice carries, beside the text,
the generated ``token_ids`` (an extension, as vLLM's): clients can compare tokens exactly.

A client that disconnects cancels its request: a stream's generator is cancelled by the ASGI server and cancels
the sequence; a non-streamed request watches for the disconnect while it waits. Cancelling frees the slot and
pages at the engine's next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from duo_compile.serve.loop import EngineLoop
from duo_compile.serve.memory import KVPlan
from duo_compile.serve.metrics import Metrics
from duo_compile.serve.protocol import BadRequest, ChatRequest, CompletionRequest
from duo_compile.serve.scheduler import QueueFull, Scheduler
from duo_compile.serve.sequence import ERROR, Sequence, Update
from duo_compile.serve.text import StopOnText, TextStream

_DISCONNECT_POLL = 0.25  # seconds between checks for a vanished client while a non-streamed request runs


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Refused(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


class _Tracker:
    """Follows one sequence from the engine thread: timings for the metrics, updates to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics, prompt_tokens: int):
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self._loop, self._metrics = loop, metrics
        self.arrival = self._last = time.monotonic()
        self._first = True
        self.prompt_tokens = prompt_tokens

    def __call__(self, update: Update) -> None:  # on the engine thread
        now = time.monotonic()
        if update.token is not None:
            self._metrics.token()
            if self._first:
                self._metrics.ttft.observe(now - self.arrival)
                self._metrics.prompt_tokens.inc(self.prompt_tokens)
                self._first = False
            else:
                self._metrics.itl.observe(now - self._last)
            self._last = now
        if update.finish_reason is not None:
            self._metrics.finished.labels(update.finish_reason).inc()
            self._metrics.e2e.observe(now - self.arrival)
        self._loop.call_soon_threadsafe(self.queue.put_nowait, update)


def create_app(engine, plan: KVPlan, *, model_name: str, token_budget: int | None = None,
               max_waiting: int = 64, tokenizer=None) -> FastAPI:
    """The app serving ``engine`` with ``plan``'s slots and pages (serve/memory.py); its lifespan starts and stops
    the engine thread (``app.state.loop``). ``tokenizer`` (default ``engine.tokenizer``) encodes text and decodes
    outputs."""
    tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
    scheduler = Scheduler(engine, plan.slots, token_budget=token_budget, max_waiting=max_waiting,
                          num_pages=plan.pages if plan.paged else None)
    engine_loop = EngineLoop(scheduler)
    metrics = Metrics(lambda: engine_loop.counts, plan)
    limit = engine.config.max_seq_len
    vocab = engine.info.vocab_size

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:  # the ASGI server has finished (or given up on) the open requests: cancel what is left
            await asyncio.to_thread(engine_loop.stop, 30.0)

    app = FastAPI(title="duo-compile", lifespan=lifespan)
    app.state.loop, app.state.scheduler, app.state.metrics = engine_loop, scheduler, metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
        if not loc:
            return _error(400, "the body must be a JSON object (Content-Type: application/json)")
        if first.get("type") == "extra_forbidden":
            return _error(400, f"unknown field {'.'.join(loc)!r}", ".".join(loc) or None)
        param = ".".join(p for p in loc if not p.isdigit() or len(loc) == 1) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "literal_error" and param == "n":
            message = "n must be 1: the server returns one choice per request"
        return _error(400, f"{param}: {message}" if param else message, param)

    @app.exception_handler(_Refused)
    async def _refused(request: Request, exc: _Refused):
        return exc.response

    # --------------------------------------------------------------------------------------- requests
    def _check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise _Refused(_error(404, f"model {name!r} is not served here (this server serves {model_name!r})",
                                  "model", "not_found_error"))

    def _encode_prompt(prompt) -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise BadRequest("this model has no tokenizer: give the prompt as token ids", "prompt")
            ids = list(tokenizer(prompt)["input_ids"])
        else:
            ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        if not ids:
            raise BadRequest("prompt is empty", "prompt")
        return ids

    def _encode_chat(body: ChatRequest) -> list[int]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template: use /v1/completions", "messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
        return _encode_prompt(list(encoded["input_ids"]))

    def _sequence(body, prompt: list[int], max_tokens: int | None, tracker_box: list) -> Sequence:
        room = limit - len(prompt)
        if room < 1:
            raise BadRequest(f"the prompt has {len(prompt)} tokens; this model's limit is {limit} tokens "
                             f"(prompt + max_tokens)", "messages" if isinstance(body, ChatRequest) else "prompt")
        max_tokens = room if max_tokens is None else max_tokens
        if len(prompt) + max_tokens > limit:
            raise BadRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = "
                             f"{len(prompt) + max_tokens} exceeds this model's limit of {limit} tokens",
                             "max_completion_tokens" if getattr(body, "max_completion_tokens", None)
                             else "max_tokens")
        kwargs = body.generate_kwargs(tokenizer)
        if body.stop:
            kwargs["stopping_criteria"] = [StopOnText(tokenizer, body.stop, len(prompt))]
        if kwargs.get("do_sample"):
            seed = body.seed if body.seed is not None else secrets.randbits(63)
            kwargs["generator"] = torch.Generator(engine.device).manual_seed(seed)
        tracker = _Tracker(asyncio.get_running_loop(), metrics, len(prompt))
        tracker_box.append(tracker)
        try:
            return Sequence.from_generate_args(engine, prompt, on_update=tracker, max_new_tokens=max_tokens,
                                               **kwargs)
        except ValueError as err:
            raise BadRequest(str(err)) from None

    def _submit(seq: Sequence) -> None:
        try:
            engine_loop.submit(seq)
        except QueueFull as err:
            metrics.refused.labels("429").inc()
            raise _Refused(_error(429, f"the server is busy: {err}; retry later", None, "rate_limit_error",
                                  {"Retry-After": "1"})) from None
        except RuntimeError as err:
            metrics.refused.labels("503").inc()
            raise _Refused(_error(503, str(err), None, "service_unavailable", {"Retry-After": "5"})) from None

    async def _serve(request: Request, body, prompt_of, chat: bool):
        _check_model(body.model)
        trackers: list[_Tracker] = []
        try:
            prompt = prompt_of()
            seq = _sequence(body, prompt, body.token_limit() if chat else body.max_tokens, trackers)
        except BadRequest as err:
            metrics.refused.labels("400").inc()
            return _error(400, str(err), err.param)
        _submit(seq)
        stream = TextStream(tokenizer, body.stop)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_events(seq, trackers[0], stream, meta, chat, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _whole(request, seq, trackers[0], stream, meta, chat)

    async def _whole(request: Request, seq: Sequence, tracker: _Tracker, stream: TextStream, meta, chat: bool):
        reason, error = None, None
        check = time.monotonic() + _DISCONNECT_POLL
        try:
            while reason is None:
                try:
                    update = await asyncio.wait_for(tracker.queue.get(), _DISCONNECT_POLL)
                    reason, error = update.finish_reason, update.error
                except asyncio.TimeoutError:
                    pass
                if reason is None and time.monotonic() >= check:  # (tokens may come faster than the poll)
                    check = time.monotonic() + _DISCONNECT_POLL
                    if await request.is_disconnected():
                        return PlainTextResponse("", status_code=499)  # (the finally cancels the request)
        finally:
            if reason is None:
                engine_loop.cancel(seq)
        if reason == ERROR:
            return _error(500, error or "the request failed", None, "server_error")
        text = stream.text(seq.tokens)
        choice = {"index": 0, "finish_reason": reason, "token_ids": list(seq.tokens)}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = None
        else:
            choice.update(text=text, logprobs=None)
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": _usage(seq)}

    async def _events(seq: Sequence, tracker: _Tracker, stream: TextStream, meta, chat: bool, usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        done = False

        def chunk(text: str, tokens: list[int], reason: str | None, first: bool = False) -> str:
            choice = {"index": 0, "finish_reason": reason, "token_ids": tokens, "logprobs": None}
            if chat:
                choice["delta"] = {"role": "assistant", "content": text} if first else (
                    {"content": text} if text or reason is None else {})
            else:
                choice["text"] = text
            return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

        try:
            if chat:
                yield chunk("", [], None, first=True)
            while not done:
                update = await tracker.queue.get()
                done = update.finish_reason is not None
                if update.finish_reason == ERROR:
                    error = {"message": update.error or "the request failed", "type": "server_error",
                             "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                text = stream.delta(seq.tokens, done)
                tokens = [update.token] if update.token is not None else []
                if text or tokens or done:
                    yield chunk(text, tokens, update.finish_reason)
            if usage:
                yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': _usage(seq)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is cancelled or closed) before the end: free the slot
            if not done:
                engine_loop.cancel(seq)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await _serve(request, body, lambda: _encode_prompt(body.prompt_of_one()), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await _serve(request, body, lambda: _encode_chat(body), chat=True)

    # ------------------------------------------------------------------------------------------- info
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "duo-compile", "max_model_len": limit}]}

    @app.get("/health")
    async def health():
        if not engine_loop.alive:
            return _error(503, "the engine thread is not running", None, "service_unavailable")
        running, waiting, _, _ = engine_loop.counts
        return {"status": "ok", "running": running, "waiting": waiting, "slots": plan.slots}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _usage(seq: Sequence) -> dict:
    return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.tokens),
            "total_tokens": len(seq.prompt) + len(seq.tokens)}
