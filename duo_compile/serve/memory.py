"""How many requests a KV memory budget holds: the scheduler's slots.

Every slot is one row of the engine's static caches, so it costs the same bytes whatever its request's length:
``engine.planned_cache_bytes(1, max_seq_len)``, the retrieval heads' ``max_seq_len`` positions plus the streaming
heads' ``sink + recent``. DuoAttention's streaming heads make that row smaller, so the same budget holds more
slots: at sparsity 0.5 and a long ``max_seq_len``, about twice as many as the same model with every head
retrieval. The budget is given in bytes (vLLM's ``--kv-cache-memory``) or as a fraction of the memory free on the
engine's device (vLLM's ``gpu_memory_utilization``, here of what is free after the weights are loaded).
"""
from __future__ import annotations

from dataclasses import dataclass

from duo_compile.checks import check_int
from duo_compile.runtime.engine import free_memory_bytes


@dataclass(frozen=True)
class SlotPlan:
    """``slots`` rows of ``row_bytes`` each; ``budget_bytes`` is what they were sized from."""

    slots: int
    row_bytes: int
    budget_bytes: int | None

    @property
    def kv_bytes(self) -> int:
        return self.slots * self.row_bytes


def plan_slots(engine, max_slots: int, kv_cache_memory: int | None = None,
               memory_fraction: float | None = None) -> SlotPlan:
    """Slots for ``engine``: ``max_slots`` at most, and no more than the budget holds.

    ``kv_cache_memory`` (bytes) or ``memory_fraction`` (of the device's free memory, in (0, 1]) set the budget;
    neither: ``max_slots`` rows, which ``Engine.allocate`` still checks against the free memory. ValueError, naming
    both sizes, when the budget holds no row at all."""
    max_slots = check_int("max_slots", max_slots, 1)
    row = engine.planned_cache_bytes(1, engine.config.max_seq_len)
    if kv_cache_memory is not None and memory_fraction is not None:
        raise ValueError("give kv_cache_memory or memory_fraction, not both")
    if memory_fraction is not None:
        if not 0 < memory_fraction <= 1:  # also refuses nan
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        free = free_memory_bytes(engine.device)
        if free is None:
            raise ValueError(f"memory_fraction needs the free memory of {engine.device}, which cannot be read")
        free += sum(c.numel() * c.element_size() for c in engine.caches)  # caches already held are freed first
        budget = int(free * memory_fraction)
    elif kv_cache_memory is not None:
        budget = check_int("kv_cache_memory", kv_cache_memory, 1)
    else:
        return SlotPlan(max_slots, row, None)
    if budget < row:
        raise ValueError(
            f"the KV cache budget of {budget} bytes ({budget / 2**30:.3f} GiB) holds no request: one slot of "
            f"max_seq_len={engine.config.max_seq_len} needs {row} bytes ({row / 2**30:.3f} GiB)"
        )
    return SlotPlan(min(max_slots, budget // row), row, budget)
