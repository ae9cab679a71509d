"""Start-up times: compile(), the first generated token cold and warm, and load(package) to the first token, each
in a fresh process; the weights' read time at disk bandwidth as the bound of a load; steady-state prefill and
decode of the compiled and the loaded engine (they must agree).

    python benchmarks/start_bench.py --out DIR [--commit X]     # Llama-3-8B shape, random bf16 weights, CUDA
    python benchmarks/start_bench.py --out DIR --dry-run        # tiny Llama on the CPU (fp32), the same steps

Processes (each a new Python process, timed from its first line):
  cold   compile() (capture + passes); generate's first token with an empty Inductor cache folder; steady
         prefill / decode; export(backend="package") with its precompile
  warm   the same model and compile() again, Inductor finding the cold process's on-disk caches
  load   load(package) to the first token with empty Inductor and Triton cache folders (the package brings
         Inductor's compiled graphs and the duo ops' compiled Triton kernels); steady prefill / decode
Each process records the Triton kernels it compiled for its first token (those it did not find cached), and the
time of its next generate (``then_first_generate_s``, NEW tokens: the decode step's first use), so that a cold
first generate of NEW tokens is ``first_token_s + then_first_generate_s``.
``--profile``: the cold process also writes where its first token's time went (``start_cold_profile.txt``: a
cProfile of that call, which slows Python-heavy parts, and Inductor's own phase timings).
Disk: the package file read once after dropping it from the page cache where the OS allows (posix_fadvise),
its bytes / seconds reported as the read bandwidth and the time a load cannot beat.
Writes ``start_<device>.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

T0 = time.perf_counter()
# Run as a script, this folder comes first on sys.path, where kernels.py would shadow the ``kernels`` distribution
# that transformers imports; the checkout itself comes from PYTHONPATH (run_on_gpu.sh sets it).
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

ROLES = ("cold", "warm", "load")
PROMPT, NEW, STEADY_NEW = 512, 32, 64


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _model(dry_run: bool, dry_layers: int = 8):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if dry_run:
        config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=dry_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
        dtype, device = torch.float32, "cpu"
    else:  # Llama-3-8B
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             rope_theta=500000.0)
        dtype, device = torch.bfloat16, "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    return model, device


def _masks(model):
    """Half the KV heads retrieval heads. ``DUO_BENCH_MASKS=alternate`` (default): every other head of every layer,
    so all layers have the same split; ``random``: half of all heads at seeded random places, so the split varies
    from layer to layer as identified gates' does (layers whose splits differ are different programs to compile)."""
    import numpy as np

    import duo_compile

    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    kind = os.environ.get("DUO_BENCH_MASKS", "alternate")
    if kind == "random":
        gates = np.random.default_rng(0).random((layers, heads))
        return duo_compile.HeadMasks.from_gates(gates).binarize(sparsity=0.5)
    if kind != "alternate":
        raise SystemExit(f"DUO_BENCH_MASKS={kind!r}: expected 'alternate' or 'random'")
    gates = (np.arange(layers * heads).reshape(layers, heads) % 2).astype(float)  # half retrieval, every layer mixed
    return duo_compile.HeadMasks.from_gates(gates)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _steady(engine, ids, device) -> dict:
    """Second runs: prefill (one new token) and decode (per token, from STEADY_NEW tokens minus the first)."""
    _, first = _timed(lambda: engine.generate(ids, max_new_tokens=1), device)
    _, both = _timed(lambda: engine.generate(ids, max_new_tokens=STEADY_NEW), device)
    return {"prefill_s": first, "decode_ms_per_token": 1000 * (both - first) / (STEADY_NEW - 1)}


@contextlib.contextmanager
def _triton_compiles():
    """Yield a list that gets the name of every kernel binary Triton writes to its cache in this process (each one
    compiled here rather than found cached)."""
    names = []
    try:
        from triton.runtime.cache import FileCacheManager
    except ImportError:
        yield names
        return
    put = FileCacheManager.put

    def recording_put(self, data, filename, *args, **kwargs):
        if filename.endswith((".cubin", ".hsaco", ".so")):
            names.append(filename)
        return put(self, data, filename, *args, **kwargs)

    FileCacheManager.put = recording_put
    try:
        yield names
    finally:
        FileCacheManager.put = put


def _profiled(fn, path: str):
    """Run ``fn`` under cProfile; write the heaviest calls (cumulative and own time) and Inductor's phase timings
    to ``path``."""
    import cProfile
    import io
    import pstats

    from torch._dynamo.utils import compile_times

    profile = cProfile.Profile()
    profile.enable()
    try:
        return fn()
    finally:
        profile.disable()
        text = io.StringIO()
        for key in ("cumulative", "tottime"):
            pstats.Stats(profile, stream=text).sort_stats(key).print_stats(70)
        with open(path, "w") as f:
            f.write("Inductor phases (seconds):\n" + str(compile_times(repr="str", aggregate=True)) + "\n\n")
            f.write(text.getvalue())


def child(role: str, dry_run: bool, package: str, profile: str | None = None) -> dict:
    import torch

    import duo_compile

    result = {"role": role, "imports_s": time.perf_counter() - T0}
    if role == "load":
        engine, seconds = _timed(lambda: duo_compile.load(package), "cpu")
        result["load_s"] = seconds
        device = str(engine.device.type)
        result["compile_cache_loaded"] = engine.compile_cache_loaded
        result["load_parts_s"] = engine.load_seconds  # checks, program (deserialisation), weights, caches
        from duo_compile.export import package_export, package_triton

        result["package_triton_kernels"] = len(package_triton.by_folder(package_export.read_triton(package)))
    else:
        (model, device), seconds = _timed(lambda: _model(dry_run), "cpu")
        result["build_model_s"] = seconds
        max_len = 1024 if dry_run else 8192
        engine, seconds = _timed(lambda: duo_compile.compile(model, _masks(model), sink_size=64, recent_size=256,
                                                             max_seq_len=max_len), device)
        result["compile_s"] = seconds
        del model
    ids = torch.randint(0, engine.info.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    first = lambda: engine.generate(ids, max_new_tokens=1)  # noqa: E731
    if profile and role == "cold":
        first = lambda fn=first: _profiled(fn, profile)  # noqa: E731
        result["first_token_profiled"] = True  # its time includes cProfile's overhead
    with _triton_compiles() as compiled:
        _, seconds = _timed(first, device)
    result["first_token_s"] = seconds
    result["first_token_triton_compiles"] = compiled  # kernels Triton compiled in this process (not found cached)
    run = engine._run  # runtime/inductor_graph.py: the graphs it holds, and how many of them this process compiled
    result["first_token_graphs"] = {"held": run.held, "compiled_here": run.compiled}
    triton_cache = os.environ.get("TRITON_CACHE_DIR")
    if triton_cache and os.path.isdir(triton_cache):  # kernel folders after the first token (compiled or installed)
        result["triton_cache_folders"] = sum(not n.startswith("tmp.") for n in os.listdir(triton_cache))
    result["to_first_token_s"] = time.perf_counter() - T0
    # The first generate of NEW tokens after the first token: the decode step's graph (compiled, or read from the
    # package) and its CUDA graph capture; first_token_s + this is the first generate of NEW tokens.
    tokens, seconds = _timed(lambda: engine.generate(ids, max_new_tokens=NEW), device)
    result["first_tokens"], result["then_first_generate_s"] = tokens[0, PROMPT:].tolist(), seconds
    result.update(_steady(engine, ids, device))
    if role == "cold":
        _, seconds = _timed(lambda: duo_compile.export(engine, package, backend="package"), device)
        result["export_s"] = seconds
        result["package_bytes"] = os.path.getsize(package)
    from torch._dynamo.utils import counters

    result["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    result["device_name"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result["torch"] = torch.__version__
    return result


def read_bandwidth(path: str) -> dict:
    """Read ``path`` once (after asking the OS to drop it from the page cache): bytes, seconds, GB/s."""
    dropped = False
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                dropped = True
            except OSError:
                pass
        start = time.perf_counter()
        total = 0
        for block in iter(lambda: f.read(64 << 20), b""):
            total += len(block)
        seconds = time.perf_counter() - start
    return {"bytes": total, "read_s": seconds, "gb_per_s": total / seconds / 1e9, "page_cache_dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny Llama on the CPU")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--roles", default=",".join(ROLES),
                        help="comma-separated roles to run, in this order (load needs cold's package)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the cold process's first token into start_cold_profile.txt")
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--package", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        with open(args.result, "w") as f:
            profile = os.path.join(args.out, "start_cold_profile.txt") if args.profile else None
            json.dump(child(args.role, args.dry_run, args.package, profile), f)
        return
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "start_work") if args.dry_run else "/tmp/duo_start_bench"
    os.makedirs(work, exist_ok=True)
    package = os.path.join(work, "engine.pt2")
    caches = {"cold": os.path.join(work, "cache_cold"), "load": os.path.join(work, "cache_load")}
    caches["warm"] = caches["cold"]  # the second process finds the first one's caches
    for folder in set(caches.values()):
        subprocess.run(["rm", "-rf", folder], check=False)
    results = {"commit": args.commit, "dry_run": args.dry_run, "prompt": PROMPT,
               "caches": "Inductor and Triton cache folders: cold and load empty, warm the cold one's"}
    roles = args.roles.split(",")
    if set(roles) - set(ROLES):
        parser.error(f"--roles takes {','.join(ROLES)}, got {args.roles}")
    for role in roles:
        # Triton's own folder too: the duo ops' Triton kernels are compiled by Triton, outside Inductor's caches.
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(caches[role], "inductor"),
                   TRITON_CACHE_DIR=os.path.join(caches[role], "triton"))
        out = os.path.join(work, f"{role}.json")
        cmd = [sys.executable, __file__, "--out", args.out, "--role", role, "--package", package, "--result", out]
        cmd += ["--dry-run"] * args.dry_run + ["--profile"] * args.profile
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, check=False)
        if proc.returncode != 0:
            results[role] = {"error": f"exit status {proc.returncode}"}
            print(f"{role}: failed ({proc.returncode})", flush=True)
            continue
        with open(out) as f:
            results[role] = json.load(f)
        results[role]["process_s"] = time.perf_counter() - started
        print(role, json.dumps(results[role]), flush=True)
    if os.path.exists(package):
        results["disk"] = read_bandwidth(package)
        print("disk", json.dumps(results["disk"]), flush=True)
    cold, load = results.get("cold", {}), results.get("load", {})
    if "first_tokens" in cold and "first_tokens" in load:
        results["load_tokens_equal_compiled"] = cold["first_tokens"] == load["first_tokens"]
    device = "cpu" if args.dry_run else cold.get("device_name", "gpu").replace(" ", "_")
    path = os.path.join(args.out, f"start_{device}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", path, flush=True)


if __name__ == "__main__":
    main()
