"""The families beyond Llama/Mistral/Qwen2 (tests/tiny_models.py FAMILIES), end to end, and the graph refusals.

Per family (tiny random weights, fp32, CPU, eager backend): mixed masks against the eager oracle (dense per-head
masks; sliding-window layers by the model's own rule), both streaming modes, whole and chunked prefill, batch 2;
an all-retrieval engine token-identical to ``model.generate``; the same on the ops' Triton kernels (interpreted) for
the families that change what reaches them; ``duo-compile compile`` on a saved directory of each; ``identify()``
on each. Window layers: the compiled graph gives them one streaming op with sink 0 and recent = the window,
whatever the masks say. Attention the passes cannot lower exactly is refused with an error naming the node and
the reason.

Each model is captured once per test process (tests/shared_capture.py); every compile still runs its checks, passes
and engine on its own copy of that graph.
"""
import contextlib
import functools

import numpy as np
import pytest
import torch
from torch import fx
from transformers import GPT2Config, GPT2LMHeadModel

import duo_compile
from duo_compile.cli import main
from duo_compile.identify import identify
from duo_compile.identify.gated_attention import gated_attention
from duo_compile.kernels import blockwise, paged, triton_ops
from duo_compile.masks import HeadMasks, kv_cache_bytes
from duo_compile.oracle import oracle_generate, oracle_logits
from duo_compile.passes.attention_mask import read_window
from duo_compile.passes.context import PassContext
from duo_compile.passes.find_attention import find_attention
from tests.shared_capture import captured
from tests.tiny_models import FAMILIES, WINDOW, family_model, mixed_masks

SINK, RECENT, PROMPT, NEW, CHUNK, MAX_LEN = 2, 6, 24, 6, 10, 64

# (family, gqa, streaming mode, prefill chunk): every family once (GQA; MHA for Mixtral), each streaming mode and
# prefill kind on several families; each also compiles an all-retrieval engine and compares it with
# ``model.generate``.
CASES = [
    ("qwen3", True, "window", CHUNK),
    ("qwen3_moe", True, "chunk", None),
    ("mixtral", False, "window", None),
    ("phi3", True, "window", CHUNK),
    ("olmo2", True, "chunk", CHUNK),
    ("glm4", True, "window", CHUNK),
    ("gemma3", True, "chunk", CHUNK),
    ("mistral_window", True, "window", CHUNK),
    ("qwen3_window", True, "chunk", None),
]
# The window layers of the families that have them (WINDOW < MAX_LEN).
WINDOW_LAYERS = {"gemma3": [0, 2], "mistral_window": [0, 1, 2], "qwen3_window": [2]}


pytestmark = pytest.mark.usefixtures("one_capture_per_model")


@functools.cache
def _model(name, gqa):
    return family_model(name, gqa)


@functools.cache
def _engine(name, gqa, mode):
    """The eager engine of ``_model(name, gqa)`` with ``mixed_masks``, compiled once per test process."""
    model = _model(name, gqa)
    return duo_compile.compile(model, mixed_masks(model), sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                               streaming_mode=mode, backend="eager")


def _id(name, gqa, mode, chunk):
    return f"{name}-{'gqa' if gqa else 'mha'}-{mode}-{'chunked' if chunk else 'whole'}"


@pytest.mark.parametrize("name,gqa,mode,chunk", CASES, ids=[_id(*c) for c in CASES])
def test_family_matches_oracle_and_hf_generate(name, gqa, mode, chunk):
    model = _model(name, gqa)
    ids = torch.randint(0, 96, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    masks = mixed_masks(model)
    engine = _engine(name, gqa, mode)
    out = engine.generate(ids, max_new_tokens=NEW, prefill_chunk_size=chunk, output_scores=True,
                          return_dict_in_generate=True)
    tokens, scores = oracle_generate(model, masks, ids, NEW, sink_size=SINK, recent_size=RECENT,
                                     streaming_mode=mode, prefill_chunk_size=chunk)
    assert torch.equal(out.sequences, tokens)
    for step, (got, want) in enumerate(zip(out.scores, scores)):
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-5, f"step {step}: relative score error {rel:.2e}"
    # Window layers: one streaming cache of the window for all KV heads, whatever the masks say for the layer.
    windows = WINDOW_LAYERS.get(name, [])
    for spec in engine.cache_specs:
        if spec.layer in windows:
            assert (spec.kind, spec.num_kv_heads, spec.slots) == ("streaming", model.config.num_key_value_heads,
                                                                  WINDOW)
    assert engine.kv_cache_bytes() == kv_cache_bytes(model, masks, seq_len=MAX_LEN, batch_size=2,
                                                     sink_size=SINK, recent_size=RECENT)
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    engine = duo_compile.compile(model, duo_compile.HeadMasks.all_retrieval(layers, kv_heads), max_seq_len=MAX_LEN,
                                 backend="eager")
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0)
    assert torch.equal(engine.generate(ids, max_new_tokens=NEW, prefill_chunk_size=chunk), expected)


def test_moe_family_on_inductor_gives_the_eager_tokens():
    """An MoE family through the Inductor backend (its graph cut into layer regions, runtime/layer_regions.py):
    the router's flattening multiplies sizes before the layers and its top-k has two outputs; the eager engine's
    tokens, prefill chunked."""
    model = _model("mixtral", False)
    ids = torch.randint(0, 96, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    engine = duo_compile.compile(model, mixed_masks(model), sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                                 backend="inductor")
    got = engine.generate(ids, max_new_tokens=NEW, prefill_chunk_size=CHUNK)
    assert torch.equal(got, _engine("mixtral", False, "window").generate(ids, max_new_tokens=NEW,
                                                                       prefill_chunk_size=CHUNK))
    assert len(engine._run.regions) == model.config.num_hidden_layers


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "phi3", "olmo2", "glm4", "mistral_window", "qwen3_window"])
def test_oracle_with_all_retrieval_is_the_model(name):
    """The oracle itself is right for these families: its rule with every head retrieval (and the model's windows)
    is the model's own SDPA forward."""
    model = _model(name, True)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(2))
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    with torch.no_grad():
        expected = model(ids).logits
    got = oracle_logits(model, np.ones((layers, kv_heads), bool), ids, sink_size=SINK, recent_size=RECENT)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,length,max_seq_len", [("gemma3", 40, None), ("mistral_window", 40, None),
                                                     ("mistral_window", WINDOW, WINDOW)])
def test_identification_keeps_window_layers(name, length, max_seq_len):
    """identify()'s gated attention with binary gates is the oracle's rule: window layers keep the model's window
    whatever their gates, the masks apply to the full-attention layers; given a max_seq_len that a window reaches,
    that window is full attention and its layer's masks apply."""
    model = _model(name, True)
    ids = torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(3))
    masks = mixed_masks(model)
    with torch.no_grad(), gated_attention(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=max_seq_len):
        got = model(ids).logits
    want = oracle_logits(model, masks, ids, sink_size=SINK, recent_size=RECENT, max_seq_len=max_seq_len)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- the Triton kernels, interpreted
@contextlib.contextmanager
def _triton_kernels_on_cpu(ran: set):
    """The ops' Triton kernels (what CUDA runs: kernels/triton_ops.py) as their CPU kernels, so an engine on CPU
    tensors runs them under the Triton interpreter (conftest.py); the blockwise CPU kernels (kernels/ops.py) are
    registered again on the way out. ``ran`` collects the names of the ops called."""
    def recording(name, fn):
        def kernel(*args, **kwargs):
            ran.add(name)
            return fn(*args, **kwargs)
        return kernel

    for name, fn in triton_ops.CUDA_KERNELS.items():
        torch.library.register_kernel(f"duo::{name}", "cpu")(recording(name, fn))
    try:
        yield
    finally:
        for name, fn in paged.with_pages(blockwise.CPU_KERNELS).items():
            torch.library.register_kernel(f"duo::{name}", "cpu")(fn)


# (family, streaming mode, prefill chunk): what each adds in front of the kernels. Gemma 3: per-head q/k norms with
# RoPE fused into the ops, query scaling, window layers (window mode inside a chunk-mode engine), chunked prefill;
# Phi-3: q/k/v as column slices of one qkv_proj; OLMo-2: q/k norms over the whole projection. Phi-3 and OLMo-2
# rotate q/k before the ops (fuse_rope does not match their RoPE).
TRITON_CASES = [("gemma3", "chunk", CHUNK), ("phi3", "window", None), ("olmo2", "chunk", None)]


@pytest.mark.parametrize("name,mode,chunk", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_family_on_the_triton_kernels_matches_oracle(name, mode, chunk):
    """The engine with the Triton kernels (interpreted) equals the eager oracle: mixed masks, batch 2, a prefill and
    a decode step; the kernels of a mixed layer and of a layer of only streaming heads run."""
    model = _model(name, True)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(4))
    masks = mixed_masks(model)
    engine = _engine(name, True, mode)  # the engine test_family_matches_oracle_and_hf_generate checks on CPU
    ran = set()
    with _triton_kernels_on_cpu(ran):
        out = engine.generate(ids, max_new_tokens=2, prefill_chunk_size=chunk, output_scores=True,
                              return_dict_in_generate=True)
    assert {"attention_cached", "streaming_attention_cached"} <= ran  # the mixed and the all-streaming layers
    tokens, scores = oracle_generate(model, masks, ids, 2, sink_size=SINK, recent_size=RECENT,
                                     streaming_mode=mode, prefill_chunk_size=chunk)
    assert torch.equal(out.sequences, tokens)
    for step, (got, want) in enumerate(zip(out.scores, scores)):
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-5, f"step {step}: relative score error {rel:.2e}"


# ------------------------------------------------------------------------ the CLI, identify and masks files
@pytest.mark.parametrize("name", list(FAMILIES))
def test_cli_compiles_a_model_directory(name, tmp_path, monkeypatch, capsys):
    """``duo-compile compile`` on a directory written by ``save_pretrained``, with a masks file (the authors' TSV):
    the engine it hands to ``export`` has the sizes asked and generates the oracle's tokens with those masks.
    Writing engine files is the subject of test_export.py, test_package.py and the test below, so ``export`` is
    recorded here, not run. A masks file of another shape is refused naming both shapes."""
    model = _model(name, True)
    model.save_pretrained(tmp_path / "model")
    masks = mixed_masks(model)
    masks.to_tsv(tmp_path / "masks.tsv")
    exported = {}
    monkeypatch.setattr(duo_compile, "export", lambda engine, path, backend: exported.update(
        engine=engine, path=path, backend=backend))
    args = ["compile", str(tmp_path / "model"), "--masks", str(tmp_path / "masks.tsv"), "--sink", str(SINK),
            "--recent", str(RECENT), "--max-seq-len", str(MAX_LEN), "--no-tokenizer", "-o", str(tmp_path / "e.onnx"),
            "--backend", "onnx"]
    assert main(args) == 0
    engine = exported["engine"]
    assert (exported["path"], exported["backend"]) == (str(tmp_path / "e.onnx"), "onnx")
    assert (engine.config.sink_size, engine.config.recent_size, engine.config.max_seq_len) == (SINK, RECENT, MAX_LEN)
    ids = torch.randint(0, 96, (2, PROMPT), generator=torch.Generator().manual_seed(5))
    tokens, _ = oracle_generate(model, masks, ids, NEW, sink_size=SINK, recent_size=RECENT)
    assert torch.equal(engine.generate(ids, max_new_tokens=NEW), tokens)

    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    HeadMasks.all_retrieval(layers + 1, kv_heads).to_tsv(tmp_path / "masks.tsv")
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"masks have shape ({layers + 1}, {kv_heads}) but the model has {layers} layers x {kv_heads} KV heads")


def test_cli_sparsity_counts_the_full_attention_layers_only(tmp_path, monkeypatch):
    """``duo-compile compile --sparsity`` on a model with window layers (Gemma 3): the gates of its window layers
    (rows the engine does not use) stay 1 and the sparsity is a fraction of the full-attention heads, so those
    layers keep the retrieval heads their gates choose rather than losing them all to the window layers' rows."""
    model = _model("gemma3", True)
    model.save_pretrained(tmp_path / "model")
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    gates = np.full((layers, kv_heads), 0.9)
    gates[WINDOW_LAYERS["gemma3"]] = 0.05  # what identify leaves them is 1; low here, so that counting them shows
    full = [layer for layer in range(layers) if layer not in WINDOW_LAYERS["gemma3"]]
    gates[full] = np.linspace(0.2, 0.8, len(full) * kv_heads).reshape(len(full), kv_heads)
    HeadMasks.from_gates(gates).to_tsv(tmp_path / "gates.tsv")
    exported = {}
    monkeypatch.setattr(duo_compile, "export", lambda engine, path, backend: exported.update(engine=engine))
    assert main(["compile", str(tmp_path / "model"), "--masks", str(tmp_path / "gates.tsv"), "--sparsity", "0.5",
                 "--max-seq-len", str(MAX_LEN), "--no-tokenizer", "-o", str(tmp_path / "e.onnx"),
                 "--backend", "onnx"]) == 0
    retrieval = exported["engine"].masks.retrieval
    assert retrieval[WINDOW_LAYERS["gemma3"]].all()
    assert (~retrieval[full]).sum() == round(0.5 * len(full) * kv_heads)
    assert HeadMasks(retrieval.astype(float)) == HeadMasks.from_gates(gates).binarize(
        sparsity=0.5, skip_layers=WINDOW_LAYERS["gemma3"])


def test_engine_file_of_a_model_with_window_layers(tmp_path):
    """An engine package of Gemma 3 (window layers in a chunk-mode engine) passes load's check of its cache specs
    against the masks and the model's windows, and generates the compiled engine's tokens."""
    engine = _engine("gemma3", True, "chunk")
    duo_compile.export(engine, tmp_path / "gemma3.pt2", backend="package")
    loaded = duo_compile.load(tmp_path / "gemma3.pt2")
    assert loaded.cache_specs == engine.cache_specs
    ids = torch.randint(0, 96, (2, PROMPT), generator=torch.Generator().manual_seed(6))
    assert torch.equal(loaded.generate(ids, max_new_tokens=NEW, prefill_chunk_size=CHUNK),
                       engine.generate(ids, max_new_tokens=NEW, prefill_chunk_size=CHUNK))


# identify() at the smallest task: one passkey of two words (samples of at most the context length + 10 tokens).
SHORT_IDENTIFY = {"num_passkeys": 1, "passkey_length": 2, "sink_size": SINK, "recent_size": RECENT, "progress": False}


@pytest.mark.parametrize("name", [name for name in FAMILIES if name != "mistral_window"])
def test_identify_writes_gates_of_the_model_shape(name, tmp_path):
    """identify() runs on each family and writes the authors' TSV of one gate per layer and KV head, which reads
    back as the gates it returned; a window layer's gates stay 1 (they reach no output, and the L1 term leaves
    them alone), the others move."""
    model = _model(name, True)
    gates = identify(model, num_steps=2, context_lengths=[32], output_dir=tmp_path, **SHORT_IDENTIFY)
    assert gates.shape == (model.config.num_hidden_layers, model.config.num_key_value_heads)
    assert HeadMasks.from_tsv(tmp_path / "full_attention_heads.tsv") == gates
    values = gates.gates
    windows = WINDOW_LAYERS.get(name, [])
    full = [layer for layer in range(gates.shape[0]) if layer not in windows]
    assert (values[windows] == 1).all() and (values[full] < 1).any()


def test_identify_trains_a_window_layer_only_where_its_window_holds_every_sample():
    """Mistral with a window of 48 tokens on every layer: samples of at most 42 tokens (context 32 + tail 10) make
    every layer a full-attention one, all gates trained; longer samples leave no layer to train, refused."""
    model = family_model("mistral_window", sliding_window=48)
    gates = identify(model, num_steps=2, context_lengths=[32], **SHORT_IDENTIFY)
    assert (gates.gates < 1).any(axis=1).all()
    with pytest.raises(ValueError, match=r"every layer of MistralForCausalLM has a sliding window \(48 to 48 tokens\) "
                                         r"shorter than the longest sample \(50 tokens: context length 40 plus the "
                                         r"question/answer tail\): .* no gates to identify"):
        identify(model, num_steps=1, context_lengths=[40], **SHORT_IDENTIFY)


# ------------------------------------------------------------------------------------------------ refusals
def _mask_module(make):
    """A traced ``forward(input_ids, position_ids) -> mask`` from ``make(positions)`` (q rows, k columns)."""
    def forward(input_ids, position_ids):
        pos = torch.arange(input_ids.shape[1])
        return make(pos[:, None], pos[None, :])
    gm = fx.symbolic_trace(forward)
    return gm, next(n for n in gm.graph.nodes if n.op == "output").args[0]


MASKS = {
    "causal": (lambda p, j: (j <= p)[None, None], 0),
    "window": (lambda p, j: ((j <= p) & (p - j < 5))[None, None], 5),
    "float-causal": (lambda p, j: torch.where(j <= p, 0.0, float("-inf"))[None, None], 0),
}
BAD_MASKS = {
    "bidirectional": (lambda p, j: ((j >= 0) & (p >= 0))[None, None], "neither causal nor a causal sliding"),
    "bias": (lambda p, j: (-(p - j).abs().float() * 0.5)[None, None], "adds a bias to the scores"),
    "per-head": (lambda p, j: (j <= p)[None, None].expand(1, 2, -1, -1), r"not \[B, 1, T, T\]"),
}


@pytest.mark.parametrize("case", list(MASKS))
def test_mask_is_read_from_the_graph(case):
    make, window = MASKS[case]
    gm, mask = _mask_module(make)
    assert read_window(gm, mask, mask, 16, {}) == window


@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_a_mask_that_is_not_causal_is_refused_naming_the_node(case):
    make, message = BAD_MASKS[case]
    gm, mask = _mask_module(make)
    with pytest.raises(ValueError, match=f"attention node {mask.name}: .*{message}"):
        read_window(gm, mask, mask, 16, {})


def test_config_and_graph_windows_must_agree():
    """The window read from the graph is checked against the config's; one of max_seq_len or more is causal."""
    graph = captured(_model("mistral_window", True))
    retrieval = np.ones((3, 2), bool)
    with pytest.raises(ValueError, match=r"\(layer 0\): its mask is a sliding window of 8 tokens, but the model's "
                                         r"config declares full attention"):
        find_attention(graph, PassContext(retrieval=retrieval, sink_size=SINK, recent_size=RECENT, max_seq_len=64))
    ctx = PassContext(retrieval=retrieval, sink_size=SINK, recent_size=RECENT, max_seq_len=64,
                      declared_windows=(WINDOW,) * 3)
    assert [site.window for site in find_attention(graph, ctx) and ctx.sites] == [WINDOW] * 3
    ctx = PassContext(retrieval=retrieval, sink_size=SINK, recent_size=RECENT, max_seq_len=WINDOW,
                      declared_windows=(WINDOW,) * 3)
    assert [site.window for site in find_attention(graph, ctx) and ctx.sites] == [0] * 3


def test_a_window_of_max_seq_len_or_more_is_a_full_layer_whose_masks_apply():
    """Mistral with its window of WINDOW tokens in an engine of max_seq_len = WINDOW: the window hides no key from any
    query the engine can run, so every layer's masks apply, as the oracle given that max_seq_len says (without it,
    the oracle keeps the window for every head and differs)."""
    model = _model("mistral_window", True)
    masks = mixed_masks(model)
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(7))
    engine = duo_compile.compile(model, masks, sink_size=1, recent_size=2, max_seq_len=WINDOW, backend="eager")
    out = engine.generate(ids, max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
    tokens, scores = oracle_generate(model, masks, ids, 3, sink_size=1, recent_size=2, max_seq_len=WINDOW)
    assert torch.equal(out.sequences, tokens)
    for got, want in zip(out.scores, scores):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _, windowed = oracle_generate(model, masks, ids, 3, sink_size=1, recent_size=2)
    assert not torch.allclose(windowed[-1], scores[-1], atol=1e-3)
    with pytest.raises(ValueError, match=r"9 tokens do not fit max_seq_len=8"):
        oracle_generate(model, masks, ids, 4, sink_size=1, recent_size=2, max_seq_len=WINDOW)


class _HeadFlip(torch.nn.Module):
    """Reverses the heads of ``[B, T, heads, head_dim]``: an op that mixes heads, put where Qwen3's q norm is."""

    def forward(self, x):
        return x.flip(-2)


def test_an_op_mixing_heads_before_attention_is_refused():
    model = family_model("qwen3")
    model.model.layers[1].self_attn.q_norm = _HeadFlip()
    with pytest.raises(ValueError, match=r"attention node scaled_dot_product_attention_1: node flip between linear_\d+ "
                                         r"and the query: aten.flip.default is not known to act on each head alone"):
        duo_compile.compile(model, mixed_masks(model), max_seq_len=MAX_LEN, backend="eager")


def test_attention_without_linear_projections_is_refused():
    """GPT-2 projects with Conv1D (addmm): the passes cannot find q/k/v projections to reorder."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=64,
                                       bos_token_id=None, eos_token_id=None))
    with pytest.raises(ValueError, match=r"attention node scaled_dot_product_attention: expected exactly one linear "
                                         r"layer with a weight parameter producing the query, found none"):
        duo_compile.compile(model, duo_compile.HeadMasks.all_retrieval(2, 2), max_seq_len=64, backend="eager")
