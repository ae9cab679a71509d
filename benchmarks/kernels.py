"""Kernel benchmark on one CUDA GPU: correctness at real sizes, then speed against the physical ceilings.

Run from the repository root:  python -m benchmarks.kernels --out results.json [--commit SHA] [--sections ...]

Sections (all by default, in the order ceilings, decode, decode_tail, split_sweep, gemv, retrieval, streaming,
cached, formats, d64, flex):
  ceilings   device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate, measured here
  cached     the cached ops at real sizes against reference.py in fp32 (outputs and cache contents), several chunks
  decode     retrieval decode (split-K + combine) vs torch SDPA (enable_gqa=True, no k/v expansion) at
             8K/64K/256K/512K keys; effective bandwidth over KV bytes read vs the copy bandwidth. Both sides timed
             as CUDA-graph replays of several calls over rotating cache copies (more bytes than L2), so neither
             launch overhead nor L2 hits are counted. The launcher's own choice ("default") is timed after the
             variants (the first timing of a row pays a warm-up: benchmarks/DECISIONS.md#default-timed-last).
             Then the streaming decode (sink 64 + recent 256 cache, slot write fused) with its tile variants, and a
             mixed layer's decode (duo::attention_cached at 8K and 128K keys) on each STREAMING_DECODE path
  decode_tail  small decode reads (8K keys on Llama-2 heads, 64K on Llama-3) and the other shape at each size:
             kernel device times (profiler) of ours and SDPA beside the whole call's graph time, and split
             counts x pipeline stages
  split_sweep  one layer's decode at the e2e headline contexts (Llama-2 shape 120K, Llama-3 512K keys) per retrieval
             KV head count, every split count x 3 / 4 stages against the launcher's default, and the default
             with the combine split into 64- and 32-column blocks
  gemv       decode-time linear layers (one token) at the Llama-2-7B / Llama-3-8B weight shapes: cuBLAS
             (F.linear) vs the Triton GEMV (kernels/triton_gemv.py) and its tile variants, as CUDA-graph replays
             over rotating weight copies; TB/s over the weight bytes vs the copy bandwidth, and the weight time of
             one whole decode step (32 layers + lm_head) that each would give, also with q/k/v and gate/up fused
             into one matrix each (cuBLAS)
  retrieval  retrieval prefill (causal, 32K chunk) vs causal SDPA, TFLOP/s vs the matmul ceiling; tile sweep
  streaming  streaming prefill (sink 64, recent 256) at 32K/128K vs causal SDPA; tile sweep
  cached     (see above)
  formats    the cached checks again in fp16 (head dim 128) and at head dim 64 (bf16, fp16)
  d64        retrieval prefill at head dim 64 (bf16, fp16, 8K): each tile variant's error vs the fp32 reference
             beside SDPA's, per-row errors (worst row, by half of the query tile), time
  flex       FlexAttention (the same sink + window block mask, torch.compile'd) on the streaming-prefill shapes;
             last, because its compiles are the slowest part (skipped past --deadline)
Shapes: Llama-3-8B heads (32 q / 8 kv) and Llama-2-7B heads (32 / 32), head dim 128, bf16, batch 1; inputs are
contiguous [B, H, T, D]. Correctness: ||out - ref|| / ||ref|| < 1e-2 (bf16; fp16 2e-3) against fp32.
Timings: medians of CUDA-event timings after warm-up. No assertion on speed anywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

try:
    from duo_compile.kernels import launchers, ops, reference, triton_gemv, tuning  # noqa: F401  (ops: registers duo::)
    from duo_compile.kernels.tuning import TileConfig
except ImportError:  # a plain checkout (the GPU machine): import the kernels package from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in [m for m in sys.modules if m == "duo_compile" or m.startswith("duo_compile.")]:
        del sys.modules[name]
    from kernels import launchers, ops, reference, triton_gemv, tuning  # type: ignore[no-redef]  # noqa: F401
    from kernels.tuning import TileConfig  # type: ignore[no-redef]

SHAPES = {"llama3-8b": (32, 8), "llama2-7b": (32, 32)}
D = 128
DT = torch.bfloat16
SCALE = D**-0.5
SINK, RECENT = 64, 256
# ||out - ref|| / ||ref|| allowed per input dtype (the reference in fp32): the 1e-2 for bf16; fp16 keeps
# 3 more mantissa bits, so a tighter bound (benchmarks/DECISIONS.md#prefill-diagonal-one-stage); fp32 is the
# interpreter's smoke run.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def tol() -> float:
    return TOLERANCE[DT]
DEV = "cuda"
SIZES = {"cap": 16384, "chunks": (8192, 4096, 1, 1, 1), "s_chunks": (4096, 4096, 1, 1, 300), "decode": (8192, 65536, 262144, 524288),
         "mixed_decode": (8192, 131072),
         # decode_tail: small reads where launch gaps and the last wave weigh most (8K keys on Llama-2 heads,
         # 64K on Llama-3 heads; benchmarks/DECISIONS.md#decode-one-wave), then the other shape at each size
         "decode_tail": (("llama2-7b", 8192), ("llama3-8b", 65536), ("llama3-8b", 8192), ("llama2-7b", 65536)),
         "retrieval": 32768, "streaming": (32768, 131072), "ref_block": 2048, "dispatch": 512,
         "copy_bytes": 1 << 30, "mm": 8192, "d64": 8192}
RESULTS: dict = {}
FAILURES: list[str] = []


T0 = time.time()
DEADLINE = 1e9  # seconds after start; sections not begun by then are skipped (--deadline)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def check(name: str, err: float) -> float:
    ok = err < tol()  # NaN fails
    log(f"  check {name}: rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    if not ok:
        FAILURES.append(f"{name}: {err}")
    RESULTS.setdefault("checks", {})[name] = err
    return err


def poison(shape, dtype=DT):
    """Fill the allocator's next block of this size with NaN so an unwritten output cannot pass as correct."""
    x = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    del x


def bench(fn, rep_ms=100) -> float:
    if DEV == "cpu":  # --smoke: the interpreter; only checks that the script runs
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


MIN_GRAPH_CALLS = 8


def graph_time(calls, replays=20) -> float:
    """Median ms per call of a CUDA graph holding ``calls`` (a list of thunks, cycled to at least MIN_GRAPH_CALLS
    of them), replayed ``replays`` times.

    Why at least 8: a decode step replays one graph for every layer, so the graph's own launch is spread over
    dozens of kernels; a graph of one call would charge all of it to that call
    (benchmarks/DECISIONS.md#graph-min-calls)."""
    if DEV == "cpu":  # --smoke: each call once (only checks that the script runs)
        return bench(lambda: [c() for c in calls]) / len(calls)
    calls = [calls[i % len(calls)] for i in range(max(len(calls), MIN_GRAPH_CALLS))]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(calls))
    times.sort()
    return times[len(times) // 2]


def save(path):
    if path:
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


# ---------------------------------------------------------------- references (fp32, chunked over queries)


def ref_attention_fp32(q, k, v, key_index, visible, q_block=2048):
    """fp32 attention where query rows [q0, q1) see keys ``key_index(q0, q1)`` under ``visible(qpos, kidx)``."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for q0 in range(0, t, q_block):
        q1 = min(t, q0 + q_block)
        kidx = key_index(q0, q1)
        kk = k[:, :, kidx].float()
        vv = v[:, :, kidx].float()
        qq = q[:, :, q0:q1].float().reshape(b, hkv, g * (q1 - q0), d)
        s = torch.matmul(qq, kk.transpose(-1, -2)) * SCALE
        s = s.view(b, hkv, g, q1 - q0, -1)
        qpos = torch.arange(q0, q1, device=q.device)
        s = s.masked_fill(~visible(qpos[:, None], kidx[None, :]), float("-inf"))
        o = torch.matmul(torch.softmax(s, -1).view(b, hkv, g * (q1 - q0), -1), vv)
        out[:, :, q0:q1] = o.view(b, hq, q1 - q0, d)
    return out


def ref_causal(q, k, v, q_block=1024):
    return ref_attention_fp32(
        q, k, v, lambda q0, q1: torch.arange(0, q1, device=q.device), lambda qp, kp: kp <= qp, q_block
    )


def ref_streaming(q, k, v, sink, recent, q_block=2048):
    def key_index(q0, q1):
        lo = max(sink, q0 - recent + 1)
        return torch.cat([torch.arange(0, min(sink, q1), device=q.device), torch.arange(lo, q1, device=q.device)])

    return ref_attention_fp32(q, k, v, key_index, lambda qp, kp: (kp <= qp) & ((kp < sink) | (kp > qp - recent)), q_block)


def cache_rows(start: int, t: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached ops' per-row positions of ``batch`` rows all at ``start`` with ``t`` real tokens: (cache_start,
    valid), int64 ``[batch]`` on the device."""
    return (torch.full((batch,), start, dtype=torch.int64, device=DEV),
            torch.full((batch,), t, dtype=torch.int64, device=DEV))


def ref_cached_op(fn, q, k, v, kc, vc, pos, *args):
    """Run a reference cached op on fp32 copies; returns (out, k_cache, v_cache) in fp32."""
    kc32, vc32 = kc.to(torch.float32, copy=True), vc.to(torch.float32, copy=True)
    out = fn(q.float(), k.float(), v.float(), kc32, vc32, *pos, SCALE, *args)
    return out, kc32, vc32


# ---------------------------------------------------------------- sections


def section_ceilings():
    log("== ceilings")
    n = SIZES["copy_bytes"]
    src = torch.randn(n // 2, dtype=DT, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    copy_bw = 2 * n / ms / 1e9  # TB/s (read + write)
    del src, dst
    m = SIZES["mm"]
    a = torch.randn(m, m, dtype=DT, device=DEV)
    b_ = torch.randn(m, m, dtype=DT, device=DEV)
    ms_mm = bench(lambda: a @ b_)
    mm = 2 * m**3 / ms_mm / 1e9
    del a, b_
    RESULTS["ceilings"] = {"copy_TBps_read_plus_write": copy_bw, "bf16_matmul_TFLOPs_8192": mm}
    log(f"  copy {copy_bw:.2f} TB/s (read+write), bf16 matmul {mm:.0f} TFLOP/s")


def section_cached(tag: str = ""):
    """Cached ops against the reference, chunk after chunk, outputs and cache contents (both head shapes)."""
    log(f"== cached ops vs reference (fp32), several chunks {tag}")
    for shape, (hq, hkv) in SHAPES.items():
        # Retrieval: 8K prefill chunk, 4K chunk at start 8K, then 3 decode steps.
        cap = SIZES["cap"]
        kc = torch.randn(1, hkv, cap, D, dtype=DT, device=DEV)
        vc = torch.randn(1, hkv, cap, D, dtype=DT, device=DEV)
        start = 0
        for t in SIZES["chunks"]:
            q, k, v = (torch.randn(1, h, t, D, dtype=DT, device=DEV) for h in (hq, hkv, hkv))
            pos = cache_rows(start, t)
            ref_out, kref, vref = ref_cached_op(reference.retrieval_attention_cached, q, k, v, kc, vc, pos) if start > 0 else (None, None, None)
            poison(q.shape)
            out = launchers.triton_retrieval_attention_cached(q, k, v, kc, vc, *pos, SCALE)
            if ref_out is None:  # 8K x 8K fp32 reference through the chunked path
                ref_out = ref_causal(q, k, v)
                cache_ok = torch.equal(kc[:, :, :t], k) and torch.equal(vc[:, :, :t], v)
            else:
                cache_ok = torch.equal(kc.float(), kref) and torch.equal(vc.float(), vref)
            check(f"{tag}retrieval_cached/{shape}/start{start}/T{t}", rel_err(out, ref_out))
            check(f"{tag}retrieval_cache_contents/{shape}/start{start}/T{t}", 0.0 if cache_ok else float("nan"))
            start += t
        # Streaming, both modes: 4K chunks (longer than the ring), then decode steps (fused slot write).
        for chunk_mode in (False, True):
            kc = torch.randn(1, hkv, SINK + RECENT, D, dtype=DT, device=DEV)
            vc = torch.randn(1, hkv, SINK + RECENT, D, dtype=DT, device=DEV)
            start = 0
            for t in SIZES["s_chunks"]:
                q, k, v = (torch.randn(1, h, t, D, dtype=DT, device=DEV) for h in (hq, hkv, hkv))
                pos = cache_rows(start, t)
                ref_out, kref, vref = ref_cached_op(
                    reference.streaming_attention_cached, q, k, v, kc, vc, pos, SINK, RECENT, chunk_mode
                )
                poison(q.shape)
                out = launchers.triton_streaming_attention_cached(q, k, v, kc, vc, *pos, SCALE, SINK, RECENT, chunk_mode)
                mode = "chunk" if chunk_mode else "window"
                check(f"{tag}streaming_cached/{mode}/{shape}/start{start}/T{t}", rel_err(out, ref_out))
                cache_ok = torch.equal(kc.float(), kref) and torch.equal(vc.float(), vref)
                check(f"{tag}streaming_cache_contents/{mode}/{shape}/start{start}/T{t}", 0.0 if cache_ok else float("nan"))
                start += t
    if tag:
        return
    # Dispatch: the registered duo:: ops run the Triton kernels on CUDA.
    q, k, v = (torch.randn(1, h, SIZES["dispatch"], D, dtype=DT, device=DEV) for h in (32, 8, 8))
    a = torch.ops.duo.streaming_attention(q, k, v, SCALE, SINK, RECENT)
    b_ = launchers.triton_streaming_attention(q, k, v, SCALE, SINK, RECENT)
    if DEV == "cuda":  # on CPU the ops run the reference
        check("dispatch/duo::streaming_attention==triton", 0.0 if torch.equal(a, b_) else float("nan"))


FORMATS = ((torch.float16, 128), (torch.bfloat16, 64), (torch.float16, 64))


@contextlib.contextmanager
def in_format(dt: torch.dtype, d: int):
    """Run a section body at another dtype and head dim (the module's DT, D and SCALE), restored afterwards."""
    global D, DT, SCALE
    saved = D, DT, SCALE
    D, DT, SCALE = d, dt, d**-0.5
    try:
        yield
    finally:
        D, DT, SCALE = saved


def section_formats():
    """The cached-op checks again in the other supported formats: fp16, and head dim 64 (bf16 and fp16)."""
    for dt, d in FORMATS:
        with in_format(dt, d):
            section_cached(tag=f"{str(dt).removeprefix('torch.')}/d{d}/")


DECODE_VARIANTS = [  # (label, TileConfig overrides, programs per SM): the default's neighbours in every knob
    ("n64w4s3-x4", dict(block_n=64, num_warps=4, num_stages=3), 4),
    ("n64w4s4-x8", dict(block_n=64, num_warps=4, num_stages=4), 8),
    ("n64w4s2-x8", dict(block_n=64, num_warps=4, num_stages=2), 8),
    ("n64w4s3-x2", dict(block_n=64, num_warps=4, num_stages=3), 2),
    ("n64w4s4-x4", dict(block_n=64, num_warps=4, num_stages=4), 4),
    ("n64w4s4-x16", dict(block_n=64, num_warps=4, num_stages=4), 16),
    ("n32w4s4-x8", dict(block_n=32, num_warps=4, num_stages=4), 8),
    ("n64w2s4-x8", dict(block_n=64, num_warps=2, num_stages=4), 8),
    ("n128w4s3-x4", dict(block_n=128, num_warps=4, num_stages=3), 4),
    ("n128w8s2-x4", dict(block_n=128, num_warps=8, num_stages=2), 4),
    ("n64w4s3-x1", dict(block_n=64, num_warps=4, num_stages=3), 1),
]
STREAMING_DECODE_VARIANTS = [  # streaming decode of 1 token: (tiled kernel?, tile overrides)
    # one program per KV group walking [sink | ring | token] (triton_streaming.py; chunk mode's kernel)
    ("one_n64w4s3", False, dict(block_n=64, num_warps=4, num_stages=3)),
    ("one_n256w8s1", False, dict(block_n=256, num_warps=8, num_stages=1)),
    # one program per tile of it, then combine (triton_streaming_decode.py; window mode's default)
    ("tiles_n32w4", True, dict(block_n=32, num_warps=4)),
    ("tiles_n64w4", True, dict(block_n=64, num_warps=4)),
    ("tiles_n128w4", True, dict(block_n=128, num_warps=4)),
    ("tiles_n128w8", True, dict(block_n=128, num_warps=8)),
]


def _decode_inputs(hq: int, hkv: int, n_keys: int):
    """One decode step's inputs over ``n_keys`` cached keys (capacity n_keys + 1: the new token is appended), with
    enough cache copies (2 at least) to rotate over more than 4x L2: (q, k, v, k caches, v caches, pos, copies,
    KV bytes)."""
    kv_bytes = 2 * hkv * (n_keys + 1) * D * DT.itemsize
    copies = 2 if DEV == "cpu" else max(2, min(16, math.ceil(240e6 / kv_bytes)))
    kcs = [torch.randn(1, hkv, n_keys + 1, D, dtype=DT, device=DEV) for _ in range(copies)]
    vcs = [torch.randn(1, hkv, n_keys + 1, D, dtype=DT, device=DEV) for _ in range(copies)]
    q = torch.randn(1, 1, hq, D, dtype=DT, device=DEV).transpose(1, 2)  # [1, hq, 1, D], from a transpose
    k = torch.randn(1, hkv, 1, D, dtype=DT, device=DEV)
    v = torch.randn(1, hkv, 1, D, dtype=DT, device=DEV)
    return q, k, v, kcs, vcs, cache_rows(n_keys, 1), copies, kv_bytes


def section_decode():
    lengths = SIZES["decode"]
    log("== retrieval decode vs SDPA")
    copy_bw = RESULTS.get("ceilings", {}).get("copy_TBps_read_plus_write")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 2
    out_rows = []
    for shape, (hq, hkv) in SHAPES.items():
        groups = hq // hkv
        for n_keys in lengths:
            q, k, v, kcs, vcs, pos, copies, kv_bytes = _decode_inputs(hq, hkv, n_keys)
            # correctness (default config) against the fp32 reference, including the appended slot
            ref_out, kref, vref = ref_cached_op(reference.retrieval_attention_cached, q, k, v, kcs[0], vcs[0], pos)
            poison(q.shape)
            out = launchers.triton_retrieval_attention_cached(q, k, v, kcs[0], vcs[0], *pos, SCALE)
            check(f"decode/{shape}/{n_keys}", rel_err(out, ref_out))
            check(
                f"decode_append/{shape}/{n_keys}",
                0.0 if torch.equal(kcs[0][:, :, n_keys].float(), kref[:, :, n_keys]) else float("nan"),
            )
            del ref_out, kref, vref
            row = {"shape": shape, "keys": n_keys, "kv_MB": kv_bytes / 1e6, "copies": copies}
            best = None
            for label, over, per_sm in [*DECODE_VARIANTS, ("default", None, None)]:
                cfg = splits = None  # "default": what the launcher picks by itself (decode_config, decode_splits)
                if over is not None:
                    base = tuning.decode_config(q, groups)
                    cfg = TileConfig(block_t=base.block_t, heads_per=base.heads_per, **over)
                    progs = hkv * math.ceil(groups / cfg.heads_per)
                    splits = max(1, min(math.ceil(per_sm * sms / progs), math.ceil((n_keys + 1) / cfg.block_n), 256))
                try:
                    o = launchers.triton_retrieval_attention_cached(
                        q, k, v, kcs[0], vcs[0], *pos, SCALE, config=cfg, num_splits=splits
                    )
                    err = rel_err(o, out)
                    ms = graph_time([
                        (lambda i=i: launchers.triton_retrieval_attention_cached(
                            q, k, v, kcs[i], vcs[i], *pos, SCALE, config=cfg, num_splits=splits))
                        for i in range(copies)
                    ])
                except Exception as e:  # a config that does not compile is reported, not fatal
                    log(f"  {label}: failed {type(e).__name__}: {e}")
                    continue
                row[f"ours_{label}_us"] = ms * 1e3
                row[f"ours_{label}_splits"] = splits
                if err > tol():
                    FAILURES.append(f"decode variant {label} {shape} {n_keys}: {err}")
                if best is None or ms < best[1]:
                    best = (label, ms)
            sdpa = graph_time([
                (lambda i=i: F.scaled_dot_product_attention(q, kcs[i], vcs[i], scale=SCALE, enable_gqa=groups > 1))
                for i in range(copies)
            ])
            row.update(
                best=best[0], ours_us=best[1] * 1e3, sdpa_us=sdpa * 1e3,
                ours_TBps=kv_bytes / best[1] / 1e9, sdpa_TBps=kv_bytes / sdpa / 1e9,
            )
            if copy_bw:
                row["ours_frac_of_copy"] = row["ours_TBps"] / copy_bw
                row["sdpa_frac_of_copy"] = row["sdpa_TBps"] / copy_bw
            row["speedup_vs_sdpa"] = sdpa / best[1]
            out_rows.append(row)
            log(f"  {shape} {n_keys:>6} keys: ours {row['ours_us']:.1f} us ({row['ours_TBps']:.2f} TB/s, {best[0]}) "
                f"sdpa {row['sdpa_us']:.1f} us ({row['sdpa_TBps']:.2f} TB/s)")
            del kcs, vcs
            torch.cuda.empty_cache()
        section_streaming_decode(shape, hq, hkv)
        section_mixed_decode(shape, hq, hkv)
    RESULTS["decode"] = out_rows


def section_streaming_decode(shape: str, hq: int, hkv: int) -> None:
    """Streaming decode (sink + recent cache, slot write fused): latency-bound (it reads ~320 keys per KV head).
    The one-program kernel against the tiled one (a program per cache tile + combine), several tiles each;
    every variant checked against the reference (output and the written slot) before it is timed."""
    groups = hq // hkv
    kc = torch.randn(1, hkv, SINK + RECENT, D, dtype=DT, device=DEV)
    vc = torch.randn(1, hkv, SINK + RECENT, D, dtype=DT, device=DEV)
    q = torch.randn(1, hq, 1, D, dtype=DT, device=DEV)
    k = torch.randn(1, hkv, 1, D, dtype=DT, device=DEV)
    v = torch.randn(1, hkv, 1, D, dtype=DT, device=DEV)
    pos = cache_rows(100000, 1)
    ref_out, kref, _ = ref_cached_op(reference.streaming_attention_cached, q, k, v, kc, vc, pos, SINK, RECENT, False)
    row = {}
    for label, tiled, over in [*STREAMING_DECODE_VARIANTS, ("default", True, None)]:
        cfg = None
        if over is not None:
            base = tuning.decode_config(q, groups)
            cfg = TileConfig(block_t=base.block_t, heads_per=base.heads_per, **over)
        kcv, vcv = kc.clone(), vc.clone()

        def call(kcv=kcv, vcv=vcv, cfg=cfg, tiled=tiled):
            return launchers.triton_streaming_attention_cached(q, k, v, kcv, vcv, *pos, SCALE, SINK, RECENT, False,
                                                                 config=cfg, split_decode=tiled)

        try:
            err = rel_err(call(), ref_out)
            written = torch.equal(kcv.float(), kref)
            ms = graph_time([call])
        except Exception as e:  # a config that does not compile is reported, not fatal
            log(f"  streaming decode {label}: failed {type(e).__name__}: {e}")
            continue
        check(f"streaming_decode/{shape}/{label}", err if written else float("nan"))
        row[label] = ms * 1e3
    RESULTS.setdefault("streaming_decode_us", {})[shape] = row
    log(f"  {shape} streaming decode (sink {SINK} + recent {RECENT}), us: "
        + ", ".join(f"{key} {val:.1f}" for key, val in row.items()))


# A mixed layer's retrieval KV heads: the patterns' average at the e2e sparsities (Llama-2 0.75, Llama-3 0.5).
MIXED_RETRIEVAL_KV = {"llama3-8b": 4, "llama2-7b": 8}


def section_mixed_decode(shape: str, hq: int, hkv: int) -> None:
    """A mixed layer's one-token decode (``duo::attention_cached``: retrieval heads over the long cache plus
    streaming heads over sink + recent) on each path of ``tuning.STREAMING_DECODE``: "mixed" (one grid, one
    combine: 2 launches), "tiles" (each group's split kernel and combine: 4), "one" (3). Each is checked against
    the reference (output and both caches) before it is timed, rotating cache copies beyond L2."""
    groups, n = hq // hkv, MIXED_RETRIEVAL_KV[shape]
    q = torch.randn(1, hq, 1, D, dtype=DT, device=DEV)
    k = torch.randn(1, hkv, 1, D, dtype=DT, device=DEV)
    v = torch.randn(1, hkv, 1, D, dtype=DT, device=DEV)
    row = {}
    default = tuning.STREAMING_DECODE
    for n_keys in SIZES["mixed_decode"]:
        kv_bytes = 2 * n * (n_keys + 1) * D * DT.itemsize
        copies = 2 if DEV == "cpu" else max(1, min(16, math.ceil(240e6 / kv_bytes)))
        caches = [[torch.randn(1, n, n_keys + 1, D, dtype=DT, device=DEV) for _ in range(2)]
                  + [torch.randn(1, hkv - n, SINK + RECENT, D, dtype=DT, device=DEV) for _ in range(2)]
                  for _ in range(copies)]
        pos = cache_rows(n_keys, 1)
        ref_caches = [c.float() for c in caches[0]]
        ref_out = reference.attention_cached(q.float(), k.float(), v.float(), *ref_caches, *pos, SCALE, n, SINK, RECENT,
                                             False)
        for mode in tuning.STREAMING_DECODE_MODES:
            tuning.STREAMING_DECODE = mode  # read at each launch, so also while the graph is captured
            try:
                first = [c.clone() for c in caches[0]]
                err = rel_err(launchers.triton_attention_cached(q, k, v, *first, *pos, SCALE, n, SINK, RECENT, False),
                              ref_out)
                written = all(torch.equal(c.float(), r) for c, r in zip(first, ref_caches))
                ms = graph_time([
                    (lambda i=i: launchers.triton_attention_cached(q, k, v, *caches[i], *pos, SCALE, n, SINK, RECENT,
                                                                    False))
                    for i in range(copies)
                ])
            except Exception as e:  # a path that does not compile is reported, not fatal
                log(f"  mixed decode {mode}: failed {type(e).__name__}: {e}")
                continue
            finally:
                tuning.STREAMING_DECODE = default
            check(f"mixed_decode/{shape}/{n_keys}/{mode}", err if written else float("nan"))
            row[f"{n_keys}_{mode}"] = ms * 1e3
        del caches
        if DEV == "cuda":
            torch.cuda.empty_cache()
    RESULTS.setdefault("mixed_decode_us", {})[shape] = row
    log(f"  {shape} mixed layer decode ({n} of {hkv} KV heads retrieval), us: "
        + ", ".join(f"{key} {val:.1f}" for key, val in row.items()))


TAIL_SPLITS = (4, 6, 8, 10, 12, 16, 20, 24, 33)  # split counts timed per case, at each of TAIL_STAGES
TAIL_STAGES = (2, 3, 4)


def _kernel_us(calls) -> dict[str, float]:
    """Mean device time (us) per call of each kernel the thunks ``calls`` launch (torch profiler, eager)."""
    if DEV == "cpu":
        return {}
    for c in calls:  # compiled and warm
        c()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for c in calls:
            c()
        torch.cuda.synchronize()
    total: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:48]
            total[name] = total.get(name, 0.0) + e.time_range.elapsed_us() / len(calls)
    return total


def section_decode_tail():
    """Why: in small decode reads a kernel's ramp-up, its last wave and the gaps between kernels count as much as
    its bandwidth. For each case: the kernels' own device times (profiler) for ours and SDPA beside the
    graph-replay time of the whole call (the difference is the gaps between kernels); then
    the default tile at every split count of TAIL_SPLITS x pipeline stages of TAIL_STAGES (stages set how
    many programs fit on a multiprocessor, so which split counts fill the GPU in one wave). Every variant is
    checked against the default's output first."""
    log("== decode tail: kernel times, split counts x stages")
    copy_bw = RESULTS.get("ceilings", {}).get("copy_TBps_read_plus_write")
    rows = []
    for shape, n_keys in SIZES["decode_tail"]:
        hq, hkv = SHAPES[shape]
        groups = hq // hkv
        q, k, v, kcs, vcs, pos, copies, kv_bytes = _decode_inputs(hq, hkv, n_keys)
        ref = launchers.triton_retrieval_attention_cached(q, k, v, kcs[0], vcs[0], *pos, SCALE)
        row = {"shape": shape, "keys": n_keys, "kv_MB": kv_bytes / 1e6, "copies": copies, "us": {}, "kernels_us": {}}
        base = tuning.decode_config(q, groups, capacity=n_keys + 1)
        variants = [("default", None, None)]
        for stages in TAIL_STAGES:
            cfg = dataclasses.replace(base, num_stages=stages)
            variants += [(f"s{stages}x{splits}", cfg, splits) for splits in TAIL_SPLITS]
        for name, cfg, splits in variants:
            calls = [(lambda i=i: launchers.triton_retrieval_attention_cached(
                q, k, v, kcs[i], vcs[i], *pos, SCALE, config=cfg, num_splits=splits)) for i in range(copies)]
            try:
                err = rel_err(calls[0](), ref)
                ms = graph_time(calls)
                if name == "default":
                    row["kernels_us"][name] = _kernel_us(calls)
            except Exception as e:  # a variant that does not compile is reported, not fatal
                log(f"  {shape} {n_keys} {name}: failed {type(e).__name__}: {e}")
                continue
            if err > tol():
                FAILURES.append(f"decode_tail {name} {shape} {n_keys}: {err}")
            row["us"][name] = ms * 1e3
            kernels = row["kernels_us"].get(name, {})
            log(f"  {shape} {n_keys:>6} keys {name:<12} {ms * 1e3:7.1f} us (err {err:.1e})"
                + (f"  kernels: {', '.join(f'{n} {t:.1f}' for n, t in kernels.items())}" if kernels else ""))
        sdpa_calls = [(lambda i=i: F.scaled_dot_product_attention(q, kcs[i], vcs[i], scale=SCALE,
                                                                  enable_gqa=groups > 1)) for i in range(copies)]
        row["us"]["sdpa"] = graph_time(sdpa_calls) * 1e3
        row["kernels_us"]["sdpa"] = _kernel_us(sdpa_calls)
        ours = {name: us for name, us in row["us"].items() if name != "sdpa"}
        best = min(ours, key=ours.get)
        row.update(best=best, best_us=ours[best], best_vs_sdpa=row["us"]["sdpa"] / ours[best])
        if copy_bw:
            row["best_frac_of_copy"] = kv_bytes / (ours[best] * 1e-6) / 1e12 / copy_bw
        log(f"  {shape} {n_keys:>6} keys: sdpa {row['us']['sdpa']:.1f} us (kernels: "
            f"{', '.join(f'{n} {t:.1f}' for n, t in row['kernels_us']['sdpa'].items())}); best {best} "
            f"{ours[best]:.1f} us = x{row['best_vs_sdpa']:.2f} of SDPA")
        rows.append(row)
        del q, k, v, kcs, vcs
        if DEV == "cuda":
            torch.cuda.empty_cache()
    RESULTS["decode_tail"] = rows


# Split-count sweep of a layer's decode at each model's e2e headline context (cache capacity context + 1, as the
# e2e bench allocates): per retrieval KV head count a layer can have there (the last: every head retrieval, the
# full-attention engine's layer), the retrieval split count x pipeline stages.
SPLIT_SWEEP = {"llama2-7b": (122880, (4, 8, 16, 32)), "llama3-8b": (524288, (1, 2, 4, 8))}
SPLIT_COUNTS = (16, 32, 48, 64, 96, 128, 192, 256)
SPLIT_STAGES = (3, 4)
COMBINE_BLOCKS = (64, 32)  # combine_kernel column blocks timed beside the default (tuning.COMBINE_BLOCK_D)


def section_split_sweep():
    """Why: a DuoAttention layer (a few retrieval heads) reads its KV cache slower than a full layer: its grid has
    as many programs (decode_splits aims at programs per SM) but each reads fewer keys, so the per-program ramp
    and the last wave weigh more (benchmarks/DECISIONS.md#decode-split-sweep). This times, per retrieval head
    count, every split count (and 3 / 4 stages) of the launch a decode step uses (``duo::attention_cached`` on
    the "mixed" path; the all-retrieval layer on ``retrieval_attention_cached``), each checked against the
    launcher's default first; TB/s over the bytes the layer reads (retrieval K/V plus the streaming caches)."""
    log("== decode split-count sweep (one layer, e2e contexts)")
    rows = []
    default_mode, default_block_d = tuning.STREAMING_DECODE, tuning.COMBINE_BLOCK_D
    for shape, (context, counts) in SPLIT_SWEEP.items():
        hq, hkv = SHAPES[shape]
        groups = hq // hkv
        q = torch.randn(1, hq, 1, D, dtype=DT, device=DEV)
        k = torch.randn(1, hkv, 1, D, dtype=DT, device=DEV)
        v = torch.randn(1, hkv, 1, D, dtype=DT, device=DEV)
        pos = cache_rows(context, 1)
        for n in counts:
            cap = context + 1
            caches = [torch.randn(1, n, cap, D, dtype=DT, device=DEV) for _ in range(2)]
            if n < hkv:
                caches += [torch.randn(1, hkv - n, SINK + RECENT, D, dtype=DT, device=DEV) for _ in range(2)]
            kv_bytes = sum(c.numel() * c.element_size() for c in caches)
            base = tuning.decode_config(q[:, : n * groups], groups, capacity=cap)

            def call(cfg=None, splits=None):
                if n == hkv:
                    return launchers.triton_retrieval_attention_cached(q, k, v, *caches, *pos, SCALE, config=cfg,
                                                                        num_splits=splits)
                return launchers.triton_attention_cached(q, k, v, *caches, *pos, SCALE, n, SINK, RECENT, False,
                                                          config=cfg, num_splits=splits)

            tuning.STREAMING_DECODE = "mixed"
            try:
                ref = call()
                row = {"shape": shape, "keys": context, "retrieval_kv_heads": n, "kv_MB": kv_bytes / 1e6,
                       "default_us": graph_time([call]) * 1e3, "splits_us": {}}
                for stages in SPLIT_STAGES:
                    cfg = dataclasses.replace(base, num_stages=stages)
                    for splits in SPLIT_COUNTS:
                        err = rel_err(call(cfg, splits), ref)
                        if not err < tol():
                            FAILURES.append(f"split sweep {shape} n={n} s{stages} x{splits}: {err}")
                            continue
                        row["splits_us"][f"s{stages}x{splits}"] = graph_time([lambda: call(cfg, splits)]) * 1e3
                # The launcher's default again with the combine split into column blocks (COMBINE_BLOCK_D).
                row["combine_block_d_us"] = {}
                for block_d in COMBINE_BLOCKS:
                    tuning.COMBINE_BLOCK_D = block_d
                    err = rel_err(call(), ref)
                    if not err < tol():
                        FAILURES.append(f"split sweep {shape} n={n} combine block {block_d}: {err}")
                        continue
                    row["combine_block_d_us"][block_d] = graph_time([call]) * 1e3
            finally:
                tuning.STREAMING_DECODE = default_mode
                tuning.COMBINE_BLOCK_D = default_block_d
            best = min(row["splits_us"], key=row["splits_us"].get)
            row.update(best=best, best_us=row["splits_us"][best], default_TBps=kv_bytes / row["default_us"] / 1e6,
                       best_TBps=kv_bytes / row["splits_us"][best] / 1e6)
            rows.append(row)
            log(f"  {shape} {n:>2} of {hkv} KV heads retrieval at {context} keys: default {row['default_us']:.1f} us "
                f"({row['default_TBps']:.2f} TB/s), best {best} {row['best_us']:.1f} us ({row['best_TBps']:.2f} TB/s)")
            log("     " + ", ".join(f"{key} {val:.1f}" for key, val in row["splits_us"].items())
                + "; combine column blocks: " + ", ".join(f"{key} {val:.1f}"
                                                          for key, val in row["combine_block_d_us"].items()))
            del caches
            if DEV == "cuda":
                torch.cuda.empty_cache()
    RESULTS["split_sweep"] = rows


# Decode-time linear layers: (name, N, K, count per decode step) of each model's weights, then the projections
# that share an input concatenated into one matrix (count 0: not in the step's sum; the fused-projections figure
# swaps them in),
# to see what fusing q/k/v and gate/up into one GEMV each would give.
GEMV_SHAPES = {
    "llama2-7b": [("q/k/v/o", 4096, 4096, 4 * 32), ("gate/up", 11008, 4096, 2 * 32), ("down", 4096, 11008, 32),
                  ("lm_head", 32000, 4096, 1), ("q+k+v", 3 * 4096, 4096, 0), ("gate+up", 2 * 11008, 4096, 0)],
    "llama3-8b": [("q/o", 4096, 4096, 2 * 32), ("k/v", 1024, 4096, 2 * 32), ("gate/up", 14336, 4096, 2 * 32),
                  ("down", 4096, 14336, 32), ("lm_head", 128256, 4096, 1), ("q+k+v", 4096 + 2 * 1024, 4096, 0),
                  ("gate+up", 2 * 14336, 4096, 0)],
}
GEMV_LAYERS = 32  # decoder layers of both models
# What the fused matrices replace, per layer: {fused name: [(name, how many of them), ...]}.
GEMV_FUSED = {"q+k+v": {"llama2-7b": [("q/k/v/o", 3)], "llama3-8b": [("q/o", 1), ("k/v", 2)]},
              "gate+up": {"llama2-7b": [("gate/up", 2)], "llama3-8b": [("gate/up", 2)]}}
GEMV_VARIANTS = [  # (label, TileConfig with block_t = BLOCK_M and block_n = BLOCK_N, BLOCK_K)
    ("n16k256w4s4", TileConfig(block_t=16, block_n=16, num_warps=4, num_stages=4), 256),
    ("n16k512w4s3", TileConfig(block_t=16, block_n=16, num_warps=4, num_stages=3), 512),
    ("n32k256w4s4", TileConfig(block_t=16, block_n=32, num_warps=4, num_stages=4), 256),
    ("n32k128w4s6", TileConfig(block_t=16, block_n=32, num_warps=4, num_stages=6), 128),
    ("n64k128w4s4", TileConfig(block_t=16, block_n=64, num_warps=4, num_stages=4), 128),
    ("n16k256w2s4", TileConfig(block_t=16, block_n=16, num_warps=2, num_stages=4), 256),
    ("n32k256w8s3", TileConfig(block_t=16, block_n=32, num_warps=8, num_stages=3), 256),
]


def section_gemv():
    """One-token linear layers: cuBLAS against the Triton GEMV, each variant checked against an fp32 reference."""
    log("== decode linear layers (GEMV) vs cuBLAS")
    copy_bw = RESULTS.get("ceilings", {}).get("copy_TBps_read_plus_write")
    out = {}
    for model, layers in GEMV_SHAPES.items():
        rows, step = [], {"cublas_ms": 0.0, "best_triton_ms": 0.0, "bytes": 0}
        for name, n, k, count in layers:
            w_bytes = n * k * 2
            copies = 2 if DEV == "cpu" else max(1, min(8, math.ceil(240e6 / w_bytes)))  # more bytes than L2
            ws = [torch.randn(n, k, dtype=DT, device=DEV) / math.sqrt(k) for _ in range(copies)]
            x = torch.randn(1, k, dtype=DT, device=DEV)
            ref = F.linear(x.float(), ws[0].float())
            row = {"layer": name, "N": n, "K": k, "per_step": count, "weight_MB": w_bytes / 1e6, "copies": copies}
            row["cublas_us"] = graph_time([(lambda i=i: F.linear(x, ws[i])) for i in range(copies)]) * 1e3
            best = None
            for label, cfg, block_k in GEMV_VARIANTS:
                try:
                    err = rel_err(triton_gemv.triton_linear(x, ws[0], config=cfg, block_k=block_k), ref)
                    us = graph_time([(lambda i=i: triton_gemv.triton_linear(x, ws[i], config=cfg, block_k=block_k))
                                     for i in range(copies)]) * 1e3
                except Exception as e:  # a config that does not compile is reported, not fatal
                    log(f"  gemv {label}: failed {type(e).__name__}: {e}")
                    continue
                check(f"gemv/{model}/{name}/{label}", err)
                row[f"triton_{label}_us"] = us
                if err <= tol() and (best is None or us < best[1]):
                    best = (label, us)
            if best:
                row.update(best=best[0], triton_us=best[1], triton_TBps=w_bytes / best[1] / 1e6)
            row["cublas_TBps"] = w_bytes / row["cublas_us"] / 1e6
            if copy_bw:
                row["cublas_frac_of_copy"] = row["cublas_TBps"] / copy_bw
                if best:
                    row["triton_frac_of_copy"] = row["triton_TBps"] / copy_bw
            step["cublas_ms"] += count * row["cublas_us"] / 1e3
            step["best_triton_ms"] += count * min(row.get("triton_us", row["cublas_us"]), row["cublas_us"]) / 1e3
            step["bytes"] += count * w_bytes
            rows.append(row)
            log(f"  {model} {name:<8} {n}x{k}: cuBLAS {row['cublas_us']:.1f} us ({row['cublas_TBps']:.2f} TB/s), "
                f"triton {row.get('triton_us', float('nan')):.1f} us ({row.get('triton_TBps', float('nan')):.2f} TB/s,"
                f" {row.get('best')})")
            del ws
            if DEV == "cuda":
                torch.cuda.empty_cache()
        if copy_bw:
            step["at_copy_bandwidth_ms"] = step["bytes"] / (copy_bw * 1e9)
        by_name = {row["layer"]: row for row in rows}
        fused = step["cublas_ms"]
        for name, replaces in GEMV_FUSED.items():
            if name in by_name and model in replaces:
                fused += GEMV_LAYERS * by_name[name]["cublas_us"] / 1e3
                fused -= sum(GEMV_LAYERS * n * by_name[r]["cublas_us"] / 1e3 for r, n in replaces[model])
        step["cublas_fused_projections_ms"] = fused
        out[model] = {"layers": rows, "decode_step_weights": step}
        log(f"  {model} weights of one decode step: cuBLAS {step['cublas_ms']:.2f} ms (with q/k/v and gate/up fused "
            f"{fused:.2f} ms), with the faster of cuBLAS and triton per layer {step['best_triton_ms']:.2f} ms, "
            f"at copy bandwidth {step.get('at_copy_bandwidth_ms', 0):.2f} ms")
    RESULTS["gemv"] = out


PREFILL_VARIANTS = [  # h<heads_per> packs that many query heads of a KV group into one tile (GQA K/V reuse)
    ("t128n64w8s3", TileConfig(block_t=128, block_n=64, num_warps=8, num_stages=3)),
    ("t128n128w8s3", TileConfig(block_t=128, block_n=128, num_warps=8, num_stages=3)),
    ("t128n64w4s3", TileConfig(block_t=128, block_n=64, num_warps=4, num_stages=3)),
    ("t128n128w8s2", TileConfig(block_t=128, block_n=128, num_warps=8, num_stages=2)),
    ("t128n64w8s4", TileConfig(block_t=128, block_n=64, num_warps=8, num_stages=4)),
    ("t64n64w4s3", TileConfig(block_t=64, block_n=64, num_warps=4, num_stages=3)),
    ("t128n32w4s4", TileConfig(block_t=128, block_n=32, num_warps=4, num_stages=4)),
    ("h2t64n64w8s3", TileConfig(block_t=64, block_n=64, heads_per=2, num_warps=8, num_stages=3)),
    ("h4t32n32w8s3", TileConfig(block_t=32, block_n=32, heads_per=4, num_warps=8, num_stages=3)),
    # the same tiles with the unmasked key tiles loaded through TMA (Hopper's tensor memory accelerator)
    ("t128n128w8s3tma", TileConfig(block_t=128, block_n=128, num_warps=8, num_stages=3, tma=True)),
    ("t128n128w8s2tma", TileConfig(block_t=128, block_n=128, num_warps=8, num_stages=2, tma=True)),
    ("t128n64w8s3tma", TileConfig(block_t=128, block_n=64, num_warps=8, num_stages=3, tma=True)),
    ("t128n64w8s4tma", TileConfig(block_t=128, block_n=64, num_warps=8, num_stages=4, tma=True)),
    ("h2t64n64w8s3tma", TileConfig(block_t=64, block_n=64, heads_per=2, num_warps=8, num_stages=3, tma=True)),
    # bf: the grid runs query blocks first (one head's blocks at a time: its keys stay in L2)
    ("t128n128w8s3bf", TileConfig(block_t=128, block_n=128, num_warps=8, num_stages=3, blocks_first=True)),
    ("t128n128w8s3tmabf", TileConfig(block_t=128, block_n=128, num_warps=8, num_stages=3, tma=True,
                                     blocks_first=True)),
    ("h2t64n64w8s3tmabf", TileConfig(block_t=64, block_n=64, heads_per=2, num_warps=8, num_stages=3, tma=True,
                                     blocks_first=True)),
]


def _sweep(name, run, check_out, ref_out, variants):
    """Check check_out(cfg) against ref_out and time run(cfg) for each variant; return ({label: ms}, best label)."""
    times = {}
    for label, cfg in variants:
        try:
            poison(ref_out.shape)
            err = rel_err(check_out(cfg), ref_out)
            if not err < tol():
                FAILURES.append(f"{name} {label}: {err}")
                log(f"  {name} {label}: rel err {err:.2e} FAIL")
                continue
            times[label] = bench(lambda: run(cfg))
            log(f"  {name} {label}: {times[label]:.3f} ms (rel err {err:.1e})")
        except Exception as e:  # a config that does not compile is reported, not fatal
            log(f"  {name} {label}: failed {type(e).__name__}: {str(e)[:200]}")
    best = min(times, key=times.get)
    return times, best


D64_PREFILL_VARIANTS = [  # the head-dim-64 default first, then its neighbours (warps, key tile, query tile, options)
    ("t128n64w4s3", TileConfig(block_t=128, block_n=64, num_warps=4, num_stages=3)),
    ("t128n64w8s3", TileConfig(block_t=128, block_n=64, num_warps=8, num_stages=3)),
    ("t128n128w8s3", TileConfig(block_t=128, block_n=128, num_warps=8, num_stages=3)),
    ("t64n64w4s3", TileConfig(block_t=64, block_n=64, num_warps=4, num_stages=3)),
    ("t128n64w4s3tma", TileConfig(block_t=128, block_n=64, num_warps=4, num_stages=3, tma=True)),
    ("t128n64w4s3tmabf", TileConfig(block_t=128, block_n=64, num_warps=4, num_stages=3, tma=True, blocks_first=True)),
]
D64_FORMATS = (torch.bfloat16, torch.float16)


def _row_errors(out, ref, block_t):
    """Per-row relative error of [B, H, T, D] outputs: the worst row (head, token, token's row in its query tile)
    and the mean over the first and the second half of each query tile's rows."""
    rows = ((out.float() - ref).norm(dim=-1) / ref.norm(dim=-1))[0]  # [H, T]
    head, token = divmod(int(rows.argmax()), rows.shape[1])
    first = torch.arange(rows.shape[1], device=rows.device) % block_t < block_t // 2
    return {"worst": float(rows.max()), "worst_head": head, "worst_token": token,
            "worst_row_in_tile": token % block_t, "mean_first_half": float(rows[:, first].mean()),
            "mean_second_half": float(rows[:, ~first].mean())}


def section_d64():
    """Retrieval prefill at head dim 64 (bf16 and fp16, one chunk from start 0): each tile variant's error
    against the fp32 reference beside SDPA's on the same inputs, where the error sits (per-row errors), and the
    time: this tells a kernel fault from bf16/fp16 rounding (benchmarks/DECISIONS.md#prefill-diagonal-one-stage)."""
    log("== retrieval prefill at head dim 64: error per tile variant vs SDPA's")
    rows = []
    for dt in D64_FORMATS:
        with in_format(dt, 64):
            for shape, (hq, hkv) in SHAPES.items():
                t = SIZES["d64"]
                q, k, v = (torch.randn(1, h, t, D, dtype=DT, device=DEV) for h in (hq, hkv, hkv))
                ref = ref_causal(q, k, v)
                sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=hq != hkv)
                row = {"dtype": str(dt).removeprefix("torch."), "shape": shape, "tokens": t,
                       "sdpa_rel_err": rel_err(sdpa, ref), "variants": {}}
                for label, cfg in D64_PREFILL_VARIANTS:
                    poison(q.shape)
                    out = launchers.triton_retrieval_attention(q, k, v, SCALE, config=cfg)
                    err = check(f"d64/{row['dtype']}/{shape}/{label}", rel_err(out, ref))
                    ms = bench(lambda: launchers.triton_retrieval_attention(q, k, v, SCALE, config=cfg))
                    row["variants"][label] = {"rel_err": err, "ms": ms, **_row_errors(out, ref, cfg.block_t)}
                log(f"  {row['dtype']} {shape}: sdpa rel err {row['sdpa_rel_err']:.2e}; " + ", ".join(
                    f"{label} {r['rel_err']:.2e} (worst row {r['worst']:.1e} at tile row {r['worst_row_in_tile']}, "
                    f"{r['ms']:.3f} ms)" for label, r in row["variants"].items()))
                rows.append(row)
    RESULTS["d64_prefill"] = rows


def section_retrieval():
    t = SIZES["retrieval"]
    log("== retrieval prefill (causal) vs SDPA")
    mm = RESULTS.get("ceilings", {}).get("bf16_matmul_TFLOPs_8192")
    rows = []
    for shape, (hq, hkv) in SHAPES.items():
        q, k, v = (torch.randn(1, h, t, D, dtype=DT, device=DEV) for h in (hq, hkv, hkv))
        ref_out = ref_causal(q, k, v).to(DT)
        flops = 4 * hq * D * t * (t + 1) / 2
        run = lambda cfg: launchers.triton_retrieval_attention(q, k, v, SCALE, config=cfg)  # noqa: E731
        times, best = _sweep(f"retrieval/{shape}", run, run, ref_out, PREFILL_VARIANTS)
        check(f"retrieval_prefill/{shape}/{t}", rel_err(run(dict(PREFILL_VARIANTS)[best]), ref_out))
        sdpa_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=hq != hkv)
        sdpa_err = rel_err(sdpa_out, ref_out)
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=hq != hkv))
        # the cached op at start 0 (same kernel plus the fused append) for the best config
        kc = torch.empty(1, hkv, t, D, dtype=DT, device=DEV)
        vc = torch.empty_like(kc)
        pos = cache_rows(0, t)
        cached = bench(lambda: launchers.triton_retrieval_attention_cached(q, k, v, kc, vc, *pos, SCALE, config=dict(PREFILL_VARIANTS)[best]))
        ours = times[best]
        row = {
            "shape": shape, "tokens": t, "variants_ms": times, "best": best, "ours_ms": ours, "sdpa_ms": sdpa,
            "cached_with_append_ms": cached, "ours_TFLOPs": flops / ours / 1e9, "sdpa_TFLOPs": flops / sdpa / 1e9,
            "ours_frac_of_sdpa": sdpa / ours, "sdpa_rel_err": sdpa_err,
        }
        if mm:
            row["ours_frac_of_matmul"] = row["ours_TFLOPs"] / mm
            row["sdpa_frac_of_matmul"] = row["sdpa_TFLOPs"] / mm
        rows.append(row)
        log(f"  {shape}: ours {ours:.2f} ms ({row['ours_TFLOPs']:.0f} TFLOP/s, {best}), cached+append {cached:.2f} ms, "
            f"sdpa {sdpa:.2f} ms ({row['sdpa_TFLOPs']:.0f} TFLOP/s)")
        del q, k, v, ref_out, kc, vc
        torch.cuda.empty_cache()
    RESULTS["retrieval_prefill"] = rows


def _visible_pairs(t, sink, recent):
    p = torch.arange(t, dtype=torch.float64)
    window = torch.minimum(p + 1, torch.full_like(p, recent))
    extra_sink = torch.clamp(torch.minimum(torch.full_like(p, sink), p - recent + 1), min=0)
    return float((window + extra_sink).sum())


def section_streaming():
    lengths = SIZES["streaming"]
    log("== streaming prefill vs causal SDPA (FlexAttention: section flex)")
    rows = []
    for t in lengths:
        for shape, (hq, hkv) in SHAPES.items():
            q, k, v = (torch.randn(1, h, t, D, dtype=DT, device=DEV) for h in (hq, hkv, hkv))
            # fp32 reference on all queries at the first length; on the first, a middle and the last block after
            rb = SIZES["ref_block"]
            if t <= lengths[0]:
                ref_out = ref_streaming(q, k, v, SINK, RECENT, rb).to(DT)
                sel = slice(None)
            else:
                blocks = [0, t // 2, t - rb]
                idx = torch.cat([torch.arange(b0, b0 + rb, device=DEV) for b0 in blocks])
                sel = idx
                ref_out = torch.empty(1, hq, idx.numel(), D, dtype=DT, device=DEV)
                for i, b0 in enumerate(blocks):
                    # keys needed by queries [b0, b0 + rb): the sink and the window
                    lo = max(0, b0 - RECENT + 1)
                    kpos = torch.cat([torch.arange(0, min(SINK, lo), device=DEV), torch.arange(lo, b0 + rb, device=DEV)])
                    r = ref_attention_fp32(
                        q[:, :, b0:b0 + rb], k, v, lambda q0, q1, kpos=kpos: kpos,
                        lambda qp, kp, b0=b0: (kp <= qp + b0) & ((kp < SINK) | (kp > qp + b0 - RECENT)), rb,
                    )
                    ref_out[:, :, i * rb:(i + 1) * rb] = r.to(DT)

            def run(cfg):
                return launchers.triton_streaming_attention(q, k, v, SCALE, SINK, RECENT, config=cfg)

            def ours_fn(cfg):
                o = run(cfg)
                return o if isinstance(sel, slice) else o[:, :, sel]

            # the TMA / query-blocks-first options are the retrieval prefill's (the launcher refuses them here)
            variants = [(label, cfg) for label, cfg in PREFILL_VARIANTS if not (cfg.tma or cfg.blocks_first)]
            times, best = _sweep(f"streaming/{shape}/{t}", run, ours_fn, ref_out, variants)
            best_cfg = dict(variants)[best]
            check(f"streaming_prefill/{shape}/{t}", rel_err(ours_fn(best_cfg), ref_out))
            ours = times[best]
            kc = torch.empty(1, hkv, SINK + RECENT, D, dtype=DT, device=DEV)
            vc = torch.empty_like(kc)
            pos = cache_rows(0, t)
            cached = bench(lambda: launchers.triton_streaming_attention_cached(q, k, v, kc, vc, *pos, SCALE, SINK, RECENT, False, config=best_cfg))
            sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=hq != hkv), rep_ms=200)
            row = {"shape": shape, "tokens": t, "variants_ms": times, "best": best, "ours_ms": ours,
                   "cached_with_ring_write_ms": cached, "sdpa_causal_ms": sdpa}
            pairs = _visible_pairs(t, SINK, RECENT)
            row["ours_TFLOPs_useful"] = 4 * hq * D * pairs / ours / 1e9
            io_bytes = (2 * hq + 2 * hkv) * t * D * 2  # q, o, k, v once each
            row["ours_TBps_io"] = io_bytes / ours / 1e9
            row["speedup_vs_sdpa_causal"] = sdpa / ours
            rows.append(row)
            log(f"  {shape} {t}: ours {ours:.3f} ms ({best}; cached+write {cached:.3f}), "
                f"sdpa causal {sdpa:.2f} ms; io {row['ours_TBps_io']:.2f} TB/s")
            del q, k, v, ref_out
            torch.cuda.empty_cache()
            RESULTS["streaming_prefill"] = rows


def section_flex():
    """FlexAttention (torch.compile'd, the same sink + window block mask) on the streaming-prefill inputs."""
    log("== FlexAttention on the streaming prefill shapes")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex_fn = torch.compile(flex_attention, dynamic=False)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < SINK) | (q_idx - kv_idx < RECENT))

    for row in RESULTS.get("streaming_prefill", []):
        if time.time() - T0 > DEADLINE - 25:
            log(f"  skipped {row['shape']} {row['tokens']}: deadline")
            continue
        hq, hkv = SHAPES[row["shape"]]
        t = row["tokens"]
        q, k, v = (torch.randn(1, h, t, D, dtype=DT, device=DEV) for h in (hq, hkv, hkv))
        try:
            bm = create_block_mask(mask_mod, None, None, t, t, device=DEV, _compile=True)
            fo = flex_fn(q, k, v, block_mask=bm, scale=SCALE, enable_gqa=hq != hkv)
            ours = launchers.triton_streaming_attention(q, k, v, SCALE, SINK, RECENT)
            row["flex_rel_diff_vs_ours"] = rel_err(fo, ours)
            row["flex_ms"] = bench(lambda: flex_fn(q, k, v, block_mask=bm, scale=SCALE, enable_gqa=hq != hkv))
            row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
            log(f"  {row['shape']} {t}: flex {row['flex_ms']:.3f} ms vs ours {row['ours_ms']:.3f} ms "
                f"(x{row['speedup_vs_flex']:.2f}), |flex - ours| / |ours| {row['flex_rel_diff_vs_ours']:.1e}")
        except Exception as e:
            log(f"  flex failed: {type(e).__name__}: {str(e)[:300]}")
        del q, k, v
        torch.cuda.empty_cache()


def table():
    log("\n==== summary")
    c = RESULTS.get("ceilings", {})
    if c:
        log(f"ceilings: copy {c['copy_TBps_read_plus_write']:.2f} TB/s (r+w), bf16 matmul {c['bf16_matmul_TFLOPs_8192']:.0f} TFLOP/s")
    for r in RESULTS.get("decode", []):
        log(f"decode    {r['shape']:<10} {r['keys']:>7} keys  ours {r['ours_us']:8.1f} us {r['ours_TBps']:5.2f} TB/s "
            f"({r.get('ours_frac_of_copy', 0) * 100:4.0f}% copy)  sdpa {r['sdpa_us']:8.1f} us {r['sdpa_TBps']:5.2f} TB/s  "
            f"x{r['speedup_vs_sdpa']:.2f}")
    for r in RESULTS.get("decode_tail", []):
        log(f"tail      {r['shape']:<10} {r['keys']:>7} keys  default {r['us']['default']:.1f} us, "
            f"best {r['best']} {r['best_us']:.1f} us  sdpa "
            f"{r['us']['sdpa']:.1f} us  x{r['best_vs_sdpa']:.2f}")
    for shape, row in RESULTS.get("mixed_decode_us", {}).items():
        log(f"mixed     {shape:<10} one mixed layer's decode, keys_path: "
            + ", ".join(f"{k} {v:.1f} us" for k, v in row.items()))
    for model, g in RESULTS.get("gemv", {}).items():
        st = g["decode_step_weights"]
        log(f"gemv      {model:<10} weights per decode step: cuBLAS {st['cublas_ms']:.2f} ms (fused projections "
            f"{st['cublas_fused_projections_ms']:.2f}), faster of cuBLAS/triton per layer {st['best_triton_ms']:.2f} ms, "
            f"at copy bandwidth {st.get('at_copy_bandwidth_ms', float('nan')):.2f} ms")
    for r in RESULTS.get("retrieval_prefill", []):
        log(f"retrieval {r['shape']:<10} {r['tokens']:>7} tok   ours {r['ours_ms']:7.2f} ms {r['ours_TFLOPs']:5.0f} TFLOP/s  "
            f"sdpa {r['sdpa_ms']:7.2f} ms {r['sdpa_TFLOPs']:5.0f} TFLOP/s  ours/sdpa {r['ours_frac_of_sdpa'] * 100:.0f}%")
    for r in RESULTS.get("streaming_prefill", []):
        log(f"streaming {r['shape']:<10} {r['tokens']:>7} tok   ours {r['ours_ms']:7.3f} ms  flex {r.get('flex_ms', float('nan')):7.3f} ms "
            f"(x{r.get('speedup_vs_flex', float('nan')):.2f})  sdpa-causal {r['sdpa_causal_ms']:7.2f} ms  io {r['ours_TBps_io']:.2f} TB/s")
    log(f"failures: {FAILURES or 'none'}")


def _smoke_sizes():
    global DEV, D, DT, SCALE, SINK, RECENT, SHAPES, PREFILL_VARIANTS, DECODE_VARIANTS, STREAMING_DECODE_VARIANTS
    global FORMATS, SPLIT_COUNTS, SPLIT_STAGES, COMBINE_BLOCKS, D64_PREFILL_VARIANTS, D64_FORMATS, TAIL_SPLITS
    global TAIL_STAGES
    DEV, D, DT, SINK, RECENT = "cpu", 16, torch.float32, 4, 8
    SCALE = D**-0.5
    SHAPES = {"gqa": (4, 2), "mha": (2, 2)}
    MIXED_RETRIEVAL_KV.clear()
    MIXED_RETRIEVAL_KV.update(gqa=1, mha=1)
    SIZES.update(cap=96, chunks=(40, 20, 1, 1), s_chunks=(30, 20, 1, 5), decode=(50,), mixed_decode=(50,),
                 decode_tail=(("mha", 50), ("gqa", 50)), retrieval=40, streaming=(40, 70), ref_block=16, dispatch=20, copy_bytes=1 << 20, mm=256, d64=40)
    PREFILL_VARIANTS = [("t16n16", TileConfig(block_t=16, block_n=16)), ("t32n16", TileConfig(block_t=32, block_n=16)),
                        ("h2t16n16", TileConfig(block_t=16, block_n=16, heads_per=2)),
                        ("t16n16tma", TileConfig(block_t=16, block_n=16, tma=True))]
    DECODE_VARIANTS = [("n16", dict(block_n=16), 4), ("n32", dict(block_n=32), 2)]
    TAIL_SPLITS, TAIL_STAGES = (2, 5), (3,)
    GEMV_SHAPES.clear()
    GEMV_SHAPES["tiny"] = [("proj", 40, 48, 2 * GEMV_LAYERS), ("lm_head", 96, 32, 1), ("q+k+v", 80, 48, 0)]
    GEMV_FUSED.clear()
    GEMV_FUSED["q+k+v"] = {"tiny": [("proj", 2)]}
    GEMV_VARIANTS[:] = [("n16k16", TileConfig(block_t=16, block_n=16), 16), ("n32k32", TileConfig(block_t=16, block_n=32), 32)]
    STREAMING_DECODE_VARIANTS = [("one_n16", False, dict(block_n=16)), ("tiles_n16", True, dict(block_n=16)),
                                 ("tiles_n32", True, dict(block_n=32))]
    FORMATS = ((torch.float16, 16), (torch.float32, 32))
    D64_PREFILL_VARIANTS = [("t16n16", TileConfig(block_t=16, block_n=16)),
                            ("t32n16tmabf", TileConfig(block_t=32, block_n=16, tma=True, blocks_first=True))]
    D64_FORMATS = (torch.float16,)
    SPLIT_SWEEP.clear()
    SPLIT_SWEEP.update(gqa=(50, (1, 2)), mha=(50, (1, 2)))
    SPLIT_COUNTS, SPLIT_STAGES, COMBINE_BLOCKS = (2, 4), (3,), (8, 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--commit", default="")
    ap.add_argument("--sections", nargs="*", default=["ceilings", "decode", "decode_tail", "split_sweep", "gemv",
                                                       "retrieval", "streaming", "cached", "formats", "d64", "flex"])
    ap.add_argument("--deadline", type=float, default=1e9, help="skip sections once this many seconds have passed")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1 (script check)")
    args = ap.parse_args()
    if args.smoke:
        _smoke_sizes()
    global DEADLINE
    DEADLINE = args.deadline
    commit = args.commit
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
        except Exception:
            commit = "unknown"
    RESULTS.update(
        command=" ".join([sys.executable, "-m", "benchmarks.kernels", *sys.argv[1:]]),
        gpu=torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (smoke)", torch=torch.__version__, triton=triton.__version__, commit=commit,
        dtype="bfloat16", head_dim=D, sink=SINK, recent=RECENT, batch=1,
        sdpa_note="torch SDPA with enable_gqa=True for GQA (no k/v expansion); plain for MHA",
    )
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    sections = {
        "ceilings": section_ceilings, "cached": section_cached, "decode": section_decode, "gemv": section_gemv,
        "retrieval": section_retrieval, "streaming": section_streaming, "formats": section_formats, "d64": section_d64,
        "flex": section_flex, "split_sweep": section_split_sweep, "decode_tail": section_decode_tail,
    }
    for name in args.sections:
        if name == "flex" and args.no_flex:
            continue
        if time.time() - T0 > DEADLINE:
            log(f"== {name}: skipped (deadline)")
            RESULTS.setdefault("skipped", []).append(name)
            continue
        t0 = time.time()
        try:
            sections[name]()
        except Exception as e:
            import traceback

            traceback.print_exc()
            FAILURES.append(f"section {name} crashed: {type(e).__name__}: {e}")
        RESULTS.setdefault("section_seconds", {})[name] = time.time() - t0
        RESULTS["failures"] = FAILURES
        save(args.out)
    table()
    save(args.out)


if __name__ == "__main__":
    main()
