"""Launchers of the duo Triton kernels: plain Python over tensors, one function per op and path.

On CUDA they run the compiled kernels; on CPU tensors they run under ``TRITON_INTERPRET=1`` (set before triton is
imported), which is how the CPU tests check them against ``reference.py``. Tiles and split counts come from
tuning.py unless a caller passes its own; triton_ops.py registers the public launchers as the ops' CUDA kernels.

Launches per layer: retrieval prefill 1 (append fused), retrieval decode 2 (split-K + combine, append fused),
streaming prefill 2 (attention, then the ring write that must wait for every read), streaming decode 2 (one
program per cache tile, slot write fused, then combine; chunk mode, or STREAMING_DECODE "one": 1, one program
per KV group). A mixed layer (``duo::attention_cached``) decodes in 2 (both groups' programs in one grid, one
combine: STREAMING_DECODE "mixed"); otherwise it runs both groups' launches, each writing its heads' slice of
one output. No launcher reads a device value on the host: each batch row's start position (``cache_start[b]``)
and count of real tokens (``valid[b]``; padding tokens are never written to a cache) are read inside the kernels,
so every launch is CUDA-graph capturable. Paged retrieval caches (a ``block_table``, kernels/paged.py) are read
and written through the table inside the kernels, which read its entries on the device too.

RoPE (ops given ``cos``/``sin`` by ``fuse_rope``): the decode launches above rotate q and the new keys inside
their kernels (no extra launch); every other path (prefill, chunk mode, STREAMING_DECODE "one") first rotates q
and k with ``triton_rope.py``, one launch for both (a mixed layer's prefill once for both groups).
"""
from __future__ import annotations

import math

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from . import reference, tuning
from .paged import check_layout
from .triton_common import (
    check_shapes,
    dot_precision,
    grid_groups,
    last_dim_contiguous,
    log2_scale,
    next_pow2,
)
from .triton_decode import combine_kernel, retrieval_split_kernel
from .triton_mixed_decode import mixed_decode_kernel
from .triton_retrieval import retrieval_prefill_kernel
from .triton_rope import rope_strides, triton_rope
from .triton_streaming import streaming_kernel, streaming_write_kernel
from .triton_streaming_decode import streaming_decode_split_kernel
from .tuning import DECODE_MAX_TOKENS, MAX_SPLIT_SLOTS, TileConfig, decode_config, decode_splits, prefill_config

MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis (blocks_first puts batch x heads there)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride()[:3]  # one call: a launch passes a dozen of these, on the host path of every layer


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
    (triton_rope.py: one pass over each, one launch)."""
    if rope is None:
        return q, k
    return triton_rope(q, k, *rope)


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


def _rows(cache_start: torch.Tensor, valid: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ops' per-row ``cache_start`` / ``valid`` as the kernels read them: int64 ``[B]`` on q's device, contiguous
    (shapes checked on the host; the values are read on the device only)."""
    rows = []
    for name, x in (("cache_start", cache_start), ("valid", valid)):
        if x.dim() != 1 or x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} must be [B] = [{q.shape[0]}] (one entry per batch row), got {tuple(x.shape)}")
        rows.append(x.to(device=q.device, dtype=torch.int64).contiguous())
    return rows[0], rows[1]


def _paging(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
            batch: int) -> tuple[tuple, bool, int]:
    """A retrieval launch's paging: the kernel arguments ``(TABLE, st_b, PAGE)``, PAGED, and the most positions a
    row's cache holds. Without a table the arguments are placeholders the kernels never read. With one, the
    caches are pools ``[num_pages, Hkv, page_size, D]`` and the table int ``[B, max_pages]`` (kernels/paged.py);
    its entries are read on the device only (no host sync), so they are the caller's to get right."""
    if block_table is None:
        return (k_cache, 0, 1), False, k_cache.shape[2]
    check_layout(k_cache, v_cache, block_table, batch)
    table = block_table.to(device=k_cache.device, dtype=torch.int32).contiguous()
    return (table, table.stride(0), k_cache.shape[2]), True, table.shape[1] * k_cache.shape[2]


def _launch_retrieval_prefill(q, k, v, k_cache, v_cache, cache_start, valid, scale, cfg: TileConfig | None,
                              out=None, block_table=None):
    b, hq, t, d, hkv, groups = check_shapes(q, k, v)
    out = _empty_out(q) if out is None else out
    if out.numel() == 0:
        return out
    cfg = cfg or prefill_config(q, "retrieval")
    _check_prefill_config(cfg, t)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    has_cache = k_cache is not None
    kc, vc = (k_cache, v_cache) if has_cache else (k, v)
    pos, n_valid = _rows(cache_start, valid, q) if has_cache else (q, q)  # unused without a cache
    table, paged, _ = _paging(kc, vc, block_table, b)
    tma = cfg.tma and not paged and tma_compatible(k, v, kc, vc)
    descriptors = [_key_descriptor(x, cfg.block_n) for x in (k, v, kc, vc)] if tma else [k, v, kc, vc]
    grid = (grid_groups(b, hkv, groups, cfg.heads_per), math.ceil(t / cfg.block_t))
    blocks_first = cfg.blocks_first and grid[0] <= MAX_GRID_Y
    retrieval_prefill_kernel[grid[::-1] if blocks_first else grid](
        q, k, v, kc, vc, out, pos, n_valid, *descriptors,
        *_strides(q), *_strides(k), *_strides(v), *_strides(kc), *_strides(vc), *_strides(out),
        hkv, groups, t, log2_scale(scale), *table,
        HAS_CACHE=has_cache, HEADS_PER=cfg.heads_per, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
        D=d, DOT_PRECISION=dot_precision(q.dtype), TMA=tma, BLOCKS_FIRST=blocks_first, PAGED=paged,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _empty_partials(b: int, hq: int, t: int, splits: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partial outputs ``[B, Hq, T, splits, D]`` and their log-sum-exps ``[B, Hq, T, splits]`` (fp32)."""
    return (torch.empty((b, hq, t, splits, d), dtype=torch.float32, device=device),
            torch.empty((b, hq, t, splits), dtype=torch.float32, device=device))


def _combine(o_part, lse_part, out, rows, h_first: int = 0, splits_rest: int | None = None,
             num_splits: int = 1, block_n: int = 1):
    """Merge split partials ``[B, Hq, T, slots, D]`` by their log-sum-exp into ``out`` (a program per row and
    ``tuning.COMBINE_BLOCK_D`` columns): heads below ``h_first`` hold a retrieval decode's splits (as many as
    ``split_plan`` gave their batch row under ``num_splits`` / ``block_n``, computed from ``rows`` = the device's
    cache_start and valid), the others ``splits_rest`` (default: all slots). An ordinary launch after the splits'
    (see benchmarks/DECISIONS.md#decode-combine-pdl)."""
    b, hq, t, slots, d = o_part.shape
    # Under the interpreter (CPU tests) at least two column blocks, so the split is exercised.
    block_d = min(d if o_part.device.type == "cuda" else d // 2, tuning.COMBINE_BLOCK_D)
    combine_kernel[(b * hq * t, d // block_d)](
        o_part, lse_part, out, *_strides(out), hq, t, slots, h_first, splits_rest or slots, *rows, b, num_splits,
        SPLITS=next_pow2(slots), D=d, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_B=next_pow2(b),
        num_warps=4 if d >= 128 else 2,
    )


def _split_slots(b: int, splits: int, capacity: int, block_n: int) -> int:
    """Partial slots per row of a retrieval decode: ``split_plan`` gives a row at most ``b * splits`` splits (all
    the batch's, when the other rows are idle), at most one per key tile, and never more than the combine takes
    (``MAX_SPLIT_SLOTS``)."""
    return max(1, min(b * splits, math.ceil(capacity / block_n), MAX_SPLIT_SLOTS))


def _launch_retrieval_decode(q, k, v, k_cache, v_cache, cache_start, valid, scale, cfg, num_splits=None, out=None,
                             rope=None, block_table=None):
    b, hq, t, d, hkv, groups = check_shapes(q, k, v)
    out = _empty_out(q) if out is None else out
    if out.numel() == 0:
        return out
    table, paged, capacity = _paging(k_cache, v_cache, block_table, b)
    cfg = cfg or decode_config(q, groups, capacity=capacity)
    _refuse_retrieval_prefill_options(cfg, "retrieval decode")
    if t > cfg.block_t:
        raise ValueError(f"decode tile holds {cfg.block_t} tokens, got {t}")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    programs = grid_groups(b, hkv, groups, cfg.heads_per)
    splits = num_splits or decode_splits(q, capacity, programs, cfg)
    slots = _split_slots(b, splits, capacity + t, cfg.block_n)
    rows = _rows(cache_start, valid, q)
    o_part, lse_part = _empty_partials(b, hq, t, slots, d, q.device)
    retrieval_split_kernel[(splits + 1, programs)](
        q, k, v, k_cache, v_cache, *rows, o_part, lse_part,
        *_strides(q), *_strides(k), *_strides(v), *_strides(k_cache), *_strides(v_cache),
        b, hkv, groups, t, splits, slots, log2_scale(scale), *_rope_tables(q, rope), *table,
        HEADS_PER=cfg.heads_per, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_B=next_pow2(b),
        D=d, DOT_PRECISION=dot_precision(q.dtype), ROPE=rope is not None, PAGED=paged, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    _combine(o_part, lse_part, out, rows, h_first=hq, num_splits=splits, block_n=cfg.block_n)
    return out


def _launch_streaming_decode_split(q, k, v, k_cache, v_cache, cache_start, valid, scale, sink, recent, cfg, out,
                                   rope=None):
    """One token, window mode: a program per tile of [sink | ring | new token], then combine (see the kernel)."""
    b, hq, t, d, hkv, groups = check_shapes(q, k, v)
    cfg = cfg or decode_config(q, groups)
    _refuse_retrieval_prefill_options(cfg, "streaming decode")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    splits = math.ceil((sink + recent + 1) / cfg.block_n)
    o_part, lse_part = _empty_partials(b, hq, 1, splits, d, q.device)
    rows = _rows(cache_start, valid, q)
    streaming_decode_split_kernel[(splits, grid_groups(b, hkv, groups, cfg.heads_per))](
        q, k, v, k_cache, v_cache, *rows, o_part, lse_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *_strides(k_cache), *_strides(v_cache),
        hkv, groups, splits, log2_scale(scale), sink, recent, *_rope_tables(q, rope)[:3],
        HEADS_PER=cfg.heads_per, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
        D=d, DOT_PRECISION=dot_precision(q.dtype), ROPE=rope is not None, num_warps=cfg.num_warps, num_stages=1,
    )
    _combine(o_part, lse_part, out, rows)
    return out


def _launch_streaming(q, k, v, k_cache, v_cache, cache_start, valid, scale, sink, recent, chunk_mode, cfg,
                      split_decode=None, out=None, rope=None):
    b, hq, t, d, hkv, groups = check_shapes(q, k, v)
    out = _empty_out(q) if out is None else out
    if out.numel() == 0:
        return out
    if recent < 1 or sink < 0:
        raise ValueError(f"streaming needs recent >= 1 and sink >= 0, got sink={sink}, recent={recent}")
    has_cache = k_cache is not None
    split_decode = tuning.STREAMING_DECODE != "one" if split_decode is None else split_decode
    if has_cache and t == 1 and not chunk_mode and split_decode:
        return _launch_streaming_decode_split(q, k, v, k_cache, v_cache, cache_start, valid, scale, sink, recent,
                                              cfg, out, rope)
    q, k = _rotate_first(q, k, rope)
    decode = t <= DECODE_MAX_TOKENS
    cfg = cfg or (decode_config(q, groups) if decode else prefill_config(q, "streaming"))
    _refuse_retrieval_prefill_options(cfg, "streaming attention")
    _check_prefill_config(cfg, t)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    kc, vc = (k_cache, v_cache) if has_cache else (k, v)
    pos, n_valid = _rows(cache_start, valid, q) if has_cache else (q, q)
    programs = grid_groups(b, hkv, groups, cfg.heads_per)
    blocks = math.ceil(t / cfg.block_t)
    # One program per KV group and a single token: it may write its slot itself once it has read the ring.
    fuse_write = has_cache and t == 1 and blocks == 1 and programs == b * hkv
    streaming_kernel[(programs, blocks)](
        q, k, v, kc, vc, out, pos, n_valid,
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
            k, v, k_cache, v_cache, pos, n_valid,
            *_strides(k), *_strides(v), *_strides(k_cache), *_strides(v_cache),
            hkv, t, sink, recent, BLOCK_W=block_w, D=d, num_warps=4,
        )
    return out


# ---- public launchers (also usable on CPU tensors under TRITON_INTERPRET=1) ----


def triton_retrieval_attention(q, k, v, scale: float, config: TileConfig | None = None) -> torch.Tensor:
    """Causal attention over this call's tokens: the retrieval prefill kernel with no cache (start = 0)."""
    return _launch_retrieval_prefill(q, k, v, None, None, None, None, scale, config)


def triton_streaming_attention(
    q, k, v, scale: float, sink: int, recent: int, config: TileConfig | None = None
) -> torch.Tensor:
    """Sink + recent-window attention over this call's tokens: the streaming kernel with no cache (start = 0)."""
    return _launch_streaming(q, k, v, None, None, None, None, scale, sink, recent, False, config)


def triton_retrieval_attention_cached(
    q, k, v, k_cache, v_cache, cache_start, valid, scale: float,
    config: TileConfig | None = None, num_splits: int | None = None, out: torch.Tensor | None = None,
    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append each row's real k/v (the first ``valid[b]``) at ``cache_start[b]`` and attend causally to the row's
    cache: split-K for decode, FlashAttention else.

    ``out`` (any strides, e.g. a head slice of a bigger output): write there instead of a new tensor. ``cos``,
    ``sin``: q and k are pre-RoPE (reference.py); decode rotates them in the kernel, prefill in torch first.
    ``block_table``: the caches are page pools, each row's positions in the pages its table row lists
    (kernels/paged.py); the kernels read and write through it."""
    rope = reference.rope_pair(cos, sin)
    if q.shape[2] <= DECODE_MAX_TOKENS:
        return _launch_retrieval_decode(q, k, v, k_cache, v_cache, cache_start, valid, scale, config, num_splits,
                                        out, rope, block_table)
    q, k = _rotate_first(q, k, rope)
    return _launch_retrieval_prefill(q, k, v, k_cache, v_cache, cache_start, valid, scale, config, out, block_table)


def triton_streaming_attention_cached(
    q, k, v, k_cache, v_cache, cache_start, valid, scale: float, sink: int, recent: int, chunk_mode: bool,
    config: TileConfig | None = None, split_decode: bool | None = None, out: torch.Tensor | None = None,
    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend to [sink | recent ring | chunk] under the streaming rule, then write each row's real chunk tokens
    into its cache.

    ``split_decode`` picks the kernel of a one-token window-mode step: True the tiled one, False the one-program
    one, None ``STREAMING_DECODE`` != "one" (both are exact; the choice is for timing them side by side). ``out``
    and ``cos``/``sin`` as for ``triton_retrieval_attention_cached`` (the tiled decode rotates in the kernel).
    """
    return _launch_streaming(
        q, k, v, k_cache, v_cache, cache_start, valid, scale, sink, recent, chunk_mode, config, split_decode, out,
        reference.rope_pair(cos, sin),
    )


def _launch_mixed_decode(retrieval_qkv, streaming_qkv, k_r, v_r, k_s, v_s, cache_start, valid, scale, sink, recent,
                         out, cfg=None, num_splits=None, rope=None, block_table=None):
    """One token, window mode, both head groups: one grid of streaming tiles then retrieval splits, writing one
    partial buffer, then one combine (triton_mixed_decode.py). ``cfg`` / ``num_splits`` override the retrieval
    tiles and split count (decode_config / decode_splits), for the kernel benchmark's sweep."""
    (qr, kr, vr), (qs, ks, vs) = retrieval_qkv, streaming_qkv
    b, hq, _, d = out.shape
    _, _, _, _, hkv_r, groups = check_shapes(qr, kr, vr)
    _, _, _, _, hkv_s, _ = check_shapes(qs, ks, vs)
    table, paged, capacity = _paging(k_r, v_r, block_table, b)
    cfg = cfg or decode_config(qr, groups, capacity=capacity)
    _refuse_retrieval_prefill_options(cfg, "mixed decode")
    programs_r = grid_groups(b, hkv_r, groups, cfg.heads_per)
    programs_s = grid_groups(b, hkv_s, groups, cfg.heads_per)
    splits_r = num_splits or decode_splits(qr, capacity, programs_r, cfg)
    streaming_block_n = min(cfg.block_n, 32)  # see triton_mixed_decode.py
    tiles_s = math.ceil((sink + recent + 1) / streaming_block_n)
    part = max(_split_slots(b, splits_r, capacity + 1, cfg.block_n), tiles_s)
    rows = _rows(cache_start, valid, qr)
    o_part, lse_part = _empty_partials(b, hq, 1, part, d, out.device)
    mixed_decode_kernel[(tiles_s * programs_s + (splits_r + 1) * programs_r,)](
        qr, kr, vr, k_r, v_r, qs, ks, vs, k_s, v_s, *rows, o_part, lse_part,
        *_strides(qr), *_strides(kr), *_strides(vr), *_strides(k_r), *_strides(v_r), *_strides(k_s), *_strides(v_s),
        b, hkv_r, hkv_s, groups, splits_r, tiles_s, programs_s, part, log2_scale(scale), sink, recent,
        *_rope_tables(qr, rope)[:3], *table,
        HEADS_PER=cfg.heads_per, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_B=next_pow2(b),
        STREAMING_BLOCK_N=streaming_block_n,
        D=d, DOT_PRECISION=dot_precision(qr.dtype), ROPE=rope is not None, PAGED=paged, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    _combine(o_part, lse_part, out, rows, h_first=hkv_r * groups, splits_rest=tiles_s, num_splits=splits_r,
             block_n=cfg.block_n)
    return out


def triton_attention_cached(
    q, k, v, k_retrieval, v_retrieval, k_streaming, v_streaming, cache_start, valid, scale: float,
    retrieval_kv_heads: int, sink: int, recent: int, chunk_mode: bool,
    config: TileConfig | None = None, num_splits: int | None = None,
    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """``duo::attention_cached``: both head groups of a layer, each launcher writing its heads' slice of one
    output (no concatenation afterwards). ``config`` / ``num_splits``: the retrieval decode's tiles and split
    count (default: decode_config / decode_splits), as for ``triton_retrieval_attention_cached``; so are
    ``cos``/``sin`` and ``block_table`` (paged retrieval pools; the streaming caches stay one row per batch
    row). A prefill chunk (more than ``DECODE_MAX_TOKENS`` tokens) rotates q and k for both groups at once."""
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    if q.shape[2] > DECODE_MAX_TOKENS:
        # Both groups' paths rotate first here (the prefill kernels take rotated q and k): rotate every head
        # once, one launch where each group would make its own (the rotation is per head: same values).
        q, k = _rotate_first(q, k, reference.rope_pair(cos, sin))
        cos = sin = None
    retrieval_qkv, streaming_qkv = reference.head_groups(q, k, v, retrieval_kv_heads)
    out = _empty_out(q)
    split = retrieval_qkv[0].shape[1]
    if (tuning.STREAMING_DECODE == "mixed" and q.shape[2] == 1 and not chunk_mode and 0 < split < q.shape[1]
            and out.numel() > 0):
        return _launch_mixed_decode(retrieval_qkv, streaming_qkv, k_retrieval, v_retrieval, k_streaming,
                                    v_streaming, cache_start, valid, scale, sink, recent, out, config, num_splits,
                                    reference.rope_pair(cos, sin), block_table)
    triton_retrieval_attention_cached(*retrieval_qkv, k_retrieval, v_retrieval, cache_start, valid, scale,
                                      config=config, num_splits=num_splits, out=out[:, :split], cos=cos, sin=sin,
                                      block_table=block_table)
    triton_streaming_attention_cached(*streaming_qkv, k_streaming, v_streaming, cache_start, valid, scale, sink, recent,
                                      chunk_mode, out=out[:, split:], cos=cos, sin=sin)
    return out
