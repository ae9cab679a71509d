"""The ``duo::`` custom ops: what the split-attention, KV-layout and merge-head-groups passes emit.

Each op is a ``torch.library.custom_op`` (opaque to tracing, so torch.export, torch.compile and AOTInductor
keep it as one node) with
  * the plain PyTorch implementation from ``reference.py`` as the default for every device (the oracle: dense
    masked attention; it serves CUDA where Triton is not usable),
  * on CPU, the blockwise implementation from ``blockwise.py`` (the same results in O(T x block) memory; streaming
    heads score only their sink and window keys), registered below as the ops' CPU kernels,
  * a fake implementation for tracing and export,
  * on CUDA, the Triton kernels registered by ``kernels.triton_ops`` when Triton is usable there.

The cached ops mutate their cache arguments in place (``mutates_args``) and return a fresh output. They take
the positions per batch row: ``cache_start`` int64 ``[B]`` (the position of this call's first token in each row)
and ``valid`` int64 ``[B]`` (how many of the row's T tokens are real; the rest are padding, never written to a
cache, their outputs don't-care). See reference.py. The retrieval cached ops also take an optional
``block_table``: their retrieval caches are then page pools read and written through it (paged.py).
"""
from __future__ import annotations

import torch

from . import blockwise, paged, reference

_LIB = "duo"  # the torch.library namespace: torch.ops.duo.*


def _fake_like_q(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape).contiguous()


@torch.library.custom_op(f"{_LIB}::retrieval_attention", mutates_args=())
def retrieval_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over this call's tokens (no cache): retrieval heads of a whole-sequence graph."""
    return reference.retrieval_attention(q, k, v, scale).contiguous()


@torch.library.custom_op(f"{_LIB}::streaming_attention", mutates_args=())
def streaming_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sink: int, recent: int
) -> torch.Tensor:
    """Sink + recent-window attention over this call's tokens (no cache): streaming heads of a whole-sequence graph."""
    return reference.streaming_attention(q, k, v, scale, sink, recent).contiguous()


@torch.library.custom_op(f"{_LIB}::retrieval_attention_cached", mutates_args=("k_cache", "v_cache"))
def retrieval_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_start: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append each row's real tokens to the full retrieval cache, then attend causally to all of that row's cached
    tokens (``cos``/``sin``: q and k are pre-RoPE, rotate them first; reference.py). ``block_table``: the caches
    are page pools, row b's pages listed in ``block_table[b]`` (paged.py)."""
    return paged.REFERENCE["retrieval_attention_cached"](q, k, v, k_cache, v_cache, cache_start, valid, scale, cos,
                                                         sin, block_table).contiguous()


@torch.library.custom_op(f"{_LIB}::streaming_attention_cached", mutates_args=("k_cache", "v_cache"))
def streaming_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_start: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    sink: int,
    recent: int,
    chunk_mode: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend to sink + recent ring + this chunk, then write the chunk into the constant-size streaming cache."""
    return reference.streaming_attention_cached(
        q, k, v, k_cache, v_cache, cache_start, valid, scale, sink, recent, chunk_mode, cos, sin
    ).contiguous()


@torch.library.custom_op(
    f"{_LIB}::attention_cached", mutates_args=("k_retrieval", "v_retrieval", "k_streaming", "v_streaming")
)
def attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_retrieval: torch.Tensor,
    v_retrieval: torch.Tensor,
    k_streaming: torch.Tensor,
    v_streaming: torch.Tensor,
    cache_start: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    retrieval_kv_heads: int,
    sink: int,
    recent: int,
    chunk_mode: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """A whole layer with both head groups (``merge_head_groups``): the two cached ops above on the head slices,
    one output, so the graph needs neither the slices nor the concatenation. ``block_table``: the retrieval
    caches are page pools (paged.py); the streaming caches stay one row per batch row."""
    return paged.REFERENCE["attention_cached"](
        q, k, v, k_retrieval, v_retrieval, k_streaming, v_streaming, cache_start, valid, scale, retrieval_kv_heads,
        sink, recent, chunk_mode, cos, sin, block_table,
    ).contiguous()


for _op in (retrieval_attention, streaming_attention, retrieval_attention_cached, streaming_attention_cached,
            attention_cached):
    _op.register_fake(lambda q, *args, **kwargs: _fake_like_q(q))


OPS = {
    "retrieval_attention": torch.ops.duo.retrieval_attention.default,
    "streaming_attention": torch.ops.duo.streaming_attention.default,
    "retrieval_attention_cached": torch.ops.duo.retrieval_attention_cached.default,
    "streaming_attention_cached": torch.ops.duo.streaming_attention_cached.default,
    "attention_cached": torch.ops.duo.attention_cached.default,
}


# The blockwise implementations as the CPU kernels (kernels/blockwise.py); reference.py stays the default and the
# oracle the tests compare them with.
for _name, _fn in paged.with_pages(blockwise.CPU_KERNELS).items():
    torch.library.register_kernel(f"{_LIB}::{_name}", "cpu")(_fn)


# Triton kernels for CUDA (kernels/triton_ops.py). Without Triton the reference above serves CUDA too.
try:
    from . import triton_ops as _triton_ops
except ImportError:
    _triton_ops = None
else:
    _triton_ops.register()
