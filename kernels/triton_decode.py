"""Retrieval heads, decode: split-K (flash-decoding) over the long retrieval cache, then a reduction.

One query token cannot fill a GPU with one program per head, and decode is bound by reading the cache once,
so each row's keys ``[0, start + T)`` are cut into contiguous ranges, each a program. The group's query heads
(times the few query tokens) form the M dimension of the tile, so each K/V tile is loaded once for all query heads
of its group (GQA). For each (KV head, head chunk), the batch's ``B * (num_splits + 1)`` programs of the grid
``(num_splits + 1, B * Hkv * cdiv(groups, HEADS_PER))`` are shared out over the rows in proportion to their keys
(``triton_common.split_plan``, from the rows' ``start`` read on the device): a row four times as long gets four
times the programs, so a batch of mixed lengths takes the time of its keys, not of its longest row, and the grid
depends on shapes only (the launch can be captured in a CUDA graph). Programs the plan leaves over exit at once.

The new tokens' keys come from ``k``/``v`` (never from the cache) and the split that owns them appends the row's
real ones (its first ``valid``) to the cache; the cache part of every split ends below ``start``, so reads and the
append never touch one slot. ``start`` and ``valid`` are the program's row's (``cache_start[b]``, ``valid[b]``).

``combine_kernel`` merges the partials by their log-sum-exp in a second launch: two launches per layer for the
retrieval half (why not one: benchmarks/DECISIONS.md#decode-one-launch-combine).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import cache_rows, empty_state, load_rope, program_rows, split_plan, store_partial, tile_update


@triton.jit
def retrieval_split(
    Q, K, V, KC, VC, POS, VALID, OP, LP,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
    B, Hkv, groups, T, num_splits, qk_scale, split, pid_g, part_hq, part_head0, part_splits,
    COS, SIN, sc_b, sc_t, TABLE, st_b, PAGE,
    HEADS_PER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    D: tl.constexpr, DOT_PRECISION: tl.constexpr, ROPE: tl.constexpr, PAGED: tl.constexpr,
):
    """Program ``split`` (of ``num_splits + 1``) of the program group ``pid_g``: the group's batch-row index and
    ``split`` number it among the batch's split programs, ``split_plan`` maps that to a row b and a key range of
    it. Its partials go to rows ``(b * part_hq + part_head0 + head) * T + t``, slot = its split within row b, of a
    buffer with ``part_splits`` slots per row (a mixed layer's one-launch decode shares one buffer between both
    head groups, triton_mixed_decode.py). With ROPE, q and the new keys arrive before the rotary embedding and are
    rotated as they are loaded (cos/sin ``[B, 1, T, D]``, strides ``sc_b``/``sc_t``); the cache gets the rotated
    keys. With PAGED the cache is a page pool read and written through row b's block table (``cache_rows``)."""
    pool_b, kv, chunk, head, t, row_ok = program_rows(pid_g, 0, Hkv, groups, T, HEADS_PER, BLOCK_T)
    rows, n, first, keys, split_len = split_plan(POS, VALID, B, T, num_splits, part_splits, BLOCK_N, BLOCK_B)
    u = pool_b * (num_splits + 1) + split  # this program's place among the batch's split programs
    b = tl.sum(((first + n) <= u).to(tl.int32), 0)  # the row whose splits [first, first + n) hold u
    active = b < B
    b = tl.minimum(b, B - 1)
    mine = rows == b
    split = u - tl.sum(tl.where(mine, first, 0), 0)
    total = tl.where(active, tl.sum(tl.where(mine, keys, 0), 0), 0)
    row_ok = tl.where(active, row_ok, False)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    b64 = b.to(tl.int64)
    kv64 = kv.to(tl.int64)

    start = tl.load(POS + b).to(tl.int32)
    n_valid = tl.load(VALID + b).to(tl.int32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, total)

    q = load_rope(Q, b64 * sq_b + head.to(tl.int64)[:, None] * sq_h + t[:, None] * sq_t, COS, SIN,
                  b64 * sc_b + t[:, None] * sc_t, offs_d[None, :], row_ok[:, None], ROPE, D)
    acc, m_i, l_i = empty_state(HEADS_PER * BLOCK_T, D)

    cache_hi = tl.minimum(hi, start)
    for n in range(lo, cache_hi, BLOCK_N):
        j = n + offs_n
        ok = j < cache_hi
        kp = cache_rows(KC, b64, kv64, j, ok, skc_b, skc_h, skc_t, TABLE, st_b, PAGE, PAGED)
        vp = cache_rows(VC, b64, kv64, j, ok, svc_b, svc_h, svc_t, TABLE, st_b, PAGE, PAGED)
        kk = tl.load(kp[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
        vv = tl.load(vp[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, ok[None, :], qk_scale, True, DOT_PRECISION)

    k_base = K + b64 * sk_b + kv64 * sk_h
    v_base = V + b64 * sv_b + kv64 * sv_h
    # One iteration (T <= BLOCK_N), never software-pipelined: with ROPE its four tile loads (x, its rotated
    # half, cos, sin) multi-buffered overflow shared memory; see benchmarks/DECISIONS.md#decode-new-token-loop.
    for n in tl.range(tl.maximum(lo, start), hi, BLOCK_N, num_stages=1):
        i = n - start + offs_n  # index in the chunk
        ok = i < hi - start
        kk = load_rope(k_base, i[:, None] * sk_t, COS, SIN, b64 * sc_b + i[:, None] * sc_t, offs_d[None, :],
                       ok[:, None], ROPE, D)
        vv = tl.load(v_base + i[:, None] * sv_t + offs_d[None, :], mask=ok[:, None], other=0.0)
        visible = ok[None, :] & (i[None, :] <= t[:, None])
        acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, visible, qk_scale, True, DOT_PRECISION)
        w = tl.where(chunk == 0, ok & (i < n_valid), False)
        kp = cache_rows(KC, b64, kv64, start + i, w, skc_b, skc_h, skc_t, TABLE, st_b, PAGE, PAGED)
        vp = cache_rows(VC, b64, kv64, start + i, w, svc_b, svc_h, svc_t, TABLE, st_b, PAGE, PAGED)
        tl.store(kp[:, None] + offs_d[None, :], kk, mask=w[:, None])
        tl.store(vp[:, None] + offs_d[None, :], vv, mask=w[:, None])

    row = (b64 * part_hq + part_head0 + head) * T + t
    store_partial(OP, LP, acc, m_i, l_i, row, split, part_splits, row_ok, D)


@triton.jit(do_not_specialize=["st_b"])  # the block table's width: see triton_common.cache_rows
def retrieval_split_kernel(
    Q, K, V, KC, VC, POS, VALID, OP, LP,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
    B, Hkv, groups, T, num_splits, part_splits, qk_scale, COS, SIN, sc_b, sc_t, TABLE, st_b, PAGE,
    HEADS_PER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    D: tl.constexpr, DOT_PRECISION: tl.constexpr, ROPE: tl.constexpr, PAGED: tl.constexpr,
):
    retrieval_split(Q, K, V, KC, VC, POS, VALID, OP, LP, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                    skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, B, Hkv, groups, T, num_splits, qk_scale,
                    tl.program_id(0), tl.program_id(1), Hkv * groups, 0, part_splits, COS, SIN, sc_b, sc_t,
                    TABLE, st_b, PAGE, HEADS_PER, BLOCK_T, BLOCK_N, BLOCK_B, D, DOT_PRECISION, ROPE, PAGED)


@triton.jit
def combine_kernel(
    OP, LP, O, so_b, so_h, so_t, Hq, T, part_splits, h_first, splits_rest, POS, VALID, B, num_splits,
    SPLITS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Merge the split partials of one (b, head, t) row, ``BLOCK_D`` of its columns per program (grid
    ``(rows, D / BLOCK_D)``): weights 2^(lse_s - max lse). Rows hold ``part_splits`` slots; heads below
    ``h_first`` (retrieval heads) filled as many as ``split_plan`` gave their batch row (``num_splits`` and
    ``BLOCK_N`` as in the split launch), the others ``splits_rest`` (a mixed layer's streaming tiles). Column
    blocks: a row's partials at 512K keys are 256 splits x 128 fp32 (128 KB), more than one
    program holds in registers; a quarter of the columns each puts 4x the programs on the 32 rows of a step."""
    row = tl.program_id(0).to(tl.int64)
    t = row % T
    bh = row // T
    h = bh % Hq
    b = bh // Hq
    s = tl.arange(0, SPLITS)
    rows, n, _, _, _ = split_plan(POS, VALID, B, T, num_splits, part_splits, BLOCK_N, BLOCK_B)
    splits_first = tl.sum(tl.where(rows == b, n, 0), 0)
    ok = s < tl.where(h < h_first, splits_first, splits_rest)
    lse = tl.load(LP + row * part_splits + s, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    parts = tl.load(OP + (row * part_splits + s)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(O + b * so_b + h * so_h + t * so_t + offs_d, out.to(O.dtype.element_ty))
