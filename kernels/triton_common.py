"""Pieces every duo Triton kernel shares: the online-softmax tile step, a program's row layout, shape helpers.

Row layout. A program owns ``HEADS_PER`` query heads of one KV group times ``BLOCK_T`` query tokens; row
``r`` of its tile is head ``r // BLOCK_T`` and token ``r % BLOCK_T``. Prefill uses one head per program
(``HEADS_PER = 1``, a 128-token tile, the FlashAttention layout); decode packs the group's query heads into the
M dimension (``BLOCK_T`` = a few tokens) so that every K/V tile loaded serves all query heads of its group (GQA).

Softmax runs in base 2 (``qk_scale = scale * log2(e)``), as FlashAttention does, so each score costs one exp2.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def supported_head_dim(d: int) -> bool:
    """Kernels tile the head dim whole: a power of two from 16 to 256 (Llama/Mistral/Qwen use 64 or 128)."""
    return 16 <= d <= 256 and d == next_pow2(d)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (the op promises fp32 semantics); 16-bit inputs use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def log2_scale(scale: float) -> float:
    return float(scale) * LOG2E


def num_sms(device: torch.device) -> int:
    """Multiprocessor count (for sizing split-K grids); the interpreter gets a small number so tests stay tiny."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Return (B, Hq, T, D, Hkv, groups) after checking the op contract."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)}/{tuple(v.shape)} does not match q {tuple(q.shape)}")
    if hkv == 0 or hq % hkv:
        if hq == 0 and hkv == 0:
            return b, 0, t, d, 0, 1
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    return b, hq, t, d, hkv, hq // hkv


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels index the head dim with unit stride (16-byte loads); any other stride is passed through as given."""
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def tile_update(acc, m_i, l_i, q, k, v, visible, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One FlashAttention step: fold the key tile k/v (rows) into the running max m_i, sum l_i and output acc.

    ``visible`` is only read when MASKED; masked tiles may leave a row with nothing seen yet (max = -inf), which
    the guard turns into a zero contribution instead of NaN. Unmasked tiles skip both the select and the guard.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    # Scale folded into the exponent: one FMA per score (the softmax, not the matmul, is the hot ALU work).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def program_rows(pid_g, m0, Hkv, groups, T, HEADS_PER: tl.constexpr, BLOCK_T: tl.constexpr):
    """Decode program id ``pid_g`` = (batch, kv head, head chunk) and give each tile row its query head and token.

    Returns (b, kv, chunk, head [rows], t [rows], row_ok [rows]); head is the absolute query head index.
    """
    chunks = tl.cdiv(groups, HEADS_PER)
    chunk = pid_g % chunks
    bk = pid_g // chunks
    kv = bk % Hkv
    b = bk // Hkv
    r = tl.arange(0, HEADS_PER * BLOCK_T)
    hh = chunk * HEADS_PER + r // BLOCK_T
    t = m0 + r % BLOCK_T
    row_ok = (hh < groups) & (t < T)
    head = kv * groups + tl.minimum(hh, groups - 1)
    return b, kv, chunk, head, t, row_ok


@triton.jit
def load_rows(Q, b, head, t, row_ok, sq_b, sq_h, sq_t, D: tl.constexpr):
    """The tile's query rows Q[b, head, t, :] (rows past the group or the chunk read as 0)."""
    offs_d = tl.arange(0, D)
    ptrs = Q + b.to(tl.int64) * sq_b + head.to(tl.int64)[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None], other=0.0)


@triton.jit
def load_rope(X, x_off, COS, SIN, cs_off, d, mask, ROPE: tl.constexpr, D: tl.constexpr):
    """``X[x_off + d]`` (``d``: head-dim indices, broadcast against the row offsets ``x_off``); with ROPE the
    rotary embedding applied on the way in, ``x * cos + rotate_half(x) * sin`` with cos/sin at ``cs_off + d``
    (reference.rope). Computed in fp32 and rounded once, where Hugging Face rounds after each of its three ops
    in 16-bit inputs' dtype: within one rounding of it. The rotated half is a second load of the same row
    (from L1/L2), so a decode step rotates q and its new keys without another pass over memory."""
    x = tl.load(X + x_off + d, mask=mask, other=0.0)
    if ROPE:
        half = D // 2
        xr = tl.load(X + x_off + (d + half) % D, mask=mask, other=0.0).to(tl.float32)
        xr = tl.where(d < half, -xr, xr)
        c = tl.load(COS + cs_off + d, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(SIN + cs_off + d, mask=mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * c + xr * s).to(x.dtype)
    return x


@triton.jit
def cache_rows(C, b64, kv64, j, mask, sc_b, sc_h, sc_t, TABLE, st_b, PAGE, PAGED: tl.constexpr):
    """Pointers to positions ``j`` (a vector) of batch row ``b64``, KV head ``kv64`` of a retrieval cache: slot
    ``j`` of the row's cache ``[B, Hkv, S, D]``, or with PAGED position ``j`` of the row's pages in a pool
    ``[num_pages, Hkv, PAGE, D]`` (``sc_b`` the page stride): page ``TABLE[b, j // PAGE]`` (block table row stride
    ``st_b``), offset ``j % PAGE`` (kernels/paged.py). The table is read only where ``mask`` holds.

    The kernels that take ``st_b`` do not let Triton specialise it: a server's tables are as wide as the longest
    row of each step, so whether that width is a multiple of 16 (what Triton specialises integers on) changes from
    step to step, and each change would build the kernel again."""
    if PAGED:
        page = tl.load(TABLE + b64 * st_b + j // PAGE, mask=mask, other=0).to(tl.int64)
        return C + page * sc_b + kv64 * sc_h + (j % PAGE).to(tl.int64) * sc_t
    else:
        return C + b64 * sc_b + kv64 * sc_h + j * sc_t


@triton.jit
def empty_state(BLOCK_M: tl.constexpr, D: tl.constexpr):
    """Online-softmax state before the first key tile: output 0, running max -inf, running sum 0."""
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    return acc, m_i, l_i


@triton.jit
def split_plan(POS, VALID, B, T, num_splits, slots, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """How a batch's retrieval decode spreads ``B * num_splits`` split-K programs over its rows in proportion to
    the keys each row reads (``cache_start[b] + T``; none for a row with no real token), so a batch of mixed
    lengths costs what its keys cost and not ``B`` times its longest row.

    Every split has one length (a multiple of ``BLOCK_N``): the batch's keys over ``B * num_splits``, and at least
    a row's keys over ``slots`` (the partial slots a row has). Row b takes ``n[b] = cdiv(keys[b], split_len)``
    splits; ``first[b]`` is its first in the batch's order. Rounding up gives at most ``B`` splits past
    ``B * num_splits``, so the grid has ``B * (num_splits + 1)`` split programs. Every program of a launch and
    the combine compute the same plan from the device's positions: no host sync, CUDA graphs can hold it.
    Returns (rows index vector, n, first, keys, split_len)."""
    rows = tl.arange(0, BLOCK_B)
    in_batch = rows < B
    starts = tl.load(POS + rows, mask=in_batch, other=0).to(tl.int32)
    valid = tl.load(VALID + rows, mask=in_batch, other=0).to(tl.int32)
    keys = tl.where(in_batch & (valid > 0), starts + T, 0)
    even = tl.cdiv(tl.sum(keys, 0), B * num_splits)
    split_len = tl.maximum(tl.maximum(even, tl.cdiv(tl.max(keys, 0), slots)), 1)
    split_len = tl.cdiv(split_len, BLOCK_N) * BLOCK_N
    n = tl.cdiv(keys, split_len)
    first = tl.cumsum(n, 0) - n
    return rows, n, first, keys, split_len


@triton.jit
def store_partial(OP, LP, acc, m_i, l_i, row, split, num_splits, row_ok, D: tl.constexpr):
    """Split-K partial of each tile row ``row`` (flat b, head, t index): the normalised output into
    ``OP[row, split, :]`` and its log2-sum-exp into ``LP[row, split]`` (-inf for a split that saw no key), for
    ``combine_kernel`` to merge."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))
    offs_d = tl.arange(0, D)
    tl.store(LP + row * num_splits + split, lse, mask=row_ok)
    o_ptrs = OP + (row * num_splits + split)[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, acc / l_safe[:, None], mask=row_ok[:, None])


@triton.jit
def finish_rows(acc, l_i, O, b, head, t, row_ok, so_b, so_h, so_t, D: tl.constexpr):
    """Normalise and store the tile's rows to O[b, head, t, :] (rows with nothing visible, i.e. padding, give 0)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    offs_d = tl.arange(0, D)
    o_ptrs = O + b.to(tl.int64) * so_b + head.to(tl.int64)[:, None] * so_h + t[:, None] * so_t + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def grid_groups(b: int, hkv: int, groups: int, heads_per: int) -> int:
    """Programs along the head axis: one per (batch, kv head, chunk of heads_per query heads)."""
    return b * hkv * math.ceil(groups / heads_per)
