"""Correctness on the GPU before timing anything: compiled engines (Triton kernels, CUDA graphs) vs the oracle.

Tiny random Llama/Qwen2 models (GQA and MHA) with mixed masks on CUDA, both backends, both streaming modes, whole
and chunked prefill; greedy tokens must equal the eager oracle's and scores agree within the dtype's tolerance.
Also exports an AOTInductor engine on CUDA, loads it and checks it against the compiled engine (when export
exists). Prints one line per case and exits non-zero on any failure.

    python benchmarks/gpu_check.py [--skip-inductor]
"""
from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for tests.tiny_models

import duo_compile  # noqa: E402
from duo_compile.oracle import oracle_generate  # noqa: E402
from tests.tiny_models import mixed_gates, tiny_model  # noqa: E402

PROMPT, NEW, SINK, RECENT = 200, 24, 8, 32


def check(arch, gqa, dtype, backend, mode, chunk, tol) -> bool:
    model = tiny_model(arch, gqa, dtype=dtype).cuda()
    masks = duo_compile.HeadMasks.from_gates(mixed_gates(3, model.config.num_key_value_heads))
    engine = duo_compile.compile(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=512,
                                 streaming_mode=mode, backend=backend)
    ids = torch.randint(0, 96, (2, PROMPT), device="cuda")
    out = engine.generate(ids, max_new_tokens=NEW, prefill_chunk_size=chunk, output_scores=True,
                          return_dict_in_generate=True)
    tokens, scores = oracle_generate(model.float(), masks, ids, NEW, sink_size=SINK, recent_size=RECENT,
                                     streaming_mode=mode, prefill_chunk_size=chunk)
    # Scores are compared while both decoded the same tokens (a bf16 near-tie may flip a later token).
    agree = (out.sequences[:, PROMPT:] == tokens[:, PROMPT:]).all(dim=0).int().cumprod(0)
    steps = max(1, int(agree.sum()))
    err = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(out.scores[:steps], scores[:steps]))
    same = int((out.sequences == tokens).all(dim=1).sum())
    ok = err < tol and (same == 2 or dtype != torch.float32)
    print(f"{'ok ' if ok else 'BAD'} {arch}-{'gqa' if gqa else 'mha'} {dtype} {backend} {mode} chunk={chunk}: "
          f"rel score err {err:.2e} (tol {tol}), rows token-identical {same}/2", flush=True)
    return ok


def check_aoti() -> bool:
    if not hasattr(duo_compile, "export"):
        print("skip AOTI: duo_compile.export not available")
        return True
    model = tiny_model("llama", True).cuda()
    masks = duo_compile.HeadMasks.from_gates(mixed_gates(3, 2))
    engine = duo_compile.compile(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=512, backend="eager")
    ids = torch.randint(0, 96, (2, PROMPT), device="cuda")
    want = engine.generate(ids, max_new_tokens=NEW)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        duo_compile.export(engine, str(Path(tmp) / "tiny.pt2"), backend="aoti")
        loaded = duo_compile.load(str(Path(tmp) / "tiny.pt2"))
        got = loaded.generate(ids.to(loaded.device), max_new_tokens=NEW)
    ok = torch.equal(got.cpu(), want.cpu())
    print(f"{'ok ' if ok else 'BAD'} AOTI engine on {loaded.device}: token-identical {ok} "
          f"({time.perf_counter() - t0:.1f} s export+load+generate)", flush=True)
    return ok


def main() -> int:
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    cases = [
        ("llama", True, torch.float32, "eager", "window", None, 1e-2),
        ("llama", True, torch.float32, "eager", "chunk", 64, 1e-2),
        ("qwen2", False, torch.float32, "eager", "window", 64, 1e-2),
        ("llama", True, torch.bfloat16, "eager", "window", 64, 3e-2),
        ("qwen2", True, torch.float16, "eager", "chunk", 64, 1e-2),
        ("llama", False, torch.bfloat16, "inductor", "window", 64, 3e-2),
    ]
    if "--skip-inductor" in sys.argv:
        cases = [c for c in cases if c[3] != "inductor"]
    ok = True
    for case in cases:
        try:
            ok &= check(*case)
        except Exception:
            traceback.print_exc()
            ok = False
    try:
        ok &= check_aoti()
    except Exception:
        traceback.print_exc()
        ok = False
    print("GPU CHECK", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
