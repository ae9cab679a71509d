"""The rotary embedding as one kernel, for the attention paths that do not rotate inside their own kernels.

``fuse_rope`` hands every cached op its q/k before RoPE. Decode's split kernels rotate them as they load them;
prefill (and chunk-mode / one-program decode) kernels read every key tile many times, so those paths rotate q
and k once up front, here: one read and one write of each (what Inductor's fused RoPE kernel did before the
pass), instead of the five elementwise torch ops of ``reference.rope`` (~5x the memory traffic).

Grid ``(B * H, cdiv(T, BLOCK_T))``: each program rotates ``BLOCK_T`` tokens of one head, ``load_rope`` doing the
arithmetic (shared with the decode kernels).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import last_dim_contiguous, load_rope


@triton.jit
def rope_kernel(
    X, COS, SIN, Y, H, T, sx_b, sx_h, sx_t, sc_b, sc_t,
    BLOCK_T: tl.constexpr, D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    ok = (t < T)[:, None]
    x = load_rope(X, b * sx_b + h * sx_h + t[:, None] * sx_t, COS, SIN, b * sc_b + t[:, None] * sc_t,
                  offs_d[None, :], ok, True, D)
    tl.store(Y + ((b * H + h) * T + t[:, None]) * D + offs_d[None, :], x, mask=ok)


def rope_strides(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables ``[B or 1, 1, T, D]`` broadcast to x's batch and tokens with one set of strides for both (made
    contiguous if they differ), as the kernels take them."""
    b, _, t, d = x.shape
    cos, sin = cos.expand(b, 1, t, d), sin.expand(b, 1, t, d)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def triton_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``reference.rope(x, cos, sin)`` for x ``[B, H, T, D]`` (any strides but a unit last one) and cos/sin
    ``[B or 1, 1, T, D]``; returns a new contiguous tensor."""
    b, h, t, d = x.shape
    cos, sin = rope_strides(x, cos, sin)
    x = last_dim_contiguous(x)
    y = torch.empty((b, h, t, d), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_t = 16 if x.device.type != "cuda" else 32
    rope_kernel[(b * h, math.ceil(t / block_t))](
        x, cos, sin, y, h, t, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(2),
        BLOCK_T=block_t, D=d, num_warps=4,
    )
    return y
