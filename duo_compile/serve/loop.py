"""The engine thread: one background thread owns the scheduler (and so the engine) and steps it; other threads
(the HTTP server's event loop) hand it requests and cancellations through a thread-safe inbox.

The thread sleeps on the inbox while nothing runs, and otherwise drains it between steps, so a request joins
(and a cancelled one leaves, freeing its slot and pages) at the next step. Each ``Update`` goes to its sequence's
``on_update`` callback, called on this thread (the server's callback hands it to its event loop). An exception
from a step ends the running requests with an error (``finish_reason`` "error"; their rows may be half written)
and the thread goes on with the waiting ones: one bad step never stops the server. ``stop`` ends the thread; requests still running are cancelled.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from duo_compile.serve.scheduler import QueueFull, Scheduler
from duo_compile.serve.sequence import Sequence, Update

log = logging.getLogger("duo_compile.serve")


class EngineLoop:
    """Runs ``scheduler`` on its own thread. ``on_step(updates, seconds)`` (optional) is told of every step."""

    def __init__(self, scheduler: Scheduler, on_step=None):
        self.scheduler = scheduler
        self.on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet taken from the inbox: counted with the waiting ones
        self._waiting = 0  # the scheduler's waiting queue, as of the last step
        self._running = 0
        self._pages = 0  # pages held, as of the last step
        self._preemptions = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="duo-compile-engine", daemon=True)

    # ------------------------------------------------------------------------------- from any thread
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def counts(self) -> tuple[int, int, int, int]:
        """(running, waiting) requests, as of the last step plus what was submitted since; then the pages held
        and the preemptions so far, as of the last step."""
        with self._lock:
            return self._running, self._waiting + self._queued, self._pages, self._preemptions

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; ``QueueFull`` when the scheduler's waiting queue is full, RuntimeError when stopping."""
        limit = self.scheduler.max_waiting
        with self._lock:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if limit is not None and self._waiting + self._queued >= limit:
                raise QueueFull(f"{self._waiting + self._queued} requests are waiting (the most this server queues)")
            self._queued += 1
        self._inbox.put(("add", seq))

    def cancel(self, seq: Sequence) -> None:
        """Cancel ``seq`` at the next step (nothing if it already ended)."""
        self._inbox.put(("cancel", seq))

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread: requests still waiting or running end as cancelled."""
        with self._lock:
            self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ----------------------------------------------------------------------------- the engine thread
    def _run(self) -> None:
        scheduler = self.scheduler
        while True:
            block = not scheduler.has_work()
            while True:  # drain the inbox (waiting on it while there is nothing to step)
                try:
                    kind, seq = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if kind == "stop":
                    self._deliver([u for s in [*filter(None, scheduler.running), *scheduler.waiting]
                                   if (u := scheduler.cancel(s)) is not None])
                    self._count()
                    return
                if kind == "add":
                    with self._lock:  # moved from the inbox to the waiting queue: counted once all along
                        self._queued -= 1
                        self._waiting += 1
                    self._add(seq)
                else:
                    update = scheduler.cancel(seq)
                    self._deliver([update] if update is not None else [])
                if not block and self._inbox.empty():
                    break
            if not scheduler.has_work():
                self._count()
                continue
            begin = time.perf_counter()
            try:
                updates = scheduler.step()
            except Exception as err:  # the engine failed: end what ran, keep serving
                log.exception("engine step failed")
                updates = scheduler.fail_running(f"the engine failed: {type(err).__name__}: {err}")
            self._count()
            self._deliver(updates)
            if self.on_step is not None:
                self.on_step(updates, time.perf_counter() - begin)

    def _add(self, seq: Sequence) -> None:
        try:
            self.scheduler.add(seq)
        except (QueueFull, ValueError) as err:  # (submit counts exactly, so only a direct caller gets here)
            seq.finish_reason = "error"
            self._deliver([Update(seq, None, "error", str(err))])

    def _count(self) -> None:
        with self._lock:
            self._running, self._waiting = self.scheduler.num_running, len(self.scheduler.waiting)
            self._pages, self._preemptions = self.scheduler.pages_used, self.scheduler.preemptions

    @staticmethod
    def _deliver(updates: list[Update]) -> None:
        for update in updates:
            callback = update.sequence.on_update
            if callback is not None:
                try:
                    callback(update)
                except Exception:  # a consumer's failure must not stop the engine thread
                    log.exception("on_update callback failed")
