"""Blockwise CPU implementations of the ``duo::`` ops: the results of ``reference.py`` without its dense
``[B, H, T, S]`` score tensor, and with streaming heads scoring only their sink and window keys.

``reference.py`` is the oracle: one masked softmax over every (query, key) pair of a call, fp32 scores for all of
them. On CPU that is the whole cost and memory of a long prefill (an 8K prompt builds 2 GiB of scores per layer),
and it gives streaming heads no advantage: they score every key and mask most of them away. These functions
(registered as the ops' CPU kernels by ``ops.py``) compute the same function in pieces:

* An attention *part* is one softmax attention of some queries over a contiguous set of keys, either all visible,
  causal (a square diagonal tile: query i sees keys <= i) or under an explicit mask; it returns its output and
  the log-sum-exp of its scores. Parts over disjoint key sets merge exactly (``_merge``: the softmax over their
  union), so no call ever needs one score tensor over all its keys.
* Retrieval heads: queries at ``[P0, P1)`` = (keys ``[0, P0)``, all visible) + (keys ``[P0, P1)``, causal).
* Streaming heads, window mode: queries go in blocks of ``STREAMING_BLOCK`` rows; a block scores only the sink
  keys and its window ``[P0 - recent + 1, P1)`` (from the cache and/or the chunk) under the rule's mask, so a
  prefill does ``O(T x (sink + recent + block))`` work, not ``O(T^2)``. The blocks past the first window share
  one mask and go as the batch of a few calls on strided views of K/V (no copies); the first ones (windows
  reaching into the sink or the cache) and a last partial block go one by one.
* Streaming heads, chunk mode (the whole chunk is visible): (cached sink + ring, all visible) + (chunk, causal).
* Decode (T = 1): retrieval reads the cache up to the new token; a streaming head the cache's ``sink + recent``
  slots and the new token (window mode, cache full: write first, then the cache *is* the window, no mask).
* GQA: query head h reads KV head ``h // G``; K/V are never repeated per query head (the CPU flash kernel reads
  them per group; the fallback stacks a KV head's G query heads as the rows of one matrix product).

A part runs on PyTorch's CPU flash-attention kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``: an
online softmax over query x key tiles, so its memory does not grow with T x S) when this PyTorch has it
(``FLASH``); otherwise on plain matrix products, where the callers cut queries into blocks of ``block_rows``
rows so a part's scores stay within ``SCORE_BUDGET``. Scores are fp32 (inputs of another dtype are converted, as
in the reference); the output has q's dtype. The cached ops write their caches exactly as the reference does (the
retrieval chunk at its slots before attending; the streaming chunk's surviving tokens after attending, so a chunk
longer than the ring still reads the keys it overwrites).
"""
from __future__ import annotations

import torch

from .reference import check_retrieval_fits, head_groups, rope, rope_pair, row_positions

_FLASH_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# Use the flash kernel for attention parts (tests switch it off to check the matrix-product fallback too).
FLASH = _FLASH_OP is not None

# Fallback only: fp32 score elements one query block may hold, over the batch and all query heads (2^22 = 16 MiB),
# as rows within [MIN_BLOCK, MAX_BLOCK]: short blocks keep their scores in cache. See
# benchmarks/DECISIONS.md#blockwise-cpu-blocks.
SCORE_BUDGET = 1 << 22
MIN_BLOCK = 16
MAX_BLOCK = 256
# Flash path: output elements of one group of window-mode blocks batched into one call (2^17 = 512 KiB fp32): larger
# groups cost time and peak memory, smaller ones per-call overhead (benchmarks/DECISIONS.md#blockwise-cpu-blocks).
GROUP_ELEMENTS = 1 << 17
# Window-mode streaming blocks score (sink + recent + block) keys for sink + recent useful ones: taller blocks
# score more masked keys, shorter ones pay more per-block overhead (benchmarks/DECISIONS.md#blockwise-cpu-blocks).
STREAMING_BLOCK = 64


def block_rows(batch: int, q_heads: int, keys: int, limit: int = MAX_BLOCK) -> int:
    """Fallback query rows per block so that ``batch x q_heads x rows x keys`` fp32 scores fit ``SCORE_BUDGET``."""
    rows = SCORE_BUDGET // max(1, batch * q_heads * keys)
    return max(MIN_BLOCK, min(limit, rows))


def _rotated(q, k, cos, sin):
    tables = rope_pair(cos, sin)
    return (q, k) if tables is None else (rope(q, *tables), rope(k, *tables))


def _for_each_row(attend, q, k, v, caches, cache_start, valid, out, retrieval_cache=None) -> None:
    """Run ``attend(q, k, v, *caches, start, out)`` (the one-start code above) for a call whose rows have their
    own ``cache_start`` and ``valid``: the whole batch at once when every row starts at one position with no
    padding, otherwise row by row on views of that row's real tokens and caches, so padding is never attended
    by a real token nor written. Padding outputs are zero. ``retrieval_cache``: refuse positions past its slots
    before anything is written."""
    start, valid = row_positions(cache_start, valid, q)
    if retrieval_cache is not None:
        check_retrieval_fits(start, valid, retrieval_cache)
    starts, counts = start.tolist(), valid.tolist()
    length = q.shape[2]
    if len(set(starts)) <= 1 and all(n == length for n in counts):
        attend(q, k, v, *caches, starts[0] if starts else 0, out)
        return
    out.zero_()
    for b, (s, n) in enumerate(zip(starts, counts)):
        if n:
            row = slice(b, b + 1)
            attend(q[row, :, :n], k[row, :, :n], v[row, :, :n], *(c[row] for c in caches), s, out[row, :, :n])


def _blocks(length: int, block: int):
    for t0 in range(0, length, block):
        yield t0, min(t0 + block, length)


# ---------------------------------------------------------------------------------------------------- parts
def _additive(hidden: torch.Tensor) -> torch.Tensor:
    """The flash kernel's form of a mask: 0 where visible, -inf where hidden (fp32)."""
    return torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))


def _part(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool = False,
          hidden: torch.Tensor | None = None,
          additive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q [B, Hq, T, D]`` over ``keys/values [B, Hkv, S, D]`` (all fp32): every key
    visible, or ``causal`` (T == S, query i sees keys <= i), or ``hidden [T, S]`` (True: not visible; no row all
    hidden; ``additive``: the same as ``_additive(hidden)``, made once by a caller that reuses it). Returns
    (output ``[B, Hq, T, D]``, log-sum-exp of the scaled scores ``[B, Hq, T]``)."""
    if FLASH:
        if hidden is not None and additive is None:
            additive = _additive(hidden)
        out, lse = _FLASH_OP(q, keys, values, 0.0, causal, attn_mask=additive, scale=scale)
        return out, lse
    b, hq, t, d = q.shape
    hkv, s = keys.shape[1], keys.shape[2]
    g = hq // hkv
    rows = q.reshape(b, hkv, g * t, d)  # a KV head's G query heads as one matrix: K/V are not repeated
    scores = torch.matmul(rows, keys.transpose(-1, -2)).mul_(scale)
    if causal:
        hidden = torch.ones(t, s, dtype=torch.bool).triu_(1)
    if hidden is not None:
        scores.view(b, hkv, g, t, s).masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.matmul(scores.sub_(lse).exp_(), values)
    return out.view(b, hq, t, d), lse.view(b, hq, t)


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The softmax attention over the union of the parts' (disjoint) key sets."""
    if len(parts) == 1:
        return parts[0][0]
    lse = parts[0][1]
    for _, other in parts[1:]:
        lse = torch.logaddexp(lse, other)
    out = None
    for o, part_lse in parts:
        term = o * torch.exp(part_lse - lse).unsqueeze(-1)
        out = term if out is None else out.add_(term)
    return out


# ------------------------------------------------------------------------------------------------ retrieval
def _retrieval(q, keys, values, start: int, scale: float, out: torch.Tensor, block: int | None = None) -> None:
    """Causal attention for queries at positions ``start .. start + T - 1`` over ``keys/values [B, Hkv, >= start
    + T, D]`` whose slot j holds position j: per query block ``[P0, P1)``, keys ``[0, P0)`` all visible and the
    block's own tile causal. Writes ``out``."""
    b, hq, length, _ = q.shape
    q = q.float()
    keys, values = keys[:, :, : start + length].float(), values[:, :, : start + length].float()
    if block is None:
        block = length if FLASH else block_rows(b, hq, start + length)
    if length == 1:  # decode: one query, every key up to it visible
        out.copy_(_part(q, keys, values, scale)[0])
        return
    for t0, t1 in _blocks(length, block):
        p0, p1 = start + t0, start + t1
        parts = [_part(q[:, :, t0:t1], keys[:, :, p0:p1], values[:, :, p0:p1], scale, causal=True)]
        if p0:
            parts.append(_part(q[:, :, t0:t1], keys[:, :, :p0], values[:, :, :p0], scale))
        out[:, :, t0:t1] = _merge(parts)


def retrieval_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        block: int | None = None) -> torch.Tensor:
    """``reference.retrieval_attention``, blockwise."""
    out = torch.empty(q.shape, dtype=q.dtype)
    _retrieval(q, k, v, 0, scale, out, block)
    return out


def _retrieval_cached(q, k, v, k_cache, v_cache, start: int, scale: float, out, block=None) -> None:
    length = q.shape[2]
    k_cache[:, :, start : start + length] = k
    v_cache[:, :, start : start + length] = v
    _retrieval(q, k_cache, v_cache, start, scale, out, block)


def retrieval_attention_cached(q, k, v, k_cache, v_cache, cache_start, valid, scale, cos=None, sin=None,
                               block: int | None = None) -> torch.Tensor:
    """``reference.retrieval_attention_cached``, blockwise."""
    q, k = _rotated(q, k, cos, sin)
    out = torch.empty(q.shape, dtype=q.dtype)

    def attend(q, k, v, k_cache, v_cache, start, out):
        _retrieval_cached(q, k, v, k_cache, v_cache, start, scale, out, block)

    _for_each_row(attend, q, k, v, (k_cache, v_cache), cache_start, valid, out, retrieval_cache=k_cache)
    return out


# ------------------------------------------------------------------------------------------------ streaming
def ring_positions(start: int, sink: int, recent: int) -> torch.Tensor:
    """Position held by each of the ``recent`` ring slots once positions ``< start`` were written (-1: empty).
    Ring slot j holds the latest position p < start with p >= sink and (p - sink) % recent == j."""
    j = torch.arange(recent)
    pos = (start - 1) - torch.remainder(start - 1 - sink - j, recent)
    return torch.where(pos >= sink, pos, -1)


def _hidden(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """``[len(q_pos), len(k_pos)]``: True where window mode's rule hides the key from the query (docs/design.md
    "Semantics"; negative key positions are empty slots)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    visible = (kp >= 0) & (kp <= qp) & ((kp < sink) | (kp > qp - recent))
    return ~visible


def _streaming_window(q, k, v, k_cache, v_cache, start, scale, sink, recent, out, block=None) -> None:
    """Window mode: per query block, the sink keys and the block's window, from the cache and the chunk.

    Interior blocks (full blocks whose window lies inside the chunk, past the sink) all see the same pattern, the
    sink keys then a band of ``recent + block - 1`` chunk keys, so they go as the batch of a few calls
    (``_streaming_interior``); the others (the first blocks, whose windows reach into the sink or the cache, and a
    last partial block) one by one."""
    length = q.shape[2]
    block = block or STREAMING_BLOCK
    cached = k_cache is not None and start > 0
    n_sink = min(sink, start) if cached else 0  # sink slots written so far
    chunk_sink = max(0, min(sink - start, length))  # chunk tokens that are sink tokens
    # The first block index whose window [t0 - recent + 1, t1) starts inside the chunk, after its sink tokens.
    first = -(-(recent - 1 + chunk_sink) // block)
    last = length // block  # blocks [first, last) are interior
    if last - first >= 2:
        _streaming_interior(q, k, v, k_cache, v_cache, n_sink, chunk_sink, first, last, block, scale, recent, out)
        edges = list(range(first)) + list(range(last, -(-length // block)))
    else:
        edges = range(-(-length // block))
    if cached:
        sink_k, sink_v = k_cache[:, :, :n_sink].float(), v_cache[:, :, :n_sink].float()
        sink_pos = torch.arange(n_sink)
        filled = min(recent, max(0, start - sink))  # ring slots written so far (a prefix of the ring until full)
        ring_k = k_cache[:, :, sink : sink + filled].float()
        ring_v = v_cache[:, :, sink : sink + filled].float()
        ring_pos = ring_positions(start, sink, recent)[:filled]
    for b in edges:
        t0, t1 = b * block, min((b + 1) * block, length)
        p0, p1 = start + t0, start + t1
        lowest = p0 - recent + 1  # the earliest non-sink position a query of the block can see
        parts_k, parts_v, parts_pos = [], [], []
        if cached:
            if n_sink:
                parts_k.append(sink_k), parts_v.append(sink_v), parts_pos.append(sink_pos)
            if filled and lowest < start:
                parts_k.append(ring_k), parts_v.append(ring_v), parts_pos.append(ring_pos)
        lo = max(0, lowest - start)  # the first chunk token in the block's window
        if chunk_sink >= lo:
            lo = 0  # the chunk's sink tokens and the window touch: one slice
        elif chunk_sink:
            parts_k.append(k[:, :, :chunk_sink]), parts_v.append(v[:, :, :chunk_sink])
            parts_pos.append(torch.arange(start, start + chunk_sink))
        parts_k.append(k[:, :, lo:t1]), parts_v.append(v[:, :, lo:t1]), parts_pos.append(torch.arange(start + lo, p1))
        keys, values = torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)
        hidden = _hidden(torch.arange(p0, p1), torch.cat(parts_pos), sink, recent)
        out[:, :, t0:t1] = _part(q[:, :, t0:t1], keys, values, scale, hidden=hidden)[0]


def _streaming_interior(q, k, v, k_cache, v_cache, n_sink, chunk_sink, first, last, block, scale, recent, out):
    """Window-mode blocks ``[first, last)`` of the chunk, all full and with windows inside the chunk past its sink
    tokens: each sees the ``n_sink`` cached + ``chunk_sink`` chunk sink keys (all visible) and the chunk keys
    ``[t0 - recent + 1, t1)``, query i the band ``[i, i + recent)`` of them.

    A group of blocks is the batch dimension of two attention parts, merged: (sink keys, all visible) + (windows,
    one band mask for all). The windows are an overlapping strided view of the chunk's K/V (``unfold``) and the
    sink keys an expanded one, so nothing is gathered or repeated; groups are sized so that a group's outputs
    (``GROUP_ELEMENTS``) or, on the fallback, its scores (``SCORE_BUDGET``) stay bounded."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    width = recent + block - 1
    sink = [(kc[:, :, :n_sink], vc[:, :, :n_sink]) for kc, vc in [(k_cache, v_cache)] if n_sink]
    sink += [(k[:, :, :chunk_sink], v[:, :, :chunk_sink])] if chunk_sink else []
    sink_k = torch.cat([x for x, _ in sink], dim=2).float() if sink else None
    sink_v = torch.cat([y for _, y in sink], dim=2).float() if sink else None
    n = n_sink + chunk_sink
    i = torch.arange(block)[:, None]
    w = torch.arange(width)[None, :]
    hidden = (w < i) | (w >= i + recent)  # the band, the same for every block
    additive = _additive(hidden) if FLASH else None
    if FLASH:
        per_group = max(1, GROUP_ELEMENTS // (hq * block * d))
    else:
        per_group = max(1, SCORE_BUDGET // (hq * block * (n + width)))
    for row in range(b):
        qr, kr, vr, outr = q[row : row + 1], k[row : row + 1], v[row : row + 1], out[row : row + 1]
        for g0 in range(first, last, per_group):
            g1 = min(g0 + per_group, last)
            count, t0, t1 = g1 - g0, g0 * block, g1 * block

            # The blocks' windows [t0 - recent + 1, t1): overlapping views [count, Hkv, width, D] of the chunk's K/V.
            kw, vw = (x[:, :, t0 - recent + 1 : t1].unfold(2, width, block).permute(0, 2, 1, 4, 3)[0] for x in (kr, vr))
            qb = qr[:, :, t0:t1].reshape(hq, count, block, d).transpose(0, 1)  # a view: [count, Hq, block, D]
            parts = [_part(qb, kw, vw, scale, hidden=hidden, additive=additive)]
            if n:
                parts.append(_part(qb, sink_k[row].expand(count, hkv, n, d), sink_v[row].expand(count, hkv, n, d),
                                   scale))
            outr[:, :, t0:t1] = _merge(parts).transpose(0, 1).reshape(1, hq, t1 - t0, d)


def _streaming_chunk(q, k, v, k_cache, v_cache, start, scale, sink, recent, out, block=None) -> None:
    """Chunk mode: every cached key (sink + ring) and the chunk up to the query are visible: per query block
    [t0, t1), (cache, all visible) + (chunk [0, t0), all visible) + (chunk [t0, t1), causal)."""
    b, hq, length, _ = q.shape
    cache_k = cache_v = None
    if k_cache is not None and start > 0:
        # The slots written so far are a prefix of the cache: the ring starts filling once the sink is full.
        written = min(sink, start) + min(recent, max(0, start - sink))
        cache_k, cache_v = k_cache[:, :, :written].float(), v_cache[:, :, :written].float()
    if block is None:
        block = length if FLASH else block_rows(b, hq, sink + recent + length)
    for t0, t1 in _blocks(length, block):
        qb = q[:, :, t0:t1]
        parts = [_part(qb, k[:, :, t0:t1], v[:, :, t0:t1], scale, causal=True)]
        if t0:
            parts.append(_part(qb, k[:, :, :t0], v[:, :, :t0], scale))
        if cache_k is not None:
            parts.append(_part(qb, cache_k, cache_v, scale))
        out[:, :, t0:t1] = _merge(parts)


def _streaming(q, k, v, k_cache, v_cache, start: int, scale: float, sink: int, recent: int, chunk_mode: bool,
               out, block: int | None = None) -> None:
    """Streaming attention for the chunk at positions ``start .. start + T - 1`` over the cache (``None``: no
    cache, ``start`` is 0) and the chunk; then the chunk's surviving tokens are written to the cache."""
    q, k, v = q.float(), k.float(), v.float()
    length = q.shape[2]
    if k_cache is not None and length == 1 and not chunk_mode and start >= sink + recent - 1 and block is None:
        # Decode, window mode, cache full once this token is in: its slot held position start - recent, the one
        # cached key the rule hides from it, so after the write the cache holds exactly the visible keys.
        _write_streaming(k, v, k_cache, v_cache, start, sink, recent)
        out.copy_(_part(q, k_cache.float(), v_cache.float(), scale)[0])
        return
    attend = _streaming_chunk if chunk_mode else _streaming_window
    attend(q, k, v, k_cache, v_cache, start, scale, sink, recent, out, block)
    if k_cache is not None:
        _write_streaming(k, v, k_cache, v_cache, start, sink, recent)


def _ring_runs(first: int, end: int, sink: int, recent: int):
    """Positions ``[first, end)`` (all >= sink, at most ``recent`` of them) as contiguous (pos0, pos1, slot0) runs
    of the ring: at most two, split where the ring wraps."""
    runs, p = [], first
    while p < end:
        slot = (p - sink) % recent
        n = min(end - p, recent - slot)
        runs.append((p, p + n, sink + slot))
        p += n
    return runs


def _write_streaming(k, v, k_cache, v_cache, start: int, sink: int, recent: int) -> None:
    """Write the chunk's surviving tokens: those in the sink, and the last ``recent`` of the others (the slots
    ``reference.streaming_write_plan`` gives)."""
    end = start + k.shape[2]
    if start < sink:
        n = min(sink, end) - start
        k_cache[:, :, start : start + n] = k[:, :, :n]
        v_cache[:, :, start : start + n] = v[:, :, :n]
    for p0, p1, slot in _ring_runs(max(start, sink, end - recent), end, sink, recent):
        k_cache[:, :, slot : slot + p1 - p0] = k[:, :, p0 - start : p1 - start]
        v_cache[:, :, slot : slot + p1 - p0] = v[:, :, p0 - start : p1 - start]


def streaming_attention(q, k, v, scale, sink, recent, block: int | None = None) -> torch.Tensor:
    """``reference.streaming_attention``, blockwise."""
    out = torch.empty(q.shape, dtype=q.dtype)
    _streaming(q, k, v, None, None, 0, scale, sink, recent, False, out, block)
    return out


def streaming_attention_cached(q, k, v, k_cache, v_cache, cache_start, valid, scale, sink, recent, chunk_mode,
                               cos=None, sin=None, block: int | None = None) -> torch.Tensor:
    """``reference.streaming_attention_cached``, blockwise."""
    q, k = _rotated(q, k, cos, sin)
    out = torch.empty(q.shape, dtype=q.dtype)

    def attend(q, k, v, k_cache, v_cache, start, out):
        _streaming(q, k, v, k_cache, v_cache, start, scale, sink, recent, chunk_mode, out, block)

    _for_each_row(attend, q, k, v, (k_cache, v_cache), cache_start, valid, out)
    return out


# ---------------------------------------------------------------------------------------------- mixed layer
def attention_cached(q, k, v, k_retrieval, v_retrieval, k_streaming, v_streaming, cache_start, valid, scale,
                     retrieval_kv_heads, sink, recent, chunk_mode, cos=None, sin=None,
                     block: int | None = None) -> torch.Tensor:
    """``reference.attention_cached``, blockwise: both head groups write their halves of one output."""
    q, k = _rotated(q, k, cos, sin)
    head_groups(q, k, v, retrieval_kv_heads)  # checks the split before anything is written
    out = torch.empty(q.shape, dtype=q.dtype)

    def attend(q, k, v, k_retrieval, v_retrieval, k_streaming, v_streaming, start, out):
        (qr, kr, vr), (qs, ks, vs) = head_groups(q, k, v, retrieval_kv_heads)
        split = qr.shape[1]
        _retrieval_cached(qr, kr, vr, k_retrieval, v_retrieval, start, scale, out[:, :split], block)
        _streaming(qs, ks, vs, k_streaming, v_streaming, start, scale, sink, recent, chunk_mode, out[:, split:],
                   block)

    caches = (k_retrieval, v_retrieval, k_streaming, v_streaming)
    _for_each_row(attend, q, k, v, caches, cache_start, valid, out, retrieval_cache=k_retrieval)
    return out


CPU_KERNELS = {
    "retrieval_attention": retrieval_attention,
    "streaming_attention": streaming_attention,
    "retrieval_attention_cached": retrieval_attention_cached,
    "streaming_attention_cached": streaming_attention_cached,
    "attention_cached": attention_cached,
}
