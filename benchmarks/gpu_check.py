"""Correctness on the GPU before timing anything: compiled engines (Triton kernels, CUDA graphs) vs the oracle.

Tiny random Llama/Qwen2 models (GQA and MHA) with mixed masks on CUDA, both backends, both streaming modes, whole
and chunked prefill, on each streaming decode path (kernels.tuning.STREAMING_DECODE); greedy
tokens must equal the eager oracle's and scores agree within the dtype's tolerance.
Also exports an AOTInductor package on CUDA, loads it and checks it, in a fresh process per case: a control
(one Linear layer), the engine's graph through the stock one-model API, and the engine through
``duo_compile.export``/``load`` (tokens identical to the engine's): which of the three crash tells where a crash
comes from. Prints one line per case and exits non-zero on any failure.

``--padded`` (or ``--only-padded``) adds mixed-length batches: the Triton kernels with rows at their own positions
and counts of real tokens against each row alone (tests/ragged.py, bf16 and fp32 on CUDA, every launch path), and
engines (both backends, CUDA-graph decode, bf16 and fp32) on a left- or right-padded batch of prompts of 9..300
tokens (shorter than, around and far beyond sink + recent), each row against the oracle on that row alone.

    python benchmarks/gpu_check.py [--skip-inductor] [--skip-aoti | --only-aoti [--cpu]] [--padded | --only-padded]
"""
from __future__ import annotations

import functools
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


def check(arch, gqa, dtype, backend, mode, chunk, tol, streaming_decode="mixed") -> bool:
    from duo_compile.kernels import tuning

    tuning.STREAMING_DECODE = streaming_decode  # read at each launch: set before compiling
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
    print(f"{'ok ' if ok else 'BAD'} {arch}-{'gqa' if gqa else 'mha'} {dtype} {backend} {mode} chunk={chunk} "
          f"streaming decode {streaming_decode}: rel score err {err:.2e} (tol {tol}), rows token-identical {same}/2",
          flush=True)
    return ok


PADDED_LENGTHS = (300, 9, 40, 173)  # sink + recent = 40


def check_padded(arch, gqa, dtype, backend, mode, chunk, tol, side, streaming_decode="mixed") -> bool:
    """A padded batch of rows of PADDED_LENGTHS tokens: each row's new tokens and scores against the oracle on that
    row alone (scores compared while the tokens agree; fp32 must be token-identical), the input kept as given."""
    from duo_compile.kernels import tuning

    tuning.STREAMING_DECODE = streaming_decode
    model = tiny_model(arch, gqa, dtype=dtype).cuda()
    masks = duo_compile.HeadMasks.from_gates(mixed_gates(3, model.config.num_key_value_heads))
    engine = duo_compile.compile(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=512,
                                 streaming_mode=mode, backend=backend)
    width = max(PADDED_LENGTHS)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 96, (n,), generator=gen) for n in PADDED_LENGTHS]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, cols], mask[b, cols] = row, 1
    out = engine.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=NEW, prefill_chunk_size=chunk,
                          output_scores=True, return_dict_in_generate=True)
    ok = torch.equal(out.sequences[:, :width].cpu(), ids)
    worst, same = 0.0, 0
    for b, row in enumerate(rows):
        tokens, scores = oracle_generate(model.float(), masks, row[None].cuda(), NEW, sink_size=SINK,
                                         recent_size=RECENT, streaming_mode=mode, prefill_chunk_size=chunk)
        mine = out.sequences[b, width:]
        agree = (mine == tokens[0, len(row):]).int().cumprod(0)
        steps = max(1, int(agree.sum()))
        err = max(((a[b].float() - w[0]).norm() / w[0].norm()).item()
                  for a, w in zip(out.scores[:steps], scores[:steps]))
        worst = max(worst, err)
        same += int(bool(agree.all()))
    ok &= worst < tol and (same == len(rows) or dtype != torch.float32)
    print(f"{'ok ' if ok else 'BAD'} padded ({side}) {arch}-{'gqa' if gqa else 'mha'} {dtype} {backend} {mode} "
          f"chunk={chunk} streaming decode {streaming_decode}: rel score err {worst:.2e} (tol {tol}), rows "
          f"token-identical to the row alone {same}/{len(rows)}", flush=True)
    return ok


def check_ragged_kernels() -> bool:
    """The Triton launchers on CUDA with rows at their own positions and real-token counts, against each row alone
    through the reference (tests/ragged.py): decode, short and prefill chunks, every streaming decode path."""
    from duo_compile.kernels import launchers, tuning
    from tests.ragged import check_rows_alone

    runs = {"retrieval": launchers.triton_retrieval_attention_cached,
            "streaming": launchers.triton_streaming_attention_cached, "mixed": launchers.triton_attention_cached}
    ok = True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for starts, valid, length in (((7, 300, 0, 40), (1, 1, 0, 1), 1), ((3, 200, 0), (5, 2, 0), 5),
                                      ((0, 0, 0), (300, 129, 9), 300), ((400, 3, 170), (240, 111, 1), 240)):
            for kind, chunk_mode, decode in (("retrieval", False, "mixed"), ("streaming", False, "tiles"),
                                             ("streaming", False, "one"), ("streaming", True, "mixed"),
                                             ("mixed", False, "mixed"), ("mixed", True, "mixed")):
                tuning.STREAMING_DECODE = decode
                try:
                    check_rows_alone(runs[kind], kind, starts, valid, length, hkv=4 if kind == "mixed" else 2,
                                     groups=4, n_retrieval=2, sink=16, recent=64, chunk_mode=chunk_mode, d=128,
                                     dtype=dtype, rope=kind != "streaming", tol=tol, device="cuda")
                except AssertionError as error:
                    ok = False
                    print(f"BAD ragged kernels {kind} chunk_mode={chunk_mode} {decode} {dtype} T={length} "
                          f"starts={starts} valid={valid}: {error}", flush=True)
    tuning.STREAMING_DECODE = "mixed"
    print(f"{'ok ' if ok else 'BAD'} ragged kernels: rows at their own positions equal each row alone "
          f"(4 shapes x 6 paths x fp32/bf16)", flush=True)
    return ok


def _tiny_engine(device: str):
    """The engine the AOTI round trips export: tiny GQA Llama, mixed masks, eager backend."""
    masks = duo_compile.HeadMasks.from_gates(mixed_gates(3, 2))
    return duo_compile.compile(tiny_model("llama", True).to(device), masks, sink_size=SINK, recent_size=RECENT,
                               max_seq_len=512, backend="eager")


def aoti_child(kind: str) -> int:
    """One AOTI round trip on CUDA, in its own process (``--aoti-child KIND``): ``plain`` is a control (a Linear
    layer, no duo ops); ``engine-standard`` the engine's prefill graph through ``aoti_compile_and_package`` /
    ``aoti_load_package`` (one step); ``engine`` the engine through ``duo_compile.export`` / ``load`` (our
    two-model package) and ``generate``. Exit 0 when the loaded package reproduces the reference.
    ``--cpu`` runs the same on the CPU (a check of this script without a GPU)."""
    dev = "cpu" if "--cpu" in sys.argv else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / f"{kind}.pt2")
        if kind == "plain":
            model = torch.nn.Linear(16, 8).to(dev)
            x = torch.randn(4, 16, device=dev)
            program = torch.export.export(model, (x,))
            torch._inductor.aoti_compile_and_package(program, package_path=path)
            got, want = torch._inductor.aoti_load_package(path)(x), model(x)
            ok = torch.allclose(got, want, atol=1e-5)
        elif kind == "engine-standard":  # the engine's prefill graph through the stock one-model API
            from duo_compile.export.aoti_export import export_programs
            from duo_compile.export.engine_file import example_inputs

            engine = _tiny_engine(dev)
            program = export_programs(engine)["prefill"]
            torch._inductor.aoti_compile_and_package(program, package_path=path)
            print("  exported; loading", flush=True)
            compiled = torch._inductor.aoti_load_package(path)
            args = example_inputs(engine.cache_specs, 512, engine.dtype, dev, batch=2, length=5)
            args_copy = tuple(a.clone() for a in args)
            ok = torch.allclose(compiled(*args), engine.graph(*args_copy), atol=1e-4)
        else:
            engine = _tiny_engine(dev)
            ids = torch.randint(0, 96, (2, PROMPT), device=dev)
            want = engine.generate(ids, max_new_tokens=NEW)
            duo_compile.export(engine, path, backend="aoti")
            print("  exported; loading", flush=True)
            loaded = duo_compile.load(path)
            ok = torch.equal(loaded.generate(ids.to(loaded.device), max_new_tokens=NEW).cpu(), want.cpu())
    print(f"  {kind}: round trip {'reproduces' if ok else 'DIFFERS from'} the reference", flush=True)
    return 0 if ok else 1


def check_aoti() -> bool:
    """AOTI on CUDA, each case in a fresh process so that a crash (a segfault in the package loader was seen on
    torch 2.11) is reported with its exit status instead of ending this script."""
    import subprocess

    ok = True
    for kind in ("plain", "engine-standard", "engine"):
        t0 = time.perf_counter()
        flags = ["--cpu"] if "--cpu" in sys.argv else []
        proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--aoti-child", kind, *flags],
                              capture_output=True, text=True)
        good = proc.returncode == 0
        ok &= good
        print(f"{'ok ' if good else 'BAD'} AOTI {kind} on {'CPU' if flags else 'CUDA'}: exit status {proc.returncode} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        if not good:
            print("\n".join((proc.stdout + proc.stderr).splitlines()[-25:]), flush=True)
    return ok


def main() -> int:
    if "--aoti-child" in sys.argv:
        return aoti_child(sys.argv[sys.argv.index("--aoti-child") + 1])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"{gpu} torch {torch.__version__}", flush=True)
    cases = [
        ("llama", True, torch.float32, "eager", "window", None, 1e-2),
        ("llama", True, torch.float32, "eager", "chunk", 64, 1e-2),
        ("qwen2", False, torch.float32, "eager", "window", 64, 1e-2),
        ("llama", True, torch.bfloat16, "eager", "window", 64, 3e-2),
        ("qwen2", True, torch.float16, "eager", "chunk", 64, 1e-2),
        ("llama", False, torch.bfloat16, "inductor", "window", 64, 3e-2),
        # the other streaming decode paths (the default "mixed" above)
        ("llama", True, torch.float32, "eager", "window", 64, 1e-2, "one"),
        ("qwen2", False, torch.bfloat16, "inductor", "window", None, 3e-2, "one"),
        ("llama", True, torch.bfloat16, "eager", "window", 64, 3e-2, "tiles"),
    ]
    if "--skip-inductor" in sys.argv:
        cases = [c for c in cases if c[3] != "inductor"]
    if "--only-aoti" in sys.argv or "--only-padded" in sys.argv:
        cases = []
    padded = []
    if "--padded" in sys.argv or "--only-padded" in sys.argv:
        padded = [
            ("llama", True, torch.bfloat16, "eager", "window", 64, 3e-2, "left"),
            ("qwen2", False, torch.bfloat16, "eager", "chunk", 64, 3e-2, "right"),
            ("llama", True, torch.float32, "eager", "window", None, 1e-2, "left"),
            ("llama", False, torch.bfloat16, "inductor", "window", 64, 3e-2, "left"),
            ("qwen2", True, torch.bfloat16, "inductor", "chunk", None, 3e-2, "right"),
            ("llama", True, torch.bfloat16, "eager", "window", 64, 3e-2, "left", "tiles"),
            ("llama", True, torch.float32, "inductor", "window", 64, 1e-2, "left", "one"),
        ]
        if "--skip-inductor" in sys.argv:
            padded = [c for c in padded if c[3] != "inductor"]
    checks = [functools.partial(check, *case) for case in cases]
    checks += [check_ragged_kernels] if padded else []
    checks += [functools.partial(check_padded, *case) for case in padded]
    ok = True
    for run_check in checks:
        try:
            ok &= run_check()
        except Exception:
            traceback.print_exc()
            ok = False
    from duo_compile.kernels import tuning

    tuning.STREAMING_DECODE = "mixed"
    try:
        ok &= "--skip-aoti" in sys.argv or "--only-padded" in sys.argv or check_aoti()
    except Exception:
        traceback.print_exc()
        ok = False
    print("GPU CHECK", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
