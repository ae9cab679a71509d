"""Needle (passkey) accuracy study: does DuoAttention with identified retrieval heads keep long-context retrieval?

One needle (a passkey of NATO words) per sample at a given depth of a haystack of filler; the question at the end
asks for it. A sample scores 1 when the greedy answer equals the passkey (teacher-forced argmax on every passkey
token, which is the same as greedy decoding being right). Conditions, as in the paper: full attention;
DuoAttention with the identified gates at several sparsities; all heads streaming; random head selection at the
same sparsities (mean over seeds); and heads ranked by the attention mass they put on the needle (the
attention-score baseline). Attention runs through :func:`duo_compile.identify.gated_attention` (token-exact
sink + recent window for streaming heads), so the study is independent of the compiler.
"""
from __future__ import annotations

import numbers
import sys
import time
from collections.abc import Iterable
from typing import Any, Sequence

import numpy as np
import torch

from duo_compile.identify.gated_attention import (
    attention_layout, autocast, equal_length_batches, gated_attention, gated_hidden_states, needle_attention_mass,
)
from duo_compile.checks import check_int
from duo_compile.masks import HeadMasks
from duo_compile.identify.passkey import PasskeySample, PasskeyTask

__all__ = ["DEFAULT_CONTEXT_LENGTHS", "DEFAULT_DEPTHS", "needle_samples", "passkey_accuracy", "needle_study",
           "goals", "plot_needle_study", "plot_gates"]

DEFAULT_CONTEXT_LENGTHS = (1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192)
DEFAULT_DEPTHS = tuple(round(d, 2) for d in np.linspace(0.05, 0.95, 10))


def needle_samples(task: PasskeyTask, context_lengths: Sequence[int], depths: Sequence[float],
                   samples_per_cell: int, *, passkey_length: int, seed: int) -> list[list[list[PasskeySample]]]:
    """``samples[c][d]``: ``samples_per_cell`` one-needle samples per (context length, depth) cell."""
    grid = []
    for c, context_length in enumerate(context_lengths):
        row = []
        for d, depth in enumerate(depths):
            rng = np.random.default_rng([seed, c, d])
            row.append([task.sample(rng, int(context_length), num_passkeys=1, passkey_length=passkey_length,
                                    depths=[depth]) for _ in range(samples_per_cell)])
        grid.append(row)
    return grid


def passkey_accuracy(model: torch.nn.Module, samples: Sequence[PasskeySample], gates: Any, *, sink_size: int,
                     recent_size: int, batch_size: int = 16,
                     autocast_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: (fraction of answers exactly right, fraction of passkey tokens right), in ``samples`` order.

    gates: ``[layers, kv_heads]`` (binary for the study) or None for full attention. Only the hidden states at
    answer positions go through the lm_head.
    """
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    exact = {}
    tokens = {}
    with torch.no_grad(), autocast(device, autocast_dtype), gated_attention(
            model, gates, sink_size=sink_size, recent_size=recent_size):
        for group in equal_length_batches(samples, batch_size):
            ids = torch.as_tensor(np.stack([s.input_ids for s in group]), device=device)
            hidden = gated_hidden_states(model, ids)
            for row, s in enumerate(group):
                answers = s.answer_positions
                positions = torch.as_tensor(np.concatenate(answers), device=device)
                predicted = head(hidden[row, positions]).argmax(-1)
                correct = (predicted == ids[row, positions + 1]).cpu().numpy()
                bounds = np.cumsum([0] + [len(a) for a in answers])
                exact[id(s)] = float(np.mean([correct[a:b].all() for a, b in zip(bounds[:-1], bounds[1:])]))
                tokens[id(s)] = float(correct.mean())
    return np.array([exact[id(s)] for s in samples]), np.array([tokens[id(s)] for s in samples])


def _as_list(name: str, values: Any, allow_empty: bool = False) -> list:
    """``values`` (a list, tuple, array...) as a list; a ValueError naming ``name`` for a string, a scalar or
    (unless ``allow_empty``) an empty one."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list, got {values!r}")
    values = list(values)
    if not values and not allow_empty:
        raise ValueError(f"{name} is empty, got {values!r}")
    return values


def _fractions(name: str, values: Any, allow_empty: bool = False) -> list[float]:
    values = _as_list(name, values, allow_empty)
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name}[{i}] must be a number in [0, 1], got {v!r}")
    return [float(v) for v in values]


def needle_study(
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    gates: HeadMasks,
    context_lengths: Sequence[int] = DEFAULT_CONTEXT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples_per_cell: int = 4,
    passkey_length: int = 5,
    sink_size: int = 64,
    recent_size: int = 256,
    sparsities: Sequence[float] = (0.5, 0.75),
    random_seeds: Sequence[int] = (0, 1, 2),
    calibration_samples: int = 32,
    seed: int = 0,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every condition on the same samples; returns a JSON-safe dict (see :func:`goals` for the verdict).

    gates: the identified (not necessarily binary) gates; binarised here at each sparsity.
    Every argument is checked first (a ValueError naming it), before any sample is drawn or the model runs.
    """
    context_lengths = [check_int(f"context_lengths[{i}]", c, 1)
                       for i, c in enumerate(_as_list("context_lengths", context_lengths))]
    depths = _fractions("depths", depths)
    samples_per_cell = check_int("samples_per_cell", samples_per_cell, 1)
    passkey_length = check_int("passkey_length", passkey_length, 1)
    sink_size = check_int("sink_size", sink_size, 0)
    recent_size = check_int("recent_size", recent_size, 1)
    sparsities = _fractions("sparsities", sparsities, allow_empty=True)
    random_seeds = [check_int(f"random_seeds[{i}]", r, 0)
                    for i, r in enumerate(_as_list("random_seeds", random_seeds, allow_empty=True))]
    calibration_samples = check_int("calibration_samples", calibration_samples, 1)
    seed = check_int("seed", seed, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    if not isinstance(gates, HeadMasks):
        raise ValueError(f"gates must be HeadMasks, got {type(gates).__name__}")
    layout = attention_layout(model)
    gates.check_shape(layout.num_layers, layout.num_kv_heads)
    if tokenizer is None:
        specials = [getattr(model.config, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")]
        task = PasskeyTask.generated(layout.vocab_size or 0, num_passkeys=1, seed=0,
                                     exclude=[s for s in specials if isinstance(s, int)])
    else:
        task = PasskeyTask.from_tokenizer(tokenizer, num_passkeys=1, vocab_size=layout.vocab_size)
    grid = needle_samples(task, context_lengths, depths, samples_per_cell, passkey_length=passkey_length,
                          seed=seed)
    flat = [s for row in grid for cell in row for s in cell]
    if layout.max_positions is not None and max(s.length for s in flat) > layout.max_positions:
        raise ValueError(f"samples of {max(s.length for s in flat)} tokens exceed the model's "
                         f"max_position_embeddings={layout.max_positions}")

    # The attention-score baseline is calibrated on other samples of the same distribution.
    rng = np.random.default_rng([seed, 1_000_003])
    calibration = [task.sample(rng, int(rng.choice(context_lengths)), num_passkeys=1,
                               passkey_length=passkey_length) for _ in range(calibration_samples)]
    mass = needle_attention_mass(model, calibration, batch_size=batch_size, autocast_dtype=autocast_dtype)
    mass_gates = HeadMasks.from_gates(mass / max(float(mass.max()), 1e-12))

    shape = (layout.num_layers, layout.num_kv_heads)
    conditions: dict[str, list[HeadMasks]] = {"full": [HeadMasks.all_retrieval(*shape)]}
    for s in sparsities:
        conditions[f"duo@{s:g}"] = [gates.binarize(sparsity=s)]
    conditions["streaming"] = [HeadMasks.all_streaming(*shape)]
    for s in sparsities:
        conditions[f"random@{s:g}"] = [HeadMasks.random(*shape, sparsity=s, seed=r) for r in random_seeds]
    for s in sparsities:
        conditions[f"attention@{s:g}"] = [mass_gates.binarize(sparsity=s)]

    results: dict[str, Any] = {}
    started = time.perf_counter()
    for name, variants in conditions.items():
        exact_runs, token_runs = [], []
        for masks in variants:
            exact, token = passkey_accuracy(model, flat, masks.gates, sink_size=sink_size, recent_size=recent_size,
                                            batch_size=batch_size, autocast_dtype=autocast_dtype)
            exact_runs.append(exact.reshape(len(context_lengths), len(depths), samples_per_cell).mean(-1))
            token_runs.append(float(token.mean()))
        grid_mean = np.mean(exact_runs, axis=0)
        results[name] = {
            "accuracy": float(grid_mean.mean()),
            "token_accuracy": float(np.mean(token_runs)),
            "grid": grid_mean.round(4).tolist(),
            "per_variant_accuracy": [float(g.mean()) for g in exact_runs],
            "retrieval_ratio": float(np.mean([m.retrieval_ratio for m in variants])),
            "retrieval_heads": [m.retrieval.astype(int).tolist() for m in variants],
        }
        if progress:
            print(f"needle {name:>14}: {results[name]['accuracy']:.3f} ({time.perf_counter() - started:.0f}s)",
                  file=sys.stderr, flush=True)
    return {
        "config": dict(context_lengths=[int(c) for c in context_lengths], depths=[float(d) for d in depths],
                       samples_per_cell=samples_per_cell, passkey_length=passkey_length, sink_size=sink_size,
                       recent_size=recent_size, sparsities=[float(s) for s in sparsities],
                       random_seeds=[int(r) for r in random_seeds], calibration_samples=calibration_samples,
                       seed=seed, task=task.mode, num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                       sample_tokens_max=int(max(s.length for s in flat))),
        "identified_gates": gates.gates.tolist(),
        "needle_attention_mass": mass.tolist(),
        "conditions": results,
        "summary": {name: round(r["accuracy"], 4) for name, r in results.items()},
        "goals": goals(results, sparsities),
        "seconds": round(time.perf_counter() - started, 1),
    }


def goals(results: dict[str, Any], sparsities: Sequence[float] = (0.5, 0.75)) -> dict[str, Any]:
    """The issue's bar: full >= 95%; duo@0.5 within 3 points of full; all streaming <= 30%; identified beats
    random at the same sparsity by >= 20 points."""
    acc = {name: r["accuracy"] for name, r in results.items()}
    out: dict[str, Any] = {
        "full_at_least_0.95": acc["full"] >= 0.95,
        "streaming_at_most_0.30": acc["streaming"] <= 0.30,
    }
    if "duo@0.5" in acc:
        out["duo@0.5_within_0.03_of_full"] = acc["full"] - acc["duo@0.5"] <= 0.03
    for s in sparsities:
        out[f"duo@{s:g}_beats_random_by_0.20"] = acc[f"duo@{s:g}"] - acc[f"random@{s:g}"] >= 0.20
    out["all_met"] = all(v for v in out.values())
    return out


def plot_needle_study(study: dict[str, Any], path: str) -> None:
    """Heatmaps of accuracy (context length x needle depth), one panel per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(study["conditions"])
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    contexts = study["config"]["context_lengths"]
    depths = study["config"]["depths"]
    image = None
    for ax, name in zip(axes.flat, names):
        grid = np.array(study["conditions"][name]["grid"]).T  # depth rows, context columns
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_title(f"{name}: {study['conditions'][name]['accuracy']:.0%}")
        ax.set_xticks(range(len(contexts)), [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts],
                      fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    cfg = study["config"]
    fig.suptitle(f"passkey retrieval (exact match), sink {cfg['sink_size']} + recent {cfg['recent_size']}, "
                 f"{cfg['samples_per_cell']} samples per cell")
    fig.colorbar(image, ax=axes, shrink=0.6)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gates(gates: HeadMasks, path: str, title: str = "identified gates") -> None:
    """Heatmap of gate values, layers x KV heads (1 = retrieval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * gates.num_kv_heads, 1.0 + 0.45 * gates.num_layers))
    image = ax.imshow(gates.gates, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (layer, head), value in np.ndenumerate(gates.gates):
        ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="black" if value > 0.5 else "white")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
