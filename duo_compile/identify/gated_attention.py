"""The gated attention function: DuoAttention's per-head mix of full and streaming attention inside an unmodified
Hugging Face model.

Every KV head has one gate ``a`` (shared by the query heads of its GQA group); each query head outputs
``a * full + (1 - a) * streaming``, where ``streaming`` attends only to the first ``sink_size`` and the last
``recent_size`` tokens (token-exact window). A sliding-window layer of the model (its config's
``layer_windows``) keeps its own window for every head and ignores its gates, as the compiled engine does; given a
``max_seq_len``, a window at least that long is full attention and its layer is gated (the engine's rule for that
``max_seq_len``). The function is registered with ``transformers.AttentionInterface``
(name ``"duo_gated"``) and switched on for the duration of a ``with gated_attention(...)`` block; the model's own
attention implementation is restored afterwards. Identification trains the gates through it
(:mod:`duo_compile.identify.optimize`); the accuracy study evaluates binary gates with it and measures attention
mass on needles (the attention-score baseline, :func:`needle_attention_mass`) (:mod:`duo_compile.identify.needle`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from duo_compile.kernels.reference import streaming_visible
from duo_compile.masks import HeadMasks
from duo_compile.models.hf import read_shape
from duo_compile.identify.passkey import PasskeySample

__all__ = [
    "ATTENTION_NAME",
    "AttentionLayout",
    "attention_layout",
    "autocast",
    "equal_length_batches",
    "gated_attention",
    "gated_hidden_states",
    "needle_attention_mass",
    "streaming_attention_mask",
]

ATTENTION_NAME = "duo_gated"

# ---------------------------------------------------------------------- model layout


@dataclass(frozen=True)
class AttentionLayout:
    """What identification needs to know about the model's attention."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int | None
    vocab_size: int | None

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def attention_layout(model: torch.nn.Module) -> AttentionLayout:
    """Read layers, heads and KV heads from the model's config; ValueError when it has no attention to gate."""
    try:
        shape = read_shape(model)
    except ValueError:
        raise ValueError(
            f"no attention found in {type(model).__name__}: identify() needs a Hugging Face causal LM whose config "
            f"has num_hidden_layers and num_attention_heads (Llama, Mistral, Qwen2, ...)"
        ) from None
    if shape.num_layers < 1 or shape.num_heads < 1 or shape.num_heads % shape.num_kv_heads:
        raise ValueError(f"no usable attention in {type(model).__name__}: {shape.num_layers} layers, "
                         f"{shape.num_heads} heads, {shape.num_kv_heads} KV heads")
    return AttentionLayout(shape.num_layers, shape.num_heads, shape.num_kv_heads,
                           shape.max_position_embeddings or None, shape.vocab_size or None)


# ---------------------------------------------------------------------- the gated attention function


def streaming_attention_mask(q_len: int, k_len: int, sink_size: int, recent_size: int,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[q_len, k_len]``: query at absolute position ``p = k_len - q_len + i`` sees keys ``[0, sink)`` and
    ``[p - recent + 1, p]`` (the design's token-exact "window" rule)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    return streaming_visible(q_pos, torch.arange(k_len, device=device), sink_size, recent_size)


def _causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos


@dataclass
class _Probe:
    """Attention-mass measurement: rows of query positions, and the keys whose mass is summed."""

    query_positions: torch.Tensor  # long [B, P]
    key_mask: torch.Tensor  # bool [B, K]
    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H] summed over batch and P
    count: dict[int, int] = field(default_factory=dict)


@dataclass
class _GateState:
    gates: torch.Tensor | None  # [layers, kv_heads] fp32 or None (full attention everywhere)
    sink_size: int
    recent_size: int
    probe: _Probe | None = None
    max_seq_len: int | None = None  # windows at least this long are full attention
    calls: dict[int, int] = field(default_factory=dict)
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def window(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        key = (q_len, k_len, str(device))
        if key not in self._masks:
            self._masks = {key: streaming_attention_mask(q_len, k_len, self.sink_size, self.recent_size, device)}
        return self._masks[key]


_ACTIVE: list[_GateState] = []


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, KV, S, D] -> [B, KV * groups, S, D], query head h reads KV head h // groups."""
    if groups == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, groups, s, d).reshape(b, kv * groups, s, d)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, causal: bool,
            scaling: float | None) -> torch.Tensor:
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scaling)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)


def duo_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None,
                          dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: per head ``a * full + (1 - a) * streaming`` with the active gates.

    query ``[B, H, Q, D]``, key/value ``[B, KV, K, D]`` (keys after RoPE, at their true positions). Returns
    ``[B, Q, H, D]`` as transformers expects. Heads with a gate of exactly 1 (0) and no gradient compute only
    the full (streaming) attention.
    """
    state = _ACTIVE[-1] if _ACTIVE else None
    layer = getattr(module, "layer_idx", None)
    if state is None or layer is None:
        if state is not None:
            raise ValueError(f"attention module {type(module).__name__} has no layer_idx: cannot map it to a gate")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    state.calls[layer] = state.calls.get(layer, 0) + 1
    batch, num_heads, q_len, head_dim = query.shape
    groups = num_heads // key.shape[1]
    k = _expand_kv(key, groups)
    v = _expand_kv(value, groups)
    k_len = k.shape[2]
    base = None  # padding/causal mask handed in by transformers (bool), or None = plain causal
    if attention_mask is not None:
        base = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(
            attention_mask.dtype).min / 2
        base = base[:, :, :, :k_len]
    causal = q_len == k_len  # without a mask, SDPA's is_causal is right only for square attention
    if base is None and not causal:
        base = _causal_mask(q_len, k_len, query.device)[None, None]

    window = _layer_window(module, layer)
    if state.max_seq_len is not None and window >= state.max_seq_len:
        window = 0  # it hides no key from any sequence of max_seq_len tokens: a full-attention layer
    if window:  # a sliding-window layer keeps the model's own window for every head: its gates play no part
        seen = streaming_attention_mask(q_len, k_len, 0, window, query.device)[None, None]
        base = seen if base is None else base & seen
        causal = False

    if state.probe is not None:
        _measure_mass(state.probe, layer, query, k, scaling, head_dim)

    def full(heads: torch.Tensor | None) -> torch.Tensor:
        qh, kh, vh = (query, k, v) if heads is None else (query[:, heads], k[:, heads], v[:, heads])
        return _attend(qh, kh, vh, base, causal and base is None, scaling)

    def streaming(heads: torch.Tensor | None) -> torch.Tensor:
        qh, kh, vh = (query, k, v) if heads is None else (query[:, heads], k[:, heads], v[:, heads])
        allowed = state.window(q_len, k_len, query.device)[None, None]
        if base is not None:
            allowed = allowed & base
        return _attend(qh, kh, vh, allowed, False, scaling)

    if state.gates is None or window:
        out = full(None)
    else:
        gate = state.gates[layer].clamp(0.0, 1.0).repeat_interleave(groups)  # [H] fp32
        if gate.requires_grad and torch.is_grad_enabled():
            a = gate.view(1, num_heads, 1, 1)
            out = (a * full(None).float() + (1.0 - a) * streaming(None).float()).to(query.dtype)
        else:
            out = _mix_without_grad(gate.detach(), full, streaming, query)
    return out.transpose(1, 2).contiguous(), None


def _layer_window(module: torch.nn.Module, layer: int) -> int:
    """The sliding window the model's config declares for ``layer`` (0: full attention), as the compiler reads it
    (``ModelInfo.layer_windows``): such a layer is a window layer of the engine, whatever the gates say."""
    config = getattr(module, "config", None)
    windows = read_shape(config).layer_windows if config is not None else ()
    return windows[layer] if layer < len(windows) else 0


def _mix_without_grad(gate: torch.Tensor, full, streaming, query: torch.Tensor) -> torch.Tensor:
    """Compute each attention only for the heads that need it (binary gates: each head once)."""
    need_full = gate > 0
    need_streaming = gate < 1
    if bool(need_full.all()) and not bool(need_streaming.any()):
        return full(None)
    if bool(need_streaming.all()) and not bool(need_full.any()):
        return streaming(None)
    out = torch.zeros_like(query)
    a = gate.view(1, -1, 1, 1)
    if bool(need_full.any()):
        heads = need_full.nonzero().flatten()
        out[:, heads] = (full(heads).float() * a[:, heads]).to(query.dtype)
    if bool(need_streaming.any()):
        heads = need_streaming.nonzero().flatten()
        out[:, heads] += (streaming(heads).float() * (1.0 - a[:, heads])).to(query.dtype)
    return out


def _measure_mass(probe: _Probe, layer: int, query: torch.Tensor, k: torch.Tensor, scaling: float | None,
                  head_dim: int) -> None:
    """Softmax mass (full causal attention) from the probe queries onto the probe keys, summed per query head."""
    pos = probe.query_positions.to(query.device)  # [B, P]
    k_len = k.shape[2]
    q_sel = torch.gather(query, 2, pos[:, None, :, None].expand(-1, query.shape[1], -1, head_dim))
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    scores = torch.matmul(q_sel.float(), k.float().transpose(-1, -2)) * scale  # [B, H, P, K]
    q_abs = pos + (k_len - query.shape[2])
    visible = torch.arange(k_len, device=query.device)[None, None, :] <= q_abs[:, :, None]  # [B, P, K]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = scores.softmax(-1)
    mass = (probs * probe.key_mask.to(query.device)[:, None, None, :k_len].float()).sum(-1)  # [B, H, P]
    total = mass.sum(dim=(0, 2)).detach()
    probe.mass[layer] = probe.mass.get(layer, 0) + total
    probe.count[layer] = probe.count.get(layer, 0) + pos.numel()


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, duo_attention_forward)
    try:  # padding masks then arrive as SDPA's bool masks (or None when plain causal attention is enough)
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    except ImportError:  # without a registered mask function transformers passes no mask: plain causal
        pass


def _set_attention(model: torch.nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
            return
        except (ValueError, KeyError, AttributeError, TypeError):
            pass
    model.config._attn_implementation = name


@contextlib.contextmanager
def gated_attention(model: torch.nn.Module, gates: torch.Tensor | np.ndarray | HeadMasks | None = None, *,
                    sink_size: int, recent_size: int, probe: _Probe | None = None,
                    max_seq_len: int | None = None) -> Iterator[_GateState]:
    """Run ``model`` with DuoAttention gates inside the block; its attention implementation is restored after.

    gates: ``[layers, kv_heads]`` in [0, 1] (a tensor keeps its autograd graph); None = full attention.
    max_seq_len: the longest sequence the block runs (default: none); sliding windows at least that long are full
    attention, their layers gated, as in an engine of that ``max_seq_len``.
    """
    _register()
    if isinstance(gates, HeadMasks):
        gates = gates.gates
    if gates is not None and not isinstance(gates, torch.Tensor):
        gates = torch.tensor(np.asarray(gates), dtype=torch.float32)
    if gates is not None:
        device = next(model.parameters()).device
        gates = gates.to(device=device, dtype=torch.float32) if gates.device != device else gates.float()
    old = model.config._attn_implementation
    state = _GateState(gates=gates, sink_size=int(sink_size), recent_size=int(recent_size), probe=probe,
                       max_seq_len=max_seq_len)
    _ACTIVE.append(state)
    try:
        _set_attention(model, ATTENTION_NAME)
        yield state
    finally:
        _ACTIVE.remove(state)
        _set_attention(model, old)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its lm_head: its output is the final hidden states after the final norm."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def gated_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the final norm) ``[B, S, hidden]``, under whatever attention is active."""
    out = _decoder(model)(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


# ---------------------------------------------------------------------- the attention-score baseline


def needle_attention_mass(model: torch.nn.Module, samples: Sequence[PasskeySample], *, batch_size: int = 8,
                          autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Per KV head ``[layers, kv_heads]``: mean attention mass (full attention) that the queries predicting the
    answer passkey tokens put on the needle sentences, averaged over the group's query heads and all samples.

    Why: the attention-score baseline of the paper ranks heads by how much they attend to the needle; DuoAttention
    argues an optimisation-based criterion identifies retrieval heads better. Higher = more retrieval-like.
    """
    layout = attention_layout(model)
    device = next(model.parameters()).device
    mass = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
    count = torch.zeros(layout.num_layers, dtype=torch.float64)
    for group in equal_length_batches(samples, batch_size):
        ids = torch.as_tensor(np.stack([s.input_ids for s in group]), device=device)
        positions = torch.as_tensor(np.stack([np.concatenate(s.answer_positions) for s in group]), device=device)
        key_mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        for row, s in enumerate(group):
            for start, end in s.needle_spans:
                key_mask[row, start:end] = True
        probe = _Probe(query_positions=positions, key_mask=key_mask)
        with torch.no_grad(), autocast(device, autocast_dtype), gated_attention(model, None, sink_size=0,
                                                                                 recent_size=1, probe=probe):
            gated_hidden_states(model, ids)
        for layer, total in probe.mass.items():
            mass[layer] += total.double().cpu()
            count[layer] += probe.count[layer]
    per_query_head = (mass / count.clamp(min=1)[:, None]).numpy()
    return per_query_head.reshape(layout.num_layers, layout.num_kv_heads, layout.groups).mean(-1)


def equal_length_batches(samples: Sequence[PasskeySample], batch_size: int) -> Iterator[list[PasskeySample]]:
    """Batches of samples with equal token lengths (no padding needed), in first-seen order."""
    by_length: dict[int, list[PasskeySample]] = {}
    for s in samples:
        by_length.setdefault(s.length, []).append(s)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------- identification
