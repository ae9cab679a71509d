"""Reliability, round two: one engine shared by threads, sizes that cannot work, models without weights, and who
owns the weights after ``compile``.

- Concurrency: an engine owns one cache, so its entry points (``generate``, ``prefill``, ``step``, ``allocate``,
  ``release``, ``kv_cache_bytes``) take one lock: concurrent calls run one after the other, never interleaved.
- Sizes: a streaming cache is never larger than the sequence it can hold (``recent`` capped so that
  ``sink + recent <= max_seq_len``, same outputs as asked); the planned cache is checked against the device's
  free memory, by ``compile`` (batch 1, ``max_seq_len``) and by ``allocate``; positions past the model's trained
  length warn.
- Weights: a parameter or buffer on the meta device is refused by ``compile``, naming it; after ``compile`` the
  engine owns copies of everything it uses (an in-place edit of the model never reaches it; it shares no storage
  with the model, which can be dropped).

Eager backend, tiny random-weight models (tests/tiny_models.py), CPU.
"""
from __future__ import annotations

import gc
import sys
import threading
import warnings
import weakref

import pytest
import torch
from transformers import LlamaForCausalLM

import duo_compile
from duo_compile.oracle import oracle_generate
from duo_compile.runtime import engine as runtime_engine
from duo_compile.runtime.engine import Engine
from tests.shared_capture import compile_reuses_captures
from tests.tiny_models import mixed_gates, tiny_config, tiny_model


SINK, RECENT, MAX_LEN, VOCAB = 4, 8, 64, 96
GATES = mixed_gates(3, 2)
MASKS = duo_compile.HeadMasks.from_gates(GATES)
COMPILER = sys.modules["duo_compile.compiler"]
JOIN_S = 120  # a thread that has not finished by then is a hang (a failure), never a slow machine


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _compile(model, **kwargs) -> Engine:
    args = dict(sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN, backend="eager")
    args.update(kwargs)
    return duo_compile.compile(model, MASKS, **args)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", gqa=True)


@pytest.fixture(scope="module")
def engine(model):
    with compile_reuses_captures():  # the capped-cache tests compile ``model`` again from this capture
        return _compile(model)


@pytest.fixture
def no_capture(monkeypatch):
    """compile must refuse before doing any work: capturing the model is a test failure."""

    def tripwire(*args, **kwargs):
        raise AssertionError("compile captured the model before refusing its arguments")

    monkeypatch.setattr(COMPILER, "capture", tripwire)


def _run_threads(targets) -> list:
    """Start one thread per target at once (a barrier), join them; re-raise the first error a thread hit."""
    barrier = threading.Barrier(len(targets))
    results, errors = [None] * len(targets), []

    def work(i, target):
        barrier.wait()
        try:
            results[i] = target()
        except BaseException as err:  # noqa: BLE001 - reported below, with the thread's index
            errors.append((i, err))

    threads = [threading.Thread(target=work, args=(i, t), daemon=True) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"
    if errors:
        i, err = errors[0]
        raise AssertionError(f"thread {i} failed: {type(err).__name__}: {err}") from err
    return results


# --------------------------------------------------------------------------------------------- concurrency
# (batch, prompt length, new tokens, seed): two of batch 2 (same cache shape: their steps would interleave on one
# cache), one of batch 1 and one of batch 3 (another batch size: a reallocation under another thread's feet).
REQUESTS = [(2, 20, 6, 0), (2, 13, 6, 1), (1, 25, 6, 2), (3, 9, 6, 3)]


def test_threads_generating_on_one_engine_get_what_each_gets_alone(engine):
    alone = [engine.generate(_ids(b, n, s), max_new_tokens=new) for b, n, new, s in REQUESTS]
    for round_ in range(3):  # a few rounds: interleavings differ from run to run
        targets = [lambda b=b, n=n, new=new, s=s: engine.generate(_ids(b, n, s), max_new_tokens=new)
                   for b, n, new, s in REQUESTS]
        together = _run_threads(targets)
        for i, (got, want) in enumerate(zip(together, alone)):
            assert torch.equal(got, want), f"round {round_}: request {i} {REQUESTS[i]} got other tokens"


@pytest.mark.parametrize("call", ["generate", "prefill", "step", "allocate", "release", "kv_cache_bytes"])
def test_every_entry_point_waits_for_a_generate_in_progress(engine, call):
    """A generate holds the engine from its first allocation to its last token: a call of any entry point from
    another thread waits for it (here the first graph run of the generate blocks until released), and the generate
    still gives its own tokens."""
    inside, go, blocked = threading.Event(), threading.Event(), []

    def runner(*args):  # blocks the first thread's generate only: the second thread's graph runs never wait here
        if not go.is_set() and threading.current_thread() in blocked:
            inside.set()
            go.wait(JOIN_S)
        return engine.graph(*args)

    gated = Engine(engine.graph, engine.cache_specs, engine.config, engine.info, engine.masks, engine.device,
                   engine.dtype, runner=runner)
    ids, new = _ids(2, 20, 0), 6
    want = gated.generate(ids, max_new_tokens=new)
    result, other_result = {}, {}
    first = threading.Thread(target=lambda: result.setdefault("out", gated.generate(ids, max_new_tokens=new)),
                             daemon=True)
    calls = {
        "generate": lambda: gated.generate(_ids(1, 5, 9), max_new_tokens=2),
        "prefill": lambda: gated.prefill(ids[:, :4]),
        "step": lambda: gated.step(ids[:, :1], 0),
        "allocate": lambda: gated.allocate(3),
        "release": gated.release,
        "kv_cache_bytes": gated.kv_cache_bytes,
    }
    second = threading.Thread(target=lambda: other_result.setdefault("out", calls[call]()), daemon=True)
    blocked.append(first)
    first.start()
    try:
        assert inside.wait(JOIN_S), "the generate never reached the graph"
        second.start()
        second.join(0.5)
        assert second.is_alive(), f"{call} ran while another thread's generate was in progress"
    finally:
        go.set()
        first.join(JOIN_S)
        if second.is_alive() or second.ident is not None:
            second.join(JOIN_S)
    assert not first.is_alive() and not second.is_alive()
    assert torch.equal(result["out"], want)
    assert "out" in other_result, f"{call} failed after the generate finished"


def test_the_lock_is_reentrant_and_released_after_an_error(engine):
    """generate calls allocate/prefill/step under the lock it holds; a refused call releases it."""
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(_ids(1, 4, 0), max_new_tokens=-1)
    done = _run_threads([lambda: engine.generate(_ids(1, 4, 0), max_new_tokens=2)])
    assert done[0].shape == (1, 6)


# ---------------------------------------------------------------------------------------------------- sizes
def _streaming_slots(engine) -> list[int]:
    return [spec.slots for spec in engine.cache_specs if spec.slots is not None]


# Each case compiles an engine: four cases, both modes, each kind of cap once.
CAPPED = {"recent-1e9-window": (SINK, 10**9, "window"), "sink-1e12-chunk": (10**12, RECENT, "chunk"),
          "sink-plus-recent-above-max-len-chunk": (40, 40, "chunk"), "no-sink-huge-recent-window": (0, 10**6, "window")}


@pytest.mark.parametrize("sink,recent,mode", list(CAPPED.values()), ids=list(CAPPED))
def test_streaming_cache_is_capped_at_max_seq_len_with_the_same_output(model, sink, recent, mode):
    """A streaming head with sink + recent >= max_seq_len sees every token anyway: the engine caps recent (and sink
    only when sink alone reaches max_seq_len) so that its cache holds at most max_seq_len slots, and gives what
    the oracle gives for the sizes the user asked. engine.config holds the sizes the engine runs with;
    engine.requested_config the ones asked."""
    with compile_reuses_captures():  # tests/shared_capture.py: the capture is not the subject here
        engine = _compile(model, sink_size=sink, recent_size=recent, streaming_mode=mode, prefill_chunk_size=7)
    assert engine.requested_config.sink_size == sink and engine.requested_config.recent_size == recent
    c = engine.config
    assert c.sink_size + c.recent_size == MAX_LEN and c.sink_size == min(sink, MAX_LEN - 1) and c.recent_size >= 1
    assert _streaming_slots(engine) and all(s <= MAX_LEN for s in _streaming_slots(engine))
    ids = _ids(2, 30, 5)
    out = engine.generate(ids, max_new_tokens=MAX_LEN - 30, output_scores=True, return_dict_in_generate=True)
    tokens, scores = oracle_generate(model, MASKS, ids, MAX_LEN - 30, sink_size=sink, recent_size=recent,
                                     streaming_mode=mode, prefill_chunk_size=7)
    assert torch.equal(out.sequences, tokens)
    for got, want in zip(out.scores, scores):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    used = engine.kv_cache_bytes()
    assert used.total <= used.full_attention


def test_sizes_within_max_seq_len_are_kept_as_asked(engine):
    assert engine.config == engine.requested_config
    assert (engine.config.sink_size, engine.config.recent_size) == (SINK, RECENT)
    assert _streaming_slots(engine) and all(s == SINK + RECENT for s in _streaming_slots(engine))


def test_compile_refuses_a_cache_larger_than_free_memory(model, no_capture):
    big = 2**34
    want = duo_compile.kv_cache_bytes(model, MASKS, seq_len=big, dtype=torch.float32, sink_size=SINK,
                                      recent_size=RECENT).total
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_seq_len is also past the trained positions (tested below)
        with pytest.raises(ValueError, match=rf"max_seq_len={big} needs a KV cache of {want} bytes .* at batch 1, "
                                             rf"more than the \d+ bytes free on cpu") as err:
            _compile(model, max_seq_len=big)
    assert "\n" not in str(err.value)


def test_compile_names_both_numbers_when_the_cache_does_not_fit(model, no_capture, monkeypatch):
    monkeypatch.setattr(runtime_engine, "free_memory_bytes", lambda device: 1000)
    want = duo_compile.kv_cache_bytes(model, MASKS, seq_len=MAX_LEN, dtype=torch.float32, sink_size=SINK,
                                      recent_size=RECENT).total
    with pytest.raises(ValueError, match=rf"max_seq_len={MAX_LEN} needs a KV cache of {want} bytes .*"
                                         rf"more than the 1000 bytes free on cpu"):
        _compile(model)


def test_check_memory_false_skips_the_check_and_must_be_a_bool(model, no_capture, monkeypatch):
    """check_memory=False (for an engine whose caches are always allocated shorter, as the benchmark does) goes on
    to the capture (the tripwire); a non-bool is refused."""
    monkeypatch.setattr(runtime_engine, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(AssertionError, match="compile captured the model"):
        _compile(model, check_memory=False)
    with pytest.raises(ValueError, match=r"check_memory must be True or False, got 'no'"):
        _compile(model, check_memory="no")


def test_compile_checks_the_capped_cache_not_the_asked_one(model, no_capture, monkeypatch):
    """recent_size=10**9 plans max_seq_len slots per streaming head, not 10**9: it fits, and compile goes on (to
    the capture, which the tripwire stops)."""
    with pytest.raises(AssertionError, match="compile captured the model"):
        _compile(model, recent_size=10**9)


def test_allocate_refuses_caches_larger_than_free_memory(engine, monkeypatch):
    engine.generate(_ids(2, 10, 0), max_new_tokens=2)
    ptrs, values = [c.data_ptr() for c in engine.caches], [c.clone() for c in engine.caches]
    batch = 10**9
    want = batch * sum(s.num_kv_heads * (MAX_LEN if s.slots is None else s.slots) * s.head_dim
                       for s in engine.cache_specs) * 4
    with pytest.raises(RuntimeError, match=rf"allocate\(batch_size={batch}, max_seq_len={MAX_LEN}\) needs {want} "
                                           rf"bytes of KV cache \([\d.]+ GiB\), more than the \d+ bytes free on cpu"):
        engine.allocate(batch)
    monkeypatch.setattr(runtime_engine, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(torch.OutOfMemoryError, match=r"allocate\(batch_size=4, max_seq_len=48\) needs 92160 bytes .*"
                                                     r"more than the 59368 bytes free on cpu"):
        engine.allocate(4, 48)  # 92160 bytes: more than 1000 free + 58368 of caches it would free first
    assert engine.batch_size == 2 and [c.data_ptr() for c in engine.caches] == ptrs
    assert all(torch.equal(c, v) for c, v in zip(engine.caches, values))


def test_allocate_counts_the_caches_it_frees_first(engine, monkeypatch):
    """Reallocating frees the old caches before allocating: their bytes count as free."""
    engine.allocate(2)
    held = sum(c.numel() * c.element_size() for c in engine.caches)
    monkeypatch.setattr(runtime_engine, "free_memory_bytes", lambda device: 0)
    engine.allocate(2, MAX_LEN - 1)  # smaller than what it frees: allowed with nothing else free
    assert sum(c.numel() * c.element_size() for c in engine.caches) <= held
    monkeypatch.undo()
    engine.allocate(2)


def test_free_memory_is_read_from_the_device():
    free = runtime_engine.free_memory_bytes(torch.device("cpu"))
    assert isinstance(free, int) and 0 < free
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert free <= total
    assert runtime_engine.free_memory_bytes(torch.device("meta")) is None


def test_max_seq_len_past_the_trained_positions_warns(model, no_capture):
    trained = model.config.max_position_embeddings
    with pytest.warns(UserWarning, match=rf"max_seq_len={2 * trained} exceeds the model's max_position_embeddings="
                                         rf"{trained}"):
        with pytest.raises(AssertionError, match="compile captured the model"):
            _compile(model, max_seq_len=2 * trained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AssertionError, match="compile captured the model"):
            _compile(model, max_seq_len=trained)


# ---------------------------------------------------------------------------------------------- meta weights
def _meta_model():
    with torch.device("meta"):
        return tiny_model("llama", gqa=True)


def _meta_inv_freq():
    model = tiny_model("llama", gqa=True)
    rotary = model.model.rotary_emb
    rotary.register_buffer("inv_freq", torch.empty_like(rotary.inv_freq, device="meta"), persistent=False)
    return model


def _meta_norm():
    model = tiny_model("llama", gqa=True)
    model.model.norm.weight = torch.nn.Parameter(torch.empty_like(model.model.norm.weight, device="meta"))
    return model


@pytest.mark.parametrize("build,message", [
    (_meta_model, r"parameter 'model\.embed_tokens\.weight' is on the meta device \(no data\) \(and \d+ more\)"),
    (_meta_inv_freq, r"buffer 'model\.rotary_emb\.inv_freq' is on the meta device \(no data\)"),
], ids=["all-parameters", "rotary-inv-freq-buffer"])
def test_compile_refuses_a_model_without_weights(build, message, no_capture):
    with pytest.raises(ValueError, match=message) as err:
        _compile(build())
    assert "\n" not in str(err.value)


def test_a_meta_parameter_among_real_ones_is_named_as_spread_over_devices(no_capture):
    """One meta parameter among CPU ones is the devices error (the existing message), which names meta."""
    with pytest.raises(ValueError, match=r"spread over devices \['cpu', 'meta'\]"):
        _compile(_meta_norm())


# ---------------------------------------------------------------------------------------------- weight copies
EDITED = {
    "q_proj": lambda m: m.model.layers[1].self_attn.q_proj.weight,
    "gate_proj": lambda m: m.model.layers[0].mlp.gate_proj.weight,
    "down_proj": lambda m: m.model.layers[2].mlp.down_proj.weight,
    "lm_head": lambda m: m.lm_head.weight,
    "embed_tokens": lambda m: m.model.embed_tokens.weight,
    "norm": lambda m: m.model.layers[1].input_layernorm.weight,
}


@pytest.fixture(scope="module", params=[True, False], ids=["fused", "unfused"])
def owned(request):
    """A model of its own (the tests edit it and put it back), its engine and the engine's output before."""
    model = tiny_model("llama", gqa=True, seed=3)
    engine = _compile(model, fuse_projections=request.param)
    ids = _ids(2, 16, 7)
    out = engine.generate(ids, max_new_tokens=5, output_scores=True, return_dict_in_generate=True)
    return model, engine, ids, out


def _engine_tensors(engine):
    for module in engine.graph.modules():
        yield from ((f"param {n}", t) for n, t in module._parameters.items() if t is not None)
        yield from ((f"buffer {n}", t) for n, t in module._buffers.items() if t is not None)
        yield from ((f"attribute {n}", t) for n, t in vars(module).items() if isinstance(t, torch.Tensor))


def _storage(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


@pytest.mark.parametrize("weight", list(EDITED))
def test_in_place_edits_of_the_model_never_reach_the_engine(owned, weight):
    model, engine, ids, before = owned
    tensor = EDITED[weight](model)
    saved = tensor.detach().clone()
    with torch.no_grad():
        logits_before = model(ids).logits
        try:
            tensor.mul_(-3.0).add_(0.5)
            assert not torch.allclose(model(ids).logits, logits_before), "the edit does not change the model"
            after = engine.generate(ids, max_new_tokens=5, output_scores=True, return_dict_in_generate=True)
        finally:
            tensor.copy_(saved)
    assert torch.equal(after.sequences, before.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.scores, before.scores)), f"editing {weight} reached the engine"


def test_the_engine_shares_no_storage_with_the_model(owned):
    model, engine, _, _ = owned
    model_storages = {_storage(t) for t in (*model.parameters(), *model.buffers())}
    shared = [name for name, t in _engine_tensors(engine) if _storage(t) in model_storages]
    assert not shared, f"engine tensors sharing the model's storage: {shared}"


def test_the_model_can_be_dropped_after_compile():
    """Nothing of the engine refers to the model or its weights: dropping the model frees them all."""
    model = tiny_model("llama", gqa=True, seed=4)
    engine = _compile(model)
    ids = _ids(1, 12, 0)
    want = engine.generate(ids, max_new_tokens=4)
    refs = [weakref.ref(model)] + [weakref.ref(t) for t in (*model.parameters(), *model.buffers())]
    del model
    gc.collect()
    alive = [r for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of the model's objects are still alive after del + gc"
    assert torch.equal(engine.generate(ids, max_new_tokens=4), want)


def test_weights_copied_by_the_passes_are_not_copied_again(owned):
    """Tensors the passes already made (reordered, fused) are kept as they are; tied weights stay one copy."""
    _, engine, _, _ = owned
    storages = [_storage(t) for _, t in _engine_tensors(engine)]
    assert len(storages) == len(set(storages)), "two engine tensors share a storage (a duplicated copy?)"


def test_tied_embeddings_stay_one_tensor_in_the_engine():
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    engine = _compile(model)
    embed = model.model.embed_tokens.weight
    copies = [t for _, t in _engine_tensors(engine) if t.shape == embed.shape and torch.equal(t, embed)]
    assert copies and len({_storage(t) for t in copies}) == 1
    assert _storage(copies[0]) != _storage(embed)
    ids = _ids(1, 12, 0)
    tokens, _ = oracle_generate(model, MASKS, ids, 4, sink_size=SINK, recent_size=RECENT)
    assert torch.equal(engine.generate(ids, max_new_tokens=4), tokens)
