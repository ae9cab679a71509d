"""runtime/layer_regions.py: an engine graph cut into one region per decoder layer, the regions that are the same
program run by one compiled graph (runtime/inductor_graph.py). A small exported stack of layers keeps the
Inductor compiles short; the engine-level check is a tiny Llama engine against its eager backend."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import fx
from transformers import LlamaConfig, LlamaForCausalLM

import duo_compile
from duo_compile.capture import _plain_signature
from duo_compile.runtime.inductor_graph import InductorGraph, lift_weights
from duo_compile.runtime.layer_regions import split, weight_layer


class _Layer(torch.nn.Module):
    def __init__(self, width: int, gain: float):
        super().__init__()
        self.proj = torch.nn.Linear(width, width, bias=False)
        self.gain = gain  # a constant of the traced graph

    def forward(self, x):
        batch, length, width = x.shape  # shape arithmetic: sizes read off the input
        y = self.proj(torch.relu(x) * self.gain).view(batch, length, 2, width // 2)
        return x + y.flatten(2)


class _Stack(torch.nn.Module):
    def __init__(self, gains=(1.0, 1.0, 1.0, 1.0), width: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(_Layer(width, gain) for gain in gains)
        self.head = torch.nn.Linear(width, 3, bias=False)

    def forward(self, x):
        h = x * 2.0  # reads no weight: computed in the first layer's region
        for layer in self.layers:
            h = layer(h)
        return self.head(h)  # a weight of no layer, after the last: the last layer's region


def _graph(module: torch.nn.Module) -> fx.GraphModule:
    length = torch.export.Dim("length", min=2, max=64)
    program = torch.export.export(module, (torch.randn(2, 5, 8),), dynamic_shapes=({1: length},), strict=False)
    return _plain_signature(program.module())


@pytest.fixture(scope="module")
def stack():
    module = _Stack().eval()
    return module, _graph(module)


def _lifted(graph: fx.GraphModule):
    """``graph`` with its weights lifted to inputs, the weights' targets and tensors, and its own input count:
    what ``split`` takes."""
    lifted, targets, weights = lift_weights(graph)
    return lifted, sum(n.op == "placeholder" for n in graph.graph.nodes), targets, weights


def _runs_like(run, module: torch.nn.Module, *lengths: int) -> None:
    """``run`` gives ``module``'s outputs for inputs of each length."""
    for length in lengths:
        x = torch.randn(2, length, 8)
        with torch.no_grad():
            torch.testing.assert_close(run(x), module(x), rtol=1e-5, atol=1e-5)


def test_a_weight_belongs_to_the_layer_its_path_numbers():
    assert weight_layer("model.layers.7.mlp.down_proj.weight") == 7
    assert weight_layer("transformer.h.12.attn.c_attn.weight") == 12
    assert weight_layer("model.norm.weight") is None and weight_layer("lm_head.weight") is None


def test_one_region_per_layer_and_the_middle_layers_share_one_compiled_graph(stack):
    module, graph = stack
    run = InductorGraph(graph)
    assert len(run.regions) == 4 and run.class_of == [0, 1, 1, 2]  # first (with the prologue), middle, last (+head)
    _runs_like(run, module, 5, 9)
    assert run.compiled == 3 and run.held == 3  # one per class, for every length


def test_a_layer_with_other_constants_gets_a_class_of_its_own():
    module = _Stack(gains=(1.0, 1.0, 0.5, 1.0, 1.0)).eval()
    run = InductorGraph(_graph(module))
    assert run.class_of == [0, 1, 2, 1, 3]
    _runs_like(run, module, 6)


def test_values_flow_forward_and_are_freed_by_their_last_reader(stack):
    lifted, inputs, targets, weights = _lifted(stack[1])
    regions, outputs = split(lifted, inputs, targets, weights)
    written = set(range(inputs))
    for i, region in enumerate(regions):
        assert set(region.reads) <= written  # nothing read before it is written
        later = {j for r in regions[i + 1:] for j in r.reads} | set(outputs)
        assert all(j not in later for j in region.frees)
        assert set(region.reads) - later - set(range(inputs)) == set(region.frees)
        written |= set(region.writes)
        placeholders = [n for n in region.graph.graph.nodes if n.op == "placeholder"]
        assert len(placeholders) == len(region.reads) + len(region.weights)
        # a layer's view reads the input's length: the regions holding one recompute it from their own inputs
        assert i == 0 or any(n.target is torch.ops.aten.sym_size.int for n in region.graph.graph.nodes)
    assert set(outputs) <= written


class _Tokens(_Stack):
    """Sizes multiplied once before the layers (integer math on sizes, as an MoE block's flattening does) and a
    two-output op whose outputs the first and the last region read."""

    def forward(self, x):
        tokens = x.shape[0] * x.shape[1]
        top, where = x.max(dim=-1, keepdim=True)
        h = x * top
        for layer in self.layers:
            h = layer(h + h.new_zeros(tokens).view(x.shape[0], x.shape[1], 1))
        return self.head(h) + where


def test_only_tensors_cross_regions_and_size_math_is_recomputed():
    module = _Tokens().eval()
    graph = _graph(module)
    lifted, inputs, targets, weights = _lifted(graph)
    regions, _ = split(lifted, inputs, targets, weights)
    assert len(regions) == 4
    computed = {n.name: n for n in lifted.graph.nodes if n.op == "call_function"}
    crossing = [computed[n.name] for region in regions for n in region.graph.graph.nodes
                if n.op == "placeholder" and n.name in computed]
    assert crossing and all(isinstance(n.meta["val"], torch.Tensor) for n in crossing)
    _runs_like(InductorGraph(graph), module, 5, 9)


def test_a_number_that_would_cross_regions_keeps_the_graph_whole(stack):
    lifted, inputs, targets, weights = _lifted(stack[1])
    regions, _ = split(lifted, inputs, targets, weights)
    first_reads = {n.name for n in regions[1].graph.graph.nodes if n.op == "placeholder"}
    value = next(n for n in lifted.graph.nodes if n.name in first_reads and n.op == "call_function")
    value.meta["val"] = 3  # as if it were a number read off a tensor
    regions, outputs = split(lifted, inputs, targets, weights)
    assert len(regions) == 1 and regions[0].writes == outputs


def test_a_graph_whose_weights_name_no_layer_is_one_region(stack):
    graph = fx.symbolic_trace(torch.nn.Linear(4, 2))
    assert len(InductorGraph(graph).regions) == 1
    module, graph = stack
    whole = InductorGraph(graph, by_layer=False)  # or when asked to compile it whole
    assert len(whole.regions) == 1
    _runs_like(whole, module, 7)


def test_engine_layers_with_other_retrieval_head_counts_share_graphs_and_give_the_eager_tokens():
    """Five Llama layers of six KV heads, the middle three with 2, 3 and 4 retrieval heads: the op reads the count
    off its cache (``heads_from_cache_shapes``), so they are one class; three classes (first, middle, last),
    compiled once each for prefill and once for decode, and the eager backend's tokens."""
    config = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=5,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    gates = np.zeros((5, 6))
    for layer, retrieval in enumerate((3, 2, 3, 4, 3)):
        gates[layer, :retrieval] = 1.0
    masks = duo_compile.HeadMasks.from_gates(gates)
    engines = {backend: duo_compile.compile(model, masks, sink_size=4, recent_size=8, max_seq_len=64,
                                            backend=backend) for backend in ("eager", "inductor")}
    run = engines["inductor"]._run
    assert len(run.regions) == 5 and run.class_of == [0, 1, 1, 1, 2]
    ids = torch.randint(0, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    want, got = (engines[b].generate(ids, max_new_tokens=6) for b in ("eager", "inductor"))
    assert torch.equal(got, want) and run.compiled == 6
