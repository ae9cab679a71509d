"""Compile what serving runs before the first request arrives.

A scheduler runs two kinds of graph (serve/scheduler.py): a prefill chunk on one cache row (its length varies) and a
decode step over the first slots, in a few batch sizes (on CUDA a captured graph each). Each is compiled on first
use, and on CUDA the Triton kernels the attention ops launch are compiled again for each new specialisation of their
arguments: Triton specialises an integer argument on whether it is a multiple of 16, so a chunk of 8192 tokens and a
chunk of 8190 run two builds of the same kernel. Left to the first requests, all of this lands on their time to
first token (on a GPU, the compiles of a whole large model). ``warm_up`` runs, one after the other, a request whose
prompt is one chunk of a multiple of 16 tokens and one whose prompt is one chunk of another length, each for two new
tokens (the second from a decode step), through the scheduler itself, so the same code paths compile. A prefill
chunk on any row but the first gets a graph of its own too (its cache rows are views that start past the caches'
first element, where the first row's start at it: runtime/inductor_graph.py compiles the two apart), so with more
than one slot the shorter prompt runs once more while another request holds the first row. Then a decode step of
idle rows at each of the scheduler's decode batch sizes, which captures each size's graph without writing any
cache, largest first (the graphs share one memory pool: the smaller ones reuse the largest one's memory). It leaves
the scheduler empty.
"""
from __future__ import annotations

import time

from duo_compile.serve.sequence import Sequence


def warm_up_prompt_lengths(engine, token_budget: int) -> list[int]:
    """Prompt lengths, each prefilled as one chunk: a multiple of 16 tokens and one that is not, within the engine's
    cache rows (room for two new tokens), its prefill chunk and the scheduler's budget."""
    longest = min(engine.config.prefill_chunk_size or token_budget, token_budget, engine.cache_len - 2)
    return sorted({n for n in (16 * (longest // 16), min(longest, 17)) if n >= 2})


def warm_up(scheduler) -> float:
    """Run the warm-up requests to their end on ``scheduler`` (which must hold none); returns the seconds taken."""
    if scheduler.has_work():
        raise RuntimeError("warm_up needs an idle scheduler: it runs its own requests to their end")
    engine = scheduler.engine
    began = time.perf_counter()
    lengths = warm_up_prompt_lengths(engine, scheduler.token_budget)
    for length in lengths:
        _run_to_end(scheduler, _request(engine, length, 2))
    if scheduler.slots > 1 and lengths:
        short = lengths[0]
        # Holds the first row until cancelled: the second request's prefill (at most ``short`` steps, one prompt
        # token a step at the least) and its two tokens end first.
        holder = _request(engine, short, min(engine.cache_len - short, short + 4))
        scheduler.add(holder)
        while holder.cached < short and holder.finish_reason is None:
            scheduler.step()
        _run_to_end(scheduler, _request(engine, short, 2))
        scheduler.cancel(holder)
    for batch in reversed(scheduler.decode_batches):
        scheduler.run_decode([None] * batch)
    return time.perf_counter() - began


def _request(engine, length: int, new_tokens: int) -> Sequence:
    prompt = [i % engine.info.vocab_size for i in range(length)]
    return Sequence.from_generate_args(engine, prompt, max_new_tokens=new_tokens, eos_token_id=None, do_sample=False)


def _run_to_end(scheduler, seq: Sequence) -> None:
    """Add ``seq`` and step until it ends."""
    scheduler.add(seq)
    while seq.finish_reason is None:
        scheduler.step()
