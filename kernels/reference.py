"""Plain PyTorch implementations of the duo attention ops: the oracle every kernel is checked against.

Shapes (all ops but ``attention_cached``, which takes a whole layer and splits it into the two groups):
  q        [B, Hq, T, D]   queries of one head group (retrieval or streaming), after RoPE
  k, v     [B, Hkv, T, D]  keys/values of the same group's KV heads, Hq = Hkv * groups (GQA)
  output   [B, Hq, T, D]
Query head h reads KV head h // groups.

Positions. The T new tokens sit at absolute positions ``cache_position`` (a 1-D int64 tensor
``start, start + 1, ..., start + T - 1``, shared by the batch), so ``start`` tokens are already cached.

Retrieval cache ``[B, Hkv, max_seq_len, D]``: the token at position p lives in slot p.

Streaming cache ``[B, Hkv, sink + recent, D]``: slots ``[0, sink)`` hold the sink tokens (positions
``0..sink-1``); slots ``[sink, sink + recent)`` are a ring holding the most recent tokens: position
``p >= sink`` lives in slot ``sink + (p - sink) % recent``. Keys are stored after RoPE at their true
positions, so nothing is ever re-rotated.

RoPE. The cached ops optionally take ``cos, sin`` ``[B, 1, T, D]`` (the rotary tables of this call's positions,
as Hugging Face's rotary embedding makes them, unsqueezed over heads); then q and k arrive *before* the rotary
embedding and the op applies it first, exactly as ``apply_rotary_pos_emb`` does (``fuse_rope`` emits this, so
the GPU kernels can rotate q and the new keys as they load them instead of a separate pass over both).

Streaming rule for a query at position p:
  window mode: keys at ``[0, sink) ∪ [p - recent + 1, p]``
  chunk mode:  keys at ``[0, sink) ∪ [start - recent, p]``: the cached window plus the whole current chunk
               up to p (the authors' chunked prefill). A one-token decode step sees sink + recent + itself.
"""
from __future__ import annotations

import torch


def streaming_visible(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, recent: int, chunk_start: int | None = None
) -> torch.Tensor:
    """Boolean ``[len(q_pos), len(k_pos)]``: may a streaming query at q_pos see a key at k_pos.

    ``chunk_start=None`` is window mode; otherwise chunk mode for a chunk starting at that position.
    Negative key positions mark empty cache slots and are never visible.
    """
    qp, kp = q_pos[:, None], k_pos[None, :]
    lower = qp - recent + 1 if chunk_start is None else torch.full_like(qp, chunk_start - recent)
    return (kp >= 0) & (kp <= qp) & ((kp < sink) | (kp >= lower))


def streaming_slot_positions(start: int, sink: int, recent: int, device=None) -> torch.Tensor:
    """Absolute position held by each streaming-cache slot once ``start`` tokens were written (-1: empty)."""
    slots = torch.arange(sink + recent, device=device)
    sink_pos = torch.where(slots < min(sink, start), slots, -1)
    j = slots - sink
    ring_pos = start - 1 - torch.remainder(start - 1 - sink - j, recent)
    ring_pos = torch.where(ring_pos >= sink, ring_pos, -1)
    return torch.where(slots < sink, sink_pos, ring_pos)


def streaming_write_plan(start: int, length: int, sink: int, recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which chunk tokens survive in the streaming cache, and their slots: (token indices, slot indices).

    Tokens in the sink are kept; of the others only the last ``recent`` survive (earlier ones would be
    overwritten in the ring anyway), so every slot is written at most once.
    """
    pos = torch.arange(start, start + length)
    keep = (pos < sink) | (pos >= max(start + length - recent, sink))
    pos = pos[keep]
    slot = torch.where(pos < sink, pos, sink + torch.remainder(pos - sink, recent))
    return keep.nonzero().flatten(), slot


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked attention in fp32 with GQA: q [B,Hq,T,D], k/v [B,Hkv,S,D], visible [T,S] -> [B,Hq,T,D] (q's dtype)."""
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1)
    v = v.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary embedding of ``x`` [B, H, T, D]: ``x * cos + rotate_half(x) * sin``, where
    ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``; the same ops in the same dtype, so results match it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_pair(cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An op's rotary tables as one value: ``(cos, sin)``, or None without them; one without the other is the
    caller's mistake (the reference ops and the Triton launchers check it here)."""
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together")
    return None if cos is None else (cos, sin)


def _rotated(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
    """(q, k) with the rotary embedding applied when the op was given its tables, else unchanged."""
    tables = rope_pair(cos, sin)
    if tables is None:
        return q, k
    return rope(q, *tables), rope(k, *tables)


def _start(cache_position: torch.Tensor) -> int:
    return int(cache_position[0].item())


def retrieval_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over the tokens of this call alone (positions 0..T-1, no cache)."""
    pos = torch.arange(q.shape[2], device=q.device)
    return _attend(q, k, v, pos[None, :] <= pos[:, None], scale)


def streaming_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sink: int, recent: int
) -> torch.Tensor:
    """Sink + recent-window attention (window mode) over the tokens of this call alone (no cache)."""
    pos = torch.arange(q.shape[2], device=q.device)
    return _attend(q, k, v, streaming_visible(pos, pos, sink, recent), scale)


def retrieval_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    scale: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append k/v at cache_position to the retrieval cache, then attend causally to every cached token."""
    q, k = _rotated(q, k, cos, sin)
    start, length = _start(cache_position), q.shape[2]
    k_cache[:, :, start : start + length] = k
    v_cache[:, :, start : start + length] = v
    k_pos = torch.arange(start + length, device=q.device)
    visible = k_pos[None, :] <= cache_position.to(q.device)[:, None]
    return _attend(q, k_cache[:, :, : start + length], v_cache[:, :, : start + length], visible, scale)


def streaming_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    scale: float,
    sink: int,
    recent: int,
    chunk_mode: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend to [sink | recent ring | this chunk] under the streaming rule, then write the chunk into the cache.

    Reading happens before writing: a chunk longer than the ring would otherwise overwrite keys its own
    first queries still need.
    """
    q, k = _rotated(q, k, cos, sin)
    start, length = _start(cache_position), q.shape[2]
    device = q.device
    slot_pos = streaming_slot_positions(start, sink, recent, device)
    chunk_pos = cache_position.to(device)
    keys = torch.cat([k_cache, k], dim=2)
    values = torch.cat([v_cache, v], dim=2)
    visible = streaming_visible(chunk_pos, torch.cat([slot_pos, chunk_pos]), sink, recent, start if chunk_mode else None)
    out = _attend(q, keys, values, visible, scale)
    token_idx, slot_idx = streaming_write_plan(start, length, sink, recent)
    k_cache[:, :, slot_idx.to(device)] = k[:, :, token_idx.to(device)]
    v_cache[:, :, slot_idx.to(device)] = v[:, :, token_idx.to(device)]
    return out


def head_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, retrieval_kv_heads: int):
    """``((q, k, v) of the retrieval group, (q, k, v) of the streaming group)`` of a whole layer whose KV heads
    ``[0, retrieval_kv_heads)`` are retrieval heads, each with its ``Hq / Hkv`` query heads (the layout
    ``reorder_heads`` makes). Views, no copies."""
    n = retrieval_kv_heads
    if not 0 < n < k.shape[1]:
        raise ValueError(f"retrieval_kv_heads={n} must leave both head groups non-empty "
                         f"(the layer has {k.shape[1]} KV heads)")
    split = n * (q.shape[1] // k.shape[1])
    return (q[:, :split], k[:, :n], v[:, :n]), (q[:, split:], k[:, n:], v[:, n:])


def attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_retrieval: torch.Tensor,
    v_retrieval: torch.Tensor,
    k_streaming: torch.Tensor,
    v_streaming: torch.Tensor,
    cache_position: torch.Tensor,
    scale: float,
    retrieval_kv_heads: int,
    sink: int,
    recent: int,
    chunk_mode: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Both head groups of one layer: KV heads ``[0, retrieval_kv_heads)`` (and their query heads) on the
    retrieval cache, the rest on the streaming cache; the two outputs side by side in head order."""
    q, k = _rotated(q, k, cos, sin)
    retrieval_qkv, streaming_qkv = head_groups(q, k, v, retrieval_kv_heads)
    retrieval = retrieval_attention_cached(*retrieval_qkv, k_retrieval, v_retrieval, cache_position, scale)
    streaming = streaming_attention_cached(*streaming_qkv, k_streaming, v_streaming, cache_position, scale, sink,
                                           recent, chunk_mode)
    return torch.cat([retrieval, streaming], dim=1)
