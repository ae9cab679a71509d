"""Tensor parallelism on GPUs: decode, prefill and KV per GPU of a DuoAttention engine at TP=1 and TP=N, with the
balanced head placement and the natural one. Launched with torchrun (one process per GPU, NCCL):

    torchrun --nproc-per-node 2 -m benchmarks.tp_bench --out DIR [--shape llama3] [--contexts 524288]
        [--prefill 32768] [--backend inductor] [--commit SHA]
    torchrun --nproc-per-node 2 -m benchmarks.tp_bench --dry-run --out DIR   # tiny shape, CPU, gloo: a check

Random bf16 weights at Llama-3-8B shape (32 layers, 32 query / 8 KV heads) with the authors' Llama-3 pattern
binarised at sparsity 0.5, sink 64, recent 256 (as e2e.py). Engines, one after the other: TP=1 on rank 0 alone
(the others wait), then TP=N with the balanced placement, then TP=N with the natural one. ``--shape llama70b``:
Llama-3-70B shape (80 layers, 64 / 8 heads), too large for one GPU: every layer's random weights are views of one
layer's (so each rank can hold the model), the Llama-3-8B gates stretched over 80 layers; at 128K, TP=N
DuoAttention (balanced) against TP=N with every head retrieval (``full``). Each: decode ms/token
at every context (synthetic K/V in the caches, CUDA-graph steps, five trials of 20 steps; every rank times the
same steps, the slowest rank's median is the figure), one chunked prefill of ``--prefill`` tokens, and the KV
bytes each rank allocates at the context. Also per rank: retrieval KV heads held. Writes ``tp_<shape>.json``
(command, GPUs, versions, commit, every number) and prints a table with the goals (TP=N decode <= 0.6x TP=1;
balanced faster than natural).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import duo_compile
from duo_compile.masks import PATTERNS_DIR
from duo_compile.tools import bench

LLAMA70B = {
    "name": "Llama-3-70B shape (80 layers, GQA 64/8)",
    "config": {"vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "rope_theta": 500000.0},
    "pattern": "Llama-3-8B-Instruct-Gradient-1048k", "sparsity": 0.5, "chunk": 32 * 1024, "device": "cuda",
    "shared_layers": True,
}
SHAPES = {"llama3": bench.SHAPES["llama3"], "llama70b": LLAMA70B}
DEFAULTS = {"llama3": ([512 * 1024], "tp1,balanced,natural"), "llama70b": ([128 * 1024], "balanced,full")}
GOAL_RATIO = 0.6


def build_model(shape: dict, max_positions: int):
    """Random bf16 weights at the shape. With ``shared_layers`` (a model larger than one GPU) every layer's tensors
    are views of one layer's, so the model takes one layer's memory; the engine still holds a copy of its share of
    every layer (the passes copy what they keep), as it would of real weights."""
    if not shape.get("shared_layers"):
        return bench.build_model(shape, max_positions)
    layers = shape["config"]["num_hidden_layers"]
    one = bench.build_model({**shape, "config": {**shape["config"], "num_hidden_layers": 1}}, max_positions)
    model = bench.build_model({**shape, "device": "meta"}, max_positions)
    state = {}
    for name, tensor in one.state_dict().items():
        for i in range(layers) if ".layers.0." in name else [None]:
            state[name if i is None else name.replace(".layers.0.", f".layers.{i}.")] = tensor.view_as(tensor)
    model.load_state_dict(state, assign=True)
    for name, module in one.named_modules():  # non-persistent buffers (rotary inv_freq) are not in the state
        if ".layers." not in name:
            for key, buffer in module._buffers.items():
                model.get_submodule(name)._buffers[key] = buffer.clone()
    return model


def shape_masks(shape: dict):
    """The authors' Llama-3-8B gates, stretched over the shape's layers by relative depth when it has more (no
    pattern exists for them), binarised at the shape's sparsity; seeded random gates for the dry run."""
    import numpy as np

    from duo_compile.masks import HeadMasks

    if shape["pattern"] is None:
        return bench.shape_masks(shape, None)
    gates = HeadMasks.from_tsv(PATTERNS_DIR / shape["pattern"] / "full_attention_heads.tsv").gates
    layers = shape["config"]["num_hidden_layers"]
    stretched = gates[np.arange(layers) * gates.shape[0] // layers]
    return HeadMasks.from_gates(stretched).binarize(sparsity=shape["sparsity"])


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def gathered(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def measure(engine, contexts: list[int], prefill: int, chunk: int, vocab: int) -> dict:
    """Decode at each context and one chunked prefill, on every rank of the engine at once."""
    device = engine.device
    token = torch.tensor([[1]], device=device)
    result = {"decode": [], "prefill": {}}
    for context in contexts:
        row = {"context": context}
        try:
            engine.allocate(1, context + 1)
            for cache in engine.caches:
                cache.normal_()
            engine.step(token, context)  # compiles (inductor) and captures the decode graph
            bench.sync(device)
            trials = bench.device_trials_ms(lambda at=context: engine.step(token, at), device, repeat=5, inner=20)
            row["ms_trials"] = trials
            row["kv_GB"] = engine.kv_cache_bytes().total / 1e9
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        engine.release()
        bench.free_memory()
        result["decode"].append(row)
    if prefill:
        try:
            engine.allocate(1, prefill)
            ids = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(0)).to(device)
            engine.prefill(ids[:, : min(prefill, 2 * chunk)], chunk)  # warm-up: both prefill graphs
            result["prefill"] = {"tokens": prefill, "ms": bench.device_ms(lambda: engine.prefill(ids, chunk), device,
                                                                         repeat=1 if prefill > chunk else 3)}
        except torch.OutOfMemoryError:
            result["prefill"] = {"tokens": prefill, "error": "out of memory"}
        engine.release()
        bench.free_memory()
    return result


def run_engine(label: str, model, masks, args, shape: dict, size: int, placement: str) -> dict:
    if label == "full":
        masks = duo_compile.HeadMasks.all_retrieval(*masks.shape)
    t0 = time.perf_counter()
    engine = duo_compile.compile(model, masks, sink_size=bench.SINK, recent_size=bench.RECENT,
                                 max_seq_len=max(args.contexts) + 1 if args.contexts else args.prefill,
                                 backend=args.backend, check_memory=False, tensor_parallel_size=size,
                                 tensor_parallel_placement=placement)
    row = {"label": label, "tp": size, "placement": placement, "compile_s": time.perf_counter() - t0,
           "retrieval_kv_heads": int(engine.masks.retrieval.sum())}
    row.update(measure(engine, args.contexts, args.prefill, shape["chunk"], shape["config"]["vocab_size"]))
    del engine
    bench.free_memory()
    return row


def combine(rows: list[dict]) -> dict:
    """One engine's rows from every rank: the slowest rank's decode median (ranks wait for each other), each
    rank's KV and retrieval heads."""
    first = rows[0]
    out = {k: first[k] for k in ("label", "tp", "placement", "compile_s")}
    out["retrieval_kv_heads_per_rank"] = [r["retrieval_kv_heads"] for r in rows]
    out["decode"] = []
    for i, row in enumerate(first["decode"]):
        per_rank = [r["decode"][i] for r in rows]
        merged = {"context": row["context"]}
        if any("error" in p for p in per_rank):
            merged["error"] = "out of memory"
        else:
            medians = [p["ms_trials"][len(p["ms_trials"]) // 2] for p in per_rank]
            merged.update(ms_per_token=max(medians), ms_per_rank=medians, kv_GB_per_rank=[p["kv_GB"] for p in per_rank],
                          ms_trials_rank0=per_rank[0]["ms_trials"])
        out["decode"].append(merged)
    prefills = [r["prefill"] for r in rows]
    out["prefill"] = dict(prefills[0], ms=max(p.get("ms", float("nan")) for p in prefills)) if prefills[0] else {}
    return out


def summary(result: dict) -> list[str]:
    lines = ["| engine | context | decode ms/token (slowest rank) | per rank | KV GB per rank | prefill ms |",
             "|---|---|---|---|---|---|"]
    by_label = {e["label"]: e for e in result["engines"]}
    for e in result["engines"]:
        for row in e["decode"]:
            if "error" in row:
                lines.append(f"| {e['label']} | {row['context']} | {row['error']} | | | |")
                continue
            lines.append(f"| {e['label']} | {row['context']} | {row['ms_per_token']:.3f} | "
                         f"{', '.join(f'{m:.3f}' for m in row['ms_per_rank'])} | "
                         f"{', '.join(f'{g:.3f}' for g in row['kv_GB_per_rank'])} | {e['prefill'].get('ms', float('nan')):.1f} |")
    one, bal, nat, full = (by_label.get(k) for k in ("tp1", "balanced", "natural", "full"))
    for i, row in enumerate(bal["decode"] if bal else []):
        if "error" in row:
            continue
        if one and "ms_per_token" in one["decode"][i]:
            ratio = row["ms_per_token"] / one["decode"][i]["ms_per_token"]
            met = "met" if ratio <= GOAL_RATIO else "missed"
            lines.append(f"TP={bal['tp']} / TP=1 decode at {row['context']}: {ratio:.3f}x (goal <= {GOAL_RATIO}: {met})")
        if full and "ms_per_token" in full["decode"][i]:
            lines.append(f"DuoAttention / all retrieval (TP={bal['tp']}) decode at {row['context']}: "
                         f"{row['ms_per_token'] / full['decode'][i]['ms_per_token']:.3f}x")
        if nat and "ms_per_token" in nat["decode"][i]:
            lines.append(f"balanced / natural decode at {row['context']}: "
                         f"{row['ms_per_token'] / nat['decode'][i]['ms_per_token']:.3f}x (goal < 1)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3")
    parser.add_argument("--contexts", type=int, nargs="*", help="default: 524288 (llama3), 131072 (llama70b)")
    parser.add_argument("--prefill", type=int, default=32 * 1024, help="prompt tokens of the prefill (0: none)")
    parser.add_argument("--backend", choices=["inductor", "eager"], default="inductor")
    parser.add_argument("--engines", help="of tp1, balanced, natural, full; default: tp1,balanced,natural (llama3), "
                        "balanced,full (llama70b)")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU over gloo (a check)")
    args = parser.parse_args()
    contexts, engines = DEFAULTS[args.shape]
    args.contexts = contexts if args.contexts is None else args.contexts
    engines = (args.engines or engines).split(",")
    if set(engines) - {"tp1", "balanced", "natural", "full"}:
        parser.error(f"--engines takes tp1, balanced, natural, full; got {args.engines!r}")
    shape = SHAPES[args.shape]
    if args.dry_run:  # the tiny CPU shape, built as this shape is built
        tiny = bench.SHAPES["tiny"]
        shape = {**tiny, "shared_layers": shape.get("shared_layers", False)}
        args.contexts, args.prefill, args.backend = list(tiny["contexts"]), tiny["prefill"][0], "eager"
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    size, rank = dist.get_world_size(), dist.get_rank()
    masks = shape_masks(shape)
    import transformers

    meta = {"command": "torchrun --nproc-per-node {} -m benchmarks.tp_bench {}".format(size, " ".join(sys.argv[1:])),
            "ranks": size,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "commit": args.commit, "backend": args.backend,
            "model": shape["name"], "pattern": shape["pattern"], "sparsity": shape["sparsity"],
            "kv_note": "decode timings use synthetic (random) K/V in the caches, not a real prefill",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(str(meta))
    model = build_model(shape, max(max(args.contexts, default=0) + 1, args.prefill, 2048))
    result = {**meta, "engines": []}
    out = args.out / f"tp_{args.shape}{'_dry_run' if args.dry_run else ''}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    for label in engines:
        log(f"== engine {label}")
        if label == "tp1":  # rank 0 alone; the others wait
            row = run_engine(label, model, masks, args, shape, 1, "balanced") if rank == 0 else None
            dist.barrier()
            rows = [r for r in gathered(row) if r is not None]
        else:
            placement = "natural" if label == "natural" else "balanced"
            rows = gathered(run_engine(label, model, masks, args, shape, size, placement))
        result["engines"].append(combine(rows))
        if rank == 0:
            out.write_text(json.dumps(result, indent=1))
            log(json.dumps(result["engines"][-1]))
    if rank == 0:
        print("\n".join(summary(result)), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
