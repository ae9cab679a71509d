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

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from duo_compile.checks import check_int
from duo_compile.masks import HeadMasks
from duo_compile.models.hf import read_shape
from duo_compile.identify.passkey import PasskeyTask
from duo_compile.identify.gated_attention import (
    ATTENTION_NAME, AttentionLayout, attention_layout, autocast, equal_length_batches, gated_attention,
    gated_hidden_states,
)

__all__ = ["identify"]

CHECKPOINT_NAME = "checkpoint.pt"
GATES_NAME = "full_attention_heads.tsv"
CONFIG_NAME = "config.json"
HISTORY_NAME = "history.json"



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
        checkpointing and attention implementation are restored afterwards. Its sliding-window layers keep their
        window for every head, so their gates stay at 1 (gated_attention.py), except a window that holds the
        longest sample: that layer is trained as a full-attention one. A model with no layer to train is refused.
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
    # No sample is longer than `longest`: a window that long hides no key, its layer is a full-attention one (the
    # engine's rule for max_seq_len = longest); the other window layers' gates reach no output.
    longest = context_lengths[-1] + tail
    info = read_shape(model)
    window_layers = set(info.window_layers(longest))
    full_layers = [layer for layer in range(layout.num_layers) if layer not in window_layers]
    if not full_layers:
        windows = info.layer_windows
        raise ValueError(
            f"every layer of {type(model).__name__} has a sliding window ({min(windows)} to {max(windows)} tokens) "
            f"shorter than the longest sample ({longest} tokens: context length {context_lengths[-1]} plus the "
            f"question/answer tail): such a layer keeps its window for every head whatever its gate, so there are "
            f"no gates to identify (a layer whose window holds every sample is trained as a full-attention layer)"
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
                                 gradient_checkpointing, full_layers, longest)
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
                autocast_dtype: torch.dtype | None, gradient_checkpointing: bool,
                full_layers: list[int], longest: int) -> dict[str, float]:
    """One optimiser step on ``batch_size`` samples drawn from ``(seed, step)``, none longer than ``longest`` tokens
    (windows that long are full attention). The L1 term covers the gates of ``full_layers`` only: a sliding-window
    layer's gates reach no output, so nothing but that term would move them."""
    key = step if args["num_samples"] is None else step % args["num_samples"]
    rng = np.random.default_rng([args["seed"], key])
    context_length = int(rng.choice(args["context_lengths"]))
    samples = [task.sample(rng, context_length, num_passkeys=args["num_passkeys"],
                           passkey_length=args["passkey_length"]) for _ in range(args["batch_size"])]
    optimizer.zero_grad(set_to_none=True)
    distill_total = 0.0
    for group in equal_length_batches(samples, len(samples)):
        ids = torch.as_tensor(np.stack([s.input_ids for s in group]), device=device)
        positions = torch.as_tensor(group[0].label_positions, device=device)
        with torch.no_grad(), autocast(device, autocast_dtype), gated_attention(
                model, None, sink_size=args["sink_size"], recent_size=args["recent_size"], max_seq_len=longest):
            teacher = gated_hidden_states(model, ids)[:, positions].float()
        if gradient_checkpointing:
            model.train()
        with autocast(device, autocast_dtype), gated_attention(
                model, gates, sink_size=args["sink_size"], recent_size=args["recent_size"], max_seq_len=longest):
            student = gated_hidden_states(model, ids)[:, positions].float()
            distill = (teacher - student).pow(2).mean()
            (distill * (len(group) / len(samples))).backward()
        model.eval()
        distill_total += float(distill.detach()) * len(group) / len(samples)
    reg = gates[full_layers].abs().mean()
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

