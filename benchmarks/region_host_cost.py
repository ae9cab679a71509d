"""The host time an Inductor engine's layer regions cost around their compiled graphs.

An Inductor engine runs its graph as one compiled call per decoder layer (runtime/layer_regions.py,
runtime/inductor_graph.py). Between those calls the engine passes values through a table; each call also goes
through the compiled graph's runtime wrapper. A short prefill is host-bound on a GPU, so this is where the split
could cost. The script builds start_bench's engine (Llama-3-8B shape on CUDA, or with ``--dry-run`` a tiny Llama
on the CPU), takes the engine-graph inputs of one prefill of ``--tokens`` tokens, and times, per graph run (medians
over ``--repeats``; no device synchronisation inside, so on a GPU these are host times while the launch queue has
room): the whole run, the compiled calls within it, and what is left (the table, argument lists, frees). It also
times one compiled call of a trivial region against the same arithmetic in eager mode (the wrapper's own cost).
``--whole`` also compiles the same engine graph whole, as one compiled call (``InductorGraph(by_layer=False)``),
and times the prefill through each, alternating, in this one process: a side-by-side with no process-order
effect (synchronised wall times, medians); ``--profile DIR`` then writes each one's torch.profiler tables.

    DUO_BENCH_MASKS=random python benchmarks/region_host_cost.py --dry-run --layers 32 [--tokens 16]
    DUO_BENCH_MASKS=random python benchmarks/region_host_cost.py --tokens 512 --whole     (a GPU)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

# Run as a script, this folder comes first on sys.path, where kernels.py would shadow the ``kernels`` distribution
# that transformers imports.
HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == HERE:
    sys.path.pop(0)


def _sibling(name: str):
    """benchmarks/<name>.py as a module (by path: this folder on sys.path would shadow ``kernels``)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_ms(seconds: list[float]) -> float:
    return round(1e3 * statistics.median(seconds), 4)


def _graph_inputs(engine, ids) -> tuple:
    """The inputs the engine hands its graph for a prefill of ``ids`` (caught from one ``generate``)."""
    run, caught = engine._run, []
    engine._run = lambda *inputs: caught.append(inputs) or run(*inputs)
    try:
        engine.generate(ids, max_new_tokens=1)
    finally:
        engine._run = run
    return caught[0]


def _split(graph, inputs) -> tuple[float, float]:
    """One run of ``graph`` (an InductorGraph whose variants for ``inputs`` are chosen), as InductorGraph.__call__
    runs it: (seconds in all, seconds inside the compiled calls)."""
    from duo_compile.runtime.inductor_graph import _layout

    plan = graph._layouts[_layout(inputs)]
    values = [*inputs, *([None] * (graph._entries - len(inputs)))]
    inside = 0.0
    began = time.perf_counter()
    for i, region in enumerate(graph.regions):
        args = [values[j] for j in region.reads]
        start = time.perf_counter()
        outputs = plan[i].artifact(*args, *graph._region_weights[i])
        inside += time.perf_counter() - start
        for j, value in zip(region.writes, outputs, strict=True):
            values[j] = value
        for j in region.frees:
            values[j] = None
    return time.perf_counter() - began, inside


def _wrapper_cost(device: str, repeats: int = 2000) -> dict:
    """Microseconds per call: a compiled one-add region against the add in eager mode."""
    import torch
    import torch.fx as fx

    from duo_compile.runtime.inductor_graph import compile_variant

    class Add(torch.nn.Module):
        def forward(self, x, w):
            return (x + w,)

    x, w = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
    artifact = compile_variant(fx.symbolic_trace(Add()), [x], [w]).artifact

    def per_call(fn) -> float:
        fn()
        began = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1e6 * (time.perf_counter() - began) / repeats

    return {"compiled_call_us": per_call(lambda: artifact(x, w)), "eager_us": per_call(lambda: (x + w,))}


def _side_by_side(engine, ids, start_bench, device: str, repeats: int, profile_dir: str | None) -> dict:
    """The prefill of ``ids`` through the engine's regions and through its graph compiled whole, alternating;
    with ``profile_dir``, then each one's torch.profiler tables there (``region_profile_<name>.txt``)."""
    from duo_compile.runtime.inductor_graph import InductorGraph

    regions = engine._run
    runs = {"regions": regions, "whole": InductorGraph(engine.graph, by_layer=False)}
    seconds, tokens = {name: [] for name in runs}, {}
    try:
        for name, run in runs.items():
            engine._run = run
            print(f"compiling: the prefill, {name}", file=sys.stderr)
            tokens[name] = engine.generate(ids, max_new_tokens=1).tolist()
        for _ in range(repeats):
            for name, run in runs.items():
                engine._run = run
                seconds[name].append(start_bench._timed(lambda: engine.generate(ids, max_new_tokens=1), device)[1])
        for name, run in runs.items() if profile_dir else ():
            engine._run = run
            _sibling("tree_ab")._profile(start_bench, engine, ids, device,
                                         os.path.join(profile_dir, f"region_profile_{name}.txt"))
    finally:
        engine._run = regions
    result = {f"prefill_{name}_ms": _median_ms(s) for name, s in seconds.items()}
    return {**result, "same_tokens": tokens["regions"] == tokens["whole"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny Llama on the CPU")
    parser.add_argument("--layers", type=int, default=32, help="--dry-run: the tiny Llama's layers")
    parser.add_argument("--tokens", type=int, default=None, help="prompt length (default 512, dry run 16)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--whole", action="store_true", help="also the prefill through the graph compiled whole")
    parser.add_argument("--out", default=None, help="write the result as JSON here too")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="with --whole: torch.profiler tables of three prefills each way, written to DIR")
    args = parser.parse_args()
    if args.layers < 1 or args.repeats < 1 or (args.tokens is not None and args.tokens < 1):
        parser.error("--layers, --tokens and --repeats must be positive")
    if args.profile and not args.whole:
        parser.error("--profile profiles the side-by-side: it needs --whole")

    import duo_compile  # first: the checkout's kernels/ must not shadow transformers' kernels
    import torch

    start_bench = _sibling("start_bench")
    model, device = start_bench._model(args.dry_run, dry_layers=args.layers)
    tokens = args.tokens or (16 if args.dry_run else 512)
    engine = duo_compile.compile(model, start_bench._masks(model), max_seq_len=1024 if args.dry_run else 8192,
                                 backend="inductor")
    ids = torch.randint(0, model.config.vocab_size - 1, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    print(f"compiling: a prefill of {tokens} tokens", file=sys.stderr)
    engine.generate(ids, max_new_tokens=1)
    inputs = _graph_inputs(engine, ids)
    runs, splits = [], []
    for _ in range(args.repeats):
        start_bench._sync(device)
        began = time.perf_counter()
        engine._run(*inputs)
        runs.append(time.perf_counter() - began)  # host time: no synchronisation before the clock stops
        start_bench._sync(device)
        splits.append(_split(engine._run, inputs))
        start_bench._sync(device)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "tokens": tokens, "regions": len(engine._run.regions), "region_classes": len(engine._run.classes),
        "run_host_ms": _median_ms(runs), "loop_host_ms": _median_ms([a for a, _ in splits]),
        "inside_compiled_calls_ms": _median_ms([b for _, b in splits]),
        "outside_compiled_calls_ms": _median_ms([a - b for a, b in splits]),
        **_wrapper_cost(device),
    }
    if args.whole:
        result.update(_side_by_side(engine, ids, start_bench, device, args.repeats, args.profile))
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
