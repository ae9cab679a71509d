"""How a KV memory budget is split for the scheduler: streaming rows (slots) and retrieval pages.

A running request holds one row of every streaming cache (``sink + recent`` positions, whatever its length:
``engine.streaming_row_bytes()``) and, on a paged engine, the retrieval pages its length needs
(``engine.page_bytes()`` each, ``page_size`` positions of every retrieval head). So the budget is split once:
streaming rows for ``max_slots`` requests, and the rest as retrieval pages, as many as fit (but no more than
every slot could use at ``max_seq_len``). DuoAttention's streaming heads take little of the budget and its
retrieval heads need fewer bytes per position, so the same budget holds about twice as many positions at
sparsity 0.5 as the same model with every head retrieval (whose streaming rows are empty).

An engine without paging is the special case of one page of ``max_seq_len`` positions per slot
(``engine.planned_cache_bytes(1, max_seq_len)`` per slot, streaming row included): the budget sets the number of
slots.

The budget is given in bytes (vLLM's ``--kv-cache-memory``) or as a fraction of the memory free on the engine's
device (vLLM's ``gpu_memory_utilization``, here of what is free after the weights are loaded).
"""
from __future__ import annotations

from dataclasses import dataclass

from duo_compile.checks import check_int
from duo_compile.runtime.engine import free_memory_bytes


@dataclass(frozen=True)
class KVPlan:
    """``slots`` streaming rows of ``row_bytes`` each and ``pages`` retrieval pages of ``page_size`` positions and
    ``page_bytes`` each (``paged`` False: one page of ``max_seq_len`` per slot, the slot's retrieval row);
    ``budget_bytes`` is what they were sized from (None: no budget)."""

    slots: int
    pages: int
    page_size: int
    row_bytes: int
    page_bytes: int
    paged: bool
    budget_bytes: int | None

    @property
    def kv_bytes(self) -> int:
        return self.slots * self.row_bytes + self.pages * self.page_bytes


def _budget(engine, kv_cache_memory: int | None, memory_fraction: float | None) -> int | None:
    if kv_cache_memory is not None and memory_fraction is not None:
        raise ValueError("give kv_cache_memory or memory_fraction, not both")
    if memory_fraction is not None:
        if not 0 < memory_fraction <= 1:  # also refuses nan
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        free = free_memory_bytes(engine.device)
        if free is None:
            raise ValueError(f"memory_fraction needs the free memory of {engine.device}, which cannot be read")
        free += sum(c.numel() * c.element_size() for c in engine.caches)  # caches already held are freed first
        return int(free * memory_fraction)
    if kv_cache_memory is not None:
        return check_int("kv_cache_memory", kv_cache_memory, 1)
    return None


def plan_kv(engine, max_slots: int, kv_cache_memory: int | None = None,
            memory_fraction: float | None = None) -> KVPlan:
    """Slots and pages for ``engine``: ``max_slots`` slots at most, and no more than the budget holds.

    ``kv_cache_memory`` (bytes) or ``memory_fraction`` (of the device's free memory, in (0, 1]) set the budget;
    neither: ``max_slots`` slots with pages for every slot's ``max_seq_len``, which ``Engine.allocate`` still
    checks against the free memory. ValueError, naming the sizes, when the budget holds no request at all (a
    paged engine: not the streaming rows plus one page)."""
    max_slots = check_int("max_slots", max_slots, 1)
    budget = _budget(engine, kv_cache_memory, memory_fraction)
    c = engine.config
    if c.page_size is None:
        row = engine.planned_cache_bytes(1, c.max_seq_len)
        if budget is not None and budget < row:
            raise ValueError(
                f"the KV cache budget of {budget} bytes ({budget / 2**30:.3f} GiB) holds no request: one slot of "
                f"max_seq_len={c.max_seq_len} needs {row} bytes ({row / 2**30:.3f} GiB)"
            )
        slots = max_slots if budget is None else min(max_slots, budget // row)
        streaming = engine.streaming_row_bytes()
        return KVPlan(slots, slots, c.max_seq_len, streaming, row - streaming, False, budget)
    row, page = engine.streaming_row_bytes(), engine.page_bytes()
    most = max_slots * engine.pages_per_row(c.max_seq_len)  # more than every slot can use would be waste
    if budget is None or page == 0:
        pages = most
    else:
        pages = min(most, (budget - max_slots * row) // page)
        if pages < 1:
            raise ValueError(
                f"the KV cache budget of {budget} bytes ({budget / 2**30:.3f} GiB) holds no page: the streaming "
                f"rows of {max_slots} slots take {max_slots * row} bytes and one page of {c.page_size} positions "
                f"{page} bytes"
            )
    return KVPlan(max_slots, pages, c.page_size, row, page, True, budget)
