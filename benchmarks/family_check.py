"""Engines of the newer families at real shapes on the GPU (random bf16 weights, a few layers) against the oracle.

Qwen3-8B's attention shape (GQA 32/8, head dim 128, per-head q/k RMS norms) and Gemma-3-4B's (GQA 8/4, head dim
256, q/k norms, query scaling by ``query_pre_attn_scalar``, local layers of a 1024-token window interleaved with
global ones), each with the real hidden size, vocabulary and head counts but only a few layers, compiled with mixed
masks (DuoAttention on the full layers; the local layers are window layers whatever the masks say) on both
backends and streaming modes, whole and chunked prefill. The prompt is longer than the window, so the local
layers' window hides keys. Greedy tokens and scores are compared with the eager oracle (fp32 copy of the same
weights): scores while the tokens agree, within bf16's tolerance. Prints one line per case and exits non-zero on
any failure.

    python benchmarks/family_check.py            # on the GPU
    python benchmarks/family_check.py --dry-run  # the same code on the CPU at tiny shapes (fp32, eager)
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for tests.tiny_models

import duo_compile  # noqa: E402
from duo_compile.oracle import oracle_generate  # noqa: E402
from tests.tiny_models import mixed_gates  # noqa: E402

SHAPES = {
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=40960)),
    "gemma-3-4b": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=131072)),
}
# The CPU dry run: the same families at tiny sizes (and a window the short prompt exceeds).
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)
SINK, RECENT, NEW = 16, 64, 16


def build(name: str, dry_run: bool, dtype: torch.dtype, device: str):
    import transformers

    config_name, model_name, kwargs = SHAPES[name]
    kwargs = dict(kwargs, tie_word_embeddings=False)
    if dry_run:
        kwargs.update(TINY)
        if "sliding_window" in kwargs:
            kwargs.update(sliding_window=24, query_pre_attn_scalar=16)
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, model_name)(config).eval()
    model.generation_config.eos_token_id = None
    return model.to(dtype)


def check(model, name, backend, mode, chunk, prompt, tol, device) -> bool:
    config = model.config
    masks = duo_compile.HeadMasks.from_gates(mixed_gates(config.num_hidden_layers, config.num_key_value_heads))
    t0 = time.perf_counter()
    engine = duo_compile.compile(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=prompt + NEW + 64,
                                 streaming_mode=mode, backend=backend)
    ids = torch.randint(0, config.vocab_size, (2, prompt), device=device)
    out = engine.generate(ids, max_new_tokens=NEW, prefill_chunk_size=chunk, output_scores=True,
                          return_dict_in_generate=True)
    oracle_model = model.float()
    tokens, scores = oracle_generate(oracle_model, masks, ids, NEW, sink_size=SINK, recent_size=RECENT,
                                     streaming_mode=mode, prefill_chunk_size=chunk)
    agree = (out.sequences[:, prompt:] == tokens[:, prompt:]).all(dim=0).int().cumprod(0)
    steps = max(1, int(agree.sum()))
    err = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(out.scores[:steps], scores[:steps]))
    same = int((out.sequences == tokens).all(dim=1).sum())
    ok = err < tol
    windows = sorted({s.slots for s in engine.cache_specs if s.kind == "streaming"})
    print(f"{'ok ' if ok else 'BAD'} {name} {backend} {mode} chunk={chunk} prompt={prompt}: rel score err {err:.2e} "
          f"(tol {tol}, {steps} steps compared), rows token-identical {same}/2, streaming cache slots {windows}, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return ok


def main() -> int:
    import transformers

    dry_run = "--dry-run" in sys.argv
    device = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.bfloat16
    tol = 1e-4 if dry_run else 3e-2
    gpu = "CPU dry run" if dry_run else torch.cuda.get_device_name()
    print(f"{gpu} torch {torch.__version__} transformers {transformers.__version__}", flush=True)
    cases = [  # (shape, backend, mode, chunk, prompt): prompts longer than Gemma 3's window
        ("qwen3-8b", "eager", "window", 256, 1100),
        ("qwen3-8b", "inductor", "chunk", None, 1100),
        ("gemma-3-4b", "eager", "chunk", 512, 1300),
        ("gemma-3-4b", "inductor", "window", None, 1300),
    ]
    if dry_run:
        cases = [(name, "eager", mode, chunk and 16, 40) for name, _, mode, chunk, _ in cases]
    ok = True
    for name, backend, mode, chunk, prompt in cases:
        try:
            model = build(name, dry_run, dtype, device)
            ok &= check(model, name, backend, mode, chunk, prompt, tol, device)
            del model
            if not dry_run:
                torch.cuda.empty_cache()
        except Exception:
            traceback.print_exc()
            ok = False
    print("FAMILY CHECK", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
