"""How the launchers size their launches: tile configs, decode split counts, and the launch-path switches.

Each choice here is the fastest of the variants ``benchmarks/kernels.py`` (or the end-to-end bench) timed; the
numbers, the variants that lost and the runs behind them are in benchmarks/DECISIONS.md, linked at each choice.
The functions read shapes, dtypes and devices only, never tensor contents, so every launch they size is
CUDA-graph capturable. The interpreter (CPU tensors) gets small tiles so the CPU tests run several of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .triton_common import next_pow2, num_sms


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch knobs for one kernel call. ``block_t`` must be a multiple of ``block_n`` for prefill.

    Retrieval prefill only (the other launchers reject them): ``tma`` loads the unmasked key tiles through
    Hopper's tensor memory accelerator where the GPU and the tensors allow it (``launchers.tma_compatible``),
    else as without it; ``blocks_first`` orders the grid query blocks first (see triton_retrieval.py) where
    batch x heads fits CUDA's second grid axis (65535).
    """

    block_t: int = 128
    block_n: int = 64
    heads_per: int = 1
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False
    blocks_first: bool = False


# Queries per call at or below which a call is "decode": the group's heads share a tile and (retrieval) split-K.
DECODE_MAX_TOKENS = 16
# Cache capacities (keys) at which the decode launch changes (decode_config, decode_programs_per_sm).
LONG_CACHE = 32768  # one-head (MHA) programs: 8 per SM and 4 pipeline stages
VERY_LONG_CACHE = 131072  # one-head programs: 16 per SM
HUGE_CACHE = 524288  # GQA-packed programs: 8 per SM and 4 stages (else 2 per SM and 3 stages)
# Partial slots a retrieval decode keeps per row (the combine's SPLITS tile; split_plan never gives a row more).
MAX_SPLIT_SLOTS = 256
PACKED_HEADS = 4  # decode programs packing this many query heads of a GQA group follow their own rules
# How a window-mode one-token step decodes streaming heads (chunk mode always uses "one"):
#   "one"    one program per KV group walks its cache (triton_streaming.py), slot write fused: 1 launch;
#   "tiles"  one program per 64-key cache tile (triton_streaming_decode.py), then combine: 2 launches;
#   "mixed"  as "tiles", but a mixed layer runs its streaming tiles in its retrieval split-K grid and one
#            combine for both groups (triton_mixed_decode.py): 2 launches per mixed layer instead of 4.
# Read at each launch (the benchmarks switch it). "mixed", the fastest end to end, is the default: see
# benchmarks/DECISIONS.md#streaming-decode-tiles and benchmarks/DECISIONS.md#mixed-decode-one-grid.
STREAMING_DECODE = "mixed"
STREAMING_DECODE_MODES = ("one", "tiles", "mixed")
# Columns of the head dim per combine program (combine_kernel), read at each launch: 128 = the whole head dim of
# these models, one program per row. See benchmarks/DECISIONS.md#combine-block-d.
COMBINE_BLOCK_D = 128


def prefill_config(q: torch.Tensor, kind: str = "retrieval") -> TileConfig:
    """Prefill tiles (``kind`` "retrieval" or "streaming"); the interpreter gets 16 x 16.

    Retrieval (long causal loops): 128 queries x 128 keys, 8 warps, 3 stages, and at head dim 128 in 16-bit the
    unmasked key tiles loaded through TMA with the grid run query blocks first; head dim 64: 128 x 64, 4 warps,
    neither option. Streaming (each query block walks only sink + window tiles): 64 x 64, 4 warps, 3 stages:
    smaller blocks put more programs in flight and mask fewer keys per tile. Rows wider than 256 bytes (fp32 at head
    dim 128, Gemma's head dim 256 in 16-bit): 64 x 64, 2 stages, whose buffers fit a Hopper multiprocessor's
    shared memory. See
    benchmarks/DECISIONS.md#prefill-tiles, benchmarks/DECISIONS.md#prefill-tma-blocks-first and
    benchmarks/DECISIONS.md#prefill-head-dim-64.
    """
    if q.device.type != "cuda":
        return TileConfig(block_t=16, block_n=16)
    if q.dtype.itemsize * q.shape[-1] > 256:  # rows wider than 16-bit x 128 (fp32, head dim 256): smaller tiles
        return TileConfig(block_t=64, block_n=64, num_warps=4, num_stages=2)
    if kind == "streaming":
        return TileConfig(block_t=64, block_n=64, num_warps=4, num_stages=3)
    if q.shape[-1] <= 64:
        return TileConfig(block_t=128, block_n=64, num_warps=4, num_stages=3)
    tma = q.dtype in (torch.bfloat16, torch.float16)
    return TileConfig(block_t=128, block_n=128, num_warps=8, num_stages=3, tma=tma, blocks_first=True)


def decode_config(q: torch.Tensor, groups: int, capacity: int = 0) -> TileConfig:
    """Decode tiles: all of a group's query heads (up to 16) times the few tokens as M, at least 16 rows (the
    smallest ``tl.dot``; a lone query row is padded, see benchmarks/DECISIONS.md#decode-one-row-tiles).

    64 keys per tile, 4 warps. Pipeline stages by the cache's ``capacity`` in keys (0: the short streaming
    cache): 4 for one-head programs (MHA) from LONG_CACHE, 4 for GQA-packed programs from HUGE_CACHE (see
    decode_programs_per_sm), else 3; 2 for rows wider than 256 bytes (shared memory). See benchmarks/DECISIONS.md#decode-programs-per-sm.
    """
    t = q.shape[2]
    heads_per = min(next_pow2(groups), 16)
    block_t = next_pow2(t)
    while heads_per * block_t > 64 and heads_per > 1:
        heads_per //= 2
    block_t = max(block_t, 16 // heads_per)
    if q.device.type != "cuda":
        return TileConfig(block_t=block_t, block_n=16, heads_per=heads_per)
    deep = capacity >= (HUGE_CACHE if heads_per >= PACKED_HEADS else LONG_CACHE)
    stages = 4 if deep else 3
    if q.dtype.itemsize * q.shape[-1] > 256:  # K/V rows wider than 16-bit x 128: fewer buffers fit
        stages = 2
    return TileConfig(block_t=block_t, block_n=64, heads_per=heads_per, num_warps=4, num_stages=stages)


def decode_programs_per_sm(heads_per: int, capacity: int) -> int:
    """Split-K programs per multiprocessor, by how many query heads a program packs and the cache's capacity.

    GQA-packed programs (PACKED_HEADS or more query heads: every K/V byte loaded serves them all): 2, and 8 from
    HUGE_CACHE. One-head programs (MHA): 2 below LONG_CACHE, where two programs fit on a multiprocessor at 3
    stages, so the whole grid runs in one wave; 8 from LONG_CACHE and 16 from VERY_LONG_CACHE, where the longer
    read amortises a second wave's tail. See benchmarks/DECISIONS.md#decode-programs-per-sm and
    benchmarks/DECISIONS.md#decode-one-wave.
    """
    if heads_per >= PACKED_HEADS:
        return 8 if capacity >= HUGE_CACHE else 2
    if capacity >= VERY_LONG_CACHE:
        return 16
    return 8 if capacity >= LONG_CACHE else 2


def decode_splits(q: torch.Tensor, capacity: int, programs_per_split: int, cfg: TileConfig) -> int:
    """Splits of the key range so that the grid holds at most ``decode_programs_per_sm`` programs per
    multiprocessor (rounded down: one program past a full wave runs alone, a wave's length after the others).
    ``capacity``: the most keys a row's cache holds.

    This is the batch's splits per row: the kernel shares ``B x splits`` programs out over the rows in proportion
    to their lengths (``triton_common.split_plan``). At most one split per key tile of the capacity; the grid
    depends on the capacity, not on the current lengths (which only the device knows).
    """
    per_sm = decode_programs_per_sm(cfg.heads_per, capacity)
    target = per_sm * num_sms(q.device)
    tiles = math.ceil((capacity + q.shape[2]) / cfg.block_n)
    return max(1, min(target // max(programs_per_split, 1), tiles, 256))
