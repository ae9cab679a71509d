"""Launchers for the duo Triton kernels, and their registration as the CUDA kernels of the ``duo::`` ops.

The launchers are plain Python over tensors: on CUDA they run the compiled kernels; on CPU tensors they run
under ``TRITON_INTERPRET=1`` (set before triton is imported), which is how the CPU tests check them against
``reference.py``. ``register()`` installs them with ``torch.library.register_kernel(..., "cuda")`` on the
existing ``custom_op`` definitions: ``triton_op`` cannot be traced on CPU (platform notes), the custom ops can
everywhere, and on CUDA they now run these kernels.

Launches per layer: retrieval prefill 1 (append fused), retrieval decode 2 (split-K + combine, append fused),
streaming prefill 2 (attention, then the ring write that must wait for every read), streaming decode 2 (one
program per cache tile, slot write fused, then combine; chunk mode, or STREAMING_DECODE "one": 1, one program
per KV group). A mixed layer (``duo::attention_cached``) decodes in 2 (both groups' programs in one grid, one
combine: STREAMING_DECODE "mixed"); otherwise it runs both groups' launches, each writing its heads' slice of
one output. No launcher reads a device value on the host: the chunk's start position is read inside the
kernels, so every launch is CUDA-graph capturable.

RoPE (ops given ``cos``/``sin`` by ``fuse_rope``): the decode launches above rotate q and the new keys inside
their kernels (no extra launch); every other path (prefill, chunk mode, STREAMING_DECODE "one") first rotates q
and k with ``triton_rope.py``, one launch each.
"""
from __future__ import annotations

import math

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from . import reference
from .triton_common import (
    TileConfig,
    check_shapes,
    dot_precision,
    grid_groups,
    last_dim_contiguous,
    log2_scale,
    next_pow2,
    num_sms,
    supported_head_dim,
)
from .triton_decode import combine_kernel, retrieval_split_kernel
from .triton_mixed_decode import mixed_decode_kernel
from .triton_retrieval import retrieval_prefill_kernel
from .triton_rope import rope_strides, triton_rope
from .triton_streaming import streaming_kernel, streaming_write_kernel
from .triton_streaming_decode import streaming_decode_split_kernel

MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis (blocks_first puts batch x heads there)
# Queries per call at or below which a call is "decode": the group's heads share a tile and (retrieval) split-K.
DECODE_MAX_TOKENS = 16
# Cache capacities (keys) at which the decode launch changes (decode_config, decode_programs_per_sm).
LONG_CACHE = 32768  # one-head (MHA) programs: 8 per SM and 4 pipeline stages
VERY_LONG_CACHE = 131072  # one-head programs: 16 per SM
HUGE_CACHE = 524288  # GQA-packed programs: 8 per SM and 4 stages (else 2 per SM and 3 stages)
PACKED_HEADS = 4  # decode programs packing this many query heads of a GQA group tune differently (H200 sweep)
# How a window-mode one-token step decodes streaming heads (chunk mode always uses "one"):
#   "one"    one program per KV group walks its cache (triton_streaming.py), slot write fused: 1 launch;
#   "tiles"  one program per 64-key cache tile (triton_streaming_decode.py), then combine: 2 launches;
#   "mixed"  as "tiles", but a mixed layer runs its streaming tiles in its retrieval split-K grid and one
#            combine for both groups (triton_mixed_decode.py): 2 launches per mixed layer instead of 4.
# On the H200 (2026-12-01, sink 64 + recent 256, bf16 d128) "tiles" took 5.9 / 7.0 us per layer vs 11.3 us for
# "one" (kernels_decode_h200.json, Llama-3 / Llama-2 heads) and 0.15-0.18 ms less per decode step end to end on
# both model shapes (e2e_*_streaming_decode.json, the same engine timed with each); "mixed" another 0.17-0.20 ms
# less than "tiles" (e2e_*_inductor.json, side by side), so it is the default.
STREAMING_DECODE = "mixed"
STREAMING_DECODE_MODES = ("one", "tiles", "mixed")
# Columns of the head dim per combine program (combine_kernel): 128 = the whole head dim of these models, one
# program per row, as measured so far (0.115-0.150 ms per decode step at the headline contexts,
# results/e2e_*_fuse_rope.json). Smaller blocks put more programs on a step's few rows: 64 or 32 were 0-3.5%
# faster per layer in the H200 split sweep (results/kernels_tma_h200.json), not yet measured end to end, so the
# end-to-end numbers' setting stays. Read at each launch.
COMBINE_BLOCK_D = 128


def prefill_config(q: torch.Tensor, kind: str = "retrieval") -> TileConfig:
    """Prefill tiles, the fastest of the H200 sweep (benchmarks/results/kernels_h200.json, head dim 128, bf16).

    Retrieval (long causal loops): 128 queries x 128 keys, 8 warps, 3 stages (17.4 ms at 32K; next best 17.5);
    at head dim 128 in 16-bit also the unmasked key tiles loaded through TMA and the grid run query blocks
    first: 15.3 / 15.4 ms at 32K on Llama-3 / Llama-2 heads, against 15.6 / 16.5 with TMA alone and 17.3 / 18.1
    with neither, in one run (results/kernels_blocks_first_h200.json; SDPA 14.8 / 14.8). The TMA buffers take
    225 KB of shared memory at 3 stages; 2 stages are slower.
    Streaming (each query block walks only sink + window tiles): 64 x 64, 4 warps, 3 stages (0.82 ms at 32K vs
    1.05 ms for 128 x 64 / 8 warps): smaller blocks put more programs in flight and mask fewer keys per tile.
    Head dim 64: 128 x 64, 4 warps, neither option (8K tokens on the H200, results/kernels_d64_h200.json: TMA
    ties, TMA with the grid order 6-11% slower, 8 warps 2-3% faster: within run-to-run spread). The interpreter
    gets 16 x 16 so the CPU tests run several tiles.
    """
    if q.device.type != "cuda":
        return TileConfig(block_t=16, block_n=16)
    if kind == "streaming":
        return TileConfig(block_t=64, block_n=64, num_warps=4, num_stages=3)
    if q.shape[-1] <= 64:
        return TileConfig(block_t=128, block_n=64, num_warps=4, num_stages=3)
    tma = q.dtype in (torch.bfloat16, torch.float16)
    return TileConfig(block_t=128, block_n=128, num_warps=8, num_stages=3, tma=tma, blocks_first=True)


def decode_config(q: torch.Tensor, groups: int, capacity: int = 0) -> TileConfig:
    """Decode tiles: all of a group's query heads (up to 16) times the few tokens as M, at least 16 rows.

    64 keys per tile. Pipeline stages by the cache's ``capacity`` in keys (0: the short streaming cache), from
    the H200 runs: 4 for one-head programs (MHA) from LONG_CACHE (best from 64K keys), 4 for GQA-packed programs
    from HUGE_CACHE (see decode_programs_per_sm), else 3.
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
    return TileConfig(block_t=block_t, block_n=64, heads_per=heads_per, num_warps=4, num_stages=stages)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _rope_tables(q: torch.Tensor, rope) -> tuple:
    """Kernel arguments ``(COS, SIN, stride_b, stride_t)`` of a decode launch's fused RoPE: the ops' ``cos, sin``
    ``[B or 1, 1, T, D]`` broadcast to q's batch and tokens, one set of strides for both (made contiguous if they
    differ); without tables (``rope`` None) placeholders the kernel never reads (ROPE=False)."""
    if rope is None:
        return q, q, 0, 0
    cos, sin = rope_strides(q, *rope)
    return cos, sin, cos.stride(0), cos.stride(2)


def _rotate_first(q, k, rope):
    """Paths without a fused RoPE (prefill, chunk mode, STREAMING_DECODE "one") rotate q and k first
    (triton_rope.py: one pass over each)."""
    if rope is None:
        return q, k
    return triton_rope(q, *rope), triton_rope(k, *rope)


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _refuse_retrieval_prefill_options(cfg: TileConfig, kernel: str) -> None:
    """The retrieval prefill's own options (TMA loads, grid order) given to another launcher: an error, not
    ignored."""
    for knob in ("tma", "blocks_first"):
        if getattr(cfg, knob):
            raise ValueError(f"TileConfig.{knob}=True: only the retrieval prefill has it, not the {kernel}")


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether TMA can read these tensors (all on one device): on CPU (the interpreter emulates it) or a GPU of
    compute capability 9+ (Hopper), 16-byte aligned base addresses and strides, the last dim contiguous."""
    device = tensors[0].device
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return False
    for x in tensors:
        if x.data_ptr() % 16 or x.stride(-1) != 1 or any(s * x.element_size() % 16 for s in x.stride()[:-1]):
            return False
    return True


def _key_descriptor(x: torch.Tensor, block_n: int) -> TensorDescriptor:
    """Host-side TMA descriptor of a ``[B, H, T, D]`` k/v tensor or cache; each load is one ``[1, 1, block_n, D]``
    box (rows past ``T`` read as zeros)."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, block_n, x.shape[-1]])


def _check_prefill_config(cfg: TileConfig, t: int) -> None:
    if cfg.block_t % cfg.block_n and t > cfg.block_t:
        raise ValueError(f"block_t={cfg.block_t} must be a multiple of block_n={cfg.block_n} for multi-block prefill")
    if cfg.heads_per * cfg.block_t < 16 or cfg.block_n < 16:
        raise ValueError("tl.dot needs tiles of at least 16 rows and 16 keys")


def _launch_retrieval_prefill(q, k, v, k_cache, v_cache, cache_position, scale, cfg: TileConfig | None, out=None):
    b, hq, t, d, hkv, groups = check_shapes(q, k, v)
    out = _empty_out(q) if out is None else out
    if out.numel() == 0:
        return out
    cfg = cfg or prefill_config(q, "retrieval")
    _check_prefill_config(cfg, t)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    has_cache = k_cache is not None
    kc, vc = (k_cache, v_cache) if has_cache else (k, v)
    pos = cache_position if has_cache else q  # unused without a cache
    tma = cfg.tma and tma_compatible(k, v, kc, vc)
    descriptors = [_key_descriptor(x, cfg.block_n) for x in (k, v, kc, vc)] if tma else [k, v, kc, vc]
    grid = (grid_groups(b, hkv, groups, cfg.heads_per), math.ceil(t / cfg.block_t))
    blocks_first = cfg.blocks_first and grid[0] <= MAX_GRID_Y
    retrieval_prefill_kernel[grid[::-1] if blocks_first else grid](
        q, k, v, kc, vc, out, pos, *descriptors,
        *_strides(q), *_strides(k), *_strides(v), *_strides(kc), *_strides(vc), *_strides(out),
        hkv, groups, t, log2_scale(scale),
        HAS_CACHE=has_cache, HEADS_PER=cfg.heads_per, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
        D=d, DOT_PRECISION=dot_precision(q.dtype), TMA=tma, BLOCKS_FIRST=blocks_first, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def decode_programs_per_sm(heads_per: int, capacity: int) -> int:
    """Split-K programs per multiprocessor, the fastest of the H200 sweep (benchmarks/results/kernels_h200.json).

    Programs that pack 4+ query heads (GQA) already do 4x the work per K/V byte: 2 per SM was best at 8K, 64K
    and 256K keys (Llama-3 heads, kernel sweep); from HUGE_CACHE (512K) 8 per SM: end to end on the Llama-3
    shape at 512K and 1M keys, where layers hold 1-8 retrieval KV heads, 8 per SM with 4 stages gave 13.62 / 21.12
    ms per token and 2 per SM with 3 stages 14.13 / 22.16 (benchmarks/README.md). One-head programs (MHA,
    Llama-2 heads): 2 per SM below 32K keys, 8 from 32K, 16 from 128K. Below 32K the grid is one wave: at 3
    stages two programs fit on a multiprocessor (96 KB of shared memory each), so 32 heads x 8 splits = 256
    programs run at once where the 17 splits of 4 per SM ran in 2+ waves: 8K keys 40.9 vs 44.3 us per call,
    10 splits (2+ waves again) 51.1 us (results/kernels_decode_tail_h200.json). Larger caches amortise a second
    wave's tail: 8 / 16 per SM were best at 64K / 256K (kernels_h200.json).
    """
    if heads_per >= PACKED_HEADS:
        return 8 if capacity >= HUGE_CACHE else 2
    if capacity >= VERY_LONG_CACHE:
        return 16
    return 8 if capacity >= LONG_CACHE else 2


def decode_splits(q: torch.Tensor, k_cache: torch.Tensor, programs_per_split: int, cfg: TileConfig) -> int:
    """Splits of the key range so that the grid holds at most ``decode_programs_per_sm`` programs per
    multiprocessor (rounded down: one program past a full wave runs alone, a wave's length after the others).

    At most one split per key tile. The grid depends on the cache's capacity, not on the current length (which
    only the device knows), so a long-capacity cache read at a short length gets short splits.
    """
    per_sm = decode_programs_per_sm(cfg.heads_per, k_cache.shape[2])
    target = per_sm * num_sms(q.device)
    tiles = math.ceil((k_cache.shape[2] + q.shape[2]) / cfg.block_n)
    return max(1, min(target // max(programs_per_split, 1), tiles, 256))


def _empty_partials(b: int, hq: int, t: int, splits: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partial outputs ``[B, Hq, T, splits, D]`` and their log-sum-exps ``[B, Hq, T, splits]`` (fp32)."""
    return (torch.empty((b, hq, t, splits, d), dtype=torch.float32, device=device),
            torch.empty((b, hq, t, splits), dtype=torch.float32, device=device))


def _combine(o_part, lse_part, out, h_first: int | None = None, splits_first: int | None = None,
             splits_rest: int | None = None):
    """Merge split partials ``[B, Hq, T, splits, D]`` by their log-sum-exp into ``out`` (a program per row and
    ``COMBINE_BLOCK_D`` columns); heads from ``h_first`` on filled only ``splits_rest`` slots, those before it
    ``splits_first`` (default: every head all slots)."""
    b, hq, t, splits, d = o_part.shape
    # Under the interpreter (CPU tests) at least two column blocks, so the split is exercised.
    block_d = min(d if o_part.device.type == "cuda" else d // 2, COMBINE_BLOCK_D)
    combine_kernel[(b * hq * t, d // block_d)](
        o_part, lse_part, out, *_strides(out), hq, t, splits,
        hq if h_first is None else h_first, splits_first or splits, splits_rest or splits,
        SPLITS=next_pow2(splits), D=d, BLOCK_D=block_d, num_warps=4 if d >= 128 else 2,
    )


def _launch_retrieval_decode(q, k, v, k_cache, v_cache, cache_position, scale, cfg, num_splits=None, out=None,
                             rope=None):
    b, hq, t, d, hkv, groups = check_shapes(q, k, v)
    out = _empty_out(q) if out is None else out
    if out.numel() == 0:
        return out
    cfg = cfg or decode_config(q, groups, capacity=k_cache.shape[2])
    _refuse_retrieval_prefill_options(cfg, "retrieval decode")
    if t > cfg.block_t:
        raise ValueError(f"decode tile holds {cfg.block_t} tokens, got {t}")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    programs = grid_groups(b, hkv, groups, cfg.heads_per)
    splits = num_splits or decode_splits(q, k_cache, programs, cfg)
    o_part, lse_part = _empty_partials(b, hq, t, splits, d, q.device)
    retrieval_split_kernel[(splits, programs)](
        q, k, v, k_cache, v_cache, cache_position, o_part, lse_part,
        *_strides(q), *_strides(k), *_strides(v), *_strides(k_cache), *_strides(v_cache),
        hkv, groups, t, splits, log2_scale(scale), *_rope_tables(q, rope),
        HEADS_PER=cfg.heads_per, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
        D=d, DOT_PRECISION=dot_precision(q.dtype), ROPE=rope is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    _combine(o_part, lse_part, out)
    return out


def _launch_streaming_decode_split(q, k, v, k_cache, v_cache, cache_position, scale, sink, recent, cfg, out,
                                   rope=None):
    """One token, window mode: a program per tile of [sink | ring | new token], then combine (see the kernel)."""
    b, hq, t, d, hkv, groups = check_shapes(q, k, v)
    cfg = cfg or decode_config(q, groups)
    _refuse_retrieval_prefill_options(cfg, "streaming decode")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    splits = math.ceil((sink + recent + 1) / cfg.block_n)
    o_part, lse_part = _empty_partials(b, hq, 1, splits, d, q.device)
    streaming_decode_split_kernel[(splits, grid_groups(b, hkv, groups, cfg.heads_per))](
        q, k, v, k_cache, v_cache, cache_position, o_part, lse_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *_strides(k_cache), *_strides(v_cache),
        hkv, groups, splits, log2_scale(scale), sink, recent, *_rope_tables(q, rope)[:3],
        HEADS_PER=cfg.heads_per, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
        D=d, DOT_PRECISION=dot_precision(q.dtype), ROPE=rope is not None, num_warps=cfg.num_warps, num_stages=1,
    )
    _combine(o_part, lse_part, out)
    return out


def _launch_streaming(q, k, v, k_cache, v_cache, cache_position, scale, sink, recent, chunk_mode, cfg,
                      split_decode=None, out=None, rope=None):
    b, hq, t, d, hkv, groups = check_shapes(q, k, v)
    out = _empty_out(q) if out is None else out
    if out.numel() == 0:
        return out
    if recent < 1 or sink < 0:
        raise ValueError(f"streaming needs recent >= 1 and sink >= 0, got sink={sink}, recent={recent}")
    has_cache = k_cache is not None
    split_decode = STREAMING_DECODE != "one" if split_decode is None else split_decode
    if has_cache and t == 1 and not chunk_mode and split_decode:
        return _launch_streaming_decode_split(q, k, v, k_cache, v_cache, cache_position, scale, sink, recent, cfg,
                                              out, rope)
    q, k = _rotate_first(q, k, rope)
    decode = t <= DECODE_MAX_TOKENS
    cfg = cfg or (decode_config(q, groups) if decode else prefill_config(q, "streaming"))
    _refuse_retrieval_prefill_options(cfg, "streaming attention")
    _check_prefill_config(cfg, t)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    kc, vc = (k_cache, v_cache) if has_cache else (k, v)
    pos = cache_position if has_cache else q
    programs = grid_groups(b, hkv, groups, cfg.heads_per)
    blocks = math.ceil(t / cfg.block_t)
    # One program per KV group and a single token: it may write its slot itself once it has read the ring.
    fuse_write = has_cache and t == 1 and blocks == 1 and programs == b * hkv
    streaming_kernel[(programs, blocks)](
        q, k, v, kc, vc, out, pos,
        *_strides(q), *_strides(k), *_strides(v), *_strides(kc), *_strides(vc), *_strides(out),
        hkv, groups, t, log2_scale(scale), sink, recent,
        HAS_CACHE=has_cache, CHUNK_MODE=bool(chunk_mode), FUSE_WRITE=fuse_write,
        HEADS_PER=cfg.heads_per, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
        D=d, DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if has_cache and not fuse_write:
        candidates = sink + min(t, recent)
        block_w = 16 if q.device.type != "cuda" else 64
        streaming_write_kernel[(math.ceil(candidates / block_w), b * hkv)](
            k, v, k_cache, v_cache, cache_position,
            *_strides(k), *_strides(v), *_strides(k_cache), *_strides(v_cache),
            hkv, t, sink, recent, BLOCK_W=block_w, D=d, num_warps=4,
        )
    return out


# ---- public launchers (also usable on CPU tensors under TRITON_INTERPRET=1) ----


def triton_retrieval_attention(q, k, v, scale: float, config: TileConfig | None = None) -> torch.Tensor:
    """Causal attention over this call's tokens: the retrieval prefill kernel with no cache (start = 0)."""
    return _launch_retrieval_prefill(q, k, v, None, None, None, scale, config)


def triton_streaming_attention(
    q, k, v, scale: float, sink: int, recent: int, config: TileConfig | None = None
) -> torch.Tensor:
    """Sink + recent-window attention over this call's tokens: the streaming kernel with no cache (start = 0)."""
    return _launch_streaming(q, k, v, None, None, None, scale, sink, recent, False, config)


def triton_retrieval_attention_cached(
    q, k, v, k_cache, v_cache, cache_position, scale: float,
    config: TileConfig | None = None, num_splits: int | None = None, out: torch.Tensor | None = None,
    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append k/v at ``cache_position`` and attend causally to the cache: split-K for decode, FlashAttention else.

    ``out`` (any strides, e.g. a head slice of a bigger output): write there instead of a new tensor. ``cos``,
    ``sin``: q and k are pre-RoPE (reference.py); decode rotates them in the kernel, prefill in torch first."""
    rope = reference.rope_pair(cos, sin)
    if q.shape[2] <= DECODE_MAX_TOKENS:
        return _launch_retrieval_decode(q, k, v, k_cache, v_cache, cache_position, scale, config, num_splits, out,
                                        rope)
    q, k = _rotate_first(q, k, rope)
    return _launch_retrieval_prefill(q, k, v, k_cache, v_cache, cache_position, scale, config, out)


def triton_streaming_attention_cached(
    q, k, v, k_cache, v_cache, cache_position, scale: float, sink: int, recent: int, chunk_mode: bool,
    config: TileConfig | None = None, split_decode: bool | None = None, out: torch.Tensor | None = None,
    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend to [sink | recent ring | chunk] under the streaming rule, then write the chunk into the cache.

    ``split_decode`` picks the kernel of a one-token window-mode step: True the tiled one, False the one-program
    one, None ``STREAMING_DECODE`` != "one" (both are exact; the choice is for timing them side by side). ``out``
    and ``cos``/``sin`` as for ``triton_retrieval_attention_cached`` (the tiled decode rotates in the kernel).
    """
    return _launch_streaming(
        q, k, v, k_cache, v_cache, cache_position, scale, sink, recent, chunk_mode, config, split_decode, out,
        reference.rope_pair(cos, sin),
    )


def _launch_mixed_decode(retrieval_qkv, streaming_qkv, k_r, v_r, k_s, v_s, cache_position, scale, sink, recent,
                         out, cfg=None, num_splits=None, rope=None):
    """One token, window mode, both head groups: one grid of streaming tiles then retrieval splits, writing one
    partial buffer, then one combine (triton_mixed_decode.py). ``cfg`` / ``num_splits`` override the retrieval
    tiles and split count (decode_config / decode_splits), for the kernel benchmark's sweep."""
    (qr, kr, vr), (qs, ks, vs) = retrieval_qkv, streaming_qkv
    b, hq, _, d = out.shape
    _, _, _, _, hkv_r, groups = check_shapes(qr, kr, vr)
    _, _, _, _, hkv_s, _ = check_shapes(qs, ks, vs)
    cfg = cfg or decode_config(qr, groups, capacity=k_r.shape[2])
    _refuse_retrieval_prefill_options(cfg, "mixed decode")
    programs_r = grid_groups(b, hkv_r, groups, cfg.heads_per)
    programs_s = grid_groups(b, hkv_s, groups, cfg.heads_per)
    splits_r = num_splits or decode_splits(qr, k_r, programs_r, cfg)
    streaming_block_n = min(cfg.block_n, 32)  # see triton_mixed_decode.py
    tiles_s = math.ceil((sink + recent + 1) / streaming_block_n)
    part = max(splits_r, tiles_s)
    o_part, lse_part = _empty_partials(b, hq, 1, part, d, out.device)
    mixed_decode_kernel[(tiles_s * programs_s + splits_r * programs_r,)](
        qr, kr, vr, k_r, v_r, qs, ks, vs, k_s, v_s, cache_position, o_part, lse_part,
        *_strides(qr), *_strides(kr), *_strides(vr), *_strides(k_r), *_strides(v_r), *_strides(k_s), *_strides(v_s),
        hkv_r, hkv_s, groups, splits_r, tiles_s, programs_s, part, log2_scale(scale), sink, recent,
        *_rope_tables(qr, rope)[:3],
        HEADS_PER=cfg.heads_per, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, STREAMING_BLOCK_N=streaming_block_n,
        D=d, DOT_PRECISION=dot_precision(qr.dtype), ROPE=rope is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    _combine(o_part, lse_part, out, h_first=hkv_r * groups, splits_first=splits_r, splits_rest=tiles_s)
    return out


def triton_attention_cached(
    q, k, v, k_retrieval, v_retrieval, k_streaming, v_streaming, cache_position, scale: float,
    retrieval_kv_heads: int, sink: int, recent: int, chunk_mode: bool,
    config: TileConfig | None = None, num_splits: int | None = None,
    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """``duo::attention_cached``: both head groups of a layer, each launcher writing its heads' slice of one
    output (no concatenation afterwards). ``config`` / ``num_splits``: the retrieval decode's tiles and split
    count (default: decode_config / decode_splits), as for ``triton_retrieval_attention_cached``; so are
    ``cos``/``sin``."""
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    retrieval_qkv, streaming_qkv = reference.head_groups(q, k, v, retrieval_kv_heads)
    out = _empty_out(q)
    split = retrieval_qkv[0].shape[1]
    if (STREAMING_DECODE == "mixed" and q.shape[2] == 1 and not chunk_mode and 0 < split < q.shape[1]
            and out.numel() > 0):
        return _launch_mixed_decode(retrieval_qkv, streaming_qkv, k_retrieval, v_retrieval, k_streaming,
                                    v_streaming, cache_position, scale, sink, recent, out, config, num_splits,
                                    reference.rope_pair(cos, sin))
    triton_retrieval_attention_cached(*retrieval_qkv, k_retrieval, v_retrieval, cache_position, scale,
                                      config=config, num_splits=num_splits, out=out[:, :split], cos=cos, sin=sin)
    triton_streaming_attention_cached(*streaming_qkv, k_streaming, v_streaming, cache_position, scale, sink, recent,
                                      chunk_mode, out=out[:, split:], cos=cos, sin=sin)
    return out


# ---- registration as the CUDA kernels of the duo:: custom ops ----


def _kernel_ok(q: torch.Tensor) -> bool:
    return supported_head_dim(q.shape[-1])


def _retrieval_attention_cuda(q, k, v, scale):
    if not _kernel_ok(q):
        return reference.retrieval_attention(q, k, v, scale).contiguous()
    return triton_retrieval_attention(q, k, v, scale)


def _streaming_attention_cuda(q, k, v, scale, sink, recent):
    if not _kernel_ok(q):
        return reference.streaming_attention(q, k, v, scale, sink, recent).contiguous()
    return triton_streaming_attention(q, k, v, scale, sink, recent)


def _retrieval_attention_cached_cuda(q, k, v, k_cache, v_cache, cache_position, scale, cos=None, sin=None):
    if not _kernel_ok(q):
        return reference.retrieval_attention_cached(q, k, v, k_cache, v_cache, cache_position, scale, cos,
                                                    sin).contiguous()
    return triton_retrieval_attention_cached(q, k, v, k_cache, v_cache, cache_position.to(q.device), scale,
                                             cos=cos, sin=sin)


def _streaming_attention_cached_cuda(q, k, v, k_cache, v_cache, cache_position, scale, sink, recent, chunk_mode,
                                     cos=None, sin=None):
    if not _kernel_ok(q):
        return reference.streaming_attention_cached(
            q, k, v, k_cache, v_cache, cache_position, scale, sink, recent, chunk_mode, cos, sin
        ).contiguous()
    return triton_streaming_attention_cached(
        q, k, v, k_cache, v_cache, cache_position.to(q.device), scale, sink, recent, chunk_mode, cos=cos, sin=sin
    )


def _attention_cached_cuda(q, k, v, k_r, v_r, k_s, v_s, cache_position, scale, n, sink, recent, chunk_mode,
                           cos=None, sin=None):
    if not _kernel_ok(q):
        return reference.attention_cached(
            q, k, v, k_r, v_r, k_s, v_s, cache_position, scale, n, sink, recent, chunk_mode, cos, sin
        ).contiguous()
    return triton_attention_cached(
        q, k, v, k_r, v_r, k_s, v_s, cache_position.to(q.device), scale, n, sink, recent, chunk_mode, cos=cos,
        sin=sin,
    )


CUDA_KERNELS = {
    "retrieval_attention": _retrieval_attention_cuda,
    "streaming_attention": _streaming_attention_cuda,
    "retrieval_attention_cached": _retrieval_attention_cached_cuda,
    "streaming_attention_cached": _streaming_attention_cached_cuda,
    "attention_cached": _attention_cached_cuda,
}
_registered = False


def register() -> None:
    """Make the Triton launchers the CUDA kernels of the ``duo::`` ops (idempotent)."""
    global _registered
    if _registered:
        return
    for name, fn in CUDA_KERNELS.items():
        torch.library.register_kernel(f"duo::{name}", "cuda")(fn)
    _registered = True
