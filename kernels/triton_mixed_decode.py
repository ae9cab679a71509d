"""A mixed layer's one-token decode in one launch: the streaming tiles and the retrieval splits in one grid.

A layer with both kinds of heads (``duo::attention_cached``) would otherwise decode in four launches: retrieval
split-K, its combine, the streaming tiles, their combine. On the H200 the streaming tiles took 5-7 us per layer
and each combine 2-3 us (benchmarks/results/e2e_*_streaming_decode.json profiles), short kernels the retrieval
read does not hide because they run after it. Here one 1-D grid holds every streaming tile program first, then
every retrieval split program: the short streaming programs run in the retrieval read's shadow, both write
their partials into one buffer (query heads in the layer's order: retrieval then streaming), and one
``combine_kernel`` launch merges each head's own number of partials. Two launches per mixed layer. Measured on
the H200 (2026-12-01, Llama-2 shape at 120K, benchmarks/README.md): 3.96 ms per decode step for this kernel
where retrieval split-K and streaming tiles took 3.89 + 0.16 ms, one combine 0.12 ms where two took 0.17 ms;
0.17-0.20 ms less per step on both model shapes at every context, timed side by side.

The programs are exactly those of ``retrieval_split_kernel`` and ``streaming_decode_split_kernel`` (the same
device functions), so the cache writes and visibility rules are theirs: the retrieval split owning the new
token appends it; tile 0 of each streaming group writes its slot. Streaming tiles are ``STREAMING_BLOCK_N`` =
32 keys on the GPU (the launcher's choice): a 64-key tile keeps K and V in 36 KB of shared memory where the
retrieval split needs 22 KB, and one kernel reserves the larger of its branches for every program, which would
cut how many retrieval programs fit on a multiprocessor (32- and 64-key tiles timed alike on the H200:
5.8 / 6.6-6.7 us per layer, Llama-3 / Llama-2 heads).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_decode import retrieval_split
from .triton_streaming_decode import streaming_split


@triton.jit
def mixed_decode_kernel(
    QR, KR, VR, KCR, VCR, QS, KS, VS, KCS, VCS, POS, OP, LP,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    skr_b, skr_h, skr_t, svr_b, svr_h, svr_t, sks_b, sks_h, sks_t, svs_b, svs_h, svs_t,
    hkv_r, hkv_s, groups, splits_r, tiles_s, programs_s, part_splits, qk_scale, sink, recent, COS, SIN, sc_b,
    HEADS_PER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, STREAMING_BLOCK_N: tl.constexpr,
    D: tl.constexpr, DOT_PRECISION: tl.constexpr, ROPE: tl.constexpr,
):
    pid = tl.program_id(0)
    hq = (hkv_r + hkv_s) * groups
    streaming_programs = tiles_s * programs_s
    if pid < streaming_programs:
        streaming_split(QS, KS, VS, KCS, VCS, POS, OP, LP, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h,
                        sks_b, sks_h, sks_t, svs_b, svs_h, svs_t, hkv_s, groups, qk_scale, sink, recent,
                        pid % tiles_s, pid // tiles_s, hq, hkv_r * groups, part_splits, COS, SIN, sc_b,
                        HEADS_PER, BLOCK_T, STREAMING_BLOCK_N, D, DOT_PRECISION, ROPE)
    else:
        p = pid - streaming_programs
        retrieval_split(QR, KR, VR, KCR, VCR, POS, OP, LP, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                        skr_b, skr_h, skr_t, svr_b, svr_h, svr_t, hkv_r, groups, 1, splits_r, qk_scale,
                        p % splits_r, p // splits_r, hq, 0, part_splits, COS, SIN, sc_b, 0,
                        HEADS_PER, BLOCK_T, BLOCK_N, D, DOT_PRECISION, ROPE)
