"""The README's first command: compile a small model twice (full attention, DuoAttention) and show what was saved.

It uses the bundled passkey model and its identified gates when they are installed (``duo_compile/data``), and
otherwise a seeded random-weight Llama of the same kind (said so in the output). The prompt is a passkey sample of
``context_tokens`` tokens (8000 by default, within the model's training range: DuoAttention saves time in
proportion to the context its streaming heads skip, so a short prompt would show little). It prints the KV-cache
bytes actually allocated by each engine, the prefill and per-token decode time on this machine (on a CPU, on one
thread: ``_timing_threads``), DuoAttention's ratios to full attention, and whether the answers agree; then what
the same gates would save at long context for a real model shape (Llama-3-8B, the authors' pattern is not needed
for that: it is pure arithmetic over head counts).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from duo_compile.compiler import compile as duo_compile_model
from duo_compile.masks import HeadMasks, KVCacheBytes, kv_cache_bytes


def _demo_model(context_tokens: int):
    """The bundled trained model with its gates and a passkey prompt, else a random one (and say which)."""
    from duo_compile.identify.passkey import PASSKEY_MODEL_DIR, PasskeyTask, load_passkey_gates, load_passkey_model

    if (PASSKEY_MODEL_DIR / "model.safetensors").exists():
        model, tokenizer = load_passkey_model()
        gates = load_passkey_gates()
        task = PasskeyTask.from_tokenizer(tokenizer, num_passkeys=1, vocab_size=model.config.vocab_size)
        sample = task.sample(np.random.default_rng(0), context_tokens, num_passkeys=1, passkey_length=4)
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
    prompt = torch.randint(0, 512, (1, context_tokens))
    reason = f"random-weight Llama (no bundled model at {PASSKEY_MODEL_DIR})"
    return model, gates, prompt, None, reason, None


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _timed_generate(engine, prompt, new_tokens):
    """Greedy output, with the prefill and the decode steps timed each on their own (a decode time taken as
    (generate - prefill) / steps is noise at a short prompt: it came out negative). A ``generate`` first compiles
    the graphs and allocates the caches outside the timings: on the whole prompt for inductor (its graphs are
    compiled for the shapes they see), on a short one for eager (nothing to compile: the long prompt runs once)."""
    warm = prompt if engine.config.backend == "inductor" else prompt[:, :64]
    engine.generate(warm, max_new_tokens=2)

    def now():
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return time.perf_counter()

    start = now()
    logits = engine.prefill(prompt)
    prefill = now() - start
    token = logits.argmax(-1, keepdim=True)
    tokens = [int(token)]
    steps = max(new_tokens - 1, 1)
    start = now()
    for i in range(steps):
        token = engine.step(token, prompt.shape[1] + i).argmax(-1, keepdim=True)
        tokens.append(int(token))
    return tokens[:new_tokens], prefill, (now() - start) / steps


@contextlib.contextmanager
def _timing_threads(device: torch.device):
    """On CPU, time on one torch thread (restored afterwards): this model's ops are far too small to gain from
    more, and on a busy machine every multi-threaded op waits for a second core (DuoAttention's mixed layers run
    two attention calls where full attention runs one, so that wait, not the work, would decide the comparison)."""
    if device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _ratio(full: float, duo: float, what: str) -> str:
    """'1.40x faster' / '0.90x (slower)': full attention's time over DuoAttention's."""
    ratio = full / duo
    return f"{what} {ratio:.2f}x {'faster' if ratio >= 1 else '(slower)'}"


def run_demo(sparsity: float = 0.5, sink_size: int = 64, recent_size: int = 256, new_tokens: int = 16,
             backend: str = "inductor", max_seq_len: int = 8192, context_tokens: int = 8000) -> dict:
    """Compile full-attention and DuoAttention engines of the demo model, run both, print the comparison.

    ``context_tokens`` (the passkey haystack; the prompt adds the question) is cut to what ``max_seq_len`` holds
    with the generated tokens."""
    context_tokens = max(16, min(context_tokens, max_seq_len - new_tokens - 64))
    model, gates, prompt, answer, what, tokenizer = _demo_model(context_tokens)
    masks = gates.binarize(sparsity=sparsity)
    print(f"model: {what}: {model.config.num_hidden_layers} layers x {model.config.num_key_value_heads} KV heads")
    print(f"masks: {masks.retrieval_counts} retrieval KV heads per layer (sparsity {sparsity}); "
          f"sink {sink_size}, recent {recent_size}; prompt {prompt.shape[1]} tokens; backend {backend}")
    results = {}
    for name, m in (("full attention", HeadMasks.all_retrieval(*masks.shape)), ("DuoAttention", masks)):
        print(f"compiling {name} ...", flush=True)
        engine = duo_compile_model(model, m, sink_size=sink_size, recent_size=recent_size,
                                   max_seq_len=max_seq_len, backend=backend)
        with _timing_threads(engine.device):
            tokens, prefill_s, decode_s = _timed_generate(engine, prompt, new_tokens)
        results[name] = (tokens, engine.kv_cache_bytes(), prefill_s, decode_s)

    print(f"\n{'engine':<16}{'KV cache allocated':>22}{'prefill':>12}{'decode/token':>15}  output")
    for name, (tokens, kv, prefill_s, decode_s) in results.items():
        text = tokenizer.decode(tokens) if tokenizer is not None else tokens[:8]
        print(f"{name:<16}{_fmt(kv.total):>22}{prefill_s * 1e3:>10.1f}ms{decode_s * 1e3:>13.2f}ms  {text!r}")
    full_kv, duo_kv = results["full attention"][1], results["DuoAttention"][1]
    full_t, duo_t = results["full attention"][2:], results["DuoAttention"][2:]
    print(f"DuoAttention vs full attention at {prompt.shape[1]} tokens: {_ratio(full_t[0], duo_t[0], 'prefill')}, "
          f"{_ratio(full_t[1], duo_t[1], 'decode')}")
    if prompt.device.type == "cpu":
        print("(CPU, timed on one thread: the duo:: ops run blockwise, streaming heads scoring only their sink + "
              "recent keys, so the time saved grows with the context; benchmarks/cpu.py measures 2K-8K)")
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
