"""Train the bundled long-context passkey model, then identify its retrieval heads and run the needle study.

    python scripts/train_passkey_model.py --out OUT --device cuda --time-budget 240 --identify-steps 400 \
        --study --samples-per-cell 8                                       # the H200 run (about 5 minutes)
    python scripts/train_passkey_model.py --out /tmp/smoke --smoke --steps 40   # CPU smoke test of the pipeline

Why this model exists: the project needs a real model whose heads have really specialised (some retrieve far-back
tokens, most only model local text) and that runs in CI on CPU. It is a Llama-architecture model (6 layers, GQA
8 query / 4 KV heads, hidden 256, rope_theta 500000, 16K positions) over a word vocabulary, trained from scratch on
two things at once: language modelling of text from a seeded story grammar (``filler_grammar.py``; the streaming
heads' job) and the multi-passkey task of ``duo_compile.identify.passkey`` at contexts up to 8K tokens (the retrieval
heads' job). Loss = next-token cross-entropy over all tokens + ``answer_weight`` x cross-entropy over the answer
passkey tokens (they are a tiny fraction of the tokens).

What the H200 attempts taught (benchmarks/results/needle_README.md, logs beside it):
1. A fixed 1.5M-word corpus and no other copying signal: 4210 steps (276M tokens) memorised the corpus (train LM
   loss 1.0, held-out 3.2) and never formed retrieval (answer loss stayed at ln 26). Hence fresh grammar text every
   step, 20% of paragraphs repeated verbatim from earlier paragraphs (copying gets a gradient on many tokens),
   40% single-needle steps, answer weight 2, exact-match evaluation every ``--eval-every`` steps.
2. That recipe with contexts 256-2048 in the short phase and repeats up to 50 paragraphs back: 5213 steps (340M
   tokens), no memorisation (LM loss 1.85 train, 1.88 held out) but still no copying: the LM loss never dropped on
   the repeated paragraphs, the answer loss left ln 26 only in the last ~1000 steps (3.26 -> 3.0), exact match 0.
   The CPU proxy that did form copying (within ~1500 steps, 3M tokens) used contexts of 128-256 and repeats 2
   paragraphs back; the same proxy with contexts up to 512 and repeats 3 back formed nothing in 2500 steps
   (needle_README.md). Hence the first 40% of the steps now use contexts 128-256 and repeats at most
   ``--short-lookback`` (2) paragraphs back, where the copy target is among ~200 keys instead of thousands.

Steps: with ``--steps 0`` (default) the step count is fitted to ``--time-budget`` seconds from timed
forward+backward passes at three context lengths, and written to the log; pass it as ``--steps`` to repeat the
run. Data depend only on ``(seed, step)``. Outputs under ``--out`` (flat, at most 8 files): model.safetensors
(bf16), model_config.json, train_log.json, and with ``--identify-steps`` and ``--study``: full_attention_heads.tsv,
identify_config.json, gates.png, needle_results.json, needle_heatmap.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from filler_grammar import generate_filler  # noqa: E402

from duo_compile.identify.passkey import FILLER_PATH, PASSKEY_MODEL_DIR, PasskeyTask, WordTokenizer  # noqa: E402

TRAIN_TEXT_SEED = 1000  # the bundled filler.txt is seed 1: evaluation text is held out


def build_model(vocab_size: int, tokenizer: WordTokenizer, args, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def step_plan(step: int, total: int, args) -> tuple[np.random.Generator, int, bool]:
    """The context length of a step, the generator for its samples and whether the step is in the short phase:
    a function of (seed, step, total) only.

    Curriculum: during the first ``short_fraction`` of the steps contexts are at most ``short_max`` tokens and
    repeated paragraphs come from at most ``short_lookback`` paragraphs back (the copying mechanism forms here:
    an untrained head spreads its attention over the whole context, so the gradient towards the one matching
    key shrinks with the context length), then contexts grow to ``max_context`` (long-range robustness).
    """
    rng = np.random.default_rng([args.seed, step])
    short = step < args.short_fraction * total
    top = args.short_max if short else args.max_context
    grid = np.arange(args.min_context, max(args.min_context, top) + 1, args.context_step)
    return rng, int(rng.choice(grid)), short


def fresh_filler(tokenizer: WordTokenizer, step: int, num_tokens: int, args, lookback: int) -> np.ndarray:
    """New grammar text for every step (seeded by seed and step): the model never sees a text twice, so it
    learns the grammar instead of memorising a corpus (the first attempt memorised a 1.5M-word corpus)."""
    seed = TRAIN_TEXT_SEED + 1_000_003 * args.seed + step
    text = generate_filler(seed, int(num_tokens / 1.1) + 200, args.repeat_probability, lookback)
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)


def make_batch(task: PasskeyTask, tokenizer: WordTokenizer, step: int, total: int,
               args) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Token ids [B, S] and answer mask [B, S] (True where the token is a passkey token of an answer)."""
    rng, context, short = step_plan(step, total, args)
    fits = [n for n in range(1, args.max_passkeys + 1)
            if task.max_needles_length(n, args.passkey_length) <= context // 2]
    # One needle in 40% of the steps: its retrieval is plain copying, the easiest start for the mechanism.
    most = max(fits) if fits else 1
    num_passkeys = 1 if most == 1 or rng.random() < 0.4 else int(rng.integers(2, most + 1))
    batch = max(1, args.tokens_per_step // context)
    lookback = args.short_lookback if short else args.repeat_lookback
    task = dataclasses.replace(task, filler=fresh_filler(tokenizer, step, batch * context, args, lookback))
    samples = [task.sample(rng, context, num_passkeys=num_passkeys, passkey_length=args.passkey_length)
               for _ in range(batch)]
    ids = np.stack([s.input_ids for s in samples])
    answer = np.zeros(ids.shape, dtype=bool)
    for row, s in enumerate(samples):
        for start, end in s.answer_spans:
            answer[row, start:end] = True
    return ids, answer, context, num_passkeys


def fit_steps(model, task: PasskeyTask, args, device, amp) -> tuple[int, dict]:
    """Largest step count whose planned steps fit ``time_budget``, from timed forward+backward passes at three
    context lengths (step time ~ a + b * context at a fixed token count per step)."""
    lengths = [args.min_context, (args.min_context + args.max_context) // 2, args.max_context]
    times = []
    for length in lengths:
        batch = max(1, args.tokens_per_step // length)
        ids = torch.randint(0, task.filler.max() + 1, (batch, length + 150), device=device)
        for rep in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times.append((length, time.perf_counter() - t0))
    model.zero_grad(set_to_none=True)
    x = np.array([t[0] for t in times], dtype=np.float64)
    y = np.array([t[1] for t in times]) * 1.1  # the optimiser step is not in the timing
    b, a = np.polyfit(x, y, 1)
    if b < 0 or a < 0:  # noisy timings: fall back to the mean step time
        b, a = 0.0, float(y.mean())

    def mean_context(top: int) -> float:
        return float(np.arange(args.min_context, max(args.min_context, top) + 1, args.context_step).mean())

    def cost(n: int) -> float:  # expected seconds of n planned steps
        cut = int(np.ceil(args.short_fraction * n))
        return cut * (a + b * mean_context(args.short_max)) + (n - cut) * (a + b * mean_context(args.max_context))

    low, high = 1, 2
    while cost(high) < args.time_budget and high < 10**7:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if cost(mid) <= args.time_budget else (low, mid)
    return low, {"seconds_per_step_at": [[int(k), round(float(v), 4)] for k, v in times],
                 "fit_a_seconds": float(a), "fit_b_seconds_per_token": float(b)}


class PlannedBatches(torch.utils.data.Dataset):
    """Batch ``i`` is step ``i``'s data, made in DataLoader workers so the GPU never waits for numpy."""

    def __init__(self, task: PasskeyTask, tokenizer: WordTokenizer, total: int, args) -> None:
        self.task, self.tokenizer, self.total, self.args = task, tokenizer, total, args

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, step: int):
        ids, answer, context, num_passkeys = make_batch(self.task, self.tokenizer, step, self.total, self.args)
        return torch.from_numpy(ids), torch.from_numpy(answer), context, num_passkeys


def retrieval_eval(model, task: PasskeyTask, contexts: list[int], args, device, amp,
                   samples: int = 16) -> dict[str, float]:
    """Exact-match passkey accuracy (one needle, full attention) at a few context lengths: the training's
    real progress signal (the per-batch answer loss is noisy)."""
    from duo_compile.identify.needle import passkey_accuracy

    was_training = model.training
    model.eval()
    out = {}
    for context in contexts:
        rng = np.random.default_rng([args.seed, 99, context])
        batch = [task.sample(rng, context, num_passkeys=1, passkey_length=args.passkey_length)
                 for _ in range(samples)]
        exact, _ = passkey_accuracy(model, batch, None, sink_size=64, recent_size=256, batch_size=samples,
                                    autocast_dtype=amp)
        out[str(context)] = round(float(exact.mean()), 3)
    model.train(was_training)
    return out


def lr_at(step: int, total: int, args) -> float:
    warmup = min(args.warmup, max(1, total // 10))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_lm_loss(model, tokenizer: WordTokenizer, device, length: int, dtype) -> dict[str, float]:
    """Next-token loss on the bundled (held-out) filler: full attention and all heads streaming."""
    from duo_compile.identify import gated_attention

    ids = tokenizer.encode(FILLER_PATH.read_text(encoding="utf-8"), add_special_tokens=False)[:length]
    ids = torch.tensor([[tokenizer.bos_token_id, *ids]], device=device)
    counts = np.bincount(ids[0].cpu().numpy(), minlength=tokenizer.vocab_size).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    out = {"tokens": int(ids.shape[1]), "unigram_entropy": float(-(probs * np.log(probs)).sum())}
    layers, kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out["full"] = float(F.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:]))
        with gated_attention(model, torch.zeros(layers, kv), sink_size=64, recent_size=256):
            out["all_streaming_64_256"] = float(F.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="0: fit the step count to --time-budget")
    parser.add_argument("--time-budget", type=float, default=200.0, help="seconds of training when --steps 0")
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--min-context", type=int, default=128)
    parser.add_argument("--max-context", type=int, default=8448)
    parser.add_argument("--short-max", type=int, default=256)
    parser.add_argument("--short-fraction", type=float, default=0.4)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--context-step", type=int, default=64)
    parser.add_argument("--max-passkeys", type=int, default=6)
    parser.add_argument("--passkey-length", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--answer-weight", type=float, default=2.0)
    parser.add_argument("--repeat-probability", type=float, default=0.2)
    parser.add_argument("--repeat-lookback", type=int, default=50, help="paragraphs a repeat may reach back")
    parser.add_argument("--short-lookback", type=int, default=2, help="the same, during the short phase")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--identify-steps", type=int, default=0)
    parser.add_argument("--study", action="store_true")
    parser.add_argument("--samples-per-cell", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny model and contexts, for a CPU check")
    args = parser.parse_args()
    if args.smoke:
        args.tokens_per_step, args.min_context, args.max_context, args.context_step = 2048, 128, 512, 128
        args.warmup, args.short_max = 10, 256
        args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate = 2, 64, 4, 2, 128
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    log: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}

    def save_log() -> None:
        log["seconds_total"] = round(time.perf_counter() - started, 1)
        (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")

    tokenizer = WordTokenizer.from_pretrained(PASSKEY_MODEL_DIR)
    vocab_size = 64 * math.ceil(tokenizer.vocab_size / 64)
    # Templates and alphabet; each step replaces the filler with fresh text (fresh_filler).
    task = PasskeyTask.from_tokenizer(tokenizer, num_passkeys=args.max_passkeys, vocab_size=vocab_size,
                                      filler_text=generate_filler(TRAIN_TEXT_SEED, 20_000, args.repeat_probability))

    model = build_model(vocab_size, tokenizer, args, max_positions=16384).to(device)
    log["parameters"] = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    if args.steps > 0:
        total = args.steps
    else:
        total, log["step_fit"] = fit_steps(model, task, args, device, amp)
        print(f"fitted {total} steps to {args.time_budget}s: {log['step_fit']}", flush=True)
    log["planned_steps"] = total
    eval_task = PasskeyTask.from_tokenizer(tokenizer, num_passkeys=1, vocab_size=vocab_size)  # held-out filler
    eval_contexts = sorted({args.min_context, args.short_max, args.max_context})
    history = []
    train_start = time.perf_counter()
    step = 0
    model.train()
    workers = args.workers if device.type == "cuda" else 0
    loader = torch.utils.data.DataLoader(PlannedBatches(task, tokenizer, total, args), batch_size=None, shuffle=False,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    for ids, answer, context, num_passkeys in loader:
        ids = ids.to(device, non_blocking=True)
        answer = answer.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, args)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        token_loss = token_loss.view(targets.shape)
        is_answer = answer[:, 1:]
        lm_loss = token_loss.mean()
        answer_loss = (token_loss * is_answer).sum() / is_answer.sum().clamp(min=1)
        loss = lm_loss + args.answer_weight * answer_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0 or step == total:
            with torch.no_grad():
                answer_acc = float((logits.argmax(-1) == targets)[is_answer].float().mean())
            record = dict(step=step, lm_loss=round(float(lm_loss.detach()), 4),
                          answer_loss=round(float(answer_loss.detach()), 4),
                          answer_token_accuracy=round(answer_acc, 4), context=context, passkeys=num_passkeys,
                          grad_norm=round(float(grad_norm), 3), seconds=round(time.perf_counter() - train_start, 1))
            if step % args.eval_every == 0 or step == total:
                record["passkey_exact"] = retrieval_eval(model, eval_task, eval_contexts, args, device, amp)
            history.append(record)
            print(json.dumps(record), flush=True)
        if args.steps <= 0 and time.perf_counter() - train_start > 1.2 * args.time_budget:
            print(f"time budget exceeded at step {step} of {total}: stopping", flush=True)
            log["stopped_early_at"] = step
            break
    log["steps"] = step
    log["train_seconds"] = round(time.perf_counter() - train_start, 1)
    log["history"] = history

    # Store bf16 weights and continue with exactly those (upcast), so every later number is for the shipped model.
    from safetensors.torch import save_file

    model.eval()
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in state:
                v.copy_(state[k].float())
    model.config.to_json_file(str(args.out / "model_config.json"))
    try:
        log["heldout_lm_loss"] = heldout_lm_loss(model, tokenizer, device, 4096 if args.smoke else 8192, amp)
        print("held-out LM loss:", log["heldout_lm_loss"], flush=True)
    except Exception:  # noqa: BLE001 - keep going to the identification
        log["heldout_error"] = traceback.format_exc()
        print(log["heldout_error"], flush=True)
    save_log()

    gates = None
    if args.identify_steps > 0:
        try:
            from duo_compile.identify import identify

            identify_dir = Path("/tmp/duo_identify_passkey_model")
            shutil.rmtree(identify_dir, ignore_errors=True)
            t0 = time.perf_counter()
            top = min(args.max_context - 256, 8000)
            gates = identify(
                model, tokenizer, num_steps=args.identify_steps,
                context_lengths=[int(c) for c in np.linspace(min(1000, top // 2), top, 15)],
                num_passkeys=4, passkey_length=args.passkey_length, sink_size=64, recent_size=256,
                reg_weight=0.05, lr=0.02, seed=42, batch_size=2, output_dir=identify_dir,
                checkpoint_every=args.identify_steps, autocast_dtype=amp, progress=False,
            )
            shutil.copy(identify_dir / "full_attention_heads.tsv", args.out / "full_attention_heads.tsv")
            shutil.copy(identify_dir / "config.json", args.out / "identify_config.json")
            history_rows = json.loads((identify_dir / "history.json").read_text())
            log["identify"] = {"seconds": round(time.perf_counter() - t0, 1), "gates": gates.gates.round(4).tolist(),
                               "loss_every_25": [r["loss"] for r in history_rows[::25]],
                               "distill_every_25": [r["distill"] for r in history_rows[::25]]}
            print(f"identified gates ({log['identify']['seconds']}s):\n{np.round(gates.gates, 3)}", flush=True)
            from duo_compile.identify.needle import plot_gates

            plot_gates(gates, str(args.out / "gates.png"), title="passkey model: identified gates")
        except Exception:  # noqa: BLE001 - keep the trained model and report
            log["identify_error"] = traceback.format_exc()
            print(log["identify_error"], flush=True)
        save_log()

    if args.study and gates is not None:
        try:
            from duo_compile.identify.needle import needle_study, plot_needle_study

            t0 = time.perf_counter()
            contexts = (256, 384, 512) if args.smoke else (1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192)
            study = needle_study(model, tokenizer, gates=gates, context_lengths=contexts,
                                 samples_per_cell=args.samples_per_cell, passkey_length=args.passkey_length,
                                 sink_size=16 if args.smoke else 64, recent_size=32 if args.smoke else 256,
                                 batch_size=40, autocast_dtype=amp, calibration_samples=32)
            study["command"] = " ".join(sys.argv)
            study["device"] = log["device"]
            (args.out / "needle_results.json").write_text(json.dumps(study, indent=1) + "\n")
            plot_needle_study(study, str(args.out / "needle_heatmap.png"))
            log["study"] = {"seconds": round(time.perf_counter() - t0, 1), "summary": study["summary"],
                            "goals": study["goals"]}
            print("study:", json.dumps(log["study"]), flush=True)
        except Exception:  # noqa: BLE001
            log["study_error"] = traceback.format_exc()
            print(log["study_error"], flush=True)
    save_log()
    print(f"done in {log['seconds_total']}s", flush=True)


if __name__ == "__main__":
    main()
