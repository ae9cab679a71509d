"""The rotary embedding as one kernel, for the attention paths that do not rotate inside their own kernels.

``fuse_rope`` hands every cached op its q/k before RoPE. Decode's split kernels rotate them as they load them;
prefill (and chunk-mode / one-program decode) kernels read every key tile many times, so those paths rotate q
and k once up front, here: one read and one write of each (what Inductor's fused RoPE kernel did before the
pass), instead of the five elementwise torch ops of ``reference.rope`` (~5x the memory traffic). q and k go in
one launch: a short prefill is bound by the host's launches, not by this pass over memory.

Grid ``(B * (Hq + Hk), cdiv(T, BLOCK_T))``: each program rotates ``BLOCK_T`` tokens of one head, of q or of k,
``load_rope`` doing the arithmetic (shared with the decode kernels).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import last_dim_contiguous, load_rope


@triton.jit
def rope_kernel(
    Q, K, COS, SIN, QO, KO, HQ, HK, T, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sc_b, sc_t,
    BLOCK_T: tl.constexpr, D: tl.constexpr,
):
    heads = HQ + HK
    bh = tl.program_id(0)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    ok = (t < T)[:, None]
    cs_off = b * sc_b + t[:, None] * sc_t
    if h < HQ:
        x = load_rope(Q, b * sq_b + h * sq_h + t[:, None] * sq_t, COS, SIN, cs_off, offs_d[None, :], ok, True, D)
        tl.store(QO + ((b * HQ + h) * T + t[:, None]) * D + offs_d[None, :], x, mask=ok)
    else:
        h -= HQ
        x = load_rope(K, b * sk_b + h * sk_h + t[:, None] * sk_t, COS, SIN, cs_off, offs_d[None, :], ok, True, D)
        tl.store(KO + ((b * HK + h) * T + t[:, None]) * D + offs_d[None, :], x, mask=ok)


def rope_strides(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables ``[B or 1, 1, T, D]`` broadcast to x's batch and tokens with one set of strides for both (made
    contiguous if they differ), as the kernels take them."""
    b, _, t, d = x.shape
    cos, sin = cos.expand(b, 1, t, d), sin.expand(b, 1, t, d)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def triton_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.rope`` of q ``[B, Hq, T, D]`` and k ``[B, Hk, T, D]`` (any strides but a unit last one) with
    cos/sin ``[B or 1, 1, T, D]``, in one launch; returns new contiguous tensors."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    cos, sin = rope_strides(q, cos, sin)
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    q_out = torch.empty((b, hq, t, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, hk, t, d), dtype=k.dtype, device=k.device)
    if q_out.numel() + k_out.numel() == 0:
        return q_out, k_out
    block_t = 16 if q.device.type != "cuda" else 32
    rope_kernel[(b * (hq + hk), math.ceil(t / block_t))](
        q, k, cos, sin, q_out, k_out, hq, hk, t, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), cos.stride(0), cos.stride(2),
        BLOCK_T=block_t, D=d, num_warps=4,
    )
    return q_out, k_out
