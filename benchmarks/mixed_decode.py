"""Decode of a mixed-length batch: 8 rows at 4K..64K tokens, each at its own position, against equal-length batches.

Llama-3-8B shape (GQA 32/8), random bf16 weights, the authors' gate pattern at sparsity 0.5 (sink 64, recent 256),
inductor backend (decode steps replayed as CUDA graphs). The caches hold synthetic K/V (random values, no
prefill: a decode step reads the same bytes either way), so the whole run is compile + a few hundred steps. Every
batch runs on caches of the engine's ``max_seq_len`` (64K + 64), as ``generate`` allocates them.
Per batch, the median ms per decode step (5 trials of 20 steps), and the bound: (weight bytes + the KV bytes the
step reads) / the copy bandwidth measured in this run:

  mixed     8 rows at 4K, 8K, 16K, 24K, 32K, 40K, 48K, 64K, each at its own position (``cache_start`` per row)
  mean      8 rows all at the mixed batch's mean length (the same KV bytes read, balanced)
  longest   8 rows all at 64K (what a batch padded to its longest row would read)
  one-by-one  each length alone (batch 1), summed: what serving the 8 requests one after another costs per token

The question it answers: does a batch whose rows sit at different positions decode at the cost of its KV bytes
(near ``mean``), or at the cost of its longest row (``longest``: the split-K grid is sized for the longest row, and
a short row's programs finish early)? Also checks that the mixed step writes where it should: after the timed
steps, each row's retrieval cache slot at its own position holds the key of the last token, not the slots of any
other row's position. ``--full`` adds the same four batches on the all-retrieval engine (full attention; ~2x the
run time).

    python benchmarks/mixed_decode.py --out DIR [--full] [--commit SHA]     (one GPU: ~2 minutes; run_on_gpu.sh
                                                                             step mixed-decode)
Writes ``mixed_decode.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duo_compile  # noqa: E402
from duo_compile.masks import PATTERNS_DIR  # noqa: E402
from duo_compile.tools.bench import (  # noqa: E402
    RECENT, SHAPES, SINK, build_model, device_trials_ms, free_memory, kv_read_bytes, log, measure_ceilings,
    shape_masks, weight_bytes_per_token,
)

K = 1024
LENGTHS = [4 * K, 8 * K, 16 * K, 24 * K, 32 * K, 40 * K, 48 * K, 64 * K]


def step_ms(engine, starts: list[int]) -> tuple[float, list[float]]:
    """Median ms of a graphed decode step of ``len(starts)`` rows at those positions (5 trials of 20 steps)."""
    batch = len(starts)
    engine.allocate(batch)  # every batch at the engine's max_seq_len, as generate allocates (one graph shape)
    for cache in engine.caches:
        cache.normal_()
    token = torch.ones(batch, 1, dtype=torch.long, device=engine.device)
    positions = torch.tensor(starts)  # on the host: the step copies it into the graph's static buffer
    engine.step(token, positions)  # compile (once per engine) and capture
    torch.cuda.synchronize()
    trials = device_trials_ms(lambda: engine.step(token, positions), engine.device, repeat=5, inner=20)
    return trials[len(trials) // 2], trials


def check_writes(engine, starts: list[int]) -> bool:
    """One step at ``starts`` after zeroing the caches: each row's retrieval cache holds a key at its own position
    only (the other rows' positions in that row stay zero)."""
    batch = len(starts)
    engine.allocate(batch)
    for cache in engine.caches:
        cache.zero_()
    token = torch.ones(batch, 1, dtype=torch.long, device=engine.device)
    engine.step(token, torch.tensor(starts))
    torch.cuda.synchronize()
    spec, cache = next((s, c) for s, c in zip(engine.cache_specs, engine.caches) if s.kind == "retrieval")
    ok = True
    for b, p in enumerate(starts):
        written = cache[b].abs().sum(dim=(0, 2)) > 0  # [slots]
        ok &= bool(written[p]) and int(written.sum()) == 1
    return ok


def run(engine, masks, cfg, weights: int, copy_tbps: float, label: str) -> dict:
    mean = sum(LENGTHS) // len(LENGTHS)
    batches = {"mixed": LENGTHS, "mean": [mean] * 8, "longest": [max(LENGTHS)] * 8}
    out = {}
    for name, starts in batches.items():
        ms, trials = step_ms(engine, starts)
        kv = sum(kv_read_bytes(masks, cfg, p) for p in starts)
        out[name] = {"starts": starts, "ms": ms, "trials": trials, "kv_GB": kv / 1e9,
                     "bound_ms": (weights + kv) / (copy_tbps * 1e12) * 1e3}
        log(f"  {label} {name}: {ms:.3f} ms/step (bound {out[name]['bound_ms']:.3f}, KV read {kv / 1e9:.2f} GB)")
        engine.release()
        free_memory()
    singles = []
    for p in LENGTHS:
        ms, _ = step_ms(engine, [p])
        singles.append(ms)
        engine.release()
        free_memory()
    out["one-by-one"] = {"starts": LENGTHS, "ms_each": singles, "ms": sum(singles)}
    log(f"  {label} one-by-one: {sum(singles):.3f} ms for 8 tokens ({', '.join(f'{m:.2f}' for m in singles)})")
    out["writes_at_own_positions"] = check_writes(engine, LENGTHS)
    log(f"  {label} each row wrote only its own position: {out['writes_at_own_positions']}")
    engine.release()
    free_memory()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--full", action="store_true", help="also the all-retrieval (full attention) engine")
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    t0 = time.perf_counter()
    shape = SHAPES["llama3"]
    cfg = shape["config"]
    ceilings = measure_ceilings("cuda")
    log(f"{torch.cuda.get_device_name()}: copy {ceilings['copy_TBps']:.2f} TB/s")
    model = build_model(shape, max(LENGTHS) + 64)
    weights = weight_bytes_per_token(model)
    masks = shape_masks(shape, str(PATTERNS_DIR))
    engines = {"duo": masks}
    if args.full:
        engines["full"] = duo_compile.HeadMasks.all_retrieval(*masks.retrieval.shape)
    result = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "commit": args.commit, "shape": shape["name"],
              "sink": SINK, "recent": RECENT, "copy_TBps": ceilings["copy_TBps"], "weight_GB": weights / 1e9,
              "engines": {}}
    ok = True
    for label, engine_masks in engines.items():
        engine = duo_compile.compile(model, engine_masks, sink_size=SINK, recent_size=RECENT,
                                     max_seq_len=max(LENGTHS) + 64, backend="inductor")
        rows = run(engine, engine_masks, cfg, weights, ceilings["copy_TBps"], label)
        ok &= rows["writes_at_own_positions"]
        result["engines"][label] = rows
        del engine
        free_memory()
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "mixed_decode.json").write_text(json.dumps(result, indent=2))
    log(f"done in {result['seconds']:.0f} s; per-row writes {'ok' if ok else 'WRONG'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
