"""Continuous batching on one engine: each running request holds a row of the streaming caches (a slot) and the
retrieval pages its positions need.

Memory. A paged engine (``compile(page_size=...)``) keeps each retrieval cache as one pool of pages shared by all
requests; a request holds the pages its length needs, listed in its block-table row (kernels/paged.py), and
takes more as it grows. Its streaming caches are constant-size (sink + ring), so they stay one row per running
request. An engine without paging is the special case of one page of ``max_seq_len`` positions per slot, page
``s`` being slot ``s``'s row: its requests never grow past their page, so they are never preempted.

Requests join and leave between steps. Each ``step``:

1. admits waiting requests, first come first served, while a slot is free and the pool has the pages of the
   first request's context (``Sequence.context_length``) plus its next token, beyond those the running requests
   take in this step's decode (so an admission never forces a preemption at once); a request that cannot be
   admitted keeps the ones behind it waiting (no overtaking);
2. decodes: one token for every request whose context is in its cache, in one ``Engine.step`` of ``[batch, 1]``
   tokens over the first ``batch`` slots, each row at its own position (``start``), rows with nothing to decode
   given ``valid`` 0 (idle or prefilling rows: never written). ``batch`` is the smallest of a few sizes
   (``decode_batches``) that holds the highest decoding slot; on a GPU each size replays its own CUDA graph, so a
   step with few requests running does not pay for the idle rows of a full one. Running requests are kept in
   the lowest slots for this: at the start of a step, a request in a slot above a free one moves down into it
   (``Engine.move_row`` copies its streaming rows; its retrieval pages stay where they are). A context with one
   token left to prefill runs that token here too: a one-token chunk is a decode step (the ops treat it the
   same), so it needs no graph of its own. A request whose next position starts a page takes a free page first;
   when none is free, the newest running request (latest arrival) is preempted (below), until the oldest
   requests have their pages;
3. prefills under the step's token budget: what the decode tokens leave of ``token_budget`` goes to waiting
   contexts, in arrival order, as chunks run on their own streaming row and their pages (``Engine.step(rows=...,
   block_table=...)``), so one long prompt is prefilled over several steps while the running requests keep
   decoding at every step. A request's last prompt token (in its last chunk, or in a decode step) gives its first
   generated token. Chunks are never a single token while another chunk ran in the step: the engine then
   compiles only a prefill graph and a decode graph. Nor does a chunk of ``SHORT_CHUNK`` tokens or fewer run
   beside another chunk (what a step's budget leaves after a long chunk): the attention ops run such a chunk
   with their few-token kernels, whose tiles depend on its length, so the leftovers of a busy step, of every
   length from 2 to 16, would each build those kernels anew on a GPU in the middle of serving.

Preemption by recompute: a preempted request gives back its slot and its pages at once and goes to the front of
the waiting queue (ahead of every request that arrived after it), keeping its generated tokens. Readmitted, it
prefills its context again (the prompt and every generated token but the last) and goes on decoding from its
last token; no token is chosen twice. The oldest running request is never preempted for a newer one, and a
request is refused at ``add`` if it could not fit the whole pool alone, so every request finishes.
Cancelling or finishing a request frees its slot and pages at once (reused from the next step; a reused page's
old keys are never read: every position a request attends to is written by it first).

A bounded waiting queue refuses what it cannot hold (``QueueFull``).

Exactness: in window mode a row's outputs do not depend on where its context is cut into chunks, nor on the
other rows of a step, nor on which pages hold it (they are computed row by row: padding.py, ``valid``; a paged
op reads exactly the row's own positions), so greedy requests give the tokens ``Engine.generate`` gives each
prompt alone, whatever the arrival order, budget, interleaving, page size and preemptions
(tests/test_serve_scheduler.py). In chunk mode the streaming heads' prefill depends on the chunk boundaries, so
the scheduler cuts prompts at the engine's own ``prefill_chunk_size`` (else whole) whatever the budget, and
recomputes a preempted request's generated tokens one per chunk, as its decode steps ran them; a step runs at
least one chunk when some context waits, even past the budget.
"""
from __future__ import annotations

from collections import deque

import torch

from duo_compile.checks import check_int
from duo_compile.kernels.paged import pages_for
from duo_compile.kernels.tuning import DECODE_MAX_TOKENS
from duo_compile.serve.sequence import CANCELLED, ERROR, Sequence, Update

# The longest chunk the attention ops run with their few-token (decode) kernels: never one beside another chunk.
SHORT_CHUNK = DECODE_MAX_TOKENS


def decode_batches(slots: int) -> list[int]:
    """The batch sizes of decode steps (on a GPU, one CUDA graph each): 2, 4, 8, then multiples of 8 below
    ``slots``, and ``slots``. Never 1 where there are more slots: a one-row step would compile a graph of its own
    (the compiled graph specialises on a batch of one), and a second row costs next to nothing in a step that reads
    every weight once (benchmarks/DECISIONS.md#serve-decode-buckets)."""
    return [n for n in (2, 4, *range(8, slots, 8)) if n < slots] + [slots]


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_waiting`` requests: refuse, the caller may retry later."""


class Scheduler:
    """Slots and pages over ``engine``'s caches (allocated here: ``slots`` streaming rows and, for a paged engine,
    ``num_pages`` retrieval pages, default enough for every slot's ``max_seq_len``); not thread-safe: one thread
    drives it (serve/loop.py), others hand requests to that thread."""

    def __init__(self, engine, slots: int, token_budget: int | None = None, max_waiting: int | None = None,
                 num_pages: int | None = None):
        self.engine = engine
        self.slots = check_int("slots", slots, 1)
        self.decode_batches = decode_batches(self.slots)
        chunk = engine.config.prefill_chunk_size
        budget = token_budget if token_budget is not None else max(chunk or 2048, self.slots)
        # At most slots - 1 rows decode while a prompt waits, so this leaves every step at least one prompt token.
        self.token_budget = check_int("token_budget", budget, self.slots)
        self.max_waiting = None if max_waiting is None else check_int("max_waiting", max_waiting, 0)
        self.chunked = engine.config.streaming_mode == "chunk"
        self.paged = engine.config.page_size is not None
        if self.paged:
            self.page_size = engine.config.page_size
            default = self.slots * engine.pages_per_row(engine.config.max_seq_len)
            self.num_pages = check_int("num_pages", default if num_pages is None else num_pages, 1)
            engine.allocate(self.slots, num_pages=self.num_pages)
        else:
            if num_pages is not None:
                raise ValueError(f"num_pages={num_pages!r} needs a paged engine (compile with page_size)")
            self.page_size, self.num_pages = engine.config.max_seq_len, self.slots  # page s is slot s's row
            engine.allocate(self.slots)
        self.free_pages: list[int] = list(range(self.num_pages - 1, -1, -1))  # popped from the end: 0 first
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence | None] = [None] * self.slots
        self.preemptions = 0

    # ------------------------------------------------------------------------------------------------ state
    @property
    def num_running(self) -> int:
        return sum(seq is not None for seq in self.running)

    @property
    def num_free(self) -> int:
        return self.slots - self.num_running

    @property
    def pages_used(self) -> int:
        return self.num_pages - len(self.free_pages)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    def _pages_for(self, positions: int) -> int:
        return pages_for(positions, self.page_size)

    # ------------------------------------------------------------------------------------------- requests
    def add(self, seq: Sequence) -> None:
        """Queue a checked request (``Sequence``); ``QueueFull`` when ``max_waiting`` are waiting already;
        ValueError when it could not fit the caches alone."""
        if seq.length > self.engine.cache_len:
            raise ValueError(f"the request needs {seq.length} positions; a slot holds {self.engine.cache_len}")
        if self._pages_for(seq.length) > self.num_pages:
            raise ValueError(f"the request needs {self._pages_for(seq.length)} pages of {self.page_size} positions; "
                             f"the pool holds {self.num_pages}")
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (the most this server queues)")
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> Update | None:
        """Drop a request, waiting or running; its slot and pages are free at once. None if it had already ended."""
        if seq.finish_reason is not None:
            return None
        if seq.slot is not None and self.running[seq.slot] is seq:
            self._release(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                return None
        return self._end(seq, None, CANCELLED)

    def fail_running(self, message: str) -> list[Update]:
        """End every running request with an error (a step raised, so their rows may be half written): the slots
        and pages are free, the waiting requests keep their places."""
        running = [seq for seq in self.running if seq is not None]
        for seq in running:
            self._release(seq)
        return [self._end(seq, None, ERROR, message) for seq in running]

    # ---------------------------------------------------------------------------------------------- pages
    def _release(self, seq: Sequence) -> None:
        """Give back ``seq``'s slot and pages."""
        self.running[seq.slot] = None
        if self.paged:
            self.free_pages.extend(reversed(seq.pages))
        else:
            self.free_pages.append(seq.slot)
        seq.slot, seq.pages = None, []

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: free everything ``seq`` holds; it waits at the front, to prefill its context
        again."""
        self._release(seq)
        seq.cached = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _grow(self, seq: Sequence, positions: int) -> bool:
        """Give ``seq`` the pages of its first ``positions`` positions, preempting the newest running requests
        while none is free; False if ``seq`` itself was preempted."""
        while len(seq.pages) < self._pages_for(positions):
            if self.free_pages:
                seq.pages.append(self.free_pages.pop())
                continue
            victim = max((s for s in self.running if s is not None), key=lambda s: (s.arrival, s.id))
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _table(self, rows: list[Sequence | None]) -> torch.Tensor | None:
        """The block table for ``Engine.step`` on ``rows`` (-1: no page), or None for an engine without paging."""
        if not self.paged:
            return None
        width = max([len(seq.pages) for seq in rows if seq is not None] + [1])
        table = torch.full((len(rows), width), -1, dtype=torch.int32)
        for i, seq in enumerate(rows):
            if seq is not None:
                table[i, :len(seq.pages)] = torch.tensor(seq.pages, dtype=torch.int32)
        return table

    # ---------------------------------------------------------------------------------------------- steps
    def step(self) -> list[Update]:
        """Admit, decode the running rows, prefill under the budget; returns what happened to each request."""
        self._compact()
        self._admit()
        updates, decoded = self._decode()
        return updates + self._prefill(self.token_budget - decoded)

    def _decodes(self, seq: Sequence | None) -> bool:
        """Whether ``seq`` runs in this step's decode: at most one token of its context is not cached (a one-token
        chunk is a decode step), or (chunk mode) it recomputes a generated token, one per step as its decode steps
        ran them."""
        if seq is None:
            return False
        return seq.context_length - seq.cached <= 1 or (self.chunked and seq.cached >= len(seq.prompt))

    def _compact(self) -> None:
        """Move the requests of the highest slots into the free slots below them, so the running requests hold the
        first slots (a decode step then runs the smallest batch that holds them)."""
        for target in range(self.slots):
            if self.running[target] is not None:
                continue
            source = next((s for s in range(self.slots - 1, target, -1) if self.running[s] is not None), None)
            if source is None:
                return
            seq = self.running[source]
            self.engine.move_row(source, target, seq.cached)
            self.running[target], self.running[source], seq.slot = seq, None, target
            if not self.paged:  # page s is slot s's row: the request's positions moved with it
                self.free_pages[self.free_pages.index(target)] = source
                seq.pages = [target]

    def _admit(self) -> None:
        # Pages the running requests take in this step's decode: an admission leaves them free.
        reserved = sum(max(0, self._pages_for(seq.cached + 1) - len(seq.pages))
                       for seq in self.running if self._decodes(seq))
        for slot, seq in enumerate(self.running):
            if seq is not None or not self.waiting:
                continue
            head = self.waiting[0]
            if self.paged:
                need = self._pages_for(head.context_length + 1)
                if need + reserved > len(self.free_pages):
                    break
                head.pages = [self.free_pages.pop() for _ in range(need)]
            else:
                self.free_pages.remove(slot)
                head.pages = [slot]
            self.waiting.popleft()
            head.slot, head.cached = slot, 0
            self.running[slot] = head

    def _decode(self) -> tuple[list[Update], int]:
        """One token for every decoding row: (the updates, the rows run). Each row feeds the token at its next
        position; a row that has then cached all its tokens chooses the next one."""
        for seq in sorted((s for s in self.running if self._decodes(s)), key=lambda s: s.arrival):
            if seq.slot is not None:  # not preempted by an older request's growth in this loop
                self._grow(seq, seq.cached + 1)
        rows = [seq if self._decodes(seq) else None for seq in self.running]
        if not any(rows):
            return [], 0
        highest = max(slot for slot, seq in enumerate(rows) if seq is not None)
        rows = rows[:next(n for n in self.decode_batches if n > highest)]
        logits = self.run_decode(rows)
        updates = []
        for seq in rows:
            if seq is not None:
                seq.cached += 1
                if seq.cached == len(seq.prompt) + len(seq.tokens):  # not a recomputed token: choose the next
                    updates.append(self._choose(seq, logits[seq.slot]))
        return updates, sum(seq is not None for seq in rows)

    def run_decode(self, rows: list[Sequence | None]) -> torch.Tensor:
        """One decode step over the first ``len(rows)`` slots (a size of ``decode_batches``): each request of
        ``rows`` feeds the token at its next position, a None row is idle (nothing read or written). Returns the
        logits ``[len(rows), vocab]``; the caller advances the requests. The warm-up runs it on idle rows only."""
        device = self.engine.device
        tokens = torch.tensor([seq.token_ids(seq.cached, seq.cached + 1) if seq else [0] for seq in rows],
                              device=device)
        start = torch.tensor([seq.cached if seq else 0 for seq in rows])
        valid = torch.tensor([1 if seq else 0 for seq in rows])
        return self.engine.step(tokens, start, valid, rows=slice(0, len(rows)), block_table=self._table(rows))

    def _prefill(self, budget: int) -> list[Update]:
        updates, ran = [], False
        prefilling = (s for s in self.running if s is not None and not self._decodes(s))
        for seq in sorted(prefilling, key=lambda s: s.arrival):
            left = seq.context_length - seq.cached
            if self.chunked:  # the engine's own chunks of the prompt, so streaming heads see what generate shows them
                left = len(seq.prompt) - seq.cached  # (the generated tokens are recomputed by decode steps)
                size = min(left, self.engine.config.prefill_chunk_size or left)
                if updates and size > budget:
                    break
            else:
                size = min(left, budget, self.engine.config.prefill_chunk_size or left)
                # A one-token chunk would compile a row graph of its own, and a short one new kernel builds (see
                # the module docstring): wait for a step with more budget, unless nothing else ran (a token budget
                # of ``slots`` leaves one token beside slots - 1 decodes).
                if size < 1 or (ran and size <= SHORT_CHUNK):
                    break
            ran = True
            ids = torch.tensor([seq.token_ids(seq.cached, seq.cached + size)], device=self.engine.device)
            logits = self.engine.step(ids, seq.cached, rows=slice(seq.slot, seq.slot + 1),
                                      block_table=self._table([seq]))
            seq.cached += size
            budget -= size
            if not seq.prefilling and not seq.tokens:  # the prompt's last chunk: its first token
                updates.append(self._choose(seq, logits[0]))
        return updates

    def _choose(self, seq: Sequence, logits: torch.Tensor) -> Update:
        token, reason = seq.choose(logits)
        if reason is None:
            return Update(seq, token)
        self._release(seq)
        return self._end(seq, token, reason)

    @staticmethod
    def _end(seq: Sequence, token: int | None, reason: str, error: str | None = None) -> Update:
        seq.finish_reason = reason
        return Update(seq, token, reason, error)
