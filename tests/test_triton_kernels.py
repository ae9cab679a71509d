"""The duo Triton kernels against ``kernels/reference.py``, on CPU under TRITON_INTERPRET=1 (set in conftest).

Tiny sizes (head dim 16, 16-wide tiles) so that every path runs with several tiles: chunk boundaries, chunks
longer than the ring, ring wrap-around, sink 0, GQA groups 1/2/4, zero-head groups, batch > 1, window and chunk
mode, decode and prefill, and the cache contents after each write. fp32 and fp16 (bf16 is broken in the
interpreter). No timing here: benchmarks/kernels.py measures speed on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from duo_compile.kernels import reference
from duo_compile.kernels.launchers import (
    tma_compatible,
    triton_retrieval_attention,
    triton_retrieval_attention_cached,
    triton_streaming_attention,
    triton_streaming_attention_cached,
)
from duo_compile.kernels.tuning import TileConfig
from tests.tiny_models import rope_tables

D = 16
SCALE = D**-0.5
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def _qkv(b, hkv, groups, t, dtype=torch.float32, transposed_q=True):
    """q comes from a transpose in the model ([B, T, H, D] -> [B, H, T, D]): keep it non-contiguous."""
    if transposed_q:
        q = torch.randn(b, t, hkv * groups, D).transpose(1, 2)
    else:
        q = torch.randn(b, hkv * groups, t, D)
    k = torch.randn(b, hkv, t, D)
    v = torch.randn(b, hkv, t, D)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err < TOL[dtype], err


def _pos(start, t):
    return torch.arange(start, start + t)


def _rows(start, t, b=1):
    """The cached ops' per-row positions of ``b`` rows all at ``start`` with ``t`` real tokens: (cache_start,
    valid)."""
    return torch.full((b,), start), torch.full((b,), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hkv,groups,t", [(1, 1, 1, 37), (2, 2, 2, 33), (1, 1, 4, 20)])
def test_retrieval_attention(dtype, b, hkv, groups, t):
    q, k, v = _qkv(b, hkv, groups, t, dtype)
    _close(triton_retrieval_attention(q, k, v, SCALE), reference.retrieval_attention(q, k, v, SCALE), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b,hkv,groups,t,sink,recent",
    [(1, 1, 1, 70, 4, 8), (2, 2, 2, 45, 0, 20), (1, 1, 4, 50, 20, 17), (1, 2, 1, 40, 3, 1), (1, 1, 2, 24, 1, 64), (1, 1, 1, 80, 2, 40)],
)
def test_streaming_attention(dtype, b, hkv, groups, t, sink, recent):
    q, k, v = _qkv(b, hkv, groups, t, dtype)
    out = triton_streaming_attention(q, k, v, SCALE, sink, recent)
    _close(out, reference.streaming_attention(q, k, v, SCALE, sink, recent), dtype)


def _run_retrieval_chunks(chunks, b, hkv, groups, dtype, max_len=96, **kw):
    """Feed chunks of these lengths through kernel and reference; compare outputs and caches after each."""
    k_cache = torch.randn(b, hkv, max_len, D).to(dtype)
    v_cache = torch.randn(b, hkv, max_len, D).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    start = 0
    for t in chunks:
        q, k, v = _qkv(b, hkv, groups, t, dtype)
        pos = _rows(start, t, b)
        out = triton_retrieval_attention_cached(q, k, v, k_cache, v_cache, *pos, SCALE, **kw)
        ref = reference.retrieval_attention_cached(q, k, v, k_ref, v_ref, *pos, SCALE)
        _close(out, ref, dtype)
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        start += t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hkv,groups", [(1, 1, 1), (2, 2, 2), (1, 1, 4)])
def test_retrieval_cached_prefill_then_decode(dtype, b, hkv, groups):
    # Chunk boundaries off the 16-tile grid, then decode steps over a cache with a ragged last tile.
    _run_retrieval_chunks([21, 19, 1, 1, 3], b, hkv, groups, dtype)


@pytest.mark.parametrize("splits", [1, 3, 40])
def test_retrieval_decode_splits(splits):
    # 1 split, a few uneven ones, and more splits than key tiles (most of them empty).
    _run_retrieval_chunks([50, 1, 2], 1, 2, 2, torch.float32, num_splits=splits)


def test_retrieval_decode_heads_split_across_programs():
    # groups=4 with 2 heads per program (prefill and decode): two programs share a KV head, only the first appends.
    cfg = TileConfig(block_t=16, block_n=16, heads_per=2)
    _run_retrieval_chunks([18, 1, 3], 1, 1, 4, torch.float32, config=cfg)


def test_retrieval_decode_first_token():
    # start = 0: every split is empty except the one holding the new token.
    _run_retrieval_chunks([1, 1], 2, 1, 2, torch.float32)


TMA = TileConfig(block_t=16, block_n=16, tma=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tma,blocks_first", [(True, False), (False, True), (True, True)])
def test_retrieval_prefill_hopper_options(dtype, tma, blocks_first):
    # Prefill chunks (> DECODE_MAX_TOKENS) whose unmasked key tiles come through tensor descriptors (the
    # interpreter emulates TMA) and/or whose grid runs query blocks first: cache prefix with full tiles and a
    # ragged tail, chunk tiles left of the diagonal, batch 2, GQA.
    cfg = TileConfig(block_t=16, block_n=16, tma=tma, blocks_first=blocks_first)
    q, k, v = _qkv(2, 2, 2, 37, dtype)
    assert tma_compatible(k, v)
    _close(triton_retrieval_attention(q, k, v, SCALE, config=cfg), reference.retrieval_attention(q, k, v, SCALE),
           dtype)
    _run_retrieval_chunks([21, 19, 40], 2, 2, 2, dtype, config=cfg)


def test_tma_falls_back_for_unaligned_tensors():
    # k/v starting 4 bytes into their storage cannot be TMA-loaded: the launcher uses pointer loads instead.
    q, k, v = _qkv(1, 1, 2, 33)
    k_off, v_off = (torch.cat([torch.zeros(1), x.flatten()])[1:].view(x.shape) for x in (k, v))
    assert not tma_compatible(k_off, v_off) and tma_compatible(k, v)
    out = triton_retrieval_attention(q, k_off, v_off, SCALE, config=TMA)
    _close(out, reference.retrieval_attention(q, k, v, SCALE), torch.float32)


@pytest.mark.parametrize("dtype,d,tma,blocks_first", [
    (torch.bfloat16, 128, True, True), (torch.float16, 128, True, True), (torch.float32, 128, False, False), (torch.bfloat16, 256, False, False),
    (torch.bfloat16, 64, False, False),
])
def test_prefill_config_uses_the_hopper_options_where_the_h200_measured_them(dtype, d, tma, blocks_first):
    # TMA at head dim 128 in 16-bit, the grid order at head dim 128; head dim 64 neither (not timed); 32-bit at head
    # dim 128 and 16-bit at head dim 256 (Gemma) the smaller tiles whose buffers fit shared memory.
    from types import SimpleNamespace

    from duo_compile.kernels.tuning import prefill_config

    q = SimpleNamespace(shape=(1, 32, 4096, d), dtype=dtype, device=torch.device("cuda"))
    cfg = prefill_config(q, "retrieval")
    assert (cfg.tma, cfg.blocks_first) == (tma, blocks_first)
    if dtype.itemsize * d > 256:
        assert (cfg.block_t, cfg.block_n, cfg.num_stages) == (64, 64, 2)
    assert not (prefill_config(q, "streaming").tma or prefill_config(q, "streaming").blocks_first)


def test_hopper_options_only_for_retrieval_prefill():
    q, k, v = _qkv(1, 1, 2, 1)
    cache = torch.zeros(1, 1, 8, D)
    with pytest.raises(ValueError, match="tma=True.*retrieval decode"):
        triton_retrieval_attention_cached(q, k, v, cache, cache.clone(), *_rows(0, 1), SCALE, config=TMA)
    blocks_first = TileConfig(block_t=16, block_n=16, blocks_first=True)
    with pytest.raises(ValueError, match="blocks_first=True.*streaming"):
        triton_streaming_attention(*_qkv(1, 1, 2, 20), SCALE, 2, 4, config=blocks_first)


def _run_streaming_chunks(chunks, b, hkv, groups, sink, recent, chunk_mode, dtype=torch.float32, config=None,
                          split_decode=None):
    k_cache = torch.randn(b, hkv, sink + recent, D).to(dtype)
    v_cache = torch.randn(b, hkv, sink + recent, D).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    start = 0
    for t in chunks:
        q, k, v = _qkv(b, hkv, groups, t, dtype)
        pos = _rows(start, t, b)
        out = triton_streaming_attention_cached(
            q, k, v, k_cache, v_cache, *pos, SCALE, sink, recent, chunk_mode, config=config, split_decode=split_decode
        )
        ref = reference.streaming_attention_cached(q, k, v, k_ref, v_ref, *pos, SCALE, sink, recent, chunk_mode)
        _close(out, ref, dtype)
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), f"cache differs after chunk at {start}"
        start += t


@pytest.mark.parametrize("chunk_mode", [False, True])
@pytest.mark.parametrize(
    "b,hkv,groups,sink,recent,chunks",
    [
        (1, 1, 1, 4, 8, [6, 30, 1, 1, 5]),  # first chunk inside sink + ring, then longer than the ring
        (2, 2, 2, 0, 12, [20, 7, 1, 1, 1, 33]),  # sink 0, wrap-around, decode, batch 2
        (1, 1, 4, 20, 24, [3, 40, 1, 25]),  # chunk starting inside the sink, wide sink over several tiles
        (1, 2, 1, 16, 16, [16, 16, 1, 17]),  # tile-aligned boundaries
        (1, 1, 2, 3, 18, [25, 30, 1]),  # second query block still reaches the ring's newest keys
    ],
)
def test_streaming_cached(chunk_mode, b, hkv, groups, sink, recent, chunks):
    _run_streaming_chunks(chunks, b, hkv, groups, sink, recent, chunk_mode)


@pytest.mark.parametrize("split_decode", [False, True])
def test_streaming_cached_fp16(split_decode):
    _run_streaming_chunks([10, 30, 1, 3], 1, 2, 2, 4, 12, False, dtype=torch.float16, split_decode=split_decode)


@pytest.mark.parametrize("split_decode", [False, True])
def test_streaming_decode_unfused_write(split_decode):
    # Two programs per KV group. One-program kernel: the slot write goes to the separate write kernel (no fused
    # write). Tiled kernel: only the first head chunk writes.
    cfg = TileConfig(block_t=16, block_n=16, heads_per=2)
    _run_streaming_chunks([20, 1, 1, 3], 1, 1, 4, 2, 8, False, config=cfg, split_decode=split_decode)


@pytest.mark.parametrize(
    "b,hkv,groups,sink,recent,block_n,steps",
    [
        (1, 1, 1, 4, 8, 16, 20),  # from position 0: sink filling, ring filling, wrap-around; one tile of 13 keys
        (2, 2, 2, 5, 20, 16, 30),  # batch 2, GQA, sink + recent + 1 = 26 keys over 2 tiles (second one partial)
        (1, 1, 4, 0, 16, 16, 20),  # sink 0; the new token alone in the second tile
        (1, 2, 1, 3, 12, 32, 18),  # 32-key tile, more than the whole cache
    ],
)
def test_streaming_decode_tiles_token_by_token(b, hkv, groups, sink, recent, block_n, steps):
    """The tiled one-token kernel (triton_streaming_decode.py) from an empty cache, one token at a time."""
    heads_per = min(groups, 4)
    cfg = TileConfig(block_t=max(1, 16 // heads_per), block_n=block_n, heads_per=heads_per)
    _run_streaming_chunks([1] * steps, b, hkv, groups, sink, recent, False, config=cfg, split_decode=True)


def test_streaming_decode_one_program_kernel_token_by_token():
    # The same walk through sink, ring filling and wrap-around on the one-program kernel (FUSE_WRITE).
    _run_streaming_chunks([1] * 20, 1, 1, 2, 4, 8, False, config=TileConfig(block_t=8, block_n=16, heads_per=2),
                          split_decode=False)


def test_streaming_long_prefill_small_ring_blocks():
    # Several query blocks, a window spanning block edges, recent smaller than a tile.
    _run_streaming_chunks([50, 40], 1, 1, 1, 2, 5, False, config=TileConfig(block_t=16, block_n=16))


@pytest.mark.parametrize("cached", [False, True])
def test_zero_heads(cached):
    q, k, v = (torch.randn(2, 0, 5, D) for _ in range(3))
    if not cached:
        assert triton_retrieval_attention(q, k, v, SCALE).shape == q.shape
        assert triton_streaming_attention(q, k, v, SCALE, 2, 4).shape == q.shape
        return
    pos = _rows(3, 5, 2)
    kc, vc = torch.randn(2, 0, 16, D), torch.randn(2, 0, 16, D)
    assert triton_retrieval_attention_cached(q, k, v, kc, vc, *pos, SCALE).shape == q.shape
    assert triton_streaming_attention_cached(q, k, v, kc, vc, *pos, SCALE, 2, 4, False).shape == q.shape
    q1, k1, v1 = (x[:, :, :1] for x in (q, k, v))
    pos1 = _rows(3, 1, 2)
    assert triton_retrieval_attention_cached(q1, k1, v1, kc, vc, *pos1, SCALE).shape == q1.shape
    assert triton_streaming_attention_cached(q1, k1, v1, kc, vc, *pos1, SCALE, 2, 4, True).shape == q1.shape


def test_registered_for_cuda():
    from duo_compile.kernels import ops

    assert ops._triton_ops is not None
    for name in ops.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"duo::{name}", "CUDA"), name


@pytest.mark.parametrize("capacity", [1, 15, 16, 17, 1000, 40000, 200000, 600000])
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_decode_splits_stay_within_the_key_tiles(capacity, groups):
    # The default split count: at least 1, never more splits than key tiles (an empty split still costs a
    # program), at most 256 (the combine's width).
    from duo_compile.kernels.triton_common import grid_groups
    from duo_compile.kernels.tuning import decode_config, decode_splits

    q = torch.zeros(1, 2 * groups, 1, D)
    cfg = decode_config(q, groups)
    k_cache = torch.zeros(1, 2, capacity, D)
    splits = decode_splits(q, k_cache.shape[2], grid_groups(1, 2, groups, cfg.heads_per), cfg)
    tiles = -(-(capacity + 1) // cfg.block_n)
    assert 1 <= splits <= min(tiles, 256)


@pytest.mark.parametrize("kv_heads,groups,capacity,splits", [
    (32, 1, 8193, 8),  # Llama-2 heads at 8K keys: 256 one-head programs, one wave of 2 per SM (was 17 splits)
    (8, 4, 65537, 33),  # Llama-3 heads at 64K: 264 packed programs, 2 per SM
    (5, 4, 65537, 52),  # 260 programs; rounding up would put one program of 265 in a second wave
    (32, 1, 65537, 33),  # from LONG_CACHE one-head programs take 8 per SM (several waves, as measured best)
])
def test_decode_grid_on_the_h200(monkeypatch, kv_heads, groups, capacity, splits):
    # The default split count on a 132-multiprocessor GPU (H200): at most decode_programs_per_sm programs per
    # multiprocessor, rounded down.
    from types import SimpleNamespace

    from duo_compile.kernels import tuning

    monkeypatch.setattr(tuning, "num_sms", lambda device: 132)
    q = SimpleNamespace(device=torch.device("cuda"), shape=(1, kv_heads * groups, 1, 128))
    cfg = TileConfig(block_t=max(1, 16 // groups), block_n=64, heads_per=groups)
    assert tuning.decode_splits(q, capacity, kv_heads, cfg) == splits


# ---------------------------------------------------------------------- decode-time linear layers (triton_gemv.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "lead,n,k,bias",
    [
        ((1, 1), 40, 70, False),  # one decode token; N and K not multiples of the 16-wide tiles
        ((3, 1), 33, 48, True),  # batch 3, bias
        ((2, 10), 16, 17, True),  # 20 rows: two row blocks
    ],
)
def test_gemv_matches_linear(dtype, lead, n, k, bias):
    from duo_compile.kernels.triton_gemv import triton_linear

    x = torch.randn(*lead, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    out = triton_linear(x, w, b)
    assert out.shape == (*lead, n) and out.dtype == dtype
    err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert err < TOL[dtype], err


def test_gemv_refuses_mismatched_shapes():
    from duo_compile.kernels.triton_gemv import triton_linear

    with pytest.raises(ValueError, match=r"weight \(8, 5\)"):
        triton_linear(torch.randn(1, 4), torch.randn(8, 5))


# ---------------------------------------------------------------------- a whole layer: duo::attention_cached


@pytest.mark.parametrize("chunk_mode,streaming_decode", [(False, "mixed"), (False, "tiles"), (True, "mixed")])
@pytest.mark.parametrize("b,hkv,groups,retrieval_kv_heads", [(1, 2, 2, 1), (2, 3, 1, 2), (1, 4, 4, 1)])
def test_attention_cached_writes_both_groups_into_one_output(chunk_mode, streaming_decode, b, hkv, groups,
                                                             retrieval_kv_heads, monkeypatch):
    """triton_attention_cached against the reference, chunk after chunk and then decode steps, caches included:
    decode steps in one grid for both groups ("mixed", window mode) or each group's own launches ("tiles";
    chunk mode always)."""
    from duo_compile.kernels import tuning
    from duo_compile.kernels.launchers import triton_attention_cached

    monkeypatch.setattr(tuning, "STREAMING_DECODE", streaming_decode)

    sink, recent, capacity = 3, 10, 64
    n_s = hkv - retrieval_kv_heads
    caches = [torch.randn(b, retrieval_kv_heads, capacity, D), torch.randn(b, retrieval_kv_heads, capacity, D),
              torch.randn(b, n_s, sink + recent, D), torch.randn(b, n_s, sink + recent, D)]
    ref_caches = [c.clone() for c in caches]
    start = 0
    for t in (20, 1, 7, 1, 1):
        q, k, v = _qkv(b, hkv, groups, t)
        pos = _rows(start, t, b)
        out = triton_attention_cached(q, k, v, *caches, *pos, SCALE, retrieval_kv_heads, sink, recent, chunk_mode)
        ref = reference.attention_cached(q, k, v, *ref_caches, *pos, SCALE, retrieval_kv_heads, sink, recent,
                                         chunk_mode)
        _close(out, ref, torch.float32)
        assert all(torch.equal(c, r) for c, r in zip(caches, ref_caches)), f"caches differ after chunk at {start}"
        start += t


@pytest.mark.parametrize("retrieval_kv_heads", [0, 2])
def test_attention_cached_needs_both_groups(retrieval_kv_heads):
    q, k, v = _qkv(1, 2, 1, 1)
    with pytest.raises(ValueError, match=f"retrieval_kv_heads={retrieval_kv_heads} must leave both"):
        reference.attention_cached(q, k, v, *(torch.zeros(1, 1, 8, D) for _ in range(4)), *_rows(0, 1), SCALE,
                                   retrieval_kv_heads, 2, 4, False)


# ---------------------------------------------------------------------- RoPE fused into the decode kernels


def _rope_tables(b, pos, per_row: bool):
    """Rotary tables for positions ``pos``: ``per_row`` gives each batch row its own table ``[B, 1, T, D]`` (other
    positions per row), else one ``[1, 1, T, D]`` that the kernels broadcast (stride 0 over the batch)."""
    return rope_tables(torch.stack([pos + i for i in range(b if per_row else 1)]), D)


@pytest.mark.parametrize("layer,streaming_decode", [("retrieval", "mixed"), ("streaming", "tiles"),
                                                    ("streaming", "one"), ("mixed", "mixed"), ("mixed", "tiles"),
                                                    ("mixed-chunk", "mixed")])
@pytest.mark.parametrize("b,hkv,groups,per_row", [(1, 2, 2, False), (2, 2, 1, True)])
def test_rope_in_the_kernels_matches_rotating_first(layer, streaming_decode, b, hkv, groups, per_row, monkeypatch):
    """The cached ops given pre-RoPE q/k and cos/sin (what fuse_rope emits): decode steps rotate q and the new
    keys inside the split kernels (retrieval split-K, streaming tiles, the mixed grid), the other paths with the
    rotation kernel first; outputs and caches (which must hold rotated keys) against the reference, chunk after
    chunk."""
    from duo_compile.kernels import launchers, tuning

    monkeypatch.setattr(tuning, "STREAMING_DECODE", streaming_decode)
    sink, recent, capacity = 3, 10, 64
    n = {"retrieval": hkv, "streaming": 0}.get(layer, 1)  # retrieval KV heads
    ring = sink + recent
    slots = {"retrieval": [capacity] * 2, "streaming": [ring] * 2}.get(layer, [capacity, capacity, ring, ring])
    heads = {"retrieval": [hkv] * 2, "streaming": [hkv] * 2}.get(layer, [n, n, hkv - n, hkv - n])
    caches = [torch.randn(b, h, s, D) for h, s in zip(heads, slots)]
    ref_caches = [c.clone() for c in caches]
    start = 0
    for t in (20, 1, 7, 1, 1):
        q, k, v = _qkv(b, hkv, groups, t)
        pos = _rows(start, t, b)
        cos, sin = _rope_tables(b, _pos(start, t), per_row)
        if layer == "retrieval":
            run, ref_run = triton_retrieval_attention_cached, reference.retrieval_attention_cached
            args = (*pos, SCALE)
        elif layer == "streaming":
            run, ref_run = triton_streaming_attention_cached, reference.streaming_attention_cached
            args = (*pos, SCALE, sink, recent, False)
        else:
            run, ref_run = launchers.triton_attention_cached, reference.attention_cached
            args = (*pos, SCALE, n, sink, recent, layer == "mixed-chunk")
        out = run(q, k, v, *caches, *args, cos=cos, sin=sin)
        ref = ref_run(q, k, v, *ref_caches, *args, cos, sin)
        _close(out, ref, torch.float32)
        for c, r in zip(caches, ref_caches):  # fp32 rounding order may differ in the last bit (fused multiply-add)
            torch.testing.assert_close(c, r, rtol=1e-6, atol=1e-6)
        start += t


def test_mixed_prefill_rotates_every_head_once(monkeypatch):
    """A mixed layer's prefill chunk rotates q and k for both head groups in one rotation launch, and gives the
    reference's output and caches."""
    from duo_compile.kernels import launchers

    rotated = []
    rope = launchers.triton_rope
    monkeypatch.setattr(launchers, "triton_rope",
                        lambda q, k, cos, sin: rotated.append((q.shape[1], k.shape[1])) or rope(q, k, cos, sin))
    b, hkv, groups, t, n, sink, recent = 1, 3, 2, 20, 1, 3, 10
    ring = sink + recent
    caches = [torch.randn(b, h, s, D) for h, s in ((n, 64), (n, 64), (hkv - n, ring), (hkv - n, ring))]
    ref_caches = [c.clone() for c in caches]
    q, k, v = _qkv(b, hkv, groups, t)
    cos, sin = _rope_tables(b, _pos(0, t), False)
    args = (*_rows(0, t, b), SCALE, n, sink, recent, False)
    out = launchers.triton_attention_cached(q, k, v, *caches, *args, cos=cos, sin=sin)
    assert rotated == [(hkv * groups, hkv)]  # q's heads and k's: every head of the layer at once
    _close(out, reference.attention_cached(q, k, v, *ref_caches, *args, cos, sin), torch.float32)
    for c, r in zip(caches, ref_caches):
        torch.testing.assert_close(c, r, rtol=1e-6, atol=1e-6)


def test_rope_tables_come_in_pairs():
    q, k, v = _qkv(1, 1, 1, 1)
    cos, _ = _rope_tables(1, _pos(0, 1), False)
    with pytest.raises(ValueError, match="cos and sin must be given together"):
        triton_retrieval_attention_cached(q, k, v, torch.zeros(1, 1, 8, D), torch.zeros(1, 1, 8, D), *_rows(0, 1),
                                          SCALE, cos=cos)
    with pytest.raises(ValueError, match="cos and sin must be given together"):
        reference.retrieval_attention_cached(q, k, v, torch.zeros(1, 1, 8, D), torch.zeros(1, 1, 8, D),
                                             *_rows(0, 1), SCALE, cos=cos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hq,hk,t,per_row", [(1, 6, 3, 37, False), (2, 2, 2, 5, True), (1, 2, 0, 5, False)])
def test_triton_rope_matches_the_reference(dtype, b, hq, hk, t, per_row):
    """The prefill paths' rotation kernel against reference.rope, q and k in one launch, q from a transpose
    (non-contiguous) and k a head slice of a wider tensor (its own strides); k with no heads (a layer group
    that has none)."""
    from duo_compile.kernels.triton_rope import triton_rope

    q = torch.randn(b, t, hq, D).transpose(1, 2).to(dtype)
    k = torch.randn(b, hk + 1, t, D).to(dtype)[:, 1:]
    cos, sin = (c.to(dtype) for c in _rope_tables(b, _pos(40, t), per_row))
    q_rot, k_rot = triton_rope(q, k, cos, sin)
    _close(q_rot, reference.rope(q, cos, sin), dtype)
    assert k_rot.shape == k.shape
    if hk:
        _close(k_rot, reference.rope(k, cos, sin), dtype)


# ---------------------------------------------------------------------- per-row positions: padded / continuous batches


# (starts, valid, T) per launch path: T = 1 decode (retrieval split-K, streaming tiles / one program / the mixed
# grid), T <= DECODE_MAX_TOKENS (decode tiles, several tokens), T > it (prefill kernels, the separate ring write).
# Rows at different positions (inside the sink, filling the ring, past a wrapped ring), with different numbers of
# real tokens, one row with none; sink 3 + recent 10, so padding of a long chunk would land in the ring.
RAGGED = [
    ((7, 25, 0, 40), (1, 1, 0, 1), 1),
    ((3, 20, 0), (5, 2, 0), 5),
    ((0, 0, 0), (37, 20, 9), 37),  # a right-padded prefill from position 0
    ((40, 3, 17), (24, 11, 1), 24),
]


@pytest.mark.parametrize("kind,chunk_mode,streaming_decode", [
    ("retrieval", False, "mixed"), ("streaming", False, "tiles"), ("streaming", False, "one"),
    ("streaming", True, "mixed"), ("mixed", False, "mixed"), ("mixed", False, "tiles"), ("mixed", True, "mixed"),
])
@pytest.mark.parametrize("starts,valid,length", RAGGED, ids=["decode", "short", "prefill", "continuous"])
def test_kernels_treat_every_row_as_if_alone(kind, chunk_mode, streaming_decode, starts, valid, length, monkeypatch):
    """One launch over rows at their own positions with their own counts of real tokens equals each row alone
    (reference), outputs and caches: every kernel reads its row's start and count on the device, and never writes
    a padding token (tests/ragged.py)."""
    from duo_compile.kernels import launchers, tuning
    from tests.ragged import check_rows_alone

    monkeypatch.setattr(tuning, "STREAMING_DECODE", streaming_decode)
    run = {"retrieval": triton_retrieval_attention_cached, "streaming": triton_streaming_attention_cached,
           "mixed": launchers.triton_attention_cached}[kind]
    check_rows_alone(run, kind, starts, valid, length, chunk_mode=chunk_mode, hkv=3 if kind == "mixed" else 2)


@pytest.mark.parametrize("kind", ["retrieval", "mixed"])
@pytest.mark.parametrize("starts,valid,length", [RAGGED[0], RAGGED[3]], ids=["decode", "continuous"])
def test_kernels_rotate_each_row_at_its_own_positions(kind, starts, valid, length):
    """RoPE fused into the decode kernels (and the rotation kernel of the other paths) with per-row tables."""
    from duo_compile.kernels import launchers
    from tests.ragged import check_rows_alone

    run = triton_retrieval_attention_cached if kind == "retrieval" else launchers.triton_attention_cached
    check_rows_alone(run, kind, starts, valid, length, hkv=3 if kind == "mixed" else 2, rope=True)


def test_kernels_fp16_rows():
    from tests.ragged import check_rows_alone

    check_rows_alone(triton_streaming_attention_cached, "streaming", (0, 30, 4), (20, 3, 0), 20,
                     dtype=torch.float16, tol=TOL[torch.float16])


@pytest.mark.parametrize("kind", ["retrieval", "mixed"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_splits_follow_the_rows_lengths(kind, num_splits):
    """A decode batch of rows of very different lengths (and an idle one) shares its ``B x num_splits`` split
    programs out by length (triton_common.split_plan): the long row gets more splits than ``num_splits``, the
    short one fewer, and every row still equals the row alone."""
    import functools

    from duo_compile.kernels import launchers
    from tests.ragged import check_rows_alone

    run = triton_retrieval_attention_cached if kind == "retrieval" else launchers.triton_attention_cached
    check_rows_alone(functools.partial(run, num_splits=num_splits), kind, (120, 5, 30, 60), (1, 1, 0, 1), 1,
                     hkv=3 if kind == "mixed" else 2)


# ---------------------------------------------------------------------- paged retrieval caches (block tables)
def _scrambled_pools(caches, page_size, spare=2):
    """Contiguous retrieval caches ``[B, Hkv, L, D]`` (L a multiple of page_size) as page pools with a scrambled
    block table int32 ``[B, L / page_size]``; ``spare`` pages belong to no row."""
    b, h, length, d = caches[0].shape
    per_row = length // page_size
    table = torch.randperm(b * per_row + spare)[: b * per_row].view(b, per_row).to(torch.int32)
    pools = []
    for cache in caches:
        pool = torch.randn(b * per_row + spare, h, page_size, d, dtype=cache.dtype)
        pool[table.long()] = cache.view(b, h, per_row, page_size, d).transpose(1, 2)
        pools.append(pool)
    return pools, table


def _contiguous(pool, table):
    return pool[table.long()].transpose(1, 2).flatten(2, 3)


@pytest.mark.parametrize("kind,streaming_decode,page_size", [
    ("retrieval", "mixed", 16), ("retrieval", "mixed", 5), ("mixed", "mixed", 16), ("mixed", "tiles", 5),
])
def test_paged_kernels_read_and_write_through_the_block_table(kind, streaming_decode, page_size, monkeypatch):
    """The retrieval prefill, split-K decode and mixed-layer decode kernels on page pools with a scrambled block
    table equal the reference on the contiguous caches, outputs and caches, chunk after chunk and decode steps
    for rows at their own positions (one idle): pages of one key tile (16) and pages that tiles straddle (5)."""
    from duo_compile.kernels import launchers, tuning

    monkeypatch.setattr(tuning, "STREAMING_DECODE", streaming_decode)
    b, hkv, groups, n_r, sink, recent, capacity = 3, 3 if kind == "mixed" else 2, 2, 1, 3, 10, 80
    n_r = n_r if kind == "mixed" else hkv
    retrieval = [torch.randn(b, n_r, capacity, D), torch.randn(b, n_r, capacity, D)]
    pools, table = _scrambled_pools(retrieval, page_size)
    streaming = [torch.randn(b, hkv - n_r, sink + recent, D) for _ in range(2)]
    streaming_paged = [c.clone() for c in streaming]
    starts = torch.tensor([0, 9, 30])
    for t, valid in ((20, [20, 17, 0]), (1, [1, 1, 0]), (3, [3, 0, 3]), (1, [1, 1, 1])):
        q, k, v = _qkv(b, hkv, groups, t)
        valid = torch.tensor(valid)
        if kind == "mixed":
            args = (starts, valid, SCALE, n_r, sink, recent, False)
            ref = reference.attention_cached(q, k, v, *retrieval, *streaming, *args)
            out = launchers.triton_attention_cached(q, k, v, *pools, *streaming_paged, *args, block_table=table)
            assert all(torch.equal(c, p) for c, p in zip(streaming, streaming_paged))
        else:
            ref = reference.retrieval_attention_cached(q, k, v, *retrieval, starts, valid, SCALE)
            out = triton_retrieval_attention_cached(q, k, v, *pools, starts, valid, SCALE, block_table=table)
        for row, n in enumerate(valid.tolist()):
            if n:
                _close(out[row, :, :n], ref[row, :, :n], torch.float32)
        assert torch.equal(_contiguous(pools[0], table), retrieval[0])
        assert torch.equal(_contiguous(pools[1], table), retrieval[1])
        starts = starts + valid


def test_paged_launch_refuses_mismatched_pools():
    q, k, v = _qkv(1, 1, 1, 1)
    pool = torch.zeros(4, 1, 8, D)
    with pytest.raises(ValueError, match="paged caches must be two pools"):
        triton_retrieval_attention_cached(q, k, v, pool, pool[:2], *_rows(0, 1), SCALE,
                                          block_table=torch.zeros(1, 2, dtype=torch.int32))
