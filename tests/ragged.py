"""Per-row positions for the cached duo ops: a batch whose rows sit at different positions (``cache_start``) and
have different numbers of real tokens (``valid``; the rest of the row is padding) must give, for every row, what
that row gives alone: the same outputs for its real tokens and the same cache contents (padding never written).

``check_rows_alone`` runs one batched call of an op implementation (the registered op, the reference, or a Triton
launcher) after giving each row a history of its own length, then each row alone through ``kernels/reference.py``
from the same caches, and compares. The reference alone is checked against an independent dense rule in
tests/test_properties.py, so this closes the loop for batches.
"""
from __future__ import annotations

import torch

from duo_compile.kernels import reference
from tests.tiny_models import rope_tables

KINDS = ("retrieval", "streaming", "mixed")


def _extra(kind: str, n_retrieval: int, sink: int, recent: int, chunk_mode: bool) -> tuple:
    """The op's arguments after ``scale``."""
    return {"retrieval": (), "streaming": (sink, recent, chunk_mode),
            "mixed": (n_retrieval, sink, recent, chunk_mode)}[kind]


REFERENCE = {"retrieval": reference.retrieval_attention_cached, "streaming": reference.streaming_attention_cached,
             "mixed": reference.attention_cached}


def _caches(kind, batch, hkv, n_retrieval, capacity, ring, d, dtype, gen):
    if kind == "retrieval":
        shapes = [(hkv, capacity)] * 2
    elif kind == "streaming":
        shapes = [(hkv, ring)] * 2
    else:
        shapes = [(n_retrieval, capacity)] * 2 + [(hkv - n_retrieval, ring)] * 2
    return [torch.randn(batch, h, s, d, generator=gen).to(dtype) for h, s in shapes]


def _rows(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)  # on the host: the ops and launchers move them


def check_rows_alone(run, kind: str, starts, valid, length: int, *, hkv=2, groups=2, n_retrieval=1, sink=3,
                     recent=10, chunk_mode=False, d=16, dtype=torch.float32, rope=False, tol=2e-5, seed=0,
                     capacity=None, device="cpu"):
    """``run(q, k, v, *caches, cache_start, valid, scale, *extra, cos=, sin=)``: one batched call whose row b sits
    at ``starts[b]`` with ``valid[b]`` real tokens of ``length``, against every row alone through the reference.
    ``device``: where the tensors live (the CPU tests: the interpreter; benchmarks/gpu_check.py: CUDA)."""
    gen = torch.Generator().manual_seed(seed)
    batch, scale = len(starts), d**-0.5
    capacity = capacity or max(s + n for s, n in zip(starts, valid)) + 5
    extra = _extra(kind, n_retrieval, sink, recent, chunk_mode)
    ref = REFERENCE[kind]
    caches = [c.to(device) for c in _caches(kind, batch, hkv, n_retrieval, capacity, sink + recent, d, dtype, gen)]

    def qkv(rows, t):
        q = torch.randn(rows, t, hkv * groups, d, generator=gen).transpose(1, 2)  # non-contiguous
        k, v = (torch.randn(rows, hkv, t, d, generator=gen) for _ in range(2))
        return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))

    def tables(positions):  # [rows, T] -> cos, sin [rows, 1, T, D] (or none)
        return tuple(t.to(device=device, dtype=dtype) for t in rope_tables(positions, d)) if rope else (None, None)

    # Each row's history: its first starts[b] tokens, written alone (one call from position 0) by the reference.
    for b, s in enumerate(starts):
        if s:
            cos, sin = tables(torch.arange(s)[None])
            ref(*qkv(1, s), *[c[b : b + 1] for c in caches], _rows([0]), _rows([s]), scale, *extra, cos, sin)
    batched = [c.clone() for c in caches]
    alone = [c.clone() for c in caches]
    q, k, v = qkv(batch, length)
    cos, sin = tables(_rows(starts)[:, None] + torch.arange(length))
    out = run(q, k, v, *batched, _rows(starts), _rows(valid), scale, *extra, cos=cos, sin=sin)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "padding outputs are don't-care but must stay finite"
    for b, (s, n) in enumerate(zip(starts, valid)):
        if n == 0:
            continue
        rows = slice(b, b + 1)
        want = ref(q[rows, :, :n], k[rows, :, :n], v[rows, :, :n], *[c[rows] for c in alone], _rows([s]), _rows([n]),
                   scale, *extra, *(None if t is None else t[rows, :, :n] for t in (cos, sin)))
        err = (out[rows, :, :n].float() - want.float()).abs().max().item()
        assert err < tol, f"row {b} (start {s}, {n} real of {length}): error {err:.2e}"
    for i, (got, want) in enumerate(zip(batched, alone)):
        if rope:  # the kernels rotate in fp32 and round once, the reference in the input dtype: the last bit
            close = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else {}  # else the dtype's own tolerance
            torch.testing.assert_close(got, want, **close, msg=lambda m: f"cache {i}: {m}")
        else:
            assert torch.equal(got, want), f"cache {i} differs from the rows' caches alone (padding written?)"
    return out
