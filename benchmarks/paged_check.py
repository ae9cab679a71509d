"""Paged retrieval KV on the GPU: the Triton kernels through block tables, and the serving scheduler on a paged
engine with CUDA-graph decode, before timing anything (run_on_gpu.sh paged-check).

1. Kernels: the retrieval prefill, split-K decode and mixed-layer decode on page pools with a scrambled block
   table, against the reference on the contiguous caches (outputs within the dtype's tolerance, caches equal),
   bf16 and fp32, head dim 128, page sizes 16, 64 and 5 (tiles straddle pages), rows at their own positions.
2. Engines: a tiny random Llama with mixed masks and one with every head retrieval, compiled paged (inductor,
   CUDA graphs) and served by the scheduler from a pool small enough to preempt requests; greedy tokens must equal
   ``generate`` of each prompt alone on the same model compiled without paging (fp32).

Prints one line per case and exits non-zero on any failure.

    python benchmarks/paged_check.py              (a GPU, ~2 minutes)
    python benchmarks/paged_check.py --dry-run    (the CPU: Triton interpreter at tiny sizes, eager engines)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def check_kernels(device: str, dtype, head_dim: int, page_size: int, kind: str) -> bool:
    import torch

    from duo_compile.kernels import launchers, reference

    gen = torch.Generator().manual_seed(page_size)
    b, hkv, groups, sink, recent, capacity = 3, 3, 2, 4, 32, 30 * page_size
    n_r = 1 if kind == "mixed" else hkv
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)
    retrieval = [rand(b, n_r, capacity, head_dim) for _ in range(2)]
    per_row = capacity // page_size
    table = torch.randperm(b * per_row + 3, generator=gen)[: b * per_row].view(b, per_row).to(device, torch.int32)
    pools = []
    for cache in retrieval:
        pool = rand(b * per_row + 3, n_r, page_size, head_dim)
        pool[table.long()] = cache.view(b, n_r, per_row, page_size, head_dim).transpose(1, 2)
        pools.append(pool)
    streaming = [rand(b, hkv - n_r, sink + recent, head_dim) for _ in range(2)]
    streaming_paged = [c.clone() for c in streaming]
    starts = torch.tensor([0, 11, 3 * page_size], device=device)
    scale, err, same = head_dim**-0.5, 0.0, True
    for t, valid in ((40, [40, 29, 0]), (1, [1, 1, 1]), (5, [5, 0, 5]), (1, [1, 1, 1])):
        q, k, v = rand(b, hkv * groups, t, head_dim), rand(b, hkv, t, head_dim), rand(b, hkv, t, head_dim)
        valid = torch.tensor(valid, device=device)
        if kind == "mixed":
            args = (starts, valid, scale, n_r, sink, recent, False)
            ref = reference.attention_cached(q, k, v, *retrieval, *streaming, *args)
            out = launchers.triton_attention_cached(q, k, v, *pools, *streaming_paged, *args, block_table=table)
        else:
            ref = reference.retrieval_attention_cached(q, k, v, *retrieval, starts, valid, scale)
            out = launchers.triton_retrieval_attention_cached(q, k, v, *pools, starts, valid, scale,
                                                              block_table=table)
        for row, n in enumerate(valid.tolist()):
            if n:
                err = max(err, (out[row, :, :n].float() - ref[row, :, :n].float()).abs().max().item())
        for pool, cache in zip(pools, retrieval):
            same &= torch.equal(pool[table.long()].transpose(1, 2).flatten(2, 3), cache)
        starts = starts + valid
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    ok = err < tol and same
    print(f"{'ok ' if ok else 'BAD'} kernels {kind} {dtype} d={head_dim} page_size={page_size}: max err {err:.2e} "
          f"(tol {tol}), caches equal {same}", flush=True)
    return ok


def check_engine(device: str, backend: str, masks_kind: str) -> bool:
    import torch

    import duo_compile
    from duo_compile.serve.scheduler import Scheduler
    from duo_compile.serve.sequence import Sequence
    from tests.tiny_models import mixed_gates, tiny_model

    model = tiny_model("llama", True).to(device)
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    masks = (duo_compile.HeadMasks.from_gates(mixed_gates(layers, kv_heads)) if masks_kind == "mixed" else
             duo_compile.HeadMasks.all_retrieval(layers, kv_heads))
    sizes = {"sink_size": 4, "recent_size": 16, "max_seq_len": 160}
    plain = duo_compile.compile(model, masks, backend="eager", **sizes)
    paged = duo_compile.compile(model, masks, backend=backend, page_size=8, **sizes)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 96, (n,), generator=gen).tolist() for n in (30, 20, 7, 25, 12, 40)]
    new = [40, 60, 50, 45, 70, 30]
    want = [plain.generate(torch.tensor([p], device=device), max_new_tokens=n)[0, len(p):].tolist()
            for p, n in zip(prompts, new)]
    scheduler = Scheduler(paged, 4, token_budget=48, num_pages=16)  # 128 positions for 4 slots: preemptions
    sequences = [Sequence.from_generate_args(paged, p, max_new_tokens=n) for p, n in zip(prompts, new)]
    for seq in sequences:
        scheduler.add(seq)
    while scheduler.has_work():
        scheduler.step()
    same = sum(seq.tokens == w for seq, w in zip(sequences, want))
    graphed = sorted(paged._graphed)  # the decode batch sizes replayed from CUDA graphs
    ok = same == len(prompts) and scheduler.pages_used == 0 and scheduler.preemptions > 0 and \
        (graphed == scheduler.decode_batches or device == "cpu")
    print(f"{'ok ' if ok else 'BAD'} engine {masks_kind} masks, {backend}, {device}: {same}/{len(prompts)} requests "
          f"token-identical to generate alone, {scheduler.preemptions} preemptions, CUDA-graph decode batches {graphed}",
          flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU: interpreter kernels, eager engines")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    import duo_compile  # noqa: F401  (first: the checkout's kernels/ must not shadow transformers' kernels)

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    kernel_cases = ([(torch.float32, 16, 8, "retrieval"), (torch.float32, 16, 5, "mixed")] if args.dry_run else
                    [(dtype, 128, page, kind) for dtype in (torch.bfloat16, torch.float32) for page in (16, 64, 5)
                     for kind in ("retrieval", "mixed")])
    results = [check_kernels(device, *case) for case in kernel_cases]
    backend = "eager" if args.dry_run else "inductor"
    results += [check_engine(device, backend, masks) for masks in ("mixed", "full")]
    print(f"paged check: {results.count(False)} failure(s) of {len(results)}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
