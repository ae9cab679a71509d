"""Streaming heads, decode of one token (window mode): the sink + recent cache cut into tiles, one program each.

A streaming head's cache is short (sink + recent = 320 keys), so a decode step moves little data, but one
program per KV group walking it tile by tile is bound by the latency of those dependent loads and by what one
multiprocessor can pull (benchmarks/DECISIONS.md#streaming-decode-tiles). Here every tile of the virtual key sequence
``[sink slots | ring slots | the new token]`` is its own program (grid ``(cdiv(sink + recent + 1, BLOCK_N),
B * Hkv * cdiv(groups, HEADS_PER))``), all loads are in flight at once, and ``combine_kernel`` merges the tile
partials by their log-sum-exp, as for retrieval decode.

Visibility for the query at position ``start`` (its batch row's ``cache_start``, read on the device): sink slot
``u`` if ``u < min(sink, start)``; ring slot ``sink + i`` if it is filled (``i < min(recent, start - sink)``)
and holds a position in the window ``[start - recent + 1, start]``; the new token always. Loads are masked by
visibility, so the slot the new token goes into (an unfilled slot, or the ring slot of position
``start - recent``, just outside the window) is never read, and the program of tile 0 can write it in the same
launch without ordering against the other programs (unless the row's token is padding, ``valid`` 0: then nothing
is written).
Chunk mode sees that slot's old key, so it keeps the one-program kernel of triton_streaming.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import empty_state, load_rope, program_rows, store_partial, tile_update


@triton.jit
def streaming_split(
    Q, K, V, KC, VC, POS, VALID, OP, LP,
    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
    Hkv, groups, qk_scale, sink, recent, split, pid_g, part_hq, part_head0, part_splits, COS, SIN, sc_b,
    HEADS_PER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DOT_PRECISION: tl.constexpr, ROPE: tl.constexpr,
):
    """One tile of one program group; partial rows and ROPE (q and the new key rotated as loaded) as in
    ``retrieval_split`` (triton_decode.py)."""
    b, kv, chunk, head, t, row_ok = program_rows(pid_g, 0, Hkv, groups, 1, HEADS_PER, BLOCK_T)
    offs_d = tl.arange(0, D)
    b64 = b.to(tl.int64)
    kv64 = kv.to(tl.int64)
    start = tl.load(POS + b).to(tl.int32)

    # This program's tile of the virtual key sequence [sink slots | ring slots | new token].
    u = split * BLOCK_N + tl.arange(0, BLOCK_N)
    in_sink = u < sink
    i = u - sink  # ring index
    filled = tl.minimum(recent, tl.maximum(start - sink, 0))
    ring_pos = start - 1 - (tl.maximum(start - 1 - i, sink) - sink) % recent
    in_ring = (i >= 0) & (i < filled) & (ring_pos >= start - recent + 1)
    cached = (in_sink & (u < start)) | in_ring
    is_new = u == sink + recent

    kc_base = KC + b64 * skc_b + kv64 * skc_h
    vc_base = VC + b64 * svc_b + kv64 * svc_h
    k_new = load_rope(K, b64 * sk_b + kv64 * sk_h, COS, SIN, b64 * sc_b, offs_d, offs_d < D, ROPE, D)
    v_new = tl.load(V + b64 * sv_b + kv64 * sv_h + offs_d)
    kk = tl.load(kc_base + u[:, None] * skc_t + offs_d[None, :], mask=cached[:, None], other=0.0)
    vv = tl.load(vc_base + u[:, None] * svc_t + offs_d[None, :], mask=cached[:, None], other=0.0)
    kk = tl.where(is_new[:, None], k_new[None, :], kk)
    vv = tl.where(is_new[:, None], v_new[None, :], vv)

    q = load_rope(Q, b64 * sq_b + head.to(tl.int64)[:, None] * sq_h, COS, SIN, b64 * sc_b, offs_d[None, :],
                  row_ok[:, None], ROPE, D)
    acc, m_i, l_i = empty_state(HEADS_PER * BLOCK_T, D)
    visible = (cached | is_new)[None, :] & row_ok[:, None]
    acc, m_i, l_i = tile_update(acc, m_i, l_i, q, kk, vv, visible, qk_scale, True, DOT_PRECISION)
    row = b64 * part_hq + part_head0 + head
    store_partial(OP, LP, acc, m_i, l_i, row, split, part_splits, row_ok, D)

    if (split == 0) & (chunk == 0) & (tl.load(VALID + b) > 0):
        slot = tl.where(start < sink, start, sink + (tl.maximum(start - sink, 0) % recent))
        tl.store(kc_base + slot * skc_t + offs_d, k_new)
        tl.store(vc_base + slot * svc_t + offs_d, v_new)


@triton.jit
def streaming_decode_split_kernel(
    Q, K, V, KC, VC, POS, VALID, OP, LP,
    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
    Hkv, groups, num_splits, qk_scale, sink, recent, COS, SIN, sc_b,
    HEADS_PER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DOT_PRECISION: tl.constexpr, ROPE: tl.constexpr,
):
    streaming_split(Q, K, V, KC, VC, POS, VALID, OP, LP, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h,
                    skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, Hkv, groups, qk_scale, sink, recent,
                    tl.program_id(0), tl.program_id(1), Hkv * groups, 0, num_splits, COS, SIN, sc_b,
                    HEADS_PER, BLOCK_T, BLOCK_N, D, DOT_PRECISION, ROPE)
