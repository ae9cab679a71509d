"""The Triton launchers (launchers.py) registered as the CUDA kernels of the ``duo::`` ops.

``register()`` installs them with ``torch.library.register_kernel(..., "cuda")`` on the existing ``custom_op``
definitions of ops.py: ``triton_op`` cannot be traced on CPU, the custom ops can everywhere, and on CUDA they run
these kernels. A head dim the kernels do not tile (``supported_head_dim``) runs the reference instead (for paged
retrieval caches, on each row's pages gathered into a contiguous copy: paged.py); the kernels themselves read and
write paged caches through the block table.
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


def _retrieval_attention_cached_cuda(q, k, v, k_cache, v_cache, cache_start, valid, scale, cos=None, sin=None,
                                     block_table=None):
    if not _kernel_ok(q):
        return paged.REFERENCE["retrieval_attention_cached"](q, k, v, k_cache, v_cache, cache_start, valid, scale,
                                                             cos, sin, block_table).contiguous()
    return triton_retrieval_attention_cached(q, k, v, k_cache, v_cache, cache_start, valid, scale, cos=cos, sin=sin,
                                             block_table=block_table)


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
                           cos=None, sin=None, block_table=None):
    if not _kernel_ok(q):
        return paged.REFERENCE["attention_cached"](
            q, k, v, k_r, v_r, k_s, v_s, cache_start, valid, scale, n, sink, recent, chunk_mode, cos, sin, block_table
        ).contiguous()
    return triton_attention_cached(
        q, k, v, k_r, v_r, k_s, v_s, cache_start, valid, scale, n, sink, recent, chunk_mode, cos=cos, sin=sin,
        block_table=block_table,
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
