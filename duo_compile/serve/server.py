"""``duo-compile serve``: an engine behind the OpenAI-compatible API (api.py), run by uvicorn.

With no model the server runs the bundled passkey model with its identified gates (duo_compile/data), so one
command starts a working server. That model is no chat model; it gets a chat template that writes the messages'
texts one after the other, so a chat request with one user message is the same prompt as a completion request.

Before it listens, the server runs ``warm_up`` (serve/warm_up.py), so the first requests do not wait for compiles.

Shutdown: on SIGTERM or Ctrl-C uvicorn stops accepting connections and waits up to ``graceful_seconds`` for the
open requests to finish; then the engine thread cancels what still runs. SIGTERM then exits with status 0 (a
requested shutdown), Ctrl-C as every command does (status 130, cli.py).
"""
from __future__ import annotations

import signal

import torch

from duo_compile.serve.memory import KVPlan, plan_kv
from duo_compile.serve.warm_up import warm_up

# The bundled model's chat template: the messages' texts in order (it was trained on plain passkey prompts).
PLAIN_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }} {% endfor %}"
BUNDLED_MODEL_NAME = "duo-passkey"
DEFAULT_PAGE_SIZE = 16  # positions per retrieval KV page (vLLM's default block size)


def bundled_engine(sparsity: float = 0.5, sink_size: int = 64, recent_size: int = 256,
                   max_seq_len: int | None = None, backend: str = "inductor", device=None,
                   prefill_chunk_size: int | None = None, page_size: int | None = DEFAULT_PAGE_SIZE):
    """The bundled passkey model compiled with its identified gates at ``sparsity``, with a transformers tokenizer
    carrying ``PLAIN_CHAT_TEMPLATE``; paged retrieval caches of ``page_size`` positions (None: one row per slot)."""
    import duo_compile
    from duo_compile.identify.passkey import load_passkey_gates, load_passkey_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, word_tokenizer = load_passkey_model(device=device, dtype=dtype)
    tokenizer = word_tokenizer.to_transformers()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    masks = load_passkey_gates().binarize(sparsity=sparsity)
    return duo_compile.compile(model, masks, sink_size=sink_size, recent_size=recent_size, max_seq_len=max_seq_len,
                               prefill_chunk_size=prefill_chunk_size, backend=backend, tokenizer=tokenizer,
                               page_size=page_size)


def describe(engine, plan: KVPlan) -> str:
    """One line for the log: slots, pages, their bytes and the bytes in all."""
    c = engine.config
    if not plan.paged:
        return (f"{plan.slots} slots of max_seq_len={c.max_seq_len}: "
                f"{(plan.row_bytes + plan.page_bytes) / 2**20:.1f} MiB of KV cache each, "
                f"{plan.kv_bytes / 2**30:.3f} GiB in all")
    return (f"{plan.slots} slots ({plan.row_bytes / 2**20:.2f} MiB of streaming KV each) and {plan.pages} retrieval "
            f"pages of {plan.page_size} positions ({plan.page_bytes / 2**20:.3f} MiB each; "
            f"{plan.pages * plan.page_size} positions), {plan.kv_bytes / 2**30:.3f} GiB in all")


def run(engine, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_slots: int = 8,
        kv_cache_memory: int | None = None, memory_fraction: float | None = None, token_budget: int | None = None,
        max_waiting: int = 64, graceful_seconds: float = 30.0, log_level: str = "info") -> int:
    """Serve ``engine`` until SIGTERM/Ctrl-C; returns the exit status (0)."""
    import uvicorn

    from duo_compile.serve.api import create_app

    plan = plan_kv(engine, max_slots, kv_cache_memory=kv_cache_memory, memory_fraction=memory_fraction)
    app = create_app(engine, plan, model_name=model_name, token_budget=token_budget, max_waiting=max_waiting)
    print(f"serving {model_name!r}: {describe(engine, plan)}", flush=True)
    print("warming up (compiling the prefill and decode steps) ...", flush=True)
    print(f"warmed up in {warm_up(app.state.scheduler):.1f} s", flush=True)  # before the engine thread starts
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_seconds)
    _server_class()(config).run()
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM, once the shutdown is done, is not raised again (uvicorn re-raises
        the signals it caught, which would end the process with SIGTERM's status instead of 0)."""

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured:
                captured.remove(sig)

    return Server
