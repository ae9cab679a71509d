"""Continuous batching on one engine: every row of the engine's allocated caches is a slot for one request.

Requests join and leave between steps. Each ``step``:

1. admits waiting requests, first come first served, while a slot is free (a freed slot is reused at once);
2. decodes: one token for every request whose prompt is in its cache, all slots in one ``Engine.step`` of
   ``[slots, 1]`` tokens, each row at its own position (``start``), rows with nothing to decode given ``valid``
   0 (idle or prefilling rows: never written). A prompt with one token left to prefill runs that token here too:
   a one-token chunk is a decode step (the ops treat it the same), so it needs no graph of its own;
3. prefills under the step's token budget: what the decode tokens leave of ``token_budget`` goes to waiting
   prompts, in arrival order, as chunks run on their own cache row (``Engine.step(rows=...)``), so one long
   prompt is prefilled over several steps while the running requests keep decoding at every step. A request's
   last prompt token (in its last chunk, or in a decode step) gives its first generated token. Chunks are never a
   single token while another chunk ran in the step: the engine then compiles only a prefill graph and a decode
   graph.

Preemption: none. A slot holds a whole ``max_seq_len`` row of every cache (the static split cache: retrieval heads
``max_seq_len`` positions, streaming heads ``sink + recent``), so an admitted request always fits to its end;
admission waits for a free slot instead, and a bounded waiting queue refuses what it cannot hold (``QueueFull``).
Cancelling a request frees its slot at once (it is reused from the next step; the row's old keys are never
read: every position a new request attends to is written by it first).

Exactness: in window mode a row's outputs do not depend on where its prompt is cut into chunks, nor on the other
rows of a step (they are computed row by row: padding.py, ``valid``), so greedy requests give the tokens
``Engine.generate`` gives each prompt alone, whatever the arrival order, budget and interleaving
(tests/test_serve_scheduler.py). In chunk mode the streaming heads' prefill depends on the chunk boundaries, so
the scheduler cuts prompts at the engine's own ``prefill_chunk_size`` (else whole) whatever the budget; a step
runs at least one chunk when some prompt waits, even past the budget.
"""
from __future__ import annotations

from collections import deque

import torch

from duo_compile.checks import check_int
from duo_compile.serve.sequence import CANCELLED, ERROR, Sequence, Update


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_waiting`` requests: refuse, the caller may retry later."""


class Scheduler:
    """Slots over ``engine``'s caches (allocated here, ``slots`` rows); not thread-safe: one thread drives it
    (serve/loop.py), others hand requests to that thread."""

    def __init__(self, engine, slots: int, token_budget: int | None = None, max_waiting: int | None = None):
        self.engine = engine
        self.slots = check_int("slots", slots, 1)
        chunk = engine.config.prefill_chunk_size
        budget = token_budget if token_budget is not None else max(chunk or 2048, self.slots)
        # At most slots - 1 rows decode while a prompt waits, so this leaves every step at least one prompt token.
        self.token_budget = check_int("token_budget", budget, self.slots)
        self.max_waiting = None if max_waiting is None else check_int("max_waiting", max_waiting, 0)
        self.chunked = engine.config.streaming_mode == "chunk"
        engine.allocate(self.slots)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence | None] = [None] * self.slots

    # ------------------------------------------------------------------------------------------------ state
    @property
    def num_running(self) -> int:
        return sum(seq is not None for seq in self.running)

    @property
    def num_free(self) -> int:
        return self.slots - self.num_running

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    # ------------------------------------------------------------------------------------------- requests
    def add(self, seq: Sequence) -> None:
        """Queue a checked request (``Sequence``); ``QueueFull`` when ``max_waiting`` are waiting already."""
        if seq.length > self.engine.cache_len:
            raise ValueError(f"the request needs {seq.length} positions; a slot holds {self.engine.cache_len}")
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (the most this server queues)")
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> Update | None:
        """Drop a request, waiting or running; its slot is free at once. None if it had already ended."""
        if seq.finish_reason is not None:
            return None
        if seq.slot is not None and self.running[seq.slot] is seq:
            self.running[seq.slot] = None
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                return None
        return self._end(seq, None, CANCELLED)

    def fail_running(self, message: str) -> list[Update]:
        """End every running request with an error (a step raised, so their rows may be half written): the slots
        are free, the waiting requests keep their places."""
        updates = [self._end(seq, None, ERROR, message) for seq in self.running if seq is not None]
        self.running = [None] * self.slots
        return updates

    # ---------------------------------------------------------------------------------------------- steps
    def step(self) -> list[Update]:
        """Admit, decode the running rows, prefill under the budget; returns what happened to each request."""
        self._admit()
        updates = self._decode()  # one update (one token) per decoded row
        return updates + self._prefill(self.token_budget - len(updates))

    def _admit(self) -> None:
        for slot, seq in enumerate(self.running):
            if seq is None and self.waiting:
                seq = self.waiting.popleft()
                seq.slot, seq.cached = slot, 0
                self.running[slot] = seq

    def _decode(self) -> list[Update]:
        rows = [seq if seq is not None and seq.cached >= len(seq.prompt) - 1 else None for seq in self.running]
        if not any(rows):
            return []
        device = self.engine.device
        tokens = torch.tensor([[_next_input(seq) if seq else 0] for seq in rows], device=device)
        start = torch.tensor([seq.cached if seq else 0 for seq in rows])
        valid = torch.tensor([1 if seq else 0 for seq in rows])
        logits = self.engine.step(tokens, start, valid)
        updates = []
        for seq in rows:
            if seq is not None:
                seq.cached += 1
                updates.append(self._choose(seq, logits[seq.slot]))
        return updates

    def _prefill(self, budget: int) -> list[Update]:
        updates, ran = [], False
        for seq in sorted((s for s in self.running if s is not None and s.prefilling), key=lambda s: s.arrival):
            left = len(seq.prompt) - seq.cached
            if left == 1:  # the next decode step runs it
                continue
            if self.chunked:  # the engine's own chunks, so streaming heads see what generate shows them
                size = min(left, self.engine.config.prefill_chunk_size or left)
                if updates and size > budget:
                    break
            else:
                size = min(left, budget, self.engine.config.prefill_chunk_size or left)
                # A one-token chunk would compile a row graph of its own: wait for a step with more budget, unless
                # nothing else ran (a token budget of ``slots`` leaves one token beside slots - 1 decodes).
                if size < 1 or (size == 1 and ran):
                    break
            ran = True
            ids = torch.tensor([seq.prompt[seq.cached:seq.cached + size]], device=self.engine.device)
            logits = self.engine.step(ids, seq.cached, rows=slice(seq.slot, seq.slot + 1))
            seq.cached += size
            budget -= size
            if not seq.prefilling:  # the prompt's last chunk: its first token
                updates.append(self._choose(seq, logits[0]))
        return updates

    def _choose(self, seq: Sequence, logits: torch.Tensor) -> Update:
        token, reason = seq.choose(logits)
        if reason is None:
            return Update(seq, token)
        self.running[seq.slot] = None
        return self._end(seq, token, reason)

    @staticmethod
    def _end(seq: Sequence, token: int | None, reason: str, error: str | None = None) -> Update:
        seq.finish_reason = reason
        return Update(seq, token, reason, error)


def _next_input(seq: Sequence) -> int:
    """The token a decode step feeds ``seq``: its last prompt token while one is left to prefill, else the last
    token it generated."""
    return seq.prompt[seq.cached] if seq.prefilling else seq.tokens[-1]
