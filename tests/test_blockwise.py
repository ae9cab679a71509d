"""The blockwise CPU kernels (kernels/blockwise.py) against the dense oracle (kernels/reference.py).

Every op the CPU runs, chunk by chunk after a cache prefix and then one-token decode steps, both streaming modes,
with and without the RoPE tables, GQA groups 1-3, sink 0.., recent shorter and longer than the sequence, and
block sizes that do and do not divide the call's length: outputs within 1e-5 of the reference (fp32), and the
caches bitwise equal to the reference's after every call (caches start as random garbage, so a slot written
wrongly or read when it should not be shows), on PyTorch's CPU flash kernel and on the matrix-product fallback.
Also: the ops dispatch to these kernels on CPU, and each query block scores only the keys it may see (streaming
blocks: sink + window, never the whole sequence; retrieval blocks: keys up to the block, in bounded parts).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from duo_compile.kernels import blockwise, reference
from duo_compile.kernels.ops import OPS
from tests.reliability import examples
from tests.tiny_models import rope_tables


TOL = dict(rtol=1e-5, atol=1e-5)


@st.composite
def cases(draw):
    kv_heads = draw(st.integers(1, 3))
    prompt = draw(st.integers(1, 48))
    return dict(
        batch=draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        groups=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([2, 4, 8, 16])),
        sink=draw(st.integers(0, 6)),
        recent=draw(st.one_of(st.integers(1, 8), st.integers(9, 80))),  # small (ring wraps) and large
        prompt=prompt,
        prefix=draw(st.integers(0, 40)),  # tokens already cached before the chunked prefill
        chunk=draw(st.integers(1, 50)),
        decode=draw(st.integers(0, 6)),
        block=draw(st.sampled_from([None, 1, 2, 3, 5, 8, 16])),  # None: the op's own choice
        mode=draw(st.sampled_from(["window", "chunk"])),
        rope=draw(st.booleans()),
        merged=draw(st.booleans()),  # attention_cached (needs >= 2 KV heads) instead of the two per-group ops
        use_op=draw(st.booleans()),  # through the registered duo:: op (CPU kernel, default block)
        flash=draw(st.booleans()),  # attention parts on the CPU flash kernel, or the matrix-product fallback
        scale=draw(st.floats(0.1, 1.0)),
        seed=draw(st.integers(0, 2**16)),
    )


def _calls(c) -> list[tuple[int, int]]:
    """The prefix as one call, then the prompt in chunks, then one-token decode steps."""
    calls = [(0, c["prefix"])] if c["prefix"] else []
    end = c["prefix"] + c["prompt"]
    calls += [(b, min(b + c["chunk"], end)) for b in range(c["prefix"], end, c["chunk"])]
    return calls + [(p, p + 1) for p in range(end, end + c["decode"])]


def _rows(batch: int, begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache_start`` and ``valid`` of a call whose rows all hold positions ``begin .. end - 1``, no padding."""
    return torch.full((batch,), begin), torch.full((batch,), end - begin)


def _blockwise_fn(name: str, c):
    if c["use_op"]:
        return OPS[name]
    fn = getattr(blockwise, name)
    return lambda *args, **kwargs: fn(*args, **kwargs, block=c["block"])


@contextlib.contextmanager
def _flash(on: bool):
    """Attention parts on the CPU flash kernel (where this PyTorch has it) or on the matrix-product fallback."""
    old = blockwise.FLASH
    blockwise.FLASH = on and blockwise._FLASH_OP is not None
    try:
        yield
    finally:
        blockwise.FLASH = old


@examples(ci=400, long=4000)
@given(cases())
def test_cached_ops_equal_reference_call_by_call(c):
    with _flash(c["flash"]):
        _check_cached_ops(c)


def _check_cached_ops(c):
    gen = torch.Generator().manual_seed(c["seed"])
    calls = _calls(c)
    length = calls[-1][1]
    b, hkv, g, d = c["batch"], c["kv_heads"], c["groups"], c["head_dim"]
    q = 2 * torch.randn(b, hkv * g, length, d, generator=gen)
    k, v = torch.randn(2, b, hkv, length, d, generator=gen)
    tables = rope_tables(torch.arange(length)[None], d) if c["rope"] else None
    sink, recent, chunk_mode = c["sink"], c["recent"], c["mode"] == "chunk"
    merged = c["merged"] and hkv >= 2
    n = 1 + c["seed"] % (hkv - 1) if merged else hkv  # retrieval KV heads of the merged layer
    caches = [
        100 * torch.randn(b, n, length + 3, d, generator=gen),  # retrieval K, V (3 slots never written)
        100 * torch.randn(b, n, length + 3, d, generator=gen),
        100 * torch.randn(b, hkv - n if merged else hkv, sink + recent, d, generator=gen),  # streaming K, V
        100 * torch.randn(b, hkv - n if merged else hkv, sink + recent, d, generator=gen),
    ]
    ours = [x.clone() for x in caches]
    for begin, end in calls:
        args = (q[:, :, begin:end], k[:, :, begin:end], v[:, :, begin:end])
        pos = _rows(b, begin, end)
        rope_kw = dict(cos=tables[0][:, :, begin:end], sin=tables[1][:, :, begin:end]) if c["rope"] else {}
        if merged:
            tail = (*pos, c["scale"], n, sink, recent, chunk_mode)
            want = reference.attention_cached(*args, *caches, *tail, **rope_kw)
            got = _blockwise_fn("attention_cached", c)(*args, *ours, *tail, **rope_kw)
        else:
            want = torch.cat([
                reference.retrieval_attention_cached(*args, *caches[:2], *pos, c["scale"], **rope_kw),
                reference.streaming_attention_cached(*args, *caches[2:], *pos, c["scale"], sink, recent, chunk_mode,
                                                     **rope_kw),
            ], dim=1)
            got = torch.cat([
                _blockwise_fn("retrieval_attention_cached", c)(*args, *ours[:2], *pos, c["scale"], **rope_kw),
                _blockwise_fn("streaming_attention_cached", c)(*args, *ours[2:], *pos, c["scale"], sink, recent,
                                                              chunk_mode, **rope_kw),
            ], dim=1)
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, b=begin, e=end: f"call {b}..{e}: {m}")
        for i, (mine, theirs) in enumerate(zip(ours, caches)):
            assert torch.equal(mine, theirs), f"cache {i} differs after call {begin}..{end}"


@examples(ci=150, long=1500)
@given(cases())
def test_cacheless_ops_equal_reference(c):
    with _flash(c["flash"]):
        _check_cacheless_ops(c)


def _check_cacheless_ops(c):
    gen = torch.Generator().manual_seed(c["seed"])
    length = c["prompt"] + c["prefix"]
    q = 2 * torch.randn(c["batch"], c["kv_heads"] * c["groups"], length, c["head_dim"], generator=gen)
    k, v = torch.randn(2, c["batch"], c["kv_heads"], length, c["head_dim"], generator=gen)
    got_r = _blockwise_fn("retrieval_attention", c)(q, k, v, c["scale"])
    got_s = _blockwise_fn("streaming_attention", c)(q, k, v, c["scale"], c["sink"], c["recent"])
    torch.testing.assert_close(got_r, reference.retrieval_attention(q, k, v, c["scale"]), **TOL)
    torch.testing.assert_close(got_s, reference.streaming_attention(q, k, v, c["scale"], c["sink"], c["recent"]),
                               **TOL)


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("mode", ["window", "chunk"])
def test_default_blocks_at_a_longer_context(mode, flash, monkeypatch):
    """The ops' own block sizes (several batched interior streaming blocks, a partial last block) on 700 tokens:
    a prefill, a chunk after it, decode steps past the ring's wrap; the mixed layer op against the reference."""
    monkeypatch.setattr(blockwise, "FLASH", flash and blockwise._FLASH_OP is not None)
    sink, recent, n = 8, 100, 1
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 700, 16, generator=gen)
    k, v = torch.randn(2, 1, 3, 700, 16, generator=gen)
    caches = [torch.randn(1, n, 700, 16, generator=gen) for _ in range(2)]
    caches += [torch.randn(1, 3 - n, sink + recent, 16, generator=gen) for _ in range(2)]
    ours = [x.clone() for x in caches]
    for begin, end in [(0, 450), (450, 695)] + [(p, p + 1) for p in range(695, 700)]:
        args = (q[:, :, begin:end], k[:, :, begin:end], v[:, :, begin:end])
        tail = (*_rows(1, begin, end), 0.25, n, sink, recent, mode == "chunk")
        want = reference.attention_cached(*args, *caches, *tail)
        got = OPS["attention_cached"](*args, *ours, *tail)
        torch.testing.assert_close(got, want, **TOL)
        assert all(torch.equal(a, b) for a, b in zip(ours, caches))


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_fp32_like_the_reference(dtype, flash, monkeypatch):
    """Low-precision inputs: scores in fp32 as in the reference, the output in the input dtype."""
    monkeypatch.setattr(blockwise, "FLASH", flash and blockwise._FLASH_OP is not None)
    q = torch.randn(1, 4, 37, 16).to(dtype)
    k, v = torch.randn(2, 1, 2, 37, 16).to(dtype)
    kc, vc = torch.zeros(2, 1, 2, 64, 16, dtype=dtype)
    ks, vs = torch.zeros(2, 1, 2, 2 + 5, 16, dtype=dtype)
    for begin, end in ((0, 20), (20, 36), (36, 37)):
        pos, args = _rows(1, begin, end), (q[:, :, begin:end], k[:, :, begin:end], v[:, :, begin:end])
        kc_ref, vc_ref, ks_ref, vs_ref = kc.clone(), vc.clone(), ks.clone(), vs.clone()
        want_r = reference.retrieval_attention_cached(*args, kc_ref, vc_ref, *pos, 0.25)
        want_s = reference.streaming_attention_cached(*args, ks_ref, vs_ref, *pos, 0.25, 2, 5, False)
        got_r = OPS["retrieval_attention_cached"](*args, kc, vc, *pos, 0.25)
        got_s = OPS["streaming_attention_cached"](*args, ks, vs, *pos, 0.25, 2, 5, False)
        assert got_r.dtype == got_s.dtype == dtype
        torch.testing.assert_close(got_r, want_r)
        torch.testing.assert_close(got_s, want_s)
        assert all(torch.equal(a, b) for a, b in ((kc, kc_ref), (vc, vc_ref), (ks, ks_ref), (vs, vs_ref)))


def test_ops_dispatch_to_the_blockwise_kernels_on_cpu(monkeypatch):
    """On CPU the registered ``duo::`` ops run blockwise.py, not the dense reference."""
    seen = _record_parts(monkeypatch)
    monkeypatch.setattr(reference, "_attend", lambda *a, **kw: pytest.fail("the dense reference ran on CPU"))
    q = torch.randn(1, 4, 9, 8)
    k, v = torch.randn(2, 1, 2, 9, 8)
    kc, vc = torch.zeros(2, 1, 2, 16, 8)
    ks, vs = torch.zeros(2, 1, 2, 5, 8)
    kr, vr, ks1, vs1 = kc[:, :1].clone(), vc[:, :1].clone(), ks[:, 1:].clone(), vs[:, 1:].clone()
    pos = _rows(1, 0, 9)
    OPS["retrieval_attention"](q, k, v, 0.3)
    OPS["streaming_attention"](q, k, v, 0.3, 1, 2)
    OPS["retrieval_attention_cached"](q, k, v, kc, vc, *pos, 0.3)
    OPS["streaming_attention_cached"](q, k, v, ks, vs, *pos, 0.3, 1, 4, True)
    OPS["attention_cached"](q, k, v, kr, vr, ks1, vs1, *pos, 0.3, 1, 1, 4, False)
    assert len(seen) >= 6


def _record_parts(monkeypatch) -> list[tuple[int, int]]:
    """(query rows, keys per row) of every attention part the kernels compute from now on (batch 1)."""
    parts = []
    real = blockwise._part

    def spy(q, keys, *args, **kwargs):  # batched blocks (the batch dimension) count as rows
        parts.append((q.shape[0] * q.shape[2], keys.shape[2]))
        return real(q, keys, *args, **kwargs)

    monkeypatch.setattr(blockwise, "_part", spy)
    return parts


@pytest.mark.parametrize("flash", [True, False])
def test_streaming_heads_score_only_sink_and_window(flash, monkeypatch):
    """Window mode: a query block scores at most sink + recent + STREAMING_BLOCK keys (plus the cached ring while
    its window reaches into the cache) however long the sequence; a decode step scores the sink + recent slots and
    itself at most."""
    monkeypatch.setattr(blockwise, "FLASH", flash and blockwise._FLASH_OP is not None)
    sink, recent, length, prefix = 4, 32, 1024, 100
    q = torch.randn(1, 4, length, 8)
    k, v = torch.randn(2, 1, 2, length, 8)
    ks, vs = torch.zeros(2, 1, 2, sink + recent, 8)
    parts = _record_parts(monkeypatch)
    blockwise.streaming_attention_cached(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], ks, vs,
                                         *_rows(1, 0, prefix), 1.0, sink, recent, False)
    blockwise.streaming_attention_cached(q[:, :, prefix:-1], k[:, :, prefix:-1], v[:, :, prefix:-1], ks, vs,
                                         *_rows(1, prefix, length - 1), 1.0, sink, recent, False)
    block = blockwise.STREAMING_BLOCK
    assert len(parts) > 2 and all(keys <= 2 * (sink + recent) + block for _, keys in parts), parts
    # (query, key) pairs scored: linear in the length, far from the (length^2 / 2) of causal attention
    assert sum(rows * keys for rows, keys in parts) <= (length - 1) * (2 * (sink + recent) + block)
    parts.clear()
    blockwise.streaming_attention_cached(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], ks, vs, *_rows(1, length - 1, length),
                                         1.0, sink, recent, False)
    assert parts and all(rows == 1 and keys <= sink + recent + 1 for rows, keys in parts), parts


@pytest.mark.parametrize("flash", [True, False])
def test_retrieval_parts_bound_the_score_memory(flash, monkeypatch):
    """Retrieval queries at positions [P0, P1) score keys 0..P1-1 only, as (keys before the block) + (the block's
    own causal tile). The fallback's blocks keep one part's fp32 scores within SCORE_BUDGET elements; the flash
    kernel takes the whole call as one block (it tiles queries and keys itself). No [T, T] score tensor."""
    monkeypatch.setattr(blockwise, "FLASH", flash and blockwise._FLASH_OP is not None)
    length, heads = 4096, 8
    q = torch.randn(1, heads, length, 4)
    k, v = torch.randn(2, 1, 2, length, 4)
    parts = _record_parts(monkeypatch)
    blockwise.retrieval_attention(q, k, v, 0.5)
    # Per block: its causal tile, then (after the first block) the keys before it.
    tiles, before = [parts[0]] + parts[1::2], [0] + [keys for _, keys in parts[2::2]]
    assert len(tiles) == len(before)
    assert sum(rows for rows, _ in tiles) == length and all(rows == keys for rows, keys in tiles)
    assert before == [sum(rows for rows, _ in tiles[:i]) for i in range(len(tiles))]
    if not blockwise.FLASH:
        assert len(tiles) > 1
        assert max(heads * rows * (rows + b) for (rows, _), b in zip(tiles, before)) <= blockwise.SCORE_BUDGET
