"""Decode-time linear layers: ``y = x @ W^T (+ b)`` for a few rows of x, bound by reading W once.

Why: a decode step reads every weight once, so where a GEMV reads slower than the device copy bandwidth the
difference is paid by full attention and DuoAttention alike and pulls the DuoAttention speedup below its bound.
This kernel is a candidate to win it back; the engine does not use it. ``benchmarks/kernels.py`` (section
``gemv``) times it against cuBLAS at the Llama weight shapes: see benchmarks/DECISIONS.md#triton-gemv.

Grid ``(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))``: each program owns BLOCK_N output features, streams its
``[BLOCK_N, K]`` slab of W in ``BLOCK_K`` steps (rows of W are contiguous along K, so each step is BLOCK_N
contiguous runs) and multiplies it with the matching slice of x on the tensor cores (``BLOCK_M`` >= 16 rows,
padding masked), accumulating in fp32. Small BLOCK_N puts many programs on the GPU (4096 outputs / 16 = 256),
so enough loads are in flight without splitting K.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import dot_precision, last_dim_contiguous
from .tuning import TileConfig


@triton.jit
def gemv_kernel(
    X, W, Bias, Y, M, N, K, sx_m, sw_n, sy_m,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_ptrs = X + rows.to(tl.int64)[:, None] * sx_m + offs_k[None, :]
    w_ptrs = W + cols.to(tl.int64)[:, None] * sw_n + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rows.to(tl.int64)[:, None] * sy_m + cols[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def gemv_config(x, n: int) -> TileConfig:
    """Tiles for ``triton_linear``: ``block_t`` is BLOCK_M (rows of x), ``block_n`` BLOCK_N (outputs per program),
    ``heads_per`` unused. Not tuned, as nothing uses the kernel (benchmarks/kernels.py, section gemv, sweeps the
    variants); the interpreter gets 16-wide tiles so the CPU tests cover several K steps and output blocks."""
    if x.device.type != "cuda":
        return TileConfig(block_t=16, block_n=16)
    return TileConfig(block_t=16, block_n=16, num_warps=4, num_stages=4)


def triton_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: TileConfig | None = None, block_k: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on ``gemv_kernel``: x ``[..., K]``, weight ``[N, K]`` (row-major, as
    ``nn.Linear`` stores it), bias ``[N]`` or None; any number of rows, made for the few rows of a decode step."""
    if x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"linear of x {tuple(x.shape)} with weight {tuple(weight.shape)}"
                         f"{'' if bias is None else f' and bias {tuple(bias.shape)}'}: shapes do not match")
    n, k = weight.shape
    x2 = last_dim_contiguous(x.reshape(-1, k))
    weight = last_dim_contiguous(weight)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y.reshape(*x.shape[:-1], n)
    cfg = config or gemv_config(x, n)
    block_k = block_k or (16 if x.device.type != "cuda" else 256)
    grid = (math.ceil(n / cfg.block_n), math.ceil(m / cfg.block_t))
    gemv_kernel[grid](
        x2, weight, bias if bias is not None else weight, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.reshape(*x.shape[:-1], n)
