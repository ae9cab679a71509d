"""The README's first command: compile a small model twice (full attention, DuoAttention) and show what was saved.

It uses the bundled passkey model and its identified gates when they are installed (``duo_compile/data``), and
otherwise a seeded random-weight Llama of the same kind (said so in the output). It prints the KV-cache bytes
actually allocated by each engine, the per-token decode time on this machine, and whether the answers agree;
then what the same gates would save at long context for a real model shape (Llama-3-8B, the authors' pattern
is not needed for that: it is pure arithmetic over head counts).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from duo_compile.compiler import compile as duo_compile_model
from duo_compile.masks import HeadMasks, KVCacheBytes, kv_cache_bytes


def _demo_model():
    """The bundled trained model with its gates and a passkey prompt, else a random one (and say which)."""
    from duo_compile.identify.passkey import PASSKEY_MODEL_DIR, PasskeyTask, load_passkey_gates, load_passkey_model

    if (PASSKEY_MODEL_DIR / "model.safetensors").exists():
        model, tokenizer = load_passkey_model()
        gates = load_passkey_gates()
        task = PasskeyTask.from_tokenizer(tokenizer, num_passkeys=1, vocab_size=model.config.vocab_size)
        sample = task.sample(np.random.default_rng(0), 2000, num_passkeys=1, passkey_length=4)
        answer_start, answer_end = sample.answer_spans[0]
        prompt = torch.tensor(sample.input_ids[None, :answer_start])
        answer = sample.input_ids[answer_start:answer_end].tolist()
        return model, gates, prompt, answer, "bundled passkey model (trained by the project)", tokenizer

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).eval()
    gates = HeadMasks.random(4, 4, sparsity=0.5, seed=0)
    prompt = torch.randint(0, 512, (1, 1000))
    reason = f"random-weight Llama (no bundled model at {PASSKEY_MODEL_DIR})"
    return model, gates, prompt, None, reason, None


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _timed_generate(engine, prompt, new_tokens):
    """Greedy output (``generate``), then the prefill and the decode steps timed each on their own: a decode time
    taken as (generate - prefill) / steps is noise at a short prompt (it came out negative)."""
    out = engine.generate(prompt, max_new_tokens=new_tokens)  # also compiles and allocates outside the timing

    def now():
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return time.perf_counter()

    start = now()
    logits = engine.prefill(prompt)
    prefill = now() - start
    token = logits.argmax(-1, keepdim=True)
    steps = max(new_tokens - 1, 1)
    start = now()
    for i in range(steps):
        token = engine.step(token, prompt.shape[1] + i).argmax(-1, keepdim=True)
    return out, prefill, (now() - start) / steps


def run_demo(sparsity: float = 0.5, sink_size: int = 64, recent_size: int = 256, new_tokens: int = 16,
             backend: str = "inductor", max_seq_len: int = 8192) -> dict:
    """Compile full-attention and DuoAttention engines of the demo model, run both, print the comparison."""
    model, gates, prompt, answer, what, tokenizer = _demo_model()
    masks = gates.binarize(sparsity=sparsity)
    print(f"model: {what}: {model.config.num_hidden_layers} layers x {model.config.num_key_value_heads} KV heads")
    print(f"masks: {masks.retrieval_counts} retrieval KV heads per layer (sparsity {sparsity}); "
          f"sink {sink_size}, recent {recent_size}; prompt {prompt.shape[1]} tokens; backend {backend}")
    results = {}
    for name, m in (("full attention", HeadMasks.all_retrieval(*masks.shape)), ("DuoAttention", masks)):
        print(f"compiling {name} ...", flush=True)
        engine = duo_compile_model(model, m, sink_size=sink_size, recent_size=recent_size,
                                   max_seq_len=max_seq_len, backend=backend)
        out, prefill_s, decode_s = _timed_generate(engine, prompt, new_tokens)
        results[name] = (out[0, prompt.shape[1]:].tolist(), engine.kv_cache_bytes(), prefill_s, decode_s)

    print(f"\n{'engine':<16}{'KV cache allocated':>22}{'prefill':>12}{'decode/token':>15}  output")
    for name, (tokens, kv, prefill_s, decode_s) in results.items():
        text = tokenizer.decode(tokens) if tokenizer is not None else tokens[:8]
        print(f"{name:<16}{_fmt(kv.total):>22}{prefill_s * 1e3:>10.1f}ms{decode_s * 1e3:>13.2f}ms  {text!r}")
    if prompt.device.type == "cpu":
        print("(CPU timings run the plain PyTorch reference ops at a short context; decode speed-ups need long "
              "contexts and the Triton kernels on a GPU: see benchmarks/README.md)")
    full_kv, duo_kv = results["full attention"][1], results["DuoAttention"][1]
    print(f"\nKV cache at max_seq_len={max_seq_len}: {_fmt(full_kv.total)} -> {_fmt(duo_kv.total)} "
          f"({full_kv.total / duo_kv.total:.2f}x smaller; retrieval {_fmt(duo_kv.retrieval)}, "
          f"streaming {_fmt(duo_kv.streaming)})")
    if answer is not None:
        ok = {name: r[0][: len(answer)] == list(answer) for name, r in results.items()}
        print(f"passkey answered correctly: {ok}")
    _long_context_note(sparsity, sink_size, recent_size)
    return results


def _long_context_note(sparsity: float, sink_size: int, recent_size: int) -> None:
    """The same arithmetic at a real shape: Llama-3-8B (32 layers x 8 KV heads, d=128), bf16, 512K tokens."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    masks = HeadMasks.random(32, 8, sparsity=sparsity, seed=0)
    kv: KVCacheBytes = kv_cache_bytes(config, masks, seq_len=524288, batch_size=1, dtype=torch.bfloat16,
                                      sink_size=sink_size, recent_size=recent_size)
    print(f"at Llama-3-8B shape, 512K tokens, bf16, sparsity {sparsity}: KV {_fmt(kv.full_attention)} -> "
          f"{_fmt(kv.total)} ({kv.saving:.2f}x)")
