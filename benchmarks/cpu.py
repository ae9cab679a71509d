"""CPU benchmark: full attention vs DuoAttention engines (eager backend) vs Hugging Face, at 2K-8K tokens.

    python benchmarks/cpu.py [--lengths 2048 4096 8192] [--new-tokens 32] [--threads 1] [--repeat 2]
                             [--engines hf full duo] [--isolate] [--out benchmarks/results/cpu_passkey]

The bundled passkey model (6 layers, 8 query / 4 KV heads, d=32; ``duo_compile.identify.passkey``) with its
identified gates (else a seeded random Llama of the same shape, said so in the output), batch 1, fp32:

  hf        Hugging Face: ``model(ids, use_cache=True)`` for the prefill, then one-token forwards on its cache
  full      ``duo_compile.compile`` with every head retrieval (the engine's full attention), backend eager
  duo       DuoAttention: gates binarised at sparsity 0.5, sink 64, recent 256, window mode, backend eager
  full-dense, duo-dense   the same engines on the dense reference ops (``kernels/reference.py``, the CPU path
            before kernels/blockwise.py; opt-in, slow: it builds [H, T, T] fp32 scores)

The engines run side by side in one fresh subprocess (the dense kinds in another; ``--isolate``: one process per
engine and length instead), lengths in ascending order. Per length, each engine's unchunked prefill of the same
random prompt runs ``--repeat`` times, the engines taking turns (the fastest wall and CPU seconds kept); then
``--new-tokens`` greedy decode steps, alternating between the engines step by step so all see the same machine
load (the median step, wall and CPU ms). Memory: the peak resident set during a prefill (caches + activations)
minus the resident set before it (freed memory is trimmed back to the OS and ``/proc/self/clear_refs`` resets the
high-water mark before each prefill), beside the absolute peak; plus the KV-cache bytes each engine holds.
CPU seconds are the steadier number on a shared machine (other processes stretch wall time, not CPU time).

Writes ``<out>.json`` (command, machine, versions, load, every measurement) and ``<out>.png``; prints a table.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Run as a script, this folder is sys.path[0], and its kernels.py would shadow the ``kernels`` distribution that
# transformers imports: nothing is imported from here, so the folder leaves the path.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != Path(__file__).resolve().parent]

KINDS = ("hf", "full", "duo", "full-dense", "duo-dense")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_passkey"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- memory
def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _reset_peak() -> int:
    """Free what can be freed, reset the peak-RSS mark to the current RSS; returns the RSS (bytes)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # no reset: the high-water mark then covers the earlier (shorter) lengths as well
        pass
    return _status()["VmRSS"]


# ---------------------------------------------------------------------------------------------- worker
def _load():
    """(model, gates, description): the bundled passkey model and gates, else a random Llama of its shape."""
    import torch

    from duo_compile.identify.passkey import PASSKEY_MODEL_DIR, load_passkey_gates, load_passkey_model
    from duo_compile.masks import HeadMasks

    if (PASSKEY_MODEL_DIR / "model.safetensors").exists():
        model, _ = load_passkey_model()
        return model.eval(), load_passkey_gates(), "bundled passkey model"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=16384)
    return LlamaForCausalLM(config).eval(), HeadMasks.random(6, 4, sparsity=0.5, seed=0), \
        f"random-weight Llama (no bundled model at {PASSKEY_MODEL_DIR})"


def _use_dense_reference() -> None:
    """Make the dense reference ops the CPU kernels again (what the CPU ran before kernels/blockwise.py)."""
    import torch

    from duo_compile.kernels import reference

    for name in ("retrieval_attention", "streaming_attention", "retrieval_attention_cached",
                 "streaming_attention_cached", "attention_cached"):
        fn = getattr(reference, name)
        torch.library.register_kernel(f"duo::{name}", "cpu")(lambda *a, _fn=fn, **kw: _fn(*a, **kw).contiguous())


class _Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


class _HF:
    """Hugging Face: the prefill fills its DynamicCache; each step is a one-token forward on it."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def release(self) -> None:
        self.cache = None

    def prefill(self, ids):
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        self.cache, self.length = out.past_key_values, ids.shape[1]
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self, token, i: int):
        out = self.model(token, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def kv_bytes(self, tokens: int) -> int:  # K and V of every layer, fp32
        c = self.model.config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * tokens * 4


class _Engine:
    """A compiled engine: caches sized to the prompt + the decode steps, allocated inside the prefill's timing."""

    def __init__(self, engine, new_tokens: int):
        self.engine, self.new_tokens = engine, new_tokens

    def release(self) -> None:
        self.engine.release()

    def prefill(self, ids):
        self.engine.allocate(1, ids.shape[1] + self.new_tokens)
        self.length = ids.shape[1]
        return self.engine.prefill(ids).argmax(-1, keepdim=True)

    def step(self, token, i: int):
        return self.engine.step(token, self.length + i).argmax(-1, keepdim=True)

    def kv_bytes(self, tokens: int) -> int:
        return self.engine.kv_cache_bytes().total


def worker(kinds: list[str], lengths: list[int], new_tokens: int, threads: int, sparsity: float, sink: int,
           recent: int, repeat: int) -> None:
    """Measure engine kinds side by side in this process (the dense kinds only with each other: they replace the
    ops' CPU kernels); one JSON line per result on stdout.

    Per length, each kind's prefill runs ``repeat`` times, the kinds taking turns (fastest time kept, largest
    peak); then the decode steps alternate between the kinds, so all see the same machine load."""
    import torch

    torch.set_num_threads(threads)
    import duo_compile
    from duo_compile.masks import HeadMasks

    def emit(**row) -> None:
        print("RESULT " + json.dumps(row), flush=True)

    model, gates, what = _load()
    masks = gates.binarize(sparsity=sparsity)
    emit(event="model", what=what, retrieval_counts=list(masks.retrieval_counts),
         layers=model.config.num_hidden_layers, kv_heads=model.config.num_key_value_heads)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    if any(kind.endswith("-dense") for kind in kinds):
        _use_dense_reference()
    runners = {}
    for kind in kinds:
        with _Clock() as setup:
            if kind == "hf":
                runners[kind] = _HF(model)
            else:
                m = HeadMasks.all_retrieval(*masks.shape) if kind.startswith("full") else masks
                runners[kind] = _Engine(duo_compile.compile(model, m, sink_size=sink, recent_size=recent,
                                                            max_seq_len=max(lengths) + new_tokens, backend="eager"),
                                        new_tokens)
        emit(event="setup", kind=kind, seconds=setup.wall)

    with torch.no_grad():
        warm = torch.randint(3, vocab, (1, 64), generator=gen)
        for runner in runners.values():  # first-call costs out of the timings
            runner.step(runner.prefill(warm), 0)
            runner.release()
        for length in lengths:
            ids = torch.randint(3, vocab, (1, length), generator=gen)
            rows = {kind: dict(prefill_s=float("inf"), prefill_cpu_s=float("inf"), peak_delta_mb=0.0)
                    for kind in kinds}
            first = {}
            for rep in range(repeat):
                order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
                for kind in order:
                    runner, row = runners[kind], rows[kind]
                    runner.release()
                    before = _reset_peak()
                    with _Clock() as pre:
                        first[kind] = runner.prefill(ids)
                    peak = _status()["VmHWM"]
                    row["prefill_s"] = min(row["prefill_s"], pre.wall)
                    row["prefill_cpu_s"] = min(row["prefill_cpu_s"], pre.cpu)
                    if (peak - before) / 2**20 >= row["peak_delta_mb"]:
                        row.update(peak_delta_mb=(peak - before) / 2**20, rss_before_mb=before / 2**20,
                                   peak_rss_mb=peak / 2**20)
            tokens = {kind: [] for kind in kinds}
            times = {kind: [] for kind in kinds}
            token = dict(first)
            for i in range(new_tokens):
                for kind in kinds:
                    tokens[kind].append(int(token[kind]))
                    with _Clock() as clock:
                        token[kind] = runners[kind].step(token[kind], i)
                    times[kind].append((clock.wall, clock.cpu))
            for kind in kinds:
                emit(event="result", kind=kind, length=length, **rows[kind],
                     decode_ms=_median([w for w, _ in times[kind]]) * 1e3,
                     decode_cpu_ms=_median([c for _, c in times[kind]]) * 1e3,
                     kv_cache_mb=runners[kind].kv_bytes(length + new_tokens) / 2**20, tokens=tokens[kind],
                     loadavg=os.getloadavg()[0])
            for runner in runners.values():
                runner.release()


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# ------------------------------------------------------------------------------------------------ main
def _spawn(kinds: list[str], lengths: list[int], args) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", *kinds, "--lengths", *map(str, lengths), "--new-tokens",
           str(args.new_tokens), "--threads", str(args.threads), "--sparsity", str(args.sparsity), "--sink",
           str(args.sink), "--recent", str(args.recent), "--repeat", str(args.repeat)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        for line in proc.stdout:
            if not line.startswith("RESULT "):
                continue
            row = json.loads(line[len("RESULT "):])
            rows.append(row)
            if row["event"] == "setup":
                log(f"{row['kind']}: compiled/loaded in {row['seconds']:.1f} s")
            elif row["event"] == "result":
                log(f"{row['kind']:<10} {row['length']:>5}: prefill {row['prefill_s']:.2f} s "
                    f"(cpu {row['prefill_cpu_s']:.2f} s), decode {row['decode_ms']:.1f} ms/token "
                    f"(cpu {row['decode_cpu_ms']:.1f}), peak +{row['peak_delta_mb']:.0f} MiB "
                    f"(rss {row['peak_rss_mb']:.0f} MiB), load {row['loadavg']:.1f}")
    if proc.returncode:
        log(f"{' '.join(kinds)}: worker exited with {proc.returncode}")
    return rows


def _table(results: list[dict], kinds: list[str]) -> list[str]:
    head = (f"{'engine':<11}{'tokens':>7}{'prefill s':>11}{'(cpu s)':>9}{'decode ms/tok':>15}{'(cpu)':>8}"
            f"{'peak +MiB':>11}{'KV MiB':>9}")
    lines = [head, "-" * len(head)]
    for row in sorted(results, key=lambda r: (r["length"], kinds.index(r["kind"]))):
        lines.append(f"{row['kind']:<11}{row['length']:>7}{row['prefill_s']:>11.2f}{row['prefill_cpu_s']:>9.2f}"
                     f"{row['decode_ms']:>15.1f}{row['decode_cpu_ms']:>8.1f}{row['peak_delta_mb']:>11.0f}"
                     f"{row['kv_cache_mb']:>9.1f}")
    by = {(r["kind"], r["length"]): r for r in results}
    for length in sorted({r["length"] for r in results}):
        full, duo = by.get(("full", length)), by.get(("duo", length))
        if full and duo:
            lines.append(f"duo vs full at {length}: prefill {full['prefill_cpu_s'] / duo['prefill_cpu_s']:.2f}x, "
                         f"decode {full['decode_cpu_ms'] / duo['decode_cpu_ms']:.2f}x (cpu time), "
                         f"peak memory {duo['peak_delta_mb']:.0f} vs {full['peak_delta_mb']:.0f} MiB, "
                         f"KV {duo['kv_cache_mb']:.1f} vs {full['kv_cache_mb']:.1f} MiB")
    return lines


def _plot(results: list[dict], kinds: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("prefill_cpu_s", "prefill, CPU s"), ("decode_cpu_ms", "decode, CPU ms / token"),
              ("peak_delta_mb", "peak memory over the run's start, MiB"))
    for ax, (key, title) in zip(axes, panels):
        for kind in kinds:
            rows = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["length"])
            if rows:
                ax.plot([r["length"] for r in rows], [r[key] for r in rows], marker="o", label=kind)
        ax.set_title(title)
        ax.set_xlabel("prompt tokens")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("CPU, passkey model (6 layers, 8/4 heads), batch 1, fp32; DuoAttention sparsity 0.5, sink 64, "
                 "recent 256")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--engines", nargs="+", choices=KINDS, default=["hf", "full", "duo"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="prefills per engine and length (fastest kept)")
    parser.add_argument("--isolate", action="store_true",
                        help="a fresh subprocess per engine and length (default: one for all engines, side by side)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes <out>.json and <out>.png")
    parser.add_argument("--worker", nargs="+", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lengths = sorted(args.lengths)
    if args.worker:
        worker(args.worker, lengths, args.new_tokens, args.threads, args.sparsity, args.sink, args.recent,
               args.repeat)
        return 0

    import torch
    import transformers

    started, load0 = time.time(), os.getloadavg()
    log(f"lengths {lengths}, engines {args.engines}, {args.threads} thread(s), {os.cpu_count()} cores, "
        f"load {load0[0]:.1f}")
    rows = []
    if args.isolate:
        for kind in args.engines:
            for n in lengths:
                rows += _spawn([kind], [n], args)
    else:  # the dense kinds replace the ops' CPU kernels: a process of their own
        for kinds in ([k for k in args.engines if not k.endswith("-dense")],
                      [k for k in args.engines if k.endswith("-dense")]):
            if kinds:
                rows += _spawn(kinds, lengths, args)
    results = [r for r in rows if r["event"] == "result"]
    model = next((r for r in rows if r["event"] == "model"), {})
    lines = _table(results, args.engines)
    print("\n" + "\n".join(lines))
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["python benchmarks/cpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": model, "engines": args.engines, "lengths": lengths, "new_tokens": args.new_tokens,
        "threads": args.threads, "sparsity": args.sparsity, "sink": args.sink, "recent": args.recent,
        "isolate": args.isolate, "repeat": args.repeat, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "seconds": time.time() - started,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "commit": _commit(), "results": results, "table": lines,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    _plot(results, args.engines, out.with_suffix(".png"))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} ({time.time() - started:.0f} s)")
    return 0


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               check=True).stdout
        return sha + ("+uncommitted changes" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
