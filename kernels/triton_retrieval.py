"""Retrieval heads, prefill: causal FlashAttention of a chunk against [cached prefix | the chunk], append fused.

Grid ``(B * Hq, cdiv(T, BLOCK_T))``, or with ``BLOCKS_FIRST`` (``TileConfig.blocks_first``) the two axes swapped
so that the programs running at once are one head's query blocks rather than every head's few longest ones; the
query-block axis runs the longest blocks first (causal work grows with the block index, so the last blocks to
start are the cheap ones). Each program walks three key ranges:
  1. the cache prefix ``[0, start)`` (``start``, the row's ``cache_start``, read on the device: no host sync),
     full tiles unmasked, one masked tail tile;
  2. chunk tiles left of the diagonal, unmasked;
  3. the diagonal tiles, causally masked. These are the only tiles each chunk key owns exactly once across the
     query blocks, so the program of the group's first query head stores them into the cache right there (the
     row's first ``valid`` tokens only: padding is never written): the append costs no extra read of k/v and no
     extra launch. Nothing else in the launch reads cache slots
     ``>= start``, so the writes cannot race with the reads.
With ``HAS_CACHE=False`` (the cacheless op) ``start`` is 0 and range 1 and the stores vanish at compile time.
With ``PAGED`` the cache is a page pool read and written through the row's block table (``cache_rows``): range 1
then goes tile by tile with masked loads (a tile may span pages), and TMA is off.
Range 3 is never software-pipelined: pipelined with its cache stores, it gave the cached op's outputs errors
well above rounding on the GPU (benchmarks/DECISIONS.md#prefill-diagonal-one-stage).

With ``TMA`` (``TileConfig.tma``, Hopper and later) the unmasked tiles of ranges 1 and 2 come through the tensor
memory accelerator: host-side descriptors ``DK, DV, DKC, DVC`` over the 4-d k/v and caches, one bulk copy per
tile into shared memory instead of per-thread address arithmetic and loads, which also frees the registers that
arithmetic held. The masked tiles keep pointer loads: their keys past ``start`` must read as zeros, and a
descriptor's bounds are the whole cache, not ``start``. See benchmarks/DECISIONS.md#prefill-tma-blocks-first.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import cache_rows, empty_state, finish_rows, load_rows, program_rows, tile_update


@triton.jit
def key_tile(base, desc, b, kv, n, offs_n, offs_d, s_t, TMA: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Rows ``n .. n + BLOCK_N`` of one (batch, kv head) of a k/v tensor, all in bounds: a pointer load, or with
    TMA one descriptor load of the ``[1, 1, BLOCK_N, D]`` box."""
    if TMA:
        tile = desc.load([b, kv, n, 0]).reshape(BLOCK_N, D)
    else:
        tile = tl.load(base + (n + offs_n)[:, None] * s_t + offs_d[None, :])
    return tile


@triton.jit
def prefix_tile(acc, m_i, l_i, q, KC, VC, b64, kv64, j, start, offs_d, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
                TABLE, st_b, PAGE, qk_scale, PAGED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the cached keys at positions ``j`` below ``start`` into the running softmax (masked loads)."""
    ok = j < start
    kp = cache_rows(KC, b64, kv64, j, ok, skc_b, skc_h, skc_t, TABLE, st_b, PAGE, PAGED)
    vp = cache_rows(VC, b64, kv64, j, ok, svc_b, svc_h, svc_t, TABLE, st_b, PAGE, PAGED)
    kk = tl.load(kp[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
    vv = tl.load(vp[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
    return tile_update(acc, m_i, l_i, q, kk, vv, ok[None, :], qk_scale, True, DOT_PRECISION)


@triton.jit(do_not_specialize=["st_b"])  # the block table's width: see triton_common.cache_rows
def retrieval_prefill_kernel(
    Q, K, V, KC, VC, O, POS, VALID, DK, DV, DKC, DVC,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, so_b, so_h, so_t,
    Hkv, groups, T, qk_scale, TABLE, st_b, PAGE,
    HAS_CACHE: tl.constexpr, HEADS_PER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCKS_FIRST: tl.constexpr,
    PAGED: tl.constexpr,
):
    if BLOCKS_FIRST:  # grid (query blocks, heads): a wave runs one head's blocks, all reading its keys (L2 reuse)
        pid_g = tl.program_id(1)
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_g = tl.program_id(0)
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    m0 = pid_m * BLOCK_T
    b, kv, chunk, head, t, row_ok = program_rows(pid_g, m0, Hkv, groups, T, HEADS_PER, BLOCK_T)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    b64 = b.to(tl.int64)
    kv64 = kv.to(tl.int64)
    q = load_rows(Q, b, head, t, row_ok, sq_b, sq_h, sq_t, D)
    acc, m_i, l_i = empty_state(HEADS_PER * BLOCK_T, D)

    k_base = K + b64 * sk_b + kv64 * sk_h
    v_base = V + b64 * sv_b + kv64 * sv_h

    if HAS_CACHE:
        start = tl.load(POS + b).to(tl.int32)
        n_valid = tl.load(VALID + b).to(tl.int32)
        if PAGED:  # every prefix tile through the block table, masked (a tile may span pages)
            for n in range(0, start, BLOCK_N):
                acc, m_i, l_i = prefix_tile(acc, m_i, l_i, q, KC, VC, b64, kv64, n + offs_n, start, offs_d,
                                            skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, TABLE, st_b, PAGE, qk_scale,
                                            True, DOT_PRECISION)
        else:
            kc_base = KC + b64 * skc_b + kv64 * skc_h
            vc_base = VC + b64 * svc_b + kv64 * svc_h
            full = (start // BLOCK_N) * BLOCK_N
            for n in range(0, full, BLOCK_N):
                kk = key_tile(kc_base, DKC, b, kv, n, offs_n, offs_d, skc_t, TMA, BLOCK_N, D)
                vv = key_tile(vc_base, DVC, b, kv, n, offs_n, offs_d, svc_t, TMA, BLOCK_N, D)
                acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, None, qk_scale, False, DOT_PRECISION)
            if full < start:
                acc, m_i, l_i = prefix_tile(acc, m_i, l_i, q, KC, VC, b64, kv64, full + offs_n, start, offs_d,
                                            skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, TABLE, st_b, PAGE, qk_scale,
                                            False, DOT_PRECISION)

    # Chunk keys left of the diagonal: every row of this block sees them.
    for n in range(0, m0, BLOCK_N):
        kk = key_tile(k_base, DK, b, kv, n, offs_n, offs_d, sk_t, TMA, BLOCK_N, D)
        vv = key_tile(v_base, DV, b, kv, n, offs_n, offs_d, sv_t, TMA, BLOCK_N, D)
        acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, None, qk_scale, False, DOT_PRECISION)

    # Diagonal: causal mask; the group's first program appends these keys to the cache.
    hi = tl.minimum(m0 + BLOCK_T, T)
    for n in tl.range(m0, hi, BLOCK_N, num_stages=1):  # never pipelined: see the module docstring
        j = n + offs_n
        ok = j < T
        kk = tl.load(k_base + j[:, None] * sk_t + offs_d[None, :], mask=ok[:, None], other=0.0)
        vv = tl.load(v_base + j[:, None] * sv_t + offs_d[None, :], mask=ok[:, None], other=0.0)
        visible = (j[None, :] <= t[:, None]) & ok[None, :]
        acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, visible, qk_scale, True, DOT_PRECISION)
        if HAS_CACHE:
            w = tl.where(chunk == 0, ok & (j < n_valid), False)
            kp = cache_rows(KC, b64, kv64, start + j, w, skc_b, skc_h, skc_t, TABLE, st_b, PAGE, PAGED)
            vp = cache_rows(VC, b64, kv64, start + j, w, svc_b, svc_h, svc_t, TABLE, st_b, PAGE, PAGED)
            tl.store(kp[:, None] + offs_d[None, :], kk, mask=w[:, None])
            tl.store(vp[:, None] + offs_d[None, :], vv, mask=w[:, None])

    finish_rows(acc, l_i, O, b, head, t, row_ok, so_b, so_h, so_t, D)
