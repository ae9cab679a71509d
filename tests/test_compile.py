"""duo_compile.compile end to end against the eager oracle (tiny random models, CPU, fp32).

Eager backend: every family x MHA/GQA x streaming mode x batch 1/3 x whole/chunked prefill. Inductor costs
~13 s of compile per graph shape on CPU, so it runs a covering subset: every family and attention kind, both
modes, both batch sizes, both prefill kinds appear, but not every combination.
"""

import pytest
import torch

import duo_compile
from duo_compile.masks import kv_cache_bytes
from duo_compile.oracle import oracle_generate
from tests.tiny_models import cached_engine, cached_tiny_model, mixed_masks

SINK, RECENT, PROMPT, NEW, CHUNK, MAX_LEN = 4, 8, 60, 32, 25, 128


pytestmark = pytest.mark.usefixtures("one_capture_per_model")  # tests/shared_capture.py

_model = cached_tiny_model
_masks = mixed_masks


def _engine(arch, gqa, mode, backend):
    return cached_engine(arch, gqa, mode, backend, SINK, RECENT, MAX_LEN)


def _check(arch, gqa, mode, backend, batch, chunk):
    model, engine = _model(arch, gqa), _engine(arch, gqa, mode, backend)
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    out = engine.generate(ids, max_new_tokens=NEW, prefill_chunk_size=chunk, output_scores=True,
                          return_dict_in_generate=True)
    tokens, scores = oracle_generate(model, _masks(model), ids, NEW, sink_size=SINK, recent_size=RECENT,
                                     streaming_mode=mode, prefill_chunk_size=chunk)
    assert out.sequences.shape == (batch, PROMPT + NEW)
    assert torch.equal(out.sequences, tokens)
    for step, (got, want) in enumerate(zip(out.scores, scores)):
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-4, f"step {step}: relative score error {rel:.2e}"


FAMILIES = [(a, g) for a in ("llama", "mistral", "qwen2") for g in (True, False)]


def _id(arch, gqa):
    return f"{arch}-{'gqa' if gqa else 'mha'}"


@pytest.mark.parametrize("batch,chunk", [(1, None), (1, CHUNK), (3, None), (3, CHUNK)])
@pytest.mark.parametrize("mode", ["window", "chunk"])
@pytest.mark.parametrize("arch,gqa", FAMILIES, ids=[_id(*f) for f in FAMILIES])
def test_eager_backend_matches_oracle(arch, gqa, mode, batch, chunk):
    _check(arch, gqa, mode, "eager", batch, chunk)


# (arch, gqa, mode, batch, chunk): each family/kind once, modes alternate, both batches and prefill kinds covered.
INDUCTOR_CASES = [
    ("llama", True, "window", 1, CHUNK),
    ("llama", True, "window", 3, None),
    ("llama", False, "chunk", 3, CHUNK),
    ("mistral", True, "chunk", 3, None),
    ("mistral", False, "window", 3, CHUNK),
    ("qwen2", True, "chunk", 1, CHUNK),
    ("qwen2", False, "window", 3, CHUNK),
]


@pytest.mark.parametrize("arch,gqa,mode,batch,chunk", INDUCTOR_CASES,
                         ids=[f"{_id(a, g)}-{m}-b{b}-{'chunked' if c else 'whole'}" for a, g, m, b, c in INDUCTOR_CASES])
def test_inductor_backend_matches_oracle(arch, gqa, mode, batch, chunk):
    _check(arch, gqa, mode, "inductor", batch, chunk)


def _assert_same_as_hf_generate(model, engine, ids):
    """Greedy tokens equal the model's own generate (SDPA), with its eos id and a pad id (rows may stop early)."""
    eos = model.config.eos_token_id
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)
    got = engine.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_all_retrieval_is_token_identical_to_hf_generate(backend):
    model = _model("llama", True)
    engine = duo_compile.compile(model, duo_compile.HeadMasks.all_retrieval(3, 2), max_seq_len=MAX_LEN,
                                 backend=backend, prefill_chunk_size=CHUNK)
    ids = torch.randint(0, 96, (3, PROMPT))
    _assert_same_as_hf_generate(model, engine, ids)


@pytest.mark.parametrize("arch,gqa", [("qwen2", False), ("mistral", True)], ids=["qwen2-mha", "mistral-gqa"])
def test_window_covering_the_sequence_equals_full_attention(arch, gqa):
    model = _model(arch, gqa)
    engine = duo_compile.compile(model, _masks(model), sink_size=SINK, recent_size=PROMPT + NEW, max_seq_len=MAX_LEN,
                                 backend="eager", prefill_chunk_size=CHUNK)
    ids = torch.randint(0, 96, (2, PROMPT))
    _assert_same_as_hf_generate(model, engine, ids)


def test_eos_and_pad_follow_hugging_face():
    model = _model("llama", True)
    engine = _engine("llama", True, "window", "eager")
    ids = torch.randint(0, 96, (3, PROMPT))
    free = engine.generate(ids, max_new_tokens=NEW)
    eos = int(free[0, PROMPT + 3])  # row 0 produces this token at step 3
    out = engine.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=95)
    tokens, _ = oracle_generate(model, _masks(model), ids, NEW, sink_size=SINK, recent_size=RECENT,
                                eos_token_id=eos, pad_token_id=95)
    assert torch.equal(out, tokens)
    row0 = out[0, PROMPT:].tolist()
    assert eos in row0 and all(t == 95 for t in row0[row0.index(eos) + 1:])


@pytest.mark.parametrize("batch", [1, 3])
def test_allocated_kv_bytes_equal_the_formula(batch):
    model = _model("qwen2", True)
    engine = _engine("qwen2", True, "window", "eager")
    engine.generate(torch.randint(0, 96, (batch, 10)), max_new_tokens=2)
    got = engine.kv_cache_bytes()
    want = kv_cache_bytes(model, _masks(model), seq_len=MAX_LEN, batch_size=batch, dtype=torch.float32,
                          sink_size=SINK, recent_size=RECENT)
    assert got == want
    assert sum(c.numel() * c.element_size() for c in engine.caches) == want.total
    assert want.retrieval == 2 * batch * 3 * MAX_LEN * 16 * 4  # 3 retrieval KV heads in all
