"""Source trees side by side on one machine: the cold first token, steady prefill and decode of the
Llama-3-8B-shaped engine (random bf16 weights, CUDA) built by each tree's duo_compile, in fresh processes taking
the trees in turn, with empty Inductor and Triton cache folders (odd rounds run the trees in reverse order).

    python benchmarks/tree_ab.py --out DIR --trees _base . [--rounds 2] [--profile]
    python benchmarks/tree_ab.py --out DIR --trees _base . --dry-run [--dry-layers 32]   # tiny Llama, CPU

A tree is a folder holding ``duo_compile/``, ``kernels/``, ``passes/`` and ``models/``: the checkout, or another
commit unpacked into an empty folder (``git archive <commit> duo_compile kernels passes models | tar -x -C _base``).
The engine's model and masks are this checkout's (``start_bench.py``'s). Each process reports, as one JSON line:
``first_token_s`` (compile included), ``first_generate_s`` (that, plus the next 32-token generate: the decode
step's graph), ``tokens`` (what that generate gave; ``same_tokens`` in the file: whether all processes agree),
``prefill_<n>_ms`` (medians of 7 single-token generates of n tokens),
``decode_ms`` (start_bench's steady decode per token, median of 3), and ``prefill_<n>_quiet_ms``: the
shortest prefill again after Inductor's compile workers are shut down and the process has slept, which tells a
slow host path from competition with work left running in the background. ``--profile``: each process also
writes ``profile_<tree>_<round>.txt``, the torch.profiler tables of three of the shortest prefills (by GPU time
and by host time). Writes ``tree_ab_<device>.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Run as a script, this folder comes first on sys.path, where kernels.py would shadow the ``kernels`` distribution
# that transformers imports; duo_compile comes from PYTHONPATH (the tree under test).
HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == HERE:
    sys.path.pop(0)

LENGTHS = (512, 2048, 8000)
DRY_LENGTHS = (16, 64, 200)  # --dry-run: the tiny model's max_seq_len is 1024


def _ms(start_bench, fn, device: str, repeats: int) -> float:
    """The median of ``repeats`` timed calls of ``fn``, in milliseconds (``start_bench._timed``)."""
    return statistics.median(1000 * start_bench._timed(fn, device)[1] for _ in range(repeats))


def _profile(start_bench, engine, ids, device: str, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(3):
            engine.generate(ids, max_new_tokens=1)
        start_bench._sync(device)
    table = prof.key_averages()
    with open(path, "w") as f:
        for key in ("self_cuda_time_total",) * cuda + ("self_cpu_time_total",):
            f.write(table.table(sort_by=key, row_limit=25, max_name_column_width=60) + "\n")


def _start_bench():
    """start_bench.py as a module (by path: putting this folder on sys.path would shadow ``kernels``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("start_bench", os.path.join(HERE, "start_bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _classes(engine) -> int | None:
    """How many region classes the engine's Inductor graph compiles (runtime/layer_regions.py; None for a tree
    that compiles the graph whole)."""
    classes = getattr(engine._run, "classes", None)
    return None if classes is None else len(classes)


def child(label: str, profile_path: str | None, dry_run: bool, dry_layers: int) -> dict:
    import torch

    import duo_compile

    start_bench = _start_bench()
    model, device = start_bench._model(dry_run, dry_layers)
    engine = duo_compile.compile(model, start_bench._masks(model), sink_size=64, recent_size=256,
                                 max_seq_len=1024 if dry_run else 8192)
    del model
    result = {"tree": label, "duo_compile": os.path.dirname(duo_compile.__file__),
              "masks": os.environ.get("DUO_BENCH_MASKS", "alternate"), "region_classes": _classes(engine)}
    lengths = DRY_LENGTHS if dry_run else LENGTHS
    seeded = torch.Generator().manual_seed(0)  # the same prompts in every process, so the trees' tokens compare
    prompt = {n: torch.randint(0, engine.info.vocab_size, (1, n), generator=seeded).to(device) for n in lengths}
    short = prompt[lengths[0]]
    _, result["first_token_s"] = start_bench._timed(lambda: engine.generate(short, max_new_tokens=1), device)
    # The next generate's first decode step compiles (or waits for) the decode graph: together, a cold first
    # generate of 32 tokens.
    out, then = start_bench._timed(lambda: engine.generate(short, max_new_tokens=32), device)
    result["first_generate_s"] = result["first_token_s"] + then
    result["tokens"] = out[0, short.shape[1]:].tolist()
    for n, ids in prompt.items():
        engine.generate(ids, max_new_tokens=1)  # a length's first call may pick its graph
        result[f"prefill_{n}_ms"] = _ms(start_bench, lambda ids=ids: engine.generate(ids, max_new_tokens=1), device, 7)
    result["decode_ms"] = statistics.median(start_bench._steady(engine, short, device)["decode_ms_per_token"]
                                            for _ in range(3))
    from torch._inductor.async_compile import shutdown_compile_workers

    shutdown_compile_workers()
    time.sleep(3)
    result[f"prefill_{lengths[0]}_quiet_ms"] = _ms(start_bench, lambda: engine.generate(short, max_new_tokens=1),
                                                   device, 7)
    if profile_path:
        _profile(start_bench, engine, short, device, profile_path)
    result["device_name"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result["torch"] = torch.__version__
    return result


def _same_tokens(rows: list[dict]) -> bool | None:
    """Whether every process that ran generated the same 32 tokens (same weights, masks and prompt; a check that
    the trees compute the same model, not a tolerance: bf16 rounding differences may flip a near-tie)."""
    tokens = [row["tokens"] for row in rows if "tokens" in row]
    return None if not tokens else all(t == tokens[0] for t in tokens)


def _link_parts(tree: str) -> None:
    """The links ``pip install -e .`` would stand for: duo_compile.kernels/.passes/.models from the tree's top."""
    for part in ("kernels", "passes", "models"):
        link = os.path.join(tree, "duo_compile", part)
        if not os.path.exists(link):
            os.symlink(os.path.join("..", part), link)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--trees", nargs="+", default=["_base", "."])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of the shortest prefills")
    parser.add_argument("--commit", default="unknown", help="recorded: the checkout's commit")
    parser.add_argument("--dry-run", action="store_true", help="tiny Llama on the CPU")
    parser.add_argument("--dry-layers", type=int, default=8, help="--dry-run: the tiny Llama's layers")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.profile_path, args.dry_run, args.dry_layers)), flush=True)
        return
    for tree in args.trees:
        if not os.path.isdir(os.path.join(tree, "duo_compile")):
            parser.error(f"--trees: {tree!r} holds no duo_compile/ folder")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for round_ in range(args.rounds):
        for tree in args.trees if round_ % 2 == 0 else args.trees[::-1]:  # neither tree always runs first
            _link_parts(tree)
            label = os.path.basename(os.path.abspath(tree))
            with tempfile.TemporaryDirectory() as caches:
                env = dict(os.environ, PYTHONPATH=os.path.abspath(tree),
                           TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
                           TRITON_CACHE_DIR=os.path.join(caches, "triton"))
                cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--child", label]
                cmd += ["--dry-run", "--dry-layers", str(args.dry_layers)] * args.dry_run
                if args.profile:
                    cmd += ["--profile-path", os.path.join(args.out, f"profile_{label}_{round_}.txt")]
                print(f"round {round_ + 1}/{args.rounds}: {tree}", flush=True)
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                rows.append({"tree": label, "round": round_, "error": proc.stderr[-2000:]})
            else:
                rows.append({**json.loads(lines[-1]), "round": round_})
            print(json.dumps(rows[-1]), flush=True)
    device = next((row["device_name"] for row in rows if "device_name" in row), "gpu").replace(" ", "_")
    path = os.path.join(args.out, f"tree_ab_{device}.json")
    with open(path, "w") as f:
        json.dump({"commit": args.commit, "trees": args.trees, "same_tokens": _same_tokens(rows), "rows": rows}, f,
                  indent=1)
    print("wrote", path, flush=True)


if __name__ == "__main__":
    main()
