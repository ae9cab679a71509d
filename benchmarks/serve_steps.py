"""What one serving step costs, per engine: the two kinds of step ``Scheduler`` runs, timed alone.

serve_bench.py measures whole request streams; this script takes them apart, at the same shape and KV budget
(Llama-3-8B shape, random bf16 weights, the authors' gates at sparsity 0.5, sink 64 + recent 256, inductor):

  chunk    one request's prefill chunk of ``--chunk`` tokens on its own cache row (``Engine.step(rows=...)``),
           its row already holding ``start`` tokens, for each start in ``--starts``
  decode   one token for every slot at position ``--context`` (the CUDA-graphed decode step), the same step
           with only two rows real (``valid`` 0 elsewhere: what a step costs while most rows prefill), and the
           two rows alone in a decode step of batch 2 (what the scheduler runs when two requests are running)

with a kernel breakdown (torch.profiler) of the chunk at the last start and of the full decode step, so a slow step
shows which kernels it waits on. ``--page-size N`` compiles both engines with paged retrieval KV (each slot its own
run of pages, the engine's default block table), to compare the kernels reading through a block table with the
contiguous ones at the same shape and slots. Writes ``serve_steps.json`` under ``--out``.

    python benchmarks/serve_steps.py --out DIR            (one H100/H200, ~4 minutes; run_on_gpu.sh serve-steps)
    python benchmarks/serve_steps.py --dry-run --out DIR  (tiny shape on the CPU, eager: the same code path)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import duo_compile
from benchmarks.serve_bench import kv_budget
from duo_compile.masks import PATTERNS_DIR, HeadMasks
from duo_compile.tools.bench import (
    RECENT,
    SHAPES,
    SINK,
    build_model,
    device_ms,
    free_memory,
    kernel_breakdown,
    log,
    shape_masks,
)

K = 1024


def time_engine(engine, slots: int, chunk: int, starts: list[int], context: int, profile: bool) -> dict:
    """The chunk and decode timings above for ``engine`` with ``slots`` rows (allocated here)."""
    engine.allocate(slots)
    device, vocab = engine.device, engine.info.vocab_size
    ids = torch.randint(0, vocab, (1, chunk), device=device)
    token = torch.randint(0, vocab, (slots, 1), device=device)

    def run_chunk(start: int):
        return lambda: engine.step(ids, start, rows=slice(0, 1))

    every = torch.full((slots,), context, dtype=torch.long)
    two = torch.tensor([1, 1] + [0] * (slots - 2)) if slots > 2 else torch.ones(slots, dtype=torch.long)

    def run_decode(valid: torch.Tensor, rows: int = slots):
        return lambda: engine.step(token[:rows], every[:rows], valid[:rows], rows=slice(0, rows))

    began = time.perf_counter()
    run_chunk(starts[0])()  # compiles the prefill graph
    run_decode(torch.ones(slots, dtype=torch.long))()  # compiles the decode graph (and captures it)
    run_decode(two, min(2, slots))()  # the batch-of-two decode graph
    out = {"slots": slots, "warm_up_s": time.perf_counter() - began, "chunk_ms": {}, "decode_ms": {}}
    for start in starts:
        out["chunk_ms"][start] = device_ms(run_chunk(start), device)
        log(f"  chunk of {chunk} at {start}: {out['chunk_ms'][start]:.2f} ms")
    out["decode_ms"]["all_rows"] = device_ms(run_decode(torch.ones(slots, dtype=torch.long)), device, inner=5)
    out["decode_ms"]["two_rows"] = device_ms(run_decode(two), device, inner=5)
    out["decode_ms"]["batch_of_two"] = device_ms(run_decode(two, min(2, slots)), device, inner=5)
    log(f"  decode of {slots} rows at {context}: {out['decode_ms']['all_rows']:.2f} ms, two rows real: "
        f"{out['decode_ms']['two_rows']:.2f} ms, the two in a batch of two: {out['decode_ms']['batch_of_two']:.2f} ms")
    if profile:
        out["chunk_kernels"] = kernel_breakdown(run_chunk(starts[-1]), device, steps=2)
        out["decode_kernels"] = kernel_breakdown(run_decode(torch.ones(slots, dtype=torch.long)), device, steps=5)
        log(f"  chunk kernels: {json.dumps(out['chunk_kernels']['by_kind'])}")
        log(f"  decode kernels: {json.dumps(out['decode_kernels']['by_kind'])}")
    engine.release()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for serve_steps.json")
    p.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU (eager): checks the code path")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: 8K; dry run 16)")
    p.add_argument("--max-seq-len", type=int, default=None, help="cache row length (default: 33024; dry run 96)")
    p.add_argument("--context", type=int, default=None, help="decode position (default: 16K; dry run 40)")
    p.add_argument("--kv-gib", type=float, default=None,
                   help="KV budget of each engine in GiB (default: 45%% of the memory free after the weights)")
    p.add_argument("--page-size", type=int, default=0,
                   help="positions per retrieval KV page (default 0: unpaged, one max_seq_len row per slot)")
    p.add_argument("--commit", default="unknown", help="commit recorded with the results")
    args = p.parse_args(argv)
    if args.page_size < 0:
        p.error(f"--page-size must be an integer >= 0, got {args.page_size}")
    tiny = args.dry_run
    shape = SHAPES["tiny" if tiny else "llama3"]
    chunk = args.chunk or (16 if tiny else 8 * K)
    max_seq_len = args.max_seq_len or (96 if tiny else 32 * K + 256)
    context = args.context or (40 if tiny else 16 * K)
    starts = [s for s in range(0, max_seq_len - chunk + 1, chunk)][:4]
    if not starts or not 0 <= context < max_seq_len:
        p.error(f"--chunk {chunk} and --context {context} must fit --max-seq-len {max_seq_len}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(shape, max_seq_len)
    device = next(model.parameters()).device
    duo_masks = shape_masks(shape, None if tiny else str(PATTERNS_DIR))
    masks = {"duo": duo_masks, "full": HeadMasks.all_retrieval(*duo_masks.shape)}
    budget = kv_budget(args.kv_gib, device, 1 << 20)
    result = {"shape": shape["name"], "commit": args.commit, "torch": torch.__version__, "chunk": chunk,
              "max_seq_len": max_seq_len, "context": context, "kv_budget_gib": budget / 2**30,
              "page_size": args.page_size or None,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "engines": {}}
    for name in ("duo", "full"):
        log(f"compiling {name} ...")
        engine = duo_compile.compile(model, masks[name], sink_size=4 if tiny else SINK,
                                     recent_size=16 if tiny else RECENT, max_seq_len=max_seq_len,
                                     prefill_chunk_size=chunk, backend="eager" if tiny else "inductor",
                                     page_size=args.page_size or None)
        # As many whole max_seq_len rows as the budget holds (paged: the streaming row and the pages of one).
        slots = max(2, min(1024, budget // engine.planned_cache_bytes(1, max_seq_len)))
        result["engines"][name] = time_engine(engine, slots, chunk, starts, context, profile=device.type == "cuda")
        del engine
        free_memory()
    (out / "serve_steps.json").write_text(json.dumps(result, indent=1))
    log(f"wrote {out / 'serve_steps.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
