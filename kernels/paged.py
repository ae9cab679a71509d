"""Paged retrieval caches: the retrieval ops read and write K/V through a block table over a pool of pages.

A paged retrieval cache is a pool ``[num_pages, Hkv, page_size, D]`` shared by every sequence. ``block_table``
(int32 or int64 ``[B, max_pages]``) lists each batch row's pages in order: row b's position p lives in page
``block_table[b, p // page_size]`` at offset ``p % page_size``. Entries past a row's last position are not read
(any value; -1 marks an unassigned page). Streaming caches are not paged: they stay one row per sequence.

``pageable(impl, table_index, start_index)`` turns an implementation of a cached op over contiguous retrieval
caches (``[B, Hkv, S, D]``, arguments 3 and 4) into one that also takes ``block_table`` as its argument
``table_index``: it gathers each row's pages into a contiguous copy (pages up to the furthest position the call
reaches), runs the implementation on that copy, and writes the positions the call appended (row b's
``cache_start[b] .. cache_start[b] + valid[b] - 1``) back to their pages. Without a block table it calls the
implementation unchanged. This serves the reference and the CPU kernels (ops.py) and the CUDA fallback for head
dims the Triton kernels do not tile; it reads the positions and the table on the host (checking every page a
call uses), so such a call is not CUDA-graph capturable. The Triton kernels read and write through the table
themselves, on the device (launchers.py, ``triton_common.cache_rows``).
"""
from __future__ import annotations

import functools

import torch

from . import reference
from .reference import row_positions


def pages_for(positions: int, page_size: int) -> int:
    """Pages that hold ``positions`` tokens."""
    return -(-positions // page_size)


def check_layout(k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor, batch: int) -> None:
    """Refuse pools and a table whose shapes or dtype cannot be paged caches for a call on ``batch`` rows (what can
    be checked without reading the table's entries, so without a device sync)."""
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"paged caches must be two pools [num_pages, Hkv, page_size, D] of one shape, got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    check_table(block_table, batch)


def check_table(block_table: torch.Tensor, batch: int) -> None:
    """Refuse a block table that is not int32 / int64 ``[batch, max_pages]``."""
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32 or int64 [batch={batch}, max_pages], got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")


def _check_table(block_table: torch.Tensor, pool: torch.Tensor, start: torch.Tensor, valid: torch.Tensor) -> int:
    """Refuse a table whose entries cannot serve this call; return the pages to gather per row (the furthest
    row's)."""
    page_size = pool.shape[2]
    ends = (start + valid).tolist()
    limit = block_table.shape[1] * page_size
    if ends and max(ends) > limit:
        raise ValueError(f"positions up to {max(ends) - 1} exceed the block table's {block_table.shape[1]} pages "
                         f"of {page_size}")
    table = block_table.tolist()
    for b, end in enumerate(ends):
        used = table[b][:pages_for(end, page_size)]
        if used and not 0 <= min(used) <= max(used) < pool.shape[0]:
            raise ValueError(f"row {b} reaches position {end - 1} through pages {used}; the pool has pages "
                             f"0..{pool.shape[0] - 1}")
    return pages_for(max(ends, default=0), page_size)


def gather(pool: torch.Tensor, block_table: torch.Tensor, pages: int) -> torch.Tensor:
    """Each row's first ``pages`` pages as one contiguous cache ``[B, Hkv, pages * page_size, D]`` (a copy;
    unassigned pages read page 0, whose keys no query of that row can see)."""
    index = block_table[:, :pages].to(device=pool.device, dtype=torch.long).clamp(min=0)
    rows = pool[index]  # [B, pages, Hkv, page_size, D]
    batch, _, heads, page_size, dim = rows.shape
    return rows.transpose(1, 2).reshape(batch, heads, pages * page_size, dim)


def write_back(pool: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, start: torch.Tensor,
               valid: torch.Tensor) -> None:
    """Copy row b's positions ``start[b] .. start[b] + valid[b] - 1`` of the contiguous ``cache`` to its pages."""
    page_size = pool.shape[2]
    for b, (s, n) in enumerate(zip(start.tolist(), valid.tolist())):
        if n:
            pos = torch.arange(s, s + n, device=pool.device)
            pages = block_table[b].to(device=pool.device, dtype=torch.long)[pos // page_size]
            pool[pages, :, pos % page_size] = cache[b, :, s : s + n].transpose(0, 1)


def pageable(impl, table_index: int, start_index: int):
    """``impl`` with an optional block table at positional argument ``table_index`` (see the module docstring);
    ``cache_start`` and ``valid`` are its arguments ``start_index`` and ``start_index + 1``."""

    @functools.wraps(impl)
    def run(*args):
        block_table = args[table_index] if len(args) > table_index else None
        args = args[:table_index]
        if block_table is None:
            return impl(*args)
        q, k, v, k_pool, v_pool = args[:5]
        cache_start, valid = args[start_index : start_index + 2]
        check_layout(k_pool, v_pool, block_table, q.shape[0])
        start, count = row_positions(cache_start, valid, q)
        pages = _check_table(block_table, k_pool, start, count)
        k_cache, v_cache = gather(k_pool, block_table, pages), gather(v_pool, block_table, pages)
        out = impl(q, k, v, k_cache, v_cache, *args[5:])
        write_back(k_pool, k_cache, block_table, start, count)
        write_back(v_pool, v_cache, block_table, start, count)
        return out

    return run


# Where each op with a paged retrieval cache takes its ``block_table`` (its last argument) and its ``cache_start``
# (ops.py).
TABLE_INDEX = {"retrieval_attention_cached": (10, 5), "attention_cached": (16, 7)}


def with_pages(kernels: dict) -> dict:
    """``kernels`` (op name -> implementation over contiguous caches) with the ops of ``TABLE_INDEX`` made to take
    their block table too."""
    return {name: pageable(fn, *TABLE_INDEX[name]) if name in TABLE_INDEX else fn for name, fn in kernels.items()}


# The references of the retrieval cached ops, taking a block table: the ops' default implementation (ops.py) and
# the CUDA fallback for head dims the Triton kernels do not tile (triton_ops.py).
REFERENCE = with_pages({"retrieval_attention_cached": reference.retrieval_attention_cached,
                        "attention_cached": reference.attention_cached})
