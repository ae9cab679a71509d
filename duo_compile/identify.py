"""Retrieval-head identification: DuoAttention's gate optimisation (arXiv 2410.10819, section 3.2).

Every KV head gets one fp32 gate ``a`` (init 1.0, shared by the query heads of its GQA group); during
identification each query head outputs ``a * full + (1 - a) * streaming``, where ``streaming`` attends only to the
first ``sink_size`` and the last ``recent_size`` tokens (token-exact window). Only the gates train. The teacher is
the same model with every gate at 1 (full attention), run under no_grad, so no second copy of the weights exists.
The loss is the mean squared difference of the final hidden states (after the final norm; no lm_head) over the
question/answer tail of synthetic multi-passkey samples, plus ``reg_weight * mean(|a|)``: heads whose streaming
version does not change the answers drift to 0 (streaming), heads the answers need stay near 1 (retrieval).

The mixing runs inside the unmodified Hugging Face model through a custom attention function registered with
``transformers.AttentionInterface`` (name ``"duo_gated"``); the model's own attention implementation is restored
afterwards. The same function evaluates binary gates (the accuracy study) and measures attention mass on needles
(the attention-score baseline, :func:`needle_attention_mass`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from duo_compile.checks import check_int
from duo_compile.kernels.reference import streaming_visible
from duo_compile.masks import HeadMasks
from duo_compile.passkey import PasskeySample, PasskeyTask

__all__ = [
    "ATTENTION_NAME",
    "AttentionLayout",
    "attention_layout",
    "streaming_attention_mask",
    "gated_attention",
    "gated_hidden_states",
    "identify",
    "needle_attention_mass",
]

ATTENTION_NAME = "duo_gated"
CHECKPOINT_NAME = "checkpoint.pt"
GATES_NAME = "full_attention_heads.tsv"
CONFIG_NAME = "config.json"
HISTORY_NAME = "history.json"


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
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    names = ("num_hidden_layers", "num_attention_heads")
    if config is None or not all(isinstance(getattr(config, n, None), int) for n in names):
        raise ValueError(
            f"no attention found in {type(model).__name__}: identify() needs a Hugging Face causal LM whose config "
            f"has num_hidden_layers and num_attention_heads (Llama, Mistral, Qwen2, ...)"
        )
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    if config.num_hidden_layers < 1 or num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"no usable attention in {type(model).__name__}: {config.num_hidden_layers} layers, "
                         f"{num_heads} heads, {num_kv_heads} KV heads")
    max_positions = getattr(config, "max_position_embeddings", None)
    vocab_size = getattr(config, "vocab_size", None)
    return AttentionLayout(int(config.num_hidden_layers), num_heads, num_kv_heads,
                           int(max_positions) if max_positions else None, int(vocab_size) if vocab_size else None)


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

    if state.gates is None:
        out = full(None)
    else:
        gate = state.gates[layer].clamp(0.0, 1.0).repeat_interleave(groups)  # [H] fp32
        if gate.requires_grad and torch.is_grad_enabled():
            a = gate.view(1, num_heads, 1, 1)
            out = (a * full(None).float() + (1.0 - a) * streaming(None).float()).to(query.dtype)
        else:
            out = _mix_without_grad(gate.detach(), full, streaming, query)
    return out.transpose(1, 2).contiguous(), None


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
                    sink_size: int, recent_size: int, probe: _Probe | None = None) -> Iterator[_GateState]:
    """Run ``model`` with DuoAttention gates inside the block; its attention implementation is restored after.

    gates: ``[layers, kv_heads]`` in [0, 1] (a tensor keeps its autograd graph); None = full attention.
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
    state = _GateState(gates=gates, sink_size=int(sink_size), recent_size=int(recent_size), probe=probe)
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
    for group in _equal_length_batches(samples, batch_size):
        ids = torch.as_tensor(np.stack([s.input_ids for s in group]), device=device)
        positions = torch.as_tensor(np.stack([np.concatenate(s.answer_positions) for s in group]), device=device)
        key_mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        for row, s in enumerate(group):
            for start, end in s.needle_spans:
                key_mask[row, start:end] = True
        probe = _Probe(query_positions=positions, key_mask=key_mask)
        with torch.no_grad(), _autocast(device, autocast_dtype), gated_attention(model, None, sink_size=0,
                                                                                 recent_size=1, probe=probe):
            gated_hidden_states(model, ids)
        for layer, total in probe.mass.items():
            mass[layer] += total.double().cpu()
            count[layer] += probe.count[layer]
    per_query_head = (mass / count.clamp(min=1)[:, None]).numpy()
    return per_query_head.reshape(layout.num_layers, layout.num_kv_heads, layout.groups).mean(-1)


def _equal_length_batches(samples: Sequence[PasskeySample], batch_size: int) -> Iterator[list[PasskeySample]]:
    """Batches of samples with equal token lengths (no padding needed), in first-seen order."""
    by_length: dict[int, list[PasskeySample]] = {}
    for s in samples:
        by_length.setdefault(s.length, []).append(s)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------- identification


def _lr_factor(step: int, num_steps: int) -> float:
    """The authors' schedule: 20% linear warm-up, constant, 20% linear decay; never below 0.1x."""
    warmup = max(1, int(0.2 * num_steps))
    decay = max(1, int(0.2 * num_steps))
    if step < warmup:
        factor = (step + 1) / warmup
    elif step >= num_steps - decay:
        factor = (num_steps - step) / decay
    else:
        factor = 1.0
    return max(0.1, min(1.0, factor))


def _default_context_lengths(max_positions: int | None, tail: int) -> list[int]:
    """The authors' ``linspace(1000, 32000, 50)``, capped by the model's positions."""
    high = 32000 if max_positions is None else min(32000, max_positions - tail)
    low = min(1000, max(1, high // 4))
    return sorted({int(x) for x in np.linspace(low, high, 50)})


def identify(
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    num_steps: int = 2000,
    context_lengths: Sequence[int] | None = None,
    num_passkeys: int = 10,
    passkey_length: int = 32,
    sink_size: int = 128,
    recent_size: int = 256,
    reg_weight: float = 0.05,
    lr: float = 0.02,
    seed: int = 42,
    batch_size: int = 1,
    num_samples: int | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
    filler_text: str | None = None,
    progress: bool = True,
) -> HeadMasks:
    """Identify retrieval heads by optimising DuoAttention gates; returns the gates (not binarised) as HeadMasks.

    model: a Hugging Face causal LM (Llama, Mistral, Qwen2, ...; MHA or GQA); moved to ``device`` if given.
        Its parameters are frozen during the run and their ``requires_grad`` flags, training mode, gradient
        checkpointing and attention implementation are restored afterwards.
    tokenizer: encodes the authors' templates, NATO passkeys and the bundled filler text; None = generated tokens.
    context_lengths: tokens before the question/answer tail, one drawn per step (default: the authors'
        ``linspace(1000, 32000, 50)`` capped by ``max_position_embeddings``).
    num_passkeys, passkey_length: needles per sample and words per passkey (authors: 10 and 32).
    num_samples: draw from a fixed pool of this many samples (None: a fresh sample every step).
    output_dir: writes ``full_attention_heads.tsv``, ``config.json``, ``history.json`` and ``checkpoint.pt``
        (every ``checkpoint_every`` steps); ``resume=True`` continues from the checkpoint there.
    autocast_dtype: e.g. torch.bfloat16 to run the frozen model under autocast (gates stay fp32).
    gradient_checkpointing: recompute each layer in the backward pass (for models that only just fit).
    Samples depend only on ``(seed, step)``, so a resumed run equals an uninterrupted one.
    """
    # ---- validate everything before any training
    if not isinstance(reg_weight, (int, float)) or isinstance(reg_weight, bool) or not reg_weight >= 0:
        raise ValueError(f"reg_weight must be a number >= 0, got {reg_weight!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    num_steps = check_int("num_steps", num_steps, 1)
    num_passkeys = check_int("num_passkeys", num_passkeys, 1)
    passkey_length = check_int("passkey_length", passkey_length, 1)
    sink_size = check_int("sink_size", sink_size, 0)
    recent_size = check_int("recent_size", recent_size, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
    seed = check_int("seed", seed, 0)
    if num_samples is not None:
        num_samples = check_int("num_samples", num_samples, 1)
    if resume and output_dir is None:
        raise ValueError("resume=True needs output_dir (the checkpoint lives there)")
    layout = attention_layout(model)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device

    if tokenizer is None:
        specials = [getattr(model.config, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")]
        task = PasskeyTask.generated(layout.vocab_size or 0, num_passkeys=num_passkeys, seed=0,
                                     exclude=[s for s in specials if isinstance(s, int)])
    else:
        task = PasskeyTask.from_tokenizer(tokenizer, num_passkeys=num_passkeys, vocab_size=layout.vocab_size,
                                          filler_text=filler_text)
    tail = task.max_tail_length(num_passkeys, passkey_length)
    if context_lengths is None:
        context_lengths = _default_context_lengths(layout.max_positions, tail)
    context_lengths = sorted({int(c) for c in context_lengths})
    if not context_lengths:
        raise ValueError("context_lengths is empty")
    needles = task.max_needles_length(num_passkeys, passkey_length)
    if context_lengths[0] <= needles:
        raise ValueError(f"context length {context_lengths[0]} cannot hold {num_passkeys} needles of "
                         f"{passkey_length} words ({needles} tokens)")
    if layout.max_positions is not None and context_lengths[-1] + tail > layout.max_positions:
        raise ValueError(
            f"context length {context_lengths[-1]} plus the question/answer tail (up to {tail} tokens) exceeds the "
            f"model's max_position_embeddings={layout.max_positions}"
        )
    _check_attention_reaches_every_layer(model, layout, task, device)

    args = dict(
        num_steps=num_steps, context_lengths=context_lengths, num_passkeys=num_passkeys,
        passkey_length=passkey_length, sink_size=sink_size, recent_size=recent_size, reg_weight=float(reg_weight),
        lr=float(lr), seed=seed, batch_size=batch_size, num_samples=num_samples,
        task=task.mode, filler=task.filler_source,
        autocast_dtype=None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
    )

    # ---- state
    gates = torch.ones(layout.num_layers, layout.num_kv_heads, dtype=torch.float32, device=device,
                       requires_grad=True)
    optimizer = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, num_steps))
    history: list[dict[str, float]] = []
    start_step = 0
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume and out is not None and (out / CHECKPOINT_NAME).exists():
        start_step, history = _load_checkpoint(out / CHECKPOINT_NAME, args, gates, optimizer, scheduler)

    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    was_checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    started = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        bar = _progress(progress, start_step, num_steps)
        for step in range(start_step, num_steps):
            record = _train_step(model, task, gates, optimizer, args, step, device, autocast_dtype,
                                 gradient_checkpointing)
            scheduler.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            record["seconds"] = round(time.perf_counter() - started, 3)
            history.append(record)
            bar(step, record, gates)
            if out is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == num_steps):
                _save_checkpoint(out / CHECKPOINT_NAME, args, gates, optimizer, scheduler, step + 1, history)
    finally:
        if gradient_checkpointing and not was_checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
        for name, p in model.named_parameters():
            p.requires_grad_(saved_flags[name])

    masks = HeadMasks.from_gates(gates.detach().clamp(0.0, 1.0).double().cpu().numpy())
    if out is not None:
        masks.to_tsv(out / GATES_NAME)
        config = dict(args)
        config.update(
            model_type=getattr(model.config, "model_type", type(model).__name__),
            num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, num_heads=layout.num_heads,
            final_loss=history[-1]["loss"] if history else None,
            final_distill=history[-1]["distill"] if history else None,
            seconds=history[-1]["seconds"] if history else None,
            fraction_gates_above_half=float((masks.gates > 0.5).mean()),
        )
        _write_json(out / CONFIG_NAME, config)
        _write_json(out / HISTORY_NAME, history)
    return masks


def _check_attention_reaches_every_layer(model: torch.nn.Module, layout: AttentionLayout, task: PasskeyTask,
                                         device: torch.device) -> None:
    """A short forward through the gated function: every layer's attention must pass through it."""
    ids = torch.as_tensor(task.filler[:8], device=device)[None]
    gates = torch.ones(layout.num_layers, layout.num_kv_heads, device=device)
    with torch.no_grad(), gated_attention(model, gates, sink_size=1, recent_size=1) as state:
        try:
            gated_hidden_states(model, ids)
        except Exception as exc:  # noqa: BLE001 - reported with the model named
            raise ValueError(f"no attention found: {type(model).__name__} failed under the '{ATTENTION_NAME}' "
                             f"attention function ({type(exc).__name__}: {exc})") from exc
    missing = sorted(set(range(layout.num_layers)) - set(state.calls))
    if missing:
        raise ValueError(
            f"no attention found in layers {missing} of {type(model).__name__}: their attention does not go through "
            f"transformers' AttentionInterface, so it cannot be gated"
        )


def _train_step(model: torch.nn.Module, task: PasskeyTask, gates: torch.Tensor,
                optimizer: torch.optim.Optimizer, args: dict, step: int, device: torch.device,
                autocast_dtype: torch.dtype | None, gradient_checkpointing: bool) -> dict[str, float]:
    """One optimiser step on ``batch_size`` samples drawn from ``(seed, step)``."""
    key = step if args["num_samples"] is None else step % args["num_samples"]
    rng = np.random.default_rng([args["seed"], key])
    context_length = int(rng.choice(args["context_lengths"]))
    samples = [task.sample(rng, context_length, num_passkeys=args["num_passkeys"],
                           passkey_length=args["passkey_length"]) for _ in range(args["batch_size"])]
    optimizer.zero_grad(set_to_none=True)
    distill_total = 0.0
    for group in _equal_length_batches(samples, len(samples)):
        ids = torch.as_tensor(np.stack([s.input_ids for s in group]), device=device)
        positions = torch.as_tensor(group[0].label_positions, device=device)
        with torch.no_grad(), _autocast(device, autocast_dtype), gated_attention(
                model, None, sink_size=args["sink_size"], recent_size=args["recent_size"]):
            teacher = gated_hidden_states(model, ids)[:, positions].float()
        if gradient_checkpointing:
            model.train()
        with _autocast(device, autocast_dtype), gated_attention(
                model, gates, sink_size=args["sink_size"], recent_size=args["recent_size"]):
            student = gated_hidden_states(model, ids)[:, positions].float()
            distill = (teacher - student).pow(2).mean()
            (distill * (len(group) / len(samples))).backward()
        model.eval()
        distill_total += float(distill.detach()) * len(group) / len(samples)
    reg = gates.abs().mean()
    (args["reg_weight"] * reg).backward()
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    return {"step": step + 1, "loss": distill_total + args["reg_weight"] * float(reg.detach()),
            "distill": distill_total, "reg": float(reg.detach()), "lr": lr, "context_length": context_length}


def _progress(enabled: bool, start: int, total: int):
    """Progress: a tqdm bar when available, else a line every ~5% of the steps (to stderr)."""
    if not enabled:
        return lambda step, record, gates: None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="identify", unit="step", dynamic_ncols=True)

        def update(step: int, record: dict, gates: torch.Tensor) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4g}", distill=f"{record['distill']:.3g}",
                            gates=f"{float(gates.detach().mean()):.3f}")
            if step + 1 == total:
                bar.close()

        return update
    except ImportError:
        every = max(1, total // 20)

        def report(step: int, record: dict, gates: torch.Tensor) -> None:
            if (step + 1) % every == 0 or step + 1 == total:
                print(f"identify step {step + 1}/{total} loss {record['loss']:.4g} distill {record['distill']:.3g} "
                      f"mean gate {float(gates.detach().mean()):.3f} lr {record['lr']:.3g} {record['seconds']:.0f}s",
                      file=sys.stderr, flush=True)

        return report


def _save_checkpoint(path: Path, args: dict, gates: torch.Tensor, optimizer: torch.optim.Optimizer,
                     scheduler: Any, step: int, history: list) -> None:
    state = {
        "args": args, "step": step, "gates": gates.detach().cpu().clone(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, args: dict, gates: torch.Tensor, optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> tuple[int, list]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    differing = {k: (state["args"].get(k), v) for k, v in args.items() if state["args"].get(k) != v}
    if differing:
        raise ValueError(f"cannot resume from {path}: it was written with other arguments "
                         f"(checkpoint, now): {differing}")
    with torch.no_grad():
        gates.copy_(state["gates"].to(gates.device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return int(state["step"]), list(state["history"])


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
