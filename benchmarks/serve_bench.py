"""Serving benchmark: a stream of long requests through the scheduler, DuoAttention vs every head retrieval, both
engines given the same KV cache memory budget (issue #22).

Llama-3-8B shape (GQA 32/8), random bf16 weights, the authors' gate pattern at sparsity 0.5 (sink 64, recent
256), inductor backend, paged retrieval KV (``--page-size``). Each engine splits the budget the same way
(serve/memory.py): a streaming row (sink + recent) for each of ``--max-num-seqs`` slots (default: every request),
the rest retrieval pages; DuoAttention's pages are half the bytes, so the same budget holds about twice as many
positions. Requests are admitted while their pages can be had and preempted (recomputed later) when the pool runs
out (serve/scheduler.py). The requests (random
token ids, prompt lengths drawn uniformly from ``--min-prompt``..``--max-prompt``, ``--output-tokens`` each,
greedy, no eos) run through ``Scheduler`` on one thread, the loop ``duo-compile serve`` runs minus HTTP:

  offline   every request queued at once; output tokens/s = all output tokens / time to the last one
  online    requests arriving at a fixed ``--rate`` per second (the same prompts); time to first token (TTFT)
            p50/p99 and inter-token latency (ITL) p50 from each request's arrival, tokens/s as offline

Each engine is compiled and warmed up (serve/warm_up.py, as the server does) before its runs, and each run stops
after ``--run-seconds`` (tokens/s then counts what finished in that time), so compiles never shorten a run.

Also, for scale, one request at a time: the first request alone through the DuoAttention engine's ``generate``
and through the Hugging Face model's own ``model.generate`` (sdpa, dynamic cache), their output tokens/s. The
bound on the throughput ratio is the ratio of positions the pools hold (decode-bound: the tokens per step scale
with the requests that fit; prefill, the same work for both, dilutes it); beside it the result records the
roofline estimate of this stream's ratio (serve_bound.py: prefill FLOPs at peak, decode bytes at bandwidth, the
decode steps set by how many requests each pool holds). Each run reports the most pages it held at once and its
preemptions. Writes ``serve_bench.json`` and
``serve_bench.png`` under ``--out``.

    python benchmarks/serve_bench.py --out DIR            (one H100/H200, ~9.5 minutes; run_on_gpu.sh serve-bench)
    python benchmarks/serve_bench.py --dry-run --out DIR  (tiny shape on the CPU, eager: the same code path)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duo_compile
from benchmarks.serve_bound import Stream, stream_bound
from duo_compile.masks import PATTERNS_DIR, HeadMasks
from duo_compile.serve.memory import KVPlan, plan_kv
from duo_compile.serve.scheduler import Scheduler
from duo_compile.serve.sequence import Sequence
from duo_compile.serve.warm_up import warm_up
from duo_compile.tools.bench import (
    RECENT,
    SHAPES,
    SINK,
    build_model,
    free_memory,
    log,
    shape_masks,
    sync,
)

K = 1024


def kv_budget(kv_gib: float | None, device: torch.device, cpu_bytes: int) -> int:
    """Each engine's KV budget in bytes: ``kv_gib`` if given, else 45% of the GPU memory free after the weights
    (caches freed first), else (CPU dry run) ``cpu_bytes``."""
    free_memory()
    if kv_gib is not None:
        return int(kv_gib * 2**30)
    if device.type == "cuda":
        return int(0.45 * torch.cuda.mem_get_info()[0])
    return cpu_bytes


def triton_builds() -> int:
    """Kernels in the Triton cache folder this process builds into (``TRITON_CACHE_DIR``, which Inductor points
    at its own folder when it first compiles, for the duo ops' kernels too; else Triton's default): how many a run
    built is the difference, a stall on a build mid-run shows there."""
    folder = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def percentile(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def run_stream(engine, plan: KVPlan, prompts: list[list[int]], output_tokens: int, rate: float | None,
               token_budget: int, deadline: float) -> dict:
    """Serve ``prompts`` (all at once when ``rate`` is None, else one every ``1/rate`` s); per-request timings,
    the most pages held at once and the preemptions."""
    scheduler = Scheduler(engine, plan.slots, token_budget=token_budget, num_pages=plan.pages)
    most_pages = 0
    times: dict[int, list[float]] = {}

    def record(update):
        if update.token is not None:
            times[update.sequence.id].append(time.perf_counter())

    sequences = [Sequence.from_generate_args(engine, p, on_update=record, max_new_tokens=output_tokens,
                                             eos_token_id=None) for p in prompts]
    for seq in sequences:
        times[seq.id] = []
    start = time.perf_counter()
    arrivals = [start + (0.0 if rate is None else i / rate) for i in range(len(sequences))]
    queued, finished, steps, timed_out = 0, 0, 0, False
    step_seconds: list[float] = []
    builds = triton_builds()
    while finished < len(sequences):
        now = time.perf_counter()
        if now > deadline:
            timed_out = True
            break
        while queued < len(sequences) and arrivals[queued] <= now:
            scheduler.add(sequences[queued])
            queued += 1
        if not scheduler.has_work():
            time.sleep(max(0.0, arrivals[queued] - now))
            continue
        began = time.perf_counter()
        for update in scheduler.step():
            if update.sequence.on_update is not None:
                update.sequence.on_update(update)
            finished += update.finish_reason is not None
        step_seconds.append(time.perf_counter() - began)
        steps += 1
        most_pages = max(most_pages, scheduler.pages_used)
    sync(engine.device)
    end = time.perf_counter()
    for seq in [*filter(None, scheduler.running), *scheduler.waiting]:
        scheduler.cancel(seq)
    ttft = [times[s.id][0] - arrivals[i] for i, s in enumerate(sequences) if times[s.id]]
    itl = [b - a for s in sequences for a, b in zip(times[s.id], times[s.id][1:])]
    done = [s for s in sequences if s.finish_reason == "length"]
    tokens = sum(len(s.tokens) for s in sequences)
    return {
        "requests": len(sequences), "finished": len(done), "timed_out": timed_out, "steps": steps,
        "seconds": end - start, "output_tokens": tokens, "output_tokens_per_s": tokens / (end - start),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99), "itl_p50_ms":
            None if not itl else 1e3 * percentile(itl, 50), "itl_p99_ms": None if not itl else 1e3 * percentile(itl, 99),
        "most_pages_used": most_pages, "pages": plan.pages, "preemptions": scheduler.preemptions,
        "slowest_steps_s": sorted(step_seconds)[-5:], "triton_builds": triton_builds() - builds,
    }


def one_at_a_time(generate, device, prompt: list[int], output_tokens: int) -> dict:
    """One request alone through ``generate`` (an engine's, or the Hugging Face model's): its output tokens/s."""
    ids = torch.tensor([prompt], device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = generate(ids, max_new_tokens=output_tokens, do_sample=False)
    sync(device)
    seconds = time.perf_counter() - t0
    new = out.shape[1] - len(prompt)
    return {"prompt_tokens": len(prompt), "output_tokens": new, "seconds": seconds, "output_tokens_per_s": new / seconds}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e in ("duo", "full") if e in result["engines"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.35
    for i, name in enumerate(engines):
        runs = result["engines"][name]
        label = f"{name} ({runs['pages']} pages of {runs['page_size']})"
        x = np.arange(2) + (i - 0.5) * width
        axes[0].bar(x, [runs["offline"]["output_tokens_per_s"], runs["online"]["output_tokens_per_s"]], width,
                    label=label)
        axes[1].bar(x, [runs["online"]["ttft_p50_s"] or 0, runs["online"]["ttft_p99_s"] or 0], width, label=label)
        axes[2].bar(x, [runs["online"]["itl_p50_ms"] or 0, runs["online"]["itl_p99_ms"] or 0], width, label=label)
    for ax, title, ticks in ((axes[0], "output tokens/s", ["offline", "online"]),
                             (axes[1], "online TTFT (s)", ["p50", "p99"]),
                             (axes[2], "online ITL (ms)", ["p50", "p99"])):
        ax.set_title(title)
        ax.set_xticks(range(2), ticks)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['shape']}: {result['requests']} requests, prompts {result['prompt_range']}, "
                 f"{result['output_tokens']} output tokens, KV budget {result['kv_budget_gib']:.3g} GiB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for serve_bench.json and serve_bench.png")
    p.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU (eager): checks the code path")
    p.add_argument("--requests", type=int, default=None, help="requests per run (default: 16; dry run 6)")
    p.add_argument("--min-prompt", type=int, default=None, help="shortest prompt (default: 8K; dry run 40)")
    p.add_argument("--max-prompt", type=int, default=None, help="longest prompt (default: 32K; dry run 120)")
    p.add_argument("--output-tokens", type=int, default=None, help="tokens per request (default: 256; dry run 8)")
    p.add_argument("--rate", type=float, default=None, help="online arrivals per second (default: 0.5; dry run 20)")
    p.add_argument("--kv-gib", type=float, default=None,
                   help="KV budget of each engine in GiB (default: 45%% of the memory free after the weights)")
    p.add_argument("--chunk", type=int, default=8 * K, help="longest prefill chunk per step (default: 8K)")
    p.add_argument("--page-size", type=int, default=None,
                   help="positions per retrieval KV page (default: 16; dry run 8)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="slots: requests running at once, if their pages fit (default: --requests)")
    p.add_argument("--engines", default="duo,full", help="which engines, of duo and full (default: duo,full)")
    p.add_argument("--deadline", type=float, default=540, help="seconds for the whole run (default: 540)")
    p.add_argument("--run-seconds", type=float, default=30,
                   help="longest offline or online run of an engine, counted after its warm-up (default: 30)")
    p.add_argument("--commit", default="unknown", help="commit recorded with the results")
    args = p.parse_args(argv)
    began = time.perf_counter()
    tiny = args.dry_run
    shape = SHAPES["tiny" if tiny else "llama3"]
    requests = args.requests or (6 if tiny else 16)
    low, high = args.min_prompt or (40 if tiny else 8 * K), args.max_prompt or (120 if tiny else 32 * K)
    output_tokens = args.output_tokens or (8 if tiny else 256)
    rate = args.rate or (20.0 if tiny else 0.5)
    sink, recent = (4, 16) if tiny else (SINK, RECENT)
    max_seq_len = high + output_tokens
    chunk = min(args.chunk, 32) if tiny else args.chunk
    page_size = args.page_size or (8 if tiny else 16)
    max_slots = args.max_num_seqs or requests
    for flag, value in (("--page-size", page_size), ("--max-num-seqs", max_slots), ("--requests", requests)):
        if value < 1:
            raise SystemExit(f"serve_bench.py: {flag} must be an integer >= 1, got {value}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(0)
    vocab = shape["config"]["vocab_size"]
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(low, high + 1, requests)]
    log(f"{shape['name']}: {requests} requests, prompts {low}..{high}, {output_tokens} output tokens")
    model = build_model(shape, max_seq_len)
    model.generation_config.eos_token_id = None  # random weights: every request runs to its length
    device = next(model.parameters()).device
    duo_masks = shape_masks(shape, None if tiny else str(PATTERNS_DIR))
    masks = {"duo": duo_masks, "full": HeadMasks.all_retrieval(*duo_masks.shape)}
    config = shape["config"]  # dry run: a budget that holds 3 all-retrieval rows
    budget = kv_budget(args.kv_gib, device, 3 * 2 * next(model.parameters()).element_size() *
                       config["num_hidden_layers"] * config["num_key_value_heads"] * max_seq_len *
                       (config["hidden_size"] // config["num_attention_heads"]))
    result = {"shape": shape["name"], "commit": args.commit, "device": torch.cuda.get_device_name() if
              device.type == "cuda" else platform.processor() or "cpu", "torch": torch.__version__,
              "requests": requests, "prompt_range": [low, high], "output_tokens": output_tokens, "rate": rate,
              "kv_budget_gib": budget / 2**30, "sparsity": shape["sparsity"], "sink": sink, "recent": recent,
              "chunk": chunk, "max_seq_len": max_seq_len, "page_size": page_size, "max_num_seqs": max_slots,
              "engines": {}}
    # The Hugging Face model itself, one request at a time (first: the engines' runs then share what is left).
    result["hf_generate_one_at_a_time"] = one_at_a_time(model.generate, device, prompts[0], output_tokens)
    log(f"model.generate one at a time: {json.dumps(result['hf_generate_one_at_a_time'])}")
    names = args.engines.split(",")
    for index, name in enumerate(names):
        end = began + args.deadline
        log(f"compiling {name} ...")
        engine = duo_compile.compile(model, masks[name], sink_size=sink, recent_size=recent, max_seq_len=max_seq_len,
                                     prefill_chunk_size=chunk, backend="eager" if tiny else "inductor",
                                     page_size=page_size)
        plan = plan_kv(engine, max_slots, kv_cache_memory=budget)
        slots = plan.slots
        runs = {"slots": slots, "pages": plan.pages, "page_size": page_size, "positions": plan.pages * page_size,
                "row_bytes": plan.row_bytes, "page_bytes": plan.page_bytes}
        log(f"{name}: {slots} slots, {plan.pages} pages of {page_size} positions "
            f"({plan.page_bytes / 2**20:.2f} MiB each); warm-up")
        warm = Scheduler(engine, slots, token_budget=chunk + slots, num_pages=plan.pages)
        runs["warm_up_s"] = warm_up(warm)  # what `duo-compile serve` runs before it listens
        for mode, mode_rate in (("offline", None), ("online", rate)):
            now = time.perf_counter()
            # Each run its own time after the warm-up (an engine's compiles do not eat its runs), within the deadline.
            until = min(now + args.run_seconds, end)
            runs[mode] = run_stream(engine, plan, prompts, output_tokens, mode_rate, chunk + slots, until)
            log(f"{name} {mode}: {json.dumps(runs[mode])}")
        reserve = (len(names) - 1 - index) * 3 * args.run_seconds  # roughly what the engines after this one need
        if name == "duo" and time.perf_counter() < end - reserve:
            engine.release()
            runs["one_at_a_time"] = one_at_a_time(engine.generate, device, prompts[0], output_tokens)
            log(f"{name} one at a time: {json.dumps(runs['one_at_a_time'])}")
        result["engines"][name] = runs
        engine.release()
        del engine, warm
        free_memory()
    if {"duo", "full"} <= result["engines"].keys():
        duo, full = result["engines"]["duo"], result["engines"]["full"]
        result["ratios"] = {
            "positions": duo["positions"] / full["positions"],
            **{f"{mode}_output_tokens_per_s": duo[mode]["output_tokens_per_s"] / full[mode]["output_tokens_per_s"]
               for mode in ("offline", "online")},
        }
        # The roofline estimate of this stream's ratio (serve_bound.py), from the pools' positions and slots.
        gpu = result["device"].lower()
        result["roofline"] = stream_bound(
            shape["config"], shape["sparsity"], sink + recent, Stream([len(p) for p in prompts], output_tokens),
            {name: result["engines"][name]["positions"] for name in ("duo", "full")},
            {name: result["engines"][name]["slots"] for name in ("duo", "full")},
            "h200" if "h200" in gpu else "h100")
        result["ratios"]["offline_roofline_estimate"] = result["roofline"]["ratio"]
        log(f"ratios duo/full: {json.dumps(result['ratios'])}")
    result["seconds"] = time.perf_counter() - began
    (out / "serve_bench.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "serve_bench.png")
    log(f"wrote {out / 'serve_bench.json'} and serve_bench.png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
