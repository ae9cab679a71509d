"""Streaming heads: token-exact sink + recent-window attention of a chunk against [sink | recent ring | chunk].

Grid ``(B * Hkv * cdiv(groups, HEADS_PER), cdiv(T, BLOCK_T))``. A program's query rows sit at positions
``start + t``, ``start`` its batch row's ``cache_start`` (read on the device). Key tiles it walks (and only
these: a key block wholly outside every row's window is never loaded, so the cost is chunk x (sink + recent +
BLOCK_T), independent of the context length):
  1. occupied sink slots of the cache ``[0, min(sink, start))``: visible to every row;
  2. occupied ring slots (``min(recent, start - sink)`` of them, in slot order). Slot ``sink + j`` holds
     position ``start - 1 - ((start - 1 - sink - j) mod recent)``. In window mode a block whose first query is
     ``recent`` or more tokens into the chunk sees no ring key and skips the ring entirely;
  3. chunk keys that are sink tokens (``start + j < sink``);
  4. chunk keys in the window ``[m0 - recent + 1, m0 + BLOCK_T)``: masked at the window's lower edge,
     unmasked in the middle band that every row sees whole, masked again on the diagonal.
Chunk mode (the authors' chunked prefill) widens range 4 to the whole chunk up to the diagonal and lets every
row see the whole ring (it holds exactly positions ``>= start - recent``).

The cache is only read here. Writing the surviving chunk tokens (``streaming_write_kernel``) must wait until
every program has read the old ring, so for prefill it is a second, small launch; it writes the row's real
tokens only (the first ``valid``), so padding never overwrites a real key in the ring. A decode step (one program per
KV group, ``FUSE_WRITE``) writes its single token into its slot after a barrier, inside the same launch. That is
how chunk mode decodes; window mode's one-token step runs the tiled kernel of triton_streaming_decode.py instead.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import empty_state, finish_rows, load_rows, program_rows, tile_update


@triton.jit
def streaming_kernel(
    Q, K, V, KC, VC, O, POS, VALID,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, so_b, so_h, so_t,
    Hkv, groups, T, qk_scale, sink, recent,
    HAS_CACHE: tl.constexpr, CHUNK_MODE: tl.constexpr, FUSE_WRITE: tl.constexpr,
    HEADS_PER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_g = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_T
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
    else:
        start = tl.full([], 0, tl.int32)
    # Lowest visible position of each row (window), or of the whole chunk (chunk mode).
    if CHUNK_MODE:
        lower = tl.zeros_like(t) + (start - recent)
    else:
        lower = start + t - recent + 1

    if HAS_CACHE:
        kc_base = KC + b64 * skc_b + kv64 * skc_h
        vc_base = VC + b64 * svc_b + kv64 * svc_h
        n_sink = tl.minimum(sink, start)
        for n in range(0, n_sink, BLOCK_N):
            j = n + offs_n
            ok = j < n_sink
            kk = tl.load(kc_base + j[:, None] * skc_t + offs_d[None, :], mask=ok[:, None], other=0.0)
            vv = tl.load(vc_base + j[:, None] * svc_t + offs_d[None, :], mask=ok[:, None], other=0.0)
            acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, ok[None, :], qk_scale, True, DOT_PRECISION)
        filled = tl.minimum(recent, tl.maximum(start - sink, 0))
        if not CHUNK_MODE:
            filled = tl.where(m0 >= recent, 0, filled)
        for n in range(0, filled, BLOCK_N):
            j = n + offs_n
            ok = j < filled
            slot = sink + j
            pos = start - 1 - (tl.maximum(start - 1 - sink - j, 0) % recent)
            kk = tl.load(kc_base + slot[:, None] * skc_t + offs_d[None, :], mask=ok[:, None], other=0.0)
            vv = tl.load(vc_base + slot[:, None] * svc_t + offs_d[None, :], mask=ok[:, None], other=0.0)
            visible = ok[None, :] & (pos[None, :] >= lower[:, None])
            acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, visible, qk_scale, True, DOT_PRECISION)

    hi = tl.minimum(m0 + BLOCK_T, T)
    if CHUNK_MODE:
        full_lo = m0 * 0
        diag_lo = m0
    else:
        # Chunk tokens that are sink tokens: tiles [0, sink_end).
        sink_end = tl.minimum(tl.maximum(sink - start, 0), hi)
        for n in range(0, sink_end, BLOCK_N):
            j = n + offs_n
            ok = j < T
            kk = tl.load(k_base + j[:, None] * sk_t + offs_d[None, :], mask=ok[:, None], other=0.0)
            vv = tl.load(v_base + j[:, None] * sv_t + offs_d[None, :], mask=ok[:, None], other=0.0)
            visible = (j[None, :] <= t[:, None]) & ((start + j[None, :] < sink) | (start + j[None, :] >= lower[:, None]))
            acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, visible, qk_scale, True, DOT_PRECISION)
        sink_tiles_end = tl.cdiv(sink_end, BLOCK_N) * BLOCK_N
        band_lo = tl.maximum(tl.maximum(m0 - recent + 1, 0) // BLOCK_N * BLOCK_N, sink_tiles_end)
        # Tiles from full_lo on are inside every row's window: the last row's lower edge is m0 + BLOCK_T - recent.
        full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(m0 + BLOCK_T - recent, 0), BLOCK_N) * BLOCK_N, band_lo), m0)
        for n in range(band_lo, full_lo, BLOCK_N):
            j = n + offs_n
            visible = (start + j[None, :] < sink) | (start + j[None, :] >= lower[:, None])
            kk = tl.load(k_base + j[:, None] * sk_t + offs_d[None, :])
            vv = tl.load(v_base + j[:, None] * sv_t + offs_d[None, :])
            acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, visible, qk_scale, True, DOT_PRECISION)
        diag_lo = tl.maximum(m0, sink_tiles_end)
    for n in range(full_lo, m0, BLOCK_N):
        kk = tl.load(k_base + (n + offs_n)[:, None] * sk_t + offs_d[None, :])
        vv = tl.load(v_base + (n + offs_n)[:, None] * sv_t + offs_d[None, :])
        acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, None, qk_scale, False, DOT_PRECISION)
    for n in range(diag_lo, hi, BLOCK_N):
        j = n + offs_n
        ok = j < T
        kk = tl.load(k_base + j[:, None] * sk_t + offs_d[None, :], mask=ok[:, None], other=0.0)
        vv = tl.load(v_base + j[:, None] * sv_t + offs_d[None, :], mask=ok[:, None], other=0.0)
        visible = (j[None, :] <= t[:, None]) & ok[None, :]
        if not CHUNK_MODE:
            visible = visible & ((start + j[None, :] < sink) | (start + j[None, :] >= lower[:, None]))
        acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, visible, qk_scale, True, DOT_PRECISION)

    finish_rows(acc, l_i, O, b, head, t, row_ok, so_b, so_h, so_t, D)

    if FUSE_WRITE:
        # Decode: this program is the only reader of its KV head's cache, and it has read all of it.
        tl.debug_barrier()
        # A padding token (valid 0) is not written.
        slot = tl.where(start < sink, start, sink + (tl.maximum(start - sink, 0) % recent))
        real = offs_d < tl.where(tl.load(VALID + b) > 0, D, 0)
        kk = tl.load(k_base + offs_d)
        vv = tl.load(v_base + offs_d)
        tl.store(kc_base + slot * skc_t + offs_d, kk, mask=real)
        tl.store(vc_base + slot * svc_t + offs_d, vv, mask=real)


@triton.jit
def streaming_write_kernel(
    K, V, KC, VC, POS, VALID,
    sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
    Hkv, T, sink, recent,
    BLOCK_W: tl.constexpr, D: tl.constexpr,
):
    """Write the real chunk tokens that survive into the streaming cache (``reference.streaming_write_plan`` of the
    row's ``n = valid[b]`` real tokens; padding is never written).

    Candidates ``c < sink`` are chunk tokens ``j = c`` that land in the sink; candidates ``c >= sink`` are the last
    ``min(n, recent)`` real chunk tokens, kept when they are not sink tokens. Each slot is written at most once, so
    the launch needs no ordering. Grid: ``(cdiv(sink + min(T, recent), BLOCK_W), B * Hkv)``.
    """
    c = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    pid = tl.program_id(1)
    kv = (pid % Hkv).to(tl.int64)
    b = (pid // Hkv).to(tl.int64)
    start = tl.load(POS + b).to(tl.int32)
    n = tl.minimum(tl.load(VALID + b).to(tl.int32), T)
    tail = tl.minimum(n, recent)
    is_sink = c < sink
    j = tl.where(is_sink, c, n - tail + (c - sink))
    pos = start + j
    keep = tl.where(is_sink, (pos < sink) & (j < n), (c < sink + tail) & (pos >= sink))
    slot = tl.where(pos < sink, pos, sink + (tl.maximum(pos - sink, 0) % recent))
    offs_d = tl.arange(0, D)
    kk = tl.load(K + b * sk_b + kv * sk_h + j[:, None] * sk_t + offs_d[None, :], mask=keep[:, None])
    vv = tl.load(V + b * sv_b + kv * sv_h + j[:, None] * sv_t + offs_d[None, :], mask=keep[:, None])
    tl.store(KC + b * skc_b + kv * skc_h + slot[:, None] * skc_t + offs_d[None, :], kk, mask=keep[:, None])
    tl.store(VC + b * svc_b + kv * svc_h + slot[:, None] * svc_t + offs_d[None, :], vv, mask=keep[:, None])
