"""Plain PyTorch implementations of the duo attention ops: the oracle every kernel is checked against.

Shapes (all ops but ``attention_cached``, which takes a whole layer and splits it into the two groups):
  q        [B, Hq, T, D]   queries of one head group (retrieval or streaming), after RoPE
  k, v     [B, Hkv, T, D]  keys/values of the same group's KV heads, Hq = Hkv * groups (GQA)
  output   [B, Hq, T, D]
Query head h reads KV head h // groups.

Positions, per batch row. ``cache_start`` and ``valid`` are int64 ``[B]``: token t of row b sits at absolute
position ``cache_start[b] + t``, so that row has ``cache_start[b]`` tokens cached already; only its first
``valid[b]`` tokens are real (``0 <= valid[b] <= T``), the rest are padding. Padding tokens are never written to a
cache, and their outputs are don't-care (finite: a padding query sees at least itself). Rows may differ in both:
a padded batch (equal starts, different ``valid``) or a continuous batch (different starts). Padding sits at the
end of a row's chunk, after every real token, so causal attention never shows a padding key to a real query.

Retrieval cache ``[B, Hkv, max_seq_len, D]``: the token at position p lives in slot p.

Streaming cache ``[B, Hkv, sink + recent, D]``: slots ``[0, sink)`` hold the sink tokens (positions
``0..sink-1``); slots ``[sink, sink + recent)`` are a ring holding the most recent tokens: position
``p >= sink`` lives in slot ``sink + (p - sink) % recent``. Keys are stored after RoPE at their true
positions, so nothing is ever re-rotated.

RoPE. The cached ops optionally take ``cos, sin`` ``[B, 1, T, D]`` (the rotary tables of this call's positions,
as Hugging Face's rotary embedding makes them, unsqueezed over heads); then q and k arrive *before* the rotary
embedding and the op applies it first, exactly as ``apply_rotary_pos_emb`` does (``fuse_rope`` emits this, so
the GPU kernels can rotate q and the new keys as they load them instead of a separate pass over both).

Streaming rule for a query at position p (of row b; every key is of the same row):
  window mode: keys at ``[0, sink) ∪ [p - recent + 1, p]``
  chunk mode:  keys at ``[0, sink) ∪ [start - recent, p]``: the cached window plus the whole current chunk
               up to p (the authors' chunked prefill; ``start`` is the row's ``cache_start``). A one-token decode
               step sees sink + recent + itself.
"""
from __future__ import annotations

import torch


def streaming_visible(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, recent: int, chunk_start=None
) -> torch.Tensor:
    """Boolean ``[..., len(q_pos), len(k_pos)]``: may a streaming query at q_pos see a key at k_pos.

    ``q_pos`` ``[T]`` or ``[B, T]``, ``k_pos`` ``[S]`` or ``[B, S]`` (per-row positions broadcast over the batch).
    ``chunk_start=None`` is window mode; otherwise chunk mode for a chunk starting at that position (an int, or a
    ``[B]`` tensor: one per row). Negative key positions mark empty cache slots and are never visible.
    """
    qp, kp = q_pos[..., :, None], k_pos[..., None, :]
    if chunk_start is None:
        lower = qp - recent + 1
    elif isinstance(chunk_start, torch.Tensor) and chunk_start.dim() > 0:
        lower = (chunk_start.reshape(-1, 1, 1) - recent).to(qp.device)
    else:
        lower = torch.full_like(qp, int(chunk_start) - recent)
    return (kp >= 0) & (kp <= qp) & ((kp < sink) | (kp >= lower))


def streaming_slot_positions(start, sink: int, recent: int, device=None) -> torch.Tensor:
    """Absolute position held by each streaming-cache slot once ``start`` tokens were written (-1: empty):
    ``[sink + recent]`` for an int ``start``, ``[B, sink + recent]`` for a ``[B]`` tensor of per-row starts."""
    slots = torch.arange(sink + recent, device=device)
    if isinstance(start, torch.Tensor):
        start = start.to(device=slots.device, dtype=torch.long).reshape(-1, 1)
        sink_pos = torch.where(slots < torch.clamp(start, max=sink), slots, -1)
    else:
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
    """Masked attention in fp32 with GQA: q [B,Hq,T,D], k/v [B,Hkv,S,D], visible [T,S] or per row [B,T,S]
    -> [B,Hq,T,D] (q's dtype)."""
    if visible.dim() == 3:
        visible = visible[:, None]
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


def row_positions(cache_start: torch.Tensor, valid: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ops' ``cache_start`` and ``valid`` as int64 ``[B]`` tensors on q's device, checked against q
    ``[B, H, T, D]``: one of each per row, ``cache_start >= 0``, ``0 <= valid <= T``."""
    batch, length = q.shape[0], q.shape[2]
    start, valid = (x.to(device=q.device, dtype=torch.long).reshape(-1) for x in (cache_start, valid))
    if start.numel() != batch or valid.numel() != batch:
        raise ValueError(f"cache_start and valid need one entry per batch row ({batch}), got shapes "
                         f"{tuple(cache_start.shape)} and {tuple(valid.shape)}")
    if batch and (int(start.min()) < 0 or int(valid.min()) < 0 or int(valid.max()) > length):
        raise ValueError(f"need cache_start >= 0 and 0 <= valid <= {length} (the chunk length), got cache_start "
                         f"{start.tolist()}, valid {valid.tolist()}")
    return start, valid


def check_retrieval_fits(start: torch.Tensor, valid: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Refuse a call whose real tokens would reach past the retrieval cache's slots."""
    end = start + valid
    if end.numel() and int(end.max()) > k_cache.shape[2]:
        raise ValueError(f"positions up to {int(end.max()) - 1} exceed the retrieval cache's {k_cache.shape[2]} slots")


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
    cache_start: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend causally to each row's cached tokens and this chunk, then append the row's real tokens to its cache
    (token t of row b into slot ``cache_start[b] + t`` for ``t < valid[b]``)."""
    q, k = _rotated(q, k, cos, sin)
    start, valid = row_positions(cache_start, valid, q)
    length = q.shape[2]
    check_retrieval_fits(start, valid, k_cache)
    cached = int(start.max()) if q.shape[0] else 0  # slots [0, cached) hold some row's tokens
    slots = torch.arange(cached, device=q.device)
    idx = torch.arange(length, device=q.device)
    visible = torch.cat([(slots[None, :] < start[:, None])[:, None, :].expand(-1, length, -1),
                         (idx[None, :] <= idx[:, None]).expand(q.shape[0], -1, -1)], dim=-1)
    keys = torch.cat([k_cache[:, :, :cached], k.to(k_cache.dtype)], dim=2)
    values = torch.cat([v_cache[:, :, :cached], v.to(v_cache.dtype)], dim=2)
    out = _attend(q, keys, values, visible, scale)
    for b, (s, n) in enumerate(zip(start.tolist(), valid.tolist())):
        k_cache[b, :, s : s + n] = k[b, :, :n]
        v_cache[b, :, s : s + n] = v[b, :, :n]
    return out


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
    """Attend to [sink | recent ring | this chunk] under the streaming rule, then write each row's real chunk
    tokens into its cache (``streaming_write_plan`` of its ``valid[b]`` tokens: padding never reaches the ring).

    Reading happens before writing: a chunk longer than the ring would otherwise overwrite keys its own
    first queries still need.
    """
    q, k = _rotated(q, k, cos, sin)
    start, valid = row_positions(cache_start, valid, q)
    length = q.shape[2]
    device = q.device
    slot_pos = streaming_slot_positions(start, sink, recent, device)  # [B, sink + recent]
    chunk_pos = start[:, None] + torch.arange(length, device=device)  # [B, T]
    keys = torch.cat([k_cache, k.to(k_cache.dtype)], dim=2)
    values = torch.cat([v_cache, v.to(v_cache.dtype)], dim=2)
    visible = streaming_visible(chunk_pos, torch.cat([slot_pos, chunk_pos], dim=1), sink, recent,
                                start if chunk_mode else None)
    out = _attend(q, keys, values, visible, scale)
    for b, (s, n) in enumerate(zip(start.tolist(), valid.tolist())):
        token_idx, slot_idx = streaming_write_plan(s, n, sink, recent)
        k_cache[b, :, slot_idx.to(device)] = k[b, :, token_idx.to(device)]
        v_cache[b, :, slot_idx.to(device)] = v[b, :, token_idx.to(device)]
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
    cache_start: torch.Tensor,
    valid: torch.Tensor,
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
    retrieval = retrieval_attention_cached(*retrieval_qkv, k_retrieval, v_retrieval, cache_start, valid, scale)
    streaming = streaming_attention_cached(*streaming_qkv, k_streaming, v_streaming, cache_start, valid, scale, sink,
                                           recent, chunk_mode)
    return torch.cat([retrieval, streaming], dim=1)
