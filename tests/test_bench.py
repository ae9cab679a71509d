"""``duo-compile bench`` (duo_compile/tools/bench.py): the end-to-end benchmark's code path on a CPU, and its refusals.

The numbers of a CPU run mean nothing; what is checked is that the benchmark the GPU runs measures every engine,
writes its JSON and plot, and prints each ratio beside its bound, so a mistake in it costs no device time.
"""
from __future__ import annotations

import json

import pytest
import torch

from duo_compile.cli import main


def test_bench_tiny_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--models", "tiny", "--out", str(out), "--sections", "decode,prefill", "--commit", "abc",
            "--streaming-decode", "mixed,one"]
    assert main(argv) == 0
    result = json.loads((out / "e2e_tiny.json").read_text())
    assert result["commit"] == "abc" and result["gpu"] == "cpu" and result["backend"] == "eager"
    assert 0 < result["retrieval_heads"] < result["kv_heads"]
    for label in ("full", "duo"):
        decode = result[label]["decode"]
        assert [row["context"] for row in decode] == [400, 800]
        assert all(row["ms_per_token"] > 0 and row["bound_ms"] > 0 for row in decode)
        assert all(len(row["ms_trials"]) == 5 and row["ms_per_token"] == row["ms_trials"][2] for row in decode)
        assert result[label]["prefill"][0]["ms"] > 0
    # The DuoAttention engine holds less KV than full attention (streaming heads keep sink + recent = 320 slots).
    assert result["duo"]["decode"][1]["kv_GB"] < result["full"]["decode"][1]["kv_GB"]
    # Both streaming decode kernels timed on the one DuoAttention engine; full attention has no streaming heads.
    from duo_compile.kernels import tuning

    assert tuning.STREAMING_DECODE == "mixed"  # the default again after the run
    assert result["streaming_decode"] == "mixed,one" and "decode_one" not in result["full"]
    assert [row["context"] for row in result["duo"]["decode_one"]] == [400, 800]
    assert result["hf"]["decode"][0]["ms_per_token"] > 0
    assert (out / "e2e.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| decode @ 800 |" in table and "| prefill 400 |" in table and "| decode @ 800, streaming one |" in table


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--models", "llama5"], "unknown --models"),
        (["--models", "tiny", "--sections", "decode,speed"], "unknown --sections"),
        (["--models", "tiny", "--streaming-decode", "tiles,fast"], "bad --streaming-decode 'tiles,fast'"),
        (["--models", "tiny,llama2"], "CUDA GPU" if not torch.cuda.is_available() else "mixes"),
    ],
)
def test_bench_refuses_bad_arguments_before_building(tmp_path, capsys, argv, message):
    assert main(["bench", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_bench_gpu_shapes_need_a_gpu(tmp_path, capsys):
    assert main(["bench", "--models", "llama3", "--patterns", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "need a CUDA GPU" in capsys.readouterr().err


def test_kernel_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/kernels.py --smoke: the decode, decode-tail, split-sweep, GEMV, retrieval-prefill and d64
    sections (checks, variant sweeps, JSON) under the interpreter at tiny sizes, so a mistake in the script shows
    here and not on the GPU. The script's main runs in this process, on a fresh copy of the module (--smoke
    rewrites its sizes)."""
    import importlib.util
    import sys

    out = tmp_path / "kernels.json"
    # main sets allow_tf32, which moves torch's fp32 matmul precision from "none" to "ieee": a setting Inductor's
    # graph cache keys on, so left changed it would make later tests' compiles miss the caches a fresh process has.
    matmul = torch.backends.cuda.matmul
    for name in ("fp32_precision", "allow_tf32"):
        if hasattr(matmul, name):
            monkeypatch.setattr(matmul, name, getattr(matmul, name))
            break
    spec = importlib.util.find_spec("benchmarks.kernels")
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    monkeypatch.setattr(sys, "argv", ["benchmarks/kernels.py", "--smoke", "--sections", "ceilings", "decode",
                                      "decode_tail", "split_sweep", "gemv", "retrieval", "d64", "--out", str(out)])
    kernels.main()
    result = json.loads(out.read_text())
    assert result["failures"] == [], result["failures"]
    assert {row["shape"] for row in result["decode"]} == {"gqa", "mha"}
    assert set(result["streaming_decode_us"]["gqa"]) >= {"one_n16", "tiles_n16", "default"}
    assert set(result["mixed_decode_us"]["mha"]) == {"50_one", "50_tiles", "50_mixed"}
    assert all(set(row["us"]) == {"default", "s3x2", "s3x5", "sdpa"} for row in result["decode_tail"])
    assert result["gemv"]["tiny"]["layers"][0]["best"] in {"n16k16", "n32k32"}
    sweep = {(row["shape"], row["retrieval_kv_heads"]): row for row in result["split_sweep"]}
    assert set(sweep) == {("gqa", 1), ("gqa", 2), ("mha", 1), ("mha", 2)}  # mixed layers and all-retrieval ones
    assert all(set(row["splits_us"]) == {"s3x2", "s3x4"} for row in sweep.values())
    assert all(set(row["combine_block_d_us"]) == {"8", "4"} for row in sweep.values())
    assert all("t16n16tma" in row["variants_ms"] for row in result["retrieval_prefill"])  # TMA loads checked too
    d64 = result["d64_prefill"]
    assert {row["shape"] for row in d64} == {"gqa", "mha"}
    assert all(set(row["variants"]) == {"t16n16", "t32n16tmabf"} and row["sdpa_rel_err"] < 1e-3 for row in d64)


def test_prefill_timing_warms_up_every_cache_length():
    """Each prefill length gets its own cache size, a new input shape for a compiled graph: the timed prefill
    must come after a warm-up at that size covering a cached chunk (two chunks), not only at the first length."""
    from duo_compile.tools import bench

    calls = []

    class Recorder:
        device = torch.device("cpu")

        def allocate(self, batch, length):
            calls.append(("allocate", length))

        def prefill(self, ids, chunk):
            calls.append(("prefill", ids.shape[1]))

        def release(self):
            calls.append(("release",))

    rows = bench.engine_prefill(Recorder(), vocab=10, lengths=[8, 20], chunk=4)
    assert [row["tokens"] for row in rows] == [8, 20] and all("ms" in row for row in rows)
    assert calls == [("allocate", 8), ("prefill", 8), ("prefill", 8), ("release",),
                     ("allocate", 20), ("prefill", 8), ("prefill", 20), ("release",)]


def test_decode_ratio_prints_three_decimals_and_the_trials_range():
    """1.5994 is under a 1.6x goal and must not print as 1.60x; the trials bound how far the ratio moves."""
    from duo_compile.tools.bench import decode_ratio

    full = {"ms_per_token": 19.799, "ms_trials": [19.70, 19.799, 19.90]}
    duo = {"ms_per_token": 12.379, "ms_trials": [12.30, 12.379, 12.45]}
    assert decode_ratio(full, duo) == "1.599x (1.582-1.618)"
    assert decode_ratio({"ms_per_token": 20.0}, {"ms_per_token": 12.5}) == "1.600x"


def test_serving_benchmarks_dry_run_on_cpu(tmp_path):
    """benchmarks/serve_bench.py and serve_steps.py --dry-run: the GPU runs' code paths (both engines, paged,
    warm-up, offline and online streams, step timings) at a tiny shape, so a mistake there costs no device time."""
    from benchmarks import serve_bench, serve_steps

    assert serve_bench.main(["--dry-run", "--out", str(tmp_path / "bench"), "--commit", "abc"]) == 0
    result = json.loads((tmp_path / "bench" / "serve_bench.json").read_text())
    assert set(result["engines"]) == {"duo", "full"} and (tmp_path / "bench" / "serve_bench.png").exists()
    for engine in result["engines"].values():
        assert engine["warm_up_s"] > 0
        assert all(engine[mode]["finished"] == result["requests"] for mode in ("offline", "online"))
    assert result["ratios"]["positions"] > 1  # DuoAttention's pages are smaller: more positions in the budget
    assert result["ratios"]["offline_roofline_estimate"] == result["roofline"]["ratio"] > 1
    assert serve_steps.main(["--dry-run", "--out", str(tmp_path / "steps"), "--page-size", "4"]) == 0
    steps = json.loads((tmp_path / "steps" / "serve_steps.json").read_text())
    for engine in steps["engines"].values():
        assert len(engine["chunk_ms"]) == 4 and set(engine["decode_ms"]) == {"all_rows", "two_rows", "batch_of_two"}


def test_serving_roofline_estimate():
    """benchmarks/serve_bound.py against hand-counted numbers: prefill FLOPs (linear layers, causal attention of
    retrieval heads over the prefix and streaming heads over sink + recent), decode steps set by how many requests
    a pool holds, each reading the weights and every token's KV."""
    from benchmarks.serve_bound import DEVICES, Stream, engine_seconds, main, stream_bound

    config = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=16, vocab_size=10)
    weights = 2 * (8 * 4 * (2 * 2 + 2 * 1) + 3 * 8 * 16) + 8 * 10  # q/k/v/o and the MLP per layer, then lm_head
    flops, bandwidth = DEVICES["h100"]
    prefill_only = engine_seconds(config, 0.5, 4, Stream([10], 0), positions=100, slots=8)
    pairs = 0.5 * 55 + 0.5 * (10 + 6 * 4)  # retrieval: 10*11/2 pairs; streaming: 1+2+3+4, then 4 per query
    assert prefill_only["prefill_s"] == pytest.approx((2 * weights * 10 + 4 * 4 * 2 * 2 * pairs) / flops)
    assert prefill_only["decode_s"] == 0
    decode = engine_seconds(config, 1.0, 4, Stream([1] * 6, 3), positions=8, slots=8)  # 2 requests of 4 at once
    kv = 2 * 2 * 2 * 1 * 4  # keys and values, 2 bytes, 2 layers, 1 KV head of 4
    assert (decode["concurrent"], decode["decode_steps"]) == (2, 9)
    assert decode["decode_s"] == pytest.approx((9 * 2 * weights + 6 * kv * (1 + 2 + 3)) / bandwidth)
    both = stream_bound(config, 0.5, 4, Stream([1] * 6, 3), {"duo": 16, "full": 8}, {"duo": 8, "full": 8})
    assert both["duo"]["decode_steps"] == 5 and both["ratio"] > 1  # twice the positions: 4 requests at a time
    with pytest.raises(SystemExit):
        main(["--requests", "0"])
