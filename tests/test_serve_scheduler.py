"""The serving scheduler (duo_compile/serve/scheduler.py): continuous batching over the engine's cache rows gives
every request exactly what ``Engine.generate`` gives its prompt alone (tiny random Llama, eager backend, CPU).

Prompts of 3..40 tokens with 3..14 new tokens against sink 4 + recent 8: most sequences are longer than the
streaming window, so rings wrap while other rows still fill their sinks. Schedules vary the number of slots,
the per-step token budget (down to 4 tokens for 2 slots, so long prompts are prefilled a few tokens per step
while other rows decode), the arrival order and times, and cancellations that free slots mid-stream. Paged
engines (retrieval KV in pages from a pool) add page sizes (4 and 5, which prompts and sequences fill exactly,
and 16) and pools small enough that running requests are preempted and recomputed, in both modes; the
all-retrieval engine, paged, gives ``model.generate``'s tokens.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import duo_compile
from duo_compile.masks import kv_cache_bytes
from duo_compile.serve.memory import plan_kv
from duo_compile.serve.scheduler import SHORT_CHUNK, QueueFull, Scheduler
from duo_compile.serve.sequence import CANCELLED, LENGTH, STOP, Sequence
from duo_compile.serve.warm_up import warm_up
from tests.tiny_models import cached_engine, cached_tiny_model, mixed_masks

SINK, RECENT, MAX_LEN = 4, 8, 96
pytestmark = pytest.mark.usefixtures("one_capture_per_model")  # tests/shared_capture.py
LENGTHS = (5, 30, 17, 40, 3, 21, 12)
NEW = (6, 9, 4, 14, 10, 3, 5)


@functools.cache
def _engine(mode: str = "window", chunk: int | None = None, page_size: int | None = None):
    if chunk is None and page_size is None:
        return cached_engine("llama", True, mode, "eager", SINK, RECENT, MAX_LEN)
    model = cached_tiny_model("llama", True)
    return duo_compile.compile(model, mixed_masks(model), sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                               streaming_mode=mode, prefill_chunk_size=chunk, backend="eager", page_size=page_size)


def _prompts(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (n,), generator=gen).tolist() for n in LENGTHS]


@functools.cache
def _alone(mode: str = "window", chunk: int | None = None, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """Each prompt's new tokens from ``engine.generate`` of that prompt alone (greedy)."""
    engine = _engine(mode, chunk)
    out = []
    for prompt, new in list(zip(_prompts(seed), NEW))[:4 if mode == "chunk" else None]:
        ids = engine.generate(torch.tensor([prompt]), max_new_tokens=new)
        out.append(tuple(ids[0, len(prompt):].tolist()))
    return tuple(out)


def _run(scheduler: Scheduler, sequences, arrivals, cancel_at=None, max_steps: int = 3000):
    """Step until every request ended; request i joins at step ``arrivals[i]``; ``cancel_at`` {i: step}."""
    cancel_at = cancel_at or {}
    ended = {}
    for step in range(max_steps):
        for i, seq in enumerate(sequences):
            if arrivals[i] == step:
                scheduler.add(seq)
            if cancel_at.get(i) == step:
                update = scheduler.cancel(seq)
                if update is not None:
                    ended[seq.id] = update.finish_reason
        for update in scheduler.step():
            assert scheduler.num_running <= scheduler.slots
            if update.finish_reason is not None:
                ended[update.sequence.id] = update.finish_reason
        held = [p for seq in scheduler.running if seq is not None for p in seq.pages]
        assert len(held) == len(set(held)) == scheduler.pages_used  # no page held twice, none lost
        assert not set(held) & set(scheduler.free_pages)
        if len(ended) == len(sequences):
            assert not scheduler.has_work() and scheduler.num_free == scheduler.slots and scheduler.pages_used == 0
            return ended
    raise AssertionError("the scheduler did not finish every request")


@contextlib.contextmanager
def _recorded_steps(engine):
    """Yield a list that gets ``(input shape, first cache row of rows= or None)`` of every ``engine.step`` in the
    block."""
    shapes = []
    step = engine.step
    engine.step = lambda ids, *args, **kwargs: shapes.append(
        (tuple(ids.shape), kwargs["rows"].start if "rows" in kwargs else None)) or step(ids, *args, **kwargs)
    try:
        yield shapes
    finally:
        del engine.step


def _sequences(engine, prompts, **kwargs):
    return [Sequence.from_generate_args(engine, p, max_new_tokens=n, **kwargs) for p, n in zip(prompts, NEW)]


SCHEDULES = {
    # slots, token budget, arrival step of each request
    "two-slots-budget-4": (2, 4, [0, 0, 0, 3, 3, 9, 9]),
    "three-slots-staggered": (3, 7, [0, 1, 1, 5, 9, 9, 30]),
    "reversed-arrivals-wide": (8, 64, [12, 10, 8, 6, 4, 2, 0]),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_greedy_outputs_equal_generate_alone(name):
    slots, budget, arrivals = SCHEDULES[name]
    engine = _engine()
    expected = _alone()
    sequences = _sequences(engine, _prompts())
    scheduler = Scheduler(engine, slots, token_budget=budget)
    with _recorded_steps(engine) as shapes:  # a prompt's last single token joins the decode batch, never alone
        ended = _run(scheduler, sequences, arrivals)
    for seq, want in zip(sequences, expected):
        assert tuple(seq.tokens) == want
        assert ended[seq.id] == LENGTH
    decode_shapes = {shape for shape, _ in shapes if shape[1] == 1}
    assert all(shape != (1, 1) for shape, _ in shapes) and decode_shapes <= {(n, 1) for n in scheduler.decode_batches}


@pytest.mark.parametrize("page_size", [None, 4])
def test_running_requests_keep_the_lowest_slots_and_decode_in_the_smallest_batch(page_size):
    """As requests end, the ones in higher slots move down (``Engine.move_row``), so every decode step runs the
    first slots in the smallest of ``decode_batches`` that holds them; the moved requests' tokens stay
    ``generate``'s."""
    engine = _engine(page_size=page_size)
    sequences = _sequences(engine, _prompts())
    scheduler = Scheduler(engine, 8, token_budget=64)
    assert scheduler.decode_batches == [2, 4, 8] and Scheduler(engine, 20).decode_batches == [2, 4, 8, 16, 20]
    batches, moves = [], []
    step, move_row = engine.step, engine.move_row

    def checked_step(ids, *args, **kwargs):
        if ids.shape[1] == 1:  # a decode step: the running requests hold the first slots
            held = [seq is not None for seq in scheduler.running]
            assert held == sorted(held, reverse=True)
            highest = max(i for i, seq in enumerate(scheduler.running) if seq is not None and scheduler._decodes(seq))
            assert ids.shape[0] == min(n for n in scheduler.decode_batches if n > highest)
            batches.append(ids.shape[0])
        return step(ids, *args, **kwargs)

    engine.step = checked_step
    engine.move_row = lambda *args: moves.append(args) or move_row(*args)
    try:
        _run(scheduler, sequences, [0] * len(sequences))
    finally:
        del engine.step, engine.move_row
    assert [tuple(s.tokens) for s in sequences] == list(_alone())
    assert moves and set(batches) == {2, 4, 8}


def test_a_short_chunk_runs_only_as_its_steps_first_chunk():
    """A chunk of ``SHORT_CHUNK`` tokens or fewer (run by the ops' few-token kernels, whose tiles depend on its
    length) never runs after another chunk in one step, so a busy step's leftover budget does not make chunks of
    every short length; several chunks still share steps, and the outputs are ``generate``'s."""
    engine = _engine()
    sequences = _sequences(engine, _prompts())
    scheduler = Scheduler(engine, 3, token_budget=40)
    chunks_per_step, step = [], scheduler.step

    def recorded_step():
        with _recorded_steps(engine) as shapes:
            updates = step()
        chunks_per_step.append([shape[1] for shape, _ in shapes if shape[1] > 1])  # decode steps: one token
        return updates

    scheduler.step = recorded_step
    _run(scheduler, sequences, [0] * 7)
    assert [tuple(s.tokens) for s in sequences] == list(_alone())
    assert any(len(chunks) > 1 for chunks in chunks_per_step)
    assert all(n > SHORT_CHUNK for chunks in chunks_per_step for n in chunks[1:]), chunks_per_step


def test_chunk_mode_prefills_in_the_engines_chunks():
    """Chunk mode: the streaming heads' prefill depends on the chunk boundaries; the scheduler keeps the engine's."""
    engine = _engine("chunk", 8)
    sequences = _sequences(engine, _prompts()[:4])
    _run(Scheduler(engine, 2, token_budget=2), sequences, [0, 0, 2, 2])
    assert [tuple(s.tokens) for s in sequences] == list(_alone("chunk", 8)[:4])


def test_cancelling_frees_the_slot_and_the_others_stay_exact():
    engine = _engine()
    expected = _alone()
    sequences = _sequences(engine, _prompts())
    scheduler = Scheduler(engine, 2, token_budget=6)
    # 1 is cancelled while it prefills, 3 while it decodes, 6 while it waits for a slot.
    ended = _run(scheduler, sequences, [0] * 7, cancel_at={1: 2, 3: 25, 6: 1})
    for i, (seq, want) in enumerate(zip(sequences, expected)):
        if i in (1, 3, 6):
            assert ended[seq.id] == CANCELLED and tuple(seq.tokens) == want[:len(seq.tokens)]
        else:
            assert tuple(seq.tokens) == want and ended[seq.id] == LENGTH
    assert len(sequences[3].tokens) > 0  # it was decoding when cancelled
    assert scheduler.cancel(sequences[0]) is None  # already ended


def test_eos_and_sampling_settings_per_request_equal_generate():
    """Per-request settings through transformers' processors/criteria: an eos id that stops one request early,
    sampling with top-k/top-p/temperature and a seeded generator, a repetition penalty: each as generate alone."""
    engine = _engine()
    prompts = _prompts(1)
    greedy = _alone(seed=1)
    eos = greedy[3][4]  # request 3 stops at its 5th token (or earlier, if that token came before)
    settings = [
        {"do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.7},
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 2},
        {"eos_token_id": eos, "pad_token_id": 0},
        {"do_sample": True, "temperature": 1.5, "min_p": 0.05},
    ]
    expected = []
    for i, (prompt, new, kwargs) in enumerate(zip(prompts, NEW, settings)):
        gen = torch.Generator().manual_seed(100 + i)
        ids = engine.generate(torch.tensor([prompt]), max_new_tokens=new, generator=gen, **kwargs)
        expected.append(ids[0, len(prompt):].tolist())
    sequences = [
        Sequence.from_generate_args(engine, p, max_new_tokens=n, generator=torch.Generator().manual_seed(100 + i), **kw)
        for i, (p, n, kw) in enumerate(zip(prompts, NEW, settings))
    ]
    ended = _run(Scheduler(engine, 3, token_budget=5), sequences, [0, 0, 1, 2, 3])
    assert [s.tokens for s in sequences] == expected
    assert ended[sequences[3].id] == STOP and sequences[3].tokens[-1] == eos
    assert len(sequences[3].tokens) <= 5


def test_refusals():
    engine = _engine()
    scheduler = Scheduler(engine, 2, max_waiting=1)
    scheduler.add(Sequence.from_generate_args(engine, [1, 2, 3], max_new_tokens=2))
    with pytest.raises(QueueFull):
        scheduler.add(Sequence.from_generate_args(engine, [1, 2, 3], max_new_tokens=2))
    with pytest.raises(ValueError, match="max_seq_len=96"):
        Sequence.from_generate_args(engine, [1] * 90, max_new_tokens=7)
    with pytest.raises(ValueError, match="token_budget must be an integer >= 2"):
        Scheduler(engine, 2, token_budget=1)
    with pytest.raises(ValueError, match="streamer"):
        Sequence.from_generate_args(engine, [1], streamer=object())


def test_slots_from_a_kv_memory_budget():
    """The same budget holds more DuoAttention rows than all-retrieval rows (the point of serving DuoAttention)."""
    engine = _engine()
    row = engine.planned_cache_bytes(1, MAX_LEN)
    assert plan_kv(engine, 100, kv_cache_memory=10 * row).slots == 10
    assert plan_kv(engine, 4, kv_cache_memory=10 * row).slots == 4
    full_row = kv_cache_bytes(engine.info, engine.masks, seq_len=MAX_LEN, dtype=engine.dtype, sink_size=SINK,
                              recent_size=RECENT).full_attention
    assert row < full_row and 10 * row // full_row < 10
    with pytest.raises(ValueError, match="holds no request"):
        plan_kv(engine, 4, kv_cache_memory=row - 1)
    assert 1 <= plan_kv(engine, 3, memory_fraction=0.5).slots <= 3


def test_step_on_some_rows_touches_only_those_rows():
    """``Engine.step(rows=slice)``: the chosen cache rows get what a batch of those rows alone gets, bitwise; the
    other rows are not written; a slice that does not match the input is refused before anything runs."""
    engine = _engine()
    prompt = torch.tensor([_prompts()[1]])
    engine.release()
    engine.allocate(1)  # zeros: the slots the prompt writes are the non-zero ones
    alone = engine.step(prompt, 0)
    alone_caches = [c.clone() for c in engine.caches]
    engine.allocate(3)
    for cache in engine.caches:
        cache.normal_()
    before = [c.clone() for c in engine.caches]
    logits = engine.step(prompt, 0, rows=slice(1, 2))
    torch.testing.assert_close(logits, alone, rtol=0, atol=0)
    for cache, old, ref in zip(engine.caches, before, alone_caches):
        assert torch.equal(cache[0], old[0]) and torch.equal(cache[2], old[2])
        written = ref[0] != 0  # the slots the prompt wrote (the rest of the row keeps its old values)
        assert torch.equal(cache[1][written], ref[0][written])
    with pytest.raises(ValueError, match="select 2 cache rows, got input batch 1"):
        engine.step(prompt, 0, rows=slice(0, 2))
    with pytest.raises(ValueError, match="rows must be a slice"):
        engine.step(prompt, 0, rows=1)


def test_engine_thread_survives_a_failed_step(monkeypatch):
    """serve/loop.py: a step that raises ends the running request with an error; the thread serves the next one
    exactly, and stop() cancels what waits."""
    import queue

    from duo_compile.serve.loop import EngineLoop

    engine = _engine()
    loop = EngineLoop(Scheduler(engine, 1, max_waiting=4))
    real_step, calls = engine.step, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "step", failing_once)
    done: queue.Queue = queue.Queue()
    prompt = _prompts()[0]
    first = Sequence.from_generate_args(engine, prompt, on_update=done.put, max_new_tokens=NEW[0])
    second = Sequence.from_generate_args(engine, prompt, on_update=done.put, max_new_tokens=NEW[0])
    loop.start()
    loop.submit(first)
    loop.submit(second)
    ends = {}
    while len(ends) < 2:
        update = done.get(timeout=60)
        if update.finish_reason is not None:
            ends[update.sequence.id] = update
    assert ends[first.id].finish_reason == "error" and "boom" in ends[first.id].error
    assert ends[second.id].finish_reason == LENGTH and tuple(second.tokens) == _alone()[0]
    assert loop.alive and loop.counts == (0, 0, 0, 0)
    third = Sequence.from_generate_args(engine, prompt, on_update=done.put, max_new_tokens=50)
    loop.submit(third)
    loop.stop(timeout=30)
    assert third.finish_reason == CANCELLED and not loop.alive


def test_warm_up_runs_both_chunk_kinds_and_a_decode_step_then_leaves_every_slot_free():
    """serve/warm_up.py: a chunk of a multiple of 16 tokens, one of another length, the latter again on the second
    row (a graph of its own), a decode step of each decode batch size; the requests served afterwards still get
    what ``generate`` gives them (the warm-up's rows are never read)."""
    engine = _engine()
    scheduler = Scheduler(engine, 3, token_budget=40)
    with _recorded_steps(engine) as shapes:
        warm_up(scheduler)
    assert sorted(set(shapes)) == [((1, 17), 0), ((1, 17), 1), ((1, 32), 0), ((2, 1), 0), ((3, 1), 0)]
    assert not scheduler.has_work() and scheduler.num_free == 3
    with pytest.raises(RuntimeError, match="idle scheduler"):
        scheduler.add(_sequences(engine, _prompts())[0])
        warm_up(scheduler)
    scheduler.cancel(scheduler.waiting[0])
    sequences = _sequences(engine, _prompts())
    _run(scheduler, sequences, [0] * 7)
    assert [tuple(s.tokens) for s in sequences] == list(_alone())


# ---------------------------------------------------------------------------------------------------- paged KV
PAGED_SCHEDULES = {
    # page size, slots, pages in the pool, token budget, arrival step of each request. LENGTHS hold multiples
    # of 4 and 5 (prompts 5, 30, 40, 12; sequences 24, 30 and 40 + 14 = 54 with their new tokens), so pages fill
    # exactly; 14 pages of 4, 11 of 5 or 7 of 16 hold the longest request and little else, so requests are
    # preempted.
    "page-4-preempting": (4, 3, 14, 12, [0, 0, 0, 3, 3, 9, 9]),
    "page-5-preempting-reversed": (5, 4, 11, 64, [12, 10, 8, 6, 4, 2, 0]),
    "page-16-preempting": (16, 5, 7, 9, [0, 2, 2, 3, 3, 4, 4]),
}


@pytest.mark.parametrize("name", PAGED_SCHEDULES)
def test_paged_greedy_outputs_equal_generate_alone(name):
    """Paged retrieval KV: each request gives ``generate``'s tokens for its prompt alone (on the engine without
    paging), whatever the page size, and also when the pool runs out and requests are preempted and recomputed."""
    page_size, slots, pages, budget, arrivals = PAGED_SCHEDULES[name]
    engine = _engine(page_size=page_size)
    sequences = _sequences(engine, _prompts())
    scheduler = Scheduler(engine, slots, token_budget=budget, num_pages=pages)
    ended = _run(scheduler, sequences, arrivals)
    assert [tuple(s.tokens) for s in sequences] == list(_alone())
    assert all(ended[s.id] == LENGTH for s in sequences)
    assert (scheduler.preemptions > 0) == ("preempting" in name)


def test_paged_chunk_mode_with_preemption_equals_generate_alone():
    """Chunk mode: a preempted request recomputes its prompt in the engine's chunks and its generated tokens one
    per step, as they first ran: the tokens stay ``generate``'s."""
    engine = _engine("chunk", 8, page_size=4)
    sequences = _sequences(engine, _prompts()[:4])
    scheduler = Scheduler(engine, 3, token_budget=3, num_pages=15)
    _run(scheduler, sequences, [0, 0, 0, 1])
    assert [tuple(s.tokens) for s in sequences] == list(_alone("chunk", 8)[:4])
    assert scheduler.preemptions > 0


def test_paged_all_retrieval_engine_equals_model_generate():
    """Every head retrieval (the full-attention baseline the serving benchmark compares with), paged: each request
    gives Hugging Face's ``model.generate`` tokens."""
    model = cached_tiny_model("llama", True)
    config = model.config
    masks = duo_compile.HeadMasks.all_retrieval(config.num_hidden_layers, config.num_key_value_heads)
    engine = duo_compile.compile(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                                 backend="eager", page_size=4)
    assert not any(spec.kind == "streaming" for spec in engine.cache_specs)
    sequences = [s for s in _sequences(engine, _prompts()) if s.length <= 32]  # 5 requests of 11..24 positions
    scheduler = Scheduler(engine, 3, token_budget=8, num_pages=8)
    _run(scheduler, sequences, [0] * len(sequences))
    assert scheduler.preemptions > 0
    for seq in sequences:
        want = model.generate(torch.tensor([seq.prompt]), max_new_tokens=len(seq.tokens), do_sample=False,
                              min_new_tokens=len(seq.tokens))
        assert seq.tokens == want[0, len(seq.prompt):].tolist()


def test_paged_cancel_frees_pages_at_once_and_pages_grow_with_the_sequence():
    engine = _engine(page_size=4)
    sequences = _sequences(engine, _prompts())
    scheduler = Scheduler(engine, 2, token_budget=64)
    scheduler.add(sequences[3])  # 40 prompt tokens: 10 pages, + 1 for its first token's position
    scheduler.step()
    assert sequences[3].pages and len(sequences[3].pages) == 11 == scheduler.pages_used
    for _ in range(5):  # decodes positions 40..44: a 12th page from position 44
        scheduler.step()
    assert len(sequences[3].pages) == 12 == scheduler.pages_used
    scheduler.cancel(sequences[3])
    assert scheduler.pages_used == 0 and len(scheduler.free_pages) == scheduler.num_pages


def test_paged_engine_generate_equals_unpaged():
    """A paged engine's own ``generate`` (each row its run of pages) gives the tokens of the engine without paging,
    padded batch included."""
    engine, plain = _engine(page_size=5), _engine()
    prompts = _prompts()[:3]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=6),
                       plain.generate(ids, attention_mask=mask, max_new_tokens=6))


def test_paged_refusals():
    engine = _engine(page_size=4)
    row = engine.streaming_row_bytes()
    with pytest.raises(ValueError, match="page_size must be an integer >= 1, got 0"):
        duo_compile.compile(cached_tiny_model("llama", True), mixed_masks(cached_tiny_model("llama", True)),
                            max_seq_len=MAX_LEN, backend="eager", page_size=0)
    with pytest.raises(ValueError, match="holds no page"):
        plan_kv(engine, 3, kv_cache_memory=3 * row + engine.page_bytes() - 1)
    with pytest.raises(ValueError, match="num_pages must be an integer >= 1, got 0"):
        Scheduler(engine, 2, num_pages=0)
    with pytest.raises(ValueError, match="needs a paged engine"):
        Scheduler(_engine(), 2, num_pages=8)
    scheduler = Scheduler(engine, 2, num_pages=10)
    with pytest.raises(ValueError, match="needs 12 pages of 4 positions; the pool holds 10"):
        scheduler.add(Sequence.from_generate_args(engine, _prompts()[3], max_new_tokens=6))
    with pytest.raises(ValueError, match="target row 2 is outside the allocated batch of 2"):
        engine.move_row(0, 2, 8)
    with pytest.raises(ValueError, match="source must be an integer >= 0, got -1"):
        engine.move_row(-1, 0, 8)
    with pytest.raises(ValueError, match="block_table needs a paged engine"):
        _engine().step(torch.tensor([[1]]), 0, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="step needs a block_table"):
        engine.step(torch.tensor([[1], [2]]), 0)  # the scheduler's pool is smaller than every row's max_seq_len
    with pytest.raises(ValueError, match=r"paged retrieval caches \(page_size=4\)"):
        duo_compile.export(engine, "/nonexistent/engine.pt2", backend="package")


def test_pages_from_a_kv_memory_budget():
    """The budget's split: streaming rows for every slot, the rest pages; the same budget holds about twice the
    positions for DuoAttention (half the heads retrieval) as for all heads retrieval."""
    engine = _engine(page_size=4)
    row, page = engine.streaming_row_bytes(), engine.page_bytes()
    plan = plan_kv(engine, 3, kv_cache_memory=3 * row + 10 * page + page - 1)
    assert (plan.slots, plan.pages, plan.page_size, plan.paged) == (3, 10, 4, True)
    assert plan.kv_bytes == 3 * row + 10 * page
    assert plan_kv(engine, 2).pages == 2 * MAX_LEN // 4  # no budget: every slot's max_seq_len
    assert plan_kv(engine, 2, kv_cache_memory=1 << 30).pages == 2 * MAX_LEN // 4  # capped there
    full_page = 2 * engine.dtype.itemsize * 4 * engine.info.num_layers * engine.info.num_kv_heads * engine.info.head_dim
    assert page * 2 == full_page
    Scheduler(engine, plan.slots, num_pages=plan.pages)
    assert engine.planned_cache_bytes(3, MAX_LEN, 10) == plan.kv_bytes == sum(c.nbytes for c in engine.caches)
