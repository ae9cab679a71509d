"""Needle (passkey) accuracy study of the bundled model: full attention vs DuoAttention vs the baselines.

    python benchmarks/needle.py                                   # bundled model + committed gates, CUDA if present
    python benchmarks/needle.py --samples-per-cell 1 --contexts 1024 2048 --device cpu   # a quick CPU look

Writes ``benchmarks/results/needle_results.json`` (every condition's accuracy grid, the goals of issue 4, the
command and device) and ``benchmarks/results/needle_heatmap.png`` (accuracy over context length x needle depth).
The committed results were produced on the H200 by ``scripts/train_passkey_model.py --study`` in the same run that
trained the model and identified its gates (see ``benchmarks/results/needle_README.md``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from duo_compile.identify.needle import DEFAULT_CONTEXT_LENGTHS, DEFAULT_DEPTHS, needle_study, plot_needle_study  # noqa: E402
from duo_compile.identify.passkey import load_passkey_gates, load_passkey_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the bundled passkey model")
    parser.add_argument("--gates-dir", type=Path, default=None, help="default: its committed identified gates")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXT_LENGTHS))
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    parser.add_argument("--samples-per-cell", type=int, default=8)
    parser.add_argument("--passkey-length", type=int, default=5)
    parser.add_argument("--sink-size", type=int, default=64)
    parser.add_argument("--recent-size", type=int, default=256)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    model, tokenizer = load_passkey_model(args.model_dir, device=device)
    gates = load_passkey_gates(args.gates_dir)
    study = needle_study(model, tokenizer, gates=gates, context_lengths=args.contexts, depths=args.depths,
                         samples_per_cell=args.samples_per_cell, passkey_length=args.passkey_length,
                         sink_size=args.sink_size, recent_size=args.recent_size, sparsities=args.sparsities,
                         batch_size=args.batch_size,
                         autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    study["command"] = " ".join(["python", *sys.argv])
    study["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "needle_results.json").write_text(json.dumps(study, indent=1) + "\n")
    plot_needle_study(study, str(args.out / "needle_heatmap.png"))
    print(json.dumps({"summary": study["summary"], "goals": study["goals"]}, indent=1))


if __name__ == "__main__":
    main()
