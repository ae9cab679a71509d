"""A mixed layer's one-token decode in one launch: the streaming tiles and the retrieval splits in one grid.

A layer with both kinds of heads (``duo::attention_cached``) would otherwise decode in four launches: retrieval
split-K, its combine, the streaming tiles, their combine; the short streaming kernels and the second combine run
after the retrieval read, which does not hide them. Here one 1-D grid holds every streaming tile program first,
then every retrieval split program (``splits_r + 1`` per program group, shared out over the rows by
``split_plan``): the short streaming programs run in the retrieval read's shadow, both write
their partials into one buffer (query heads in the layer's order: retrieval then streaming), and one
``combine_kernel`` launch merges each head's own number of partials. Two launches per mixed layer
(benchmarks/DECISIONS.md#mixed-decode-one-grid).

The programs are exactly those of ``retrieval_split_kernel`` and ``streaming_decode_split_kernel`` (the same
device functions), so the cache writes, visibility rules and paged retrieval pools (PAGED) are theirs: the retrieval split owning the new
token appends it; tile 0 of each streaming group writes its slot. Streaming tiles are ``STREAMING_BLOCK_N`` =
32 keys on the GPU (the launcher's choice): one kernel reserves the shared memory of its larger branch for every
program, and 32-key streaming tiles keep it at the retrieval split's, so as many retrieval programs fit on a
multiprocessor as in the retrieval kernel alone (benchmarks/DECISIONS.md#mixed-decode-streaming-tile).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_decode import retrieval_split
from .triton_streaming_decode import streaming_split


@triton.jit(do_not_specialize=["st_b"])  # the block table's width: see triton_common.cache_rows
def mixed_decode_kernel(
    QR, KR, VR, KCR, VCR, QS, KS, VS, KCS, VCS, POS, VALID, OP, LP,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    skr_b, skr_h, skr_t, svr_b, svr_h, svr_t, sks_b, sks_h, sks_t, svs_b, svs_h, svs_t,
    B, hkv_r, hkv_s, groups, splits_r, tiles_s, programs_s, part_splits, qk_scale, sink, recent, COS, SIN, sc_b,
    TABLE, st_b, PAGE,
    HEADS_PER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    STREAMING_BLOCK_N: tl.constexpr,
    D: tl.constexpr, DOT_PRECISION: tl.constexpr, ROPE: tl.constexpr, PAGED: tl.constexpr,
):
    pid = tl.program_id(0)
    hq = (hkv_r + hkv_s) * groups
    streaming_programs = tiles_s * programs_s
    if pid < streaming_programs:
        streaming_split(QS, KS, VS, KCS, VCS, POS, VALID, OP, LP, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h,
                        sks_b, sks_h, sks_t, svs_b, svs_h, svs_t, hkv_s, groups, qk_scale, sink, recent,
                        pid % tiles_s, pid // tiles_s, hq, hkv_r * groups, part_splits, COS, SIN, sc_b,
                        HEADS_PER, BLOCK_T, STREAMING_BLOCK_N, D, DOT_PRECISION, ROPE)
    else:
        p = pid - streaming_programs
        retrieval_split(QR, KR, VR, KCR, VCR, POS, VALID, OP, LP, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                        skr_b, skr_h, skr_t, svr_b, svr_h, svr_t, B, hkv_r, groups, 1, splits_r, qk_scale,
                        p % (splits_r + 1), p // (splits_r + 1), hq, 0, part_splits, COS, SIN, sc_b, 0,
                        TABLE, st_b, PAGE, HEADS_PER, BLOCK_T, BLOCK_N, BLOCK_B, D, DOT_PRECISION, ROPE, PAGED)
