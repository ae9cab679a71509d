"""The Triton launchers (launchers.py) registered as the CUDA kernels of the ``duo::`` ops.

``register()`` installs them with ``torch.library.register_kernel(..., "cuda")`` on the existing ``custom_op``
definitions of ops.py: ``triton_op`` cannot be traced on CPU, the custom ops can everywhere, and on CUDA they run
these kernels. A head dim the kernels do not tile (``supported_head_dim``) runs the reference instead. A paged
retrieval cache (a ``block_table``) runs these kernels on each row's pages gathered into a contiguous copy, then
writes the appended positions back to their pages (paged.py): the kernels do not read the block table yet.
"""
from __future__ import annotations

import torch

from . import paged, reference
from .launchers import (
    triton_attention_cached,
    triton_retrieval_attention,
    triton_retrieval_attention_cached,
    triton_streaming_attention,
    triton_streaming_attention_cached,
)
from .triton_common import supported_head_dim


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


def _retrieval_attention_cached_cuda(q, k, v, k_cache, v_cache, cache_start, valid, scale, cos=None, sin=None):
    if not _kernel_ok(q):
        return reference.retrieval_attention_cached(q, k, v, k_cache, v_cache, cache_start, valid, scale, cos,
                                                    sin).contiguous()
    return triton_retrieval_attention_cached(q, k, v, k_cache, v_cache, cache_start, valid, scale, cos=cos, sin=sin)


def _streaming_attention_cached_cuda(q, k, v, k_cache, v_cache, cache_start, valid, scale, sink, recent,
                                     chunk_mode, cos=None, sin=None):
    if not _kernel_ok(q):
        return reference.streaming_attention_cached(
            q, k, v, k_cache, v_cache, cache_start, valid, scale, sink, recent, chunk_mode, cos, sin
        ).contiguous()
    return triton_streaming_attention_cached(
        q, k, v, k_cache, v_cache, cache_start, valid, scale, sink, recent, chunk_mode, cos=cos, sin=sin
    )


def _attention_cached_cuda(q, k, v, k_r, v_r, k_s, v_s, cache_start, valid, scale, n, sink, recent, chunk_mode,
                           cos=None, sin=None):
    if not _kernel_ok(q):
        return reference.attention_cached(
            q, k, v, k_r, v_r, k_s, v_s, cache_start, valid, scale, n, sink, recent, chunk_mode, cos, sin
        ).contiguous()
    return triton_attention_cached(
        q, k, v, k_r, v_r, k_s, v_s, cache_start, valid, scale, n, sink, recent, chunk_mode, cos=cos, sin=sin,
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
    for name, fn in paged.with_pages(CUDA_KERNELS).items():
        torch.library.register_kernel(f"duo::{name}", "cuda")(fn)
    _registered = True
