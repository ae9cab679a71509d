"""Capture by repeating a traced layer (repeat_layers.py) gives the graph a full export gives, and is not used where
the layers differ.

Tiny models of 5 layers (two repeated): Qwen2's repeated capture has the same nodes as the full export's and
bitwise the same logits; a Llama engine compiled from one (mixed masks) generates the oracle's tokens. Models
whose layers differ in an attribute, a parameter shape, a hook or ``config.layer_types`` are exported whole.
"""
import numpy as np
import pytest
import torch

import duo_compile
from duo_compile import repeat_layers
from duo_compile.capture import capture
from duo_compile.oracle import oracle_generate
from tests.tiny_models import mixed_gates, tiny_model

LAYERS = 5


def _ops(gm):
    return [(n.op, str(n.target)) for n in gm.graph.nodes if n.op != "get_attr"]


def test_repeated_capture_equals_the_full_export():
    model = tiny_model("qwen2", num_layers=LAYERS)
    layers = repeat_layers.plan(model)
    assert layers is not None and len(layers.layers) == LAYERS
    with layers.first_layers(model):
        assert len(model.model.layers) == repeat_layers.TRACED
    assert len(model.model.layers) == LAYERS  # restored
    repeated, full = capture(model), capture(model, repeat_layers=False)
    assert _ops(repeated) == _ops(full)
    weights = {n.target for n in repeated.graph.nodes if n.op == "get_attr"}
    assert weights == {n.target for n in full.graph.nodes if n.op == "get_attr"}  # each layer reads its own
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    positions = torch.arange(11).expand(2, -1)
    with torch.no_grad():
        assert torch.equal(repeated(ids, positions), full(ids, positions))


def test_engine_from_a_repeated_capture_matches_the_oracle():
    model = tiny_model("llama", num_layers=LAYERS)
    gates = mixed_gates(LAYERS, model.config.num_key_value_heads)
    masks = duo_compile.HeadMasks.from_gates(gates)
    engine = duo_compile.compile(model, masks, sink_size=4, recent_size=8, max_seq_len=64, backend="eager")
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    out = engine.generate(ids, max_new_tokens=12, prefill_chunk_size=7)
    tokens, _ = oracle_generate(model, masks, ids, 12, sink_size=4, recent_size=8, prefill_chunk_size=7)
    assert torch.equal(out, tokens)


def _scaled_attention(model):
    model.model.layers[3].self_attn.scaling *= 2


def _hooked(model):
    model.model.layers[2].mlp.register_forward_hook(lambda module, args, out: out)


def _mixed_layer_types(model):
    model.config.layer_types = ["full_attention"] * (LAYERS - 1) + ["sliding_attention"]


def _wider_layer(model):
    layer = model.model.layers[4].mlp
    layer.up_proj = torch.nn.Linear(layer.up_proj.in_features, layer.up_proj.out_features + 1, bias=False)


@pytest.mark.parametrize("edit", [_scaled_attention, _hooked, _mixed_layer_types, _wider_layer])
def test_layers_that_differ_are_exported_whole(edit):
    model = tiny_model("llama", num_layers=LAYERS)
    assert repeat_layers.plan(model) is not None
    edit(model)
    assert repeat_layers.plan(model) is None


def test_few_layers_are_exported_whole():
    assert repeat_layers.plan(tiny_model("llama", num_layers=repeat_layers.TRACED)) is None


def test_a_layer_whose_graph_differs_is_exported_whole(monkeypatch):
    """An attribute-identical layer that still traces differently (here: an op only layer 2 runs, as a value
    computed from ``layer_idx`` would) fails the graph comparison, and the whole model is exported."""
    model = tiny_model("llama", num_layers=LAYERS)
    layer = model.model.layers[2]
    forward = type(layer).forward

    def odd_forward(self, hidden_states, *args, **kwargs):
        if self.self_attn.layer_idx == 2:
            hidden_states = hidden_states * 1.0 + 0.0
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(layer), "forward", odd_forward)
    results = []
    real_repeat = repeat_layers.repeat
    monkeypatch.setattr(repeat_layers, "repeat", lambda *a: results.append(real_repeat(*a)) or results[-1])
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        want = model(ids).logits[:, -1:]
        got = capture(model)(ids, torch.arange(5)[None])
    assert results == [None]
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5)
