"""A roofline estimate of a serving stream's time per engine, so the serving benchmark can put its measured
throughput ratio beside the ratio the hardware allows for that stream.

Offline, every request is prefilled once and decodes its output tokens; an engine's time is estimated as

  prefill   every prompt's FLOPs at the GPU's peak: the linear layers (2 x weights per token) and causal attention
            (4 x head_dim per query head, layer and pair of positions), retrieval heads over the whole prefix,
            streaming heads over at most sink + recent positions;
  decode    the output tokens in steps of as many sequences as the KV pool holds at once (its positions over one
            request's average length, at most the slots): each step reads every weight once, and every token reads
            its sequence's KV cache (retrieval heads: every position so far; streaming heads: sink + recent), all at
            the GPU's memory bandwidth;

one after the other. DuoAttention's pool holds about twice the positions, so its decode runs in about half the
steps and reads half the retrieval KV; its prefill saves the streaming heads' share of the attention FLOPs only.
The longer the prompts against the outputs, the closer the ratio falls to the prefill ratio. It is an estimate,
not a strict bound: a real step can carry decode tokens beside a prefill chunk (hiding their weight reads) and no
kernel runs at peak; both engines are estimated alike, so their ratio is the figure to read.

    python benchmarks/serve_bound.py --requests 256 --min-prompt 8192 --max-prompt 65536 --output-tokens 256
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 tensor-core peak and HBM bandwidth from the vendor's data sheets (SXM parts).
DEVICES = {"h100": (989e12, 3.35e12), "h200": (989e12, 4.8e12)}


@dataclass(frozen=True)
class Stream:
    prompts: list[int]
    output_tokens: int


def _model_numbers(config: dict) -> tuple[int, int, int, int, int]:
    """(linear weights, layers, query heads, kv heads, head dim) of a Llama-style config."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * config["intermediate_size"]
    return layers * per_layer + hidden * config["vocab_size"], layers, heads, kv_heads, head_dim


def engine_seconds(config: dict, retrieval: float, window: int, stream: Stream, positions: int, slots: int,
                   device: str = "h100", itemsize: int = 2) -> dict:
    """The estimate for one engine: ``retrieval`` the fraction of KV heads that are retrieval heads, ``window`` sink
    + recent, ``positions`` the retrieval positions its KV pool holds, ``slots`` its most running sequences."""
    flops_peak, bandwidth = DEVICES[device]
    weights, layers, heads, kv_heads, head_dim = _model_numbers(config)
    prefill_flops = 0.0
    for n in stream.prompts:
        near = min(n, window)  # streaming heads: each query sees at most `window` keys
        streaming_pairs = near * (near + 1) / 2 + (n - near) * window
        pairs = retrieval * n * (n + 1) / 2 + (1 - retrieval) * streaming_pairs
        prefill_flops += 2 * weights * n + 4 * head_dim * heads * layers * pairs
    kv_bytes = 2 * itemsize * layers * kv_heads * head_dim  # keys and values of one position, every head
    read = 0.0
    for n in stream.prompts:
        for t in range(stream.output_tokens):
            read += kv_bytes * (retrieval * (n + t) + (1 - retrieval) * min(n + t, window))
    tokens = len(stream.prompts) * stream.output_tokens
    length = sum(stream.prompts) / len(stream.prompts) + stream.output_tokens
    concurrent = max(1, min(slots, len(stream.prompts), int(positions // length)))
    steps = -(-tokens // concurrent)
    prefill, decode = prefill_flops / flops_peak, (steps * weights * itemsize + read) / bandwidth
    return {"prefill_s": prefill, "decode_s": decode, "seconds": prefill + decode, "concurrent": concurrent,
            "decode_steps": steps, "output_tokens_per_s": tokens / (prefill + decode)}


def stream_bound(config: dict, sparsity: float, window: int, stream: Stream, positions: dict[str, int],
                 slots: dict[str, int], device: str = "h100") -> dict:
    """The estimate for DuoAttention (``sparsity`` of its KV heads streaming) and all retrieval, and their
    throughput ratio."""
    duo = engine_seconds(config, 1 - sparsity, window, stream, positions["duo"], slots["duo"], device)
    full = engine_seconds(config, 1.0, window, stream, positions["full"], slots["full"], device)
    return {"device": device, "duo": duo, "full": full, "ratio": full["seconds"] / duo["seconds"]}


def main(argv=None) -> int:
    from duo_compile.tools.bench import RECENT, SHAPES, SINK

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--min-prompt", type=int, default=8192)
    p.add_argument("--max-prompt", type=int, default=32768)
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--positions", type=int, nargs=2, default=[462976, 234048], metavar=("DUO", "FULL"),
                   help="retrieval positions each engine's KV pool holds (default: serve_bench's 28.6 GiB budget)")
    p.add_argument("--slots", type=int, default=16, help="most running sequences per engine")
    p.add_argument("--device", choices=sorted(DEVICES), default="h100")
    args = p.parse_args(argv)
    for name in ("requests", "min_prompt", "max_prompt", "slots"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    if args.output_tokens < 0 or args.max_prompt < args.min_prompt:
        p.error(f"--output-tokens must be >= 0 and --max-prompt >= --min-prompt, got {args.output_tokens}, "
                f"{args.min_prompt}..{args.max_prompt}")
    import numpy as np

    shape = SHAPES["llama3"]
    rng = np.random.default_rng(0)  # the prompt lengths serve_bench.py draws
    prompts = [int(n) for n in rng.integers(args.min_prompt, args.max_prompt + 1, args.requests)]
    bound = stream_bound(shape["config"], shape["sparsity"], SINK + RECENT, Stream(prompts, args.output_tokens),
                         {"duo": args.positions[0], "full": args.positions[1]},
                         {"duo": args.slots, "full": args.slots}, args.device)
    print(json.dumps(bound, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
