"""Retrieval heads per rank under tensor parallelism: the natural split vs the balanced placement, for the
authors' bundled patterns (binarised at a sparsity) at N ranks. No GPU: it counts heads.

    python -m benchmarks.tp_placement --out benchmarks/results [--sparsity 0.5] [--sizes 2 4 8]

Writes ``tp_placement.json`` (every layer's counts per rank) and ``tp_placement.md`` (the table). Columns: the
fullest rank's retrieval KV heads over the mean (1.0 = even) for the worst layer, summed over the layers (``step``:
what the slowest rank reads per decode step, since the ranks meet after every layer), and over the whole model
(``memory``: the rank holding the most retrieval KV); ``bound`` is the least ``step`` any placement can reach
(``ceil(r / N)`` per layer).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from duo_compile.masks import PATTERNS_DIR, HeadMasks
from duo_compile.parallel.placement import (
    balanced_placement,
    imbalance,
    natural_placement,
    rank_counts,
)


def rows(sparsity: float, sizes: list[int]) -> list[dict]:
    out = []
    for folder in sorted(p for p in PATTERNS_DIR.iterdir() if p.is_dir()):
        retrieval = HeadMasks.from_tsv(folder / "full_attention_heads.tsv").binarize(sparsity=sparsity).retrieval
        per_layer = retrieval.sum(axis=1)
        for size in sizes:
            row = {"pattern": folder.name, "layers": retrieval.shape[0], "kv_heads": retrieval.shape[1],
                   "ranks": size, "retrieval_heads": int(per_layer.sum()),
                   "bound_step": float(sum(math.ceil(r / size) for r in per_layer) / (per_layer.sum() / size))}
            for name, place in (("natural", natural_placement), ("balanced", balanced_placement)):
                placement = place(retrieval, size)
                result = imbalance(retrieval, placement)
                row[name] = {"worst_layer": max(result.per_layer), "step": result.step, "memory": result.memory,
                             "uneven_layers": int(sum(x > 1 for x in result.per_layer)),
                             "counts": rank_counts(retrieval, placement).tolist()}
            out.append(row)
    return out


def table(results: list[dict], sparsity: float) -> str:
    title = f"Retrieval KV heads per rank, max / mean (1.00 = even); authors' patterns binarised at sparsity {sparsity}."
    header = ("| pattern | ranks | worst layer natural / balanced | step natural / balanced (bound) | "
              "memory natural / balanced |")
    lines = [title, "", header, "|---|---|---|---|---|"]
    for r in results:
        n, b = r["natural"], r["balanced"]
        lines.append(f"| {r['pattern']} ({r['layers']}x{r['kv_heads']}) | {r['ranks']} | "
                     f"{n['worst_layer']:.2f} / {b['worst_layer']:.2f} | {n['step']:.3f} / **{b['step']:.3f}** "
                     f"({r['bound_step']:.3f}) | {n['memory']:.3f} / {b['memory']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    results = rows(args.sparsity, args.sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": f"python -m benchmarks.tp_placement --out {args.out} --sparsity {args.sparsity} --sizes "
                         + " ".join(map(str, args.sizes)), "sparsity": args.sparsity, "rows": results}
    (args.out / "tp_placement.json").write_text(json.dumps(record, indent=1, default=lambda x: np.asarray(x).tolist()))
    text = table(results, args.sparsity)
    (args.out / "tp_placement.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
