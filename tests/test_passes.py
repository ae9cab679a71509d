"""Each pass on its own: what it matched, what it emitted, and that outputs are unchanged where they must be."""
from itertools import pairwise

import numpy as np
import pytest
import torch

from duo_compile.kernels.ops import OPS
from duo_compile.oracle import oracle_logits
from duo_compile.passes import SKIPPED, PassContext, run_pass, run_passes
from duo_compile.passes.find_attention import SDPA, find_attention
from duo_compile.passes.fuse_rope import fuse_rope
from tests.pass_checks import assert_ops_changed, op_counts
from tests.shared_capture import captured
from tests.tiny_models import cached_tiny_model, mixed_gates

LENGTH = 30
aten = torch.ops.aten


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _ctx(retrieval, sink=4, recent=8, mode="window"):
    return PassContext(retrieval=np.asarray(retrieval, dtype=bool), sink_size=sink, recent_size=recent,
                       streaming_mode=mode, expected_layers=len(retrieval))


def _inputs(vocab=96, batch=2, length=LENGTH):
    ids = torch.randint(0, vocab, (batch, length))
    return ids, torch.arange(length).expand(batch, -1)


def _rows(batch=2, length=LENGTH):
    """The cached graph's per-row positions for ``_inputs``: every row from position 0, all tokens real."""
    return torch.zeros(batch, dtype=torch.long), torch.full((batch,), length)


@pytest.fixture(params=[("llama", True), ("qwen2", True), ("mistral", False)], ids=lambda p: f"{p[0]}-{'gqa' if p[1] else 'mha'}")
def model(request):
    """One tiny model per family for the whole module (no test modifies it; some check that a pass does not)."""
    return cached_tiny_model(*request.param)


def _kv_heads(model):
    return model.config.num_key_value_heads


@torch.no_grad()
def test_find_attention_tags_every_layer(model):
    gm = captured(model, last_logits_only=False)
    ctx = _ctx(mixed_gates(3, _kv_heads(model)))
    before = op_counts(gm)
    find_attention(gm, ctx)
    assert_ops_changed(before, gm)  # it only tags
    assert ctx.changed["find_attention"] == 3
    for layer, site in enumerate(ctx.sites):
        assert site.layer == layer and site.node.meta["duo_attention"] is site
        assert (site.num_heads, site.num_kv_heads, site.head_dim) == (4, _kv_heads(model), 16)
        assert site.scale == pytest.approx(16 ** -0.5)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"layers.{layer}.self_attn.{proj}.weight" in getattr(site, proj).args[1].target


def test_find_attention_rejects_masks_of_the_wrong_shape(model):
    gm = captured(model, last_logits_only=False)
    with pytest.raises(ValueError, match=r"masks have shape \(3, 7\) but the model has 3 layers x"):
        find_attention(gm, _ctx(np.ones((3, 7))))


def test_find_attention_names_what_it_found_instead():
    class ManualAttention(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x

    gm = torch.export.export(ManualAttention(), (torch.randn(2, 3, 4),)).module()
    with pytest.raises(ValueError, match=r"no scaled_dot_product_attention node.*softmax"):
        find_attention(gm, _ctx(np.ones((1, 1))))


@torch.no_grad()
def test_reorder_heads_changes_weights_not_outputs(model):
    ids, pos = _inputs()
    reference = model(ids).logits
    original_q = model.model.layers[1].self_attn.q_proj.weight.clone()
    gates = np.zeros((3, _kv_heads(model)))
    gates[1, -1] = gates[2, -1] = 1  # layers 1 and 2: the retrieval head is last, so it must move
    ctx = _ctx(gates)
    gm = run_passes(captured(model, last_logits_only=False), ctx, until="find_attention")
    before = op_counts(gm)
    gm = run_pass("reorder_heads", gm, ctx)
    assert_ops_changed(before, gm)  # weights only
    assert ctx.changed["reorder_heads"] == 2
    assert ctx.retrieval_counts == [0, 1, 1] and ctx.head_order[1][0] == _kv_heads(model) - 1
    assert not torch.equal(gm.get_parameter("model.model.layers.1.self_attn.q_proj.weight"), original_q)
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, original_q)  # the user's model is untouched
    torch.testing.assert_close(gm(ids, pos), reference, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_split_attention_with_all_retrieval_changes_nothing(model):
    ids, pos = _inputs()
    ctx = _ctx(np.ones((3, _kv_heads(model))))
    gm = run_passes(captured(model, last_logits_only=False), ctx, until="reorder_heads")
    before = op_counts(gm)
    gm = run_pass("split_attention", gm, ctx)
    # The causal mask and repeat_kv that fed SDPA are dead code now, removed by the clean-up.
    assert_ops_changed(before, gm, removed={SDPA: 3}, added={OPS["retrieval_attention"]: 3, aten.slice.Tensor: None},
                       dead_code_ok=True)
    assert _count(gm, SDPA) == 0
    assert _count(gm, OPS["retrieval_attention"]) == 3 and _count(gm, OPS["streaming_attention"]) == 0
    torch.testing.assert_close(gm(ids, pos), model(ids).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_split_attention_matches_oracle_for_mixed_masks(model):
    ids, pos = _inputs()
    gates = mixed_gates(3, _kv_heads(model))
    ctx = _ctx(gates)
    gm = run_passes(captured(model, last_logits_only=False), ctx, until="reorder_heads")
    before = op_counts(gm)
    gm = run_pass("split_attention", gm, ctx)
    # layer 0: retrieval only; layer 1: both; layer 2: streaming only.
    assert_ops_changed(before, gm, removed={SDPA: 3}, dead_code_ok=True,
                       added={OPS["retrieval_attention"]: 2, OPS["streaming_attention"]: 2, aten.cat.default: 1,
                              aten.slice.Tensor: None})
    assert _count(gm, OPS["retrieval_attention"]) == 2 and _count(gm, OPS["streaming_attention"]) == 2
    assert _count(gm, torch.ops.aten.cat.default) >= 1
    expected = oracle_logits(model, gates, ids, sink_size=4, recent_size=8)
    full = model(ids).logits
    out = gm(ids, pos)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert (out - full).abs().max() > 1e-3  # the streaming heads really changed something


@torch.no_grad()
def test_kv_layout_adds_caches_and_keeps_outputs(model):
    ids, pos = _inputs()
    gates = mixed_gates(3, _kv_heads(model))
    ctx = _ctx(gates)
    gm = run_passes(captured(model, last_logits_only=False), ctx, until="split_attention")
    cacheless = gm(ids, pos)
    before = op_counts(gm)
    gm = run_pass("kv_layout", gm, ctx)
    assert_ops_changed(before, gm, removed={OPS["retrieval_attention"]: 2, OPS["streaming_attention"]: 2},
                       added={OPS["retrieval_attention_cached"]: 2, OPS["streaming_attention_cached"]: 2})
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[:4] == ["input_ids", "position_ids", "cache_start", "valid"]
    assert placeholders[4:] == [spec.name for spec in ctx.cache_specs]
    assert len(ctx.cache_specs) == 2 * 4 and ctx.changed["kv_layout"] == 4
    assert _count(gm, OPS["retrieval_attention"]) == 0 and _count(gm, OPS["retrieval_attention_cached"]) == 2
    assert _count(gm, OPS["streaming_attention_cached"]) == 2
    caches = [torch.zeros(2, s.num_kv_heads, s.slots or 64, s.head_dim) for s in ctx.cache_specs]
    torch.testing.assert_close(gm(ids, pos, *_rows(), *caches), cacheless, rtol=1e-5, atol=1e-6)
    streaming = [c for s, c in zip(ctx.cache_specs, caches) if s.kind == "streaming"]
    assert all(s.slots == 12 for s in ctx.cache_specs if s.kind == "streaming")
    assert all(bool(c.abs().sum() > 0) for c in streaming)  # the pass really wired the caches in


@torch.no_grad()
def test_kv_layout_takes_each_rows_logits_at_its_last_real_token(model):
    """With capture's last-position slice (logits_to_keep=1), kv_layout gathers each row's hidden state at index
    valid[b] - 1 instead: the logits of a row's last real token, the rest of the row being padding."""
    ids, pos = _inputs()
    gates = mixed_gates(3, _kv_heads(model))
    every = run_passes(captured(model, last_logits_only=False), _ctx(gates), until="kv_layout")
    ctx = _ctx(gates)
    last = run_passes(captured(model), ctx, until="kv_layout")
    assert _count(last, torch.ops.aten.slice.Tensor) < _count(every, torch.ops.aten.slice.Tensor) + 1
    valid = torch.tensor([LENGTH, 17])
    caches = [torch.zeros(2, s.num_kv_heads, s.slots or 64, s.head_dim) for s in ctx.cache_specs]
    full = every(ids, pos, *_rows(), *[torch.zeros_like(c) for c in caches])
    out = last(ids, pos, torch.zeros(2, dtype=torch.long), valid, *caches)
    assert out.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(out[:, 0], full[torch.arange(2), valid - 1], rtol=1e-5, atol=1e-5)


class _BeforePass:
    """What a test of the pass after ``until`` compares against: the graph after ``until`` (``gm``, ``ctx``) and its
    ``op_counts`` (``ops``), random caches for it, a copy of them (``written``) that graph has run on, and that run's
    ``output``. ``run`` feeds the same inputs and the untouched ``caches`` to the rewritten graph: equal outputs and
    ``caches`` equal to ``written`` afterwards mean the pass kept both."""

    def __init__(self, model, retrieval, until: str):
        self.ids, self.pos = _inputs()
        self.ctx = _ctx(retrieval)
        self.gm = run_passes(captured(model, last_logits_only=False), self.ctx, until=until)
        self.ops = op_counts(self.gm)
        self.caches = [torch.randn(2, s.num_kv_heads, s.slots or 64, s.head_dim) for s in self.ctx.cache_specs]
        self.written = [c.clone() for c in self.caches]
        self.output = self.run(self.gm, self.written)

    def run(self, gm, caches=None):
        return gm(self.ids, self.pos, *_rows(), *(self.caches if caches is None else caches))


@torch.no_grad()
def test_merge_head_groups_makes_one_op_per_layer_and_keeps_outputs(model):
    case = _BeforePass(model, mixed_gates(3, _kv_heads(model)), "kv_layout")
    ctx, gm, caches, before, split = case.ctx, case.gm, case.caches, case.written, case.output
    slices, cats = _count(gm, torch.ops.aten.slice.Tensor), _count(gm, torch.ops.aten.cat.default)
    gm = run_pass("merge_head_groups", gm, ctx)
    # layer 1 is the only mixed layer: its two ops and their cat become one op; layers 0 and 2 keep theirs.
    # Its q/k/v head slices (two groups x three) go too.
    assert_ops_changed(case.ops, gm, added={OPS["attention_cached"]: 1},
                       removed={OPS["retrieval_attention_cached"]: 1, OPS["streaming_attention_cached"]: 1,
                                aten.cat.default: 1, aten.slice.Tensor: 6})
    assert ctx.changed["merge_head_groups"] == 1
    assert _count(gm, OPS["attention_cached"]) == 1 and _count(gm, torch.ops.aten.cat.default) == cats - 1
    assert _count(gm, OPS["retrieval_attention_cached"]) == 1 and _count(gm, OPS["streaming_attention_cached"]) == 1
    assert _count(gm, torch.ops.aten.slice.Tensor) < slices  # the head slices of layer 1 are gone
    merged = case.run(gm)
    torch.testing.assert_close(merged, split, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(caches, before))  # the same cache writes


@torch.no_grad()
def test_fuse_projections_makes_one_linear_per_input_and_keeps_outputs(model):
    case = _BeforePass(model, mixed_gates(3, _kv_heads(model)), "merge_head_groups")
    ctx, gm, caches, before, separate = case.ctx, case.gm, case.caches, case.written, case.output
    linears = _count(gm, torch.ops.aten.linear.default)
    params = sum(p.numel() for p in gm.parameters())
    gm = run_pass("fuse_projections", gm, ctx)
    # Per layer q/k/v become one linear and gate/up another: 3 + 2 -> 1 + 1, so 3 fewer per layer.
    # Each of the five former outputs is a column slice of a fused one.
    assert_ops_changed(case.ops, gm, removed={aten.linear.default: 3 * 3}, added={aten.slice.Tensor: 5 * 3})
    assert ctx.changed["fuse_projections"] == 2 * 3
    assert _count(gm, torch.ops.aten.linear.default) == linears - 3 * 3
    assert sum(p.numel() for p in gm.parameters()) == params  # each weight held once, concatenated
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            width = gm.get_parameter(node.args[1].target).shape[0]
            assert tuple(node.meta["val"].shape[-1:]) == (width,)
    if model.config.model_type == "qwen2":  # q/k/v carry biases: concatenated with the weights
        assert any("fused_q_proj_k_proj_v_proj_bias" in name for name, _ in gm.named_parameters())
    fused = case.run(gm)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(caches, before))  # the same cache writes
    # The user's model keeps its own separate weights.
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (model.config.hidden_size,) * 2


def test_fuse_projections_can_be_turned_off(model):
    import duo_compile

    masks = duo_compile.HeadMasks.from_gates(mixed_gates(3, _kv_heads(model)))
    engine = duo_compile.compile(model, masks, sink_size=4, recent_size=8, max_seq_len=64, backend="eager",
                                 fuse_projections=False)
    assert engine.pass_counts["fuse_projections"] == 0
    assert engine.pass_counts["fuse_projections"] is SKIPPED  # not a pass that found nothing to fuse
    assert str(engine.pass_counts["fuse_projections"]) == "skipped"
    assert _count(engine.graph, torch.ops.aten.linear.default) == 7 * 3 + 1


@torch.no_grad()
@pytest.mark.parametrize("gates", ["mixed", "all-retrieval", "all-streaming"])
def test_fuse_rope_hands_the_rotation_to_every_attention_op(model, gates):
    """Every cached op (merged, retrieval-only, streaming-only) gets q/k before RoPE plus cos/sin; the rotation
    nodes (neg, the rotate_half cat) are gone; outputs and cache writes equal the graph before the pass."""
    retrieval = {"mixed": mixed_gates(3, _kv_heads(model)), "all-retrieval": np.ones((3, _kv_heads(model))),
                 "all-streaming": np.zeros((3, _kv_heads(model)))}[gates]
    case = _BeforePass(model, retrieval, "fuse_projections")
    ctx, gm, caches, before, rotated = case.ctx, case.gm, case.caches, case.written, case.output
    assert _count(gm, torch.ops.aten.neg.default) == 2 * 3  # q and k per layer
    gm = run_pass("fuse_rope", gm, ctx)
    # Per layer, q and k each lose x * cos + cat([-x_hi, x_lo]) * sin: two muls, an add, a neg, a cat, two slices.
    assert_ops_changed(case.ops, gm, removed={aten.mul.Tensor: 2 * 2 * 3, aten.add.Tensor: 2 * 3,
                                              aten.neg.default: 2 * 3, aten.cat.default: 2 * 3,
                                              aten.slice.Tensor: 2 * 2 * 3})
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in
           (OPS["attention_cached"], OPS["retrieval_attention_cached"], OPS["streaming_attention_cached"])]
    assert ctx.changed["fuse_rope"] == len(ops) == 3  # one op per layer
    assert all(set(n.kwargs) == {"cos", "sin"} for n in ops)
    assert _count(gm, torch.ops.aten.neg.default) == 0
    fused = case.run(gm)
    torch.testing.assert_close(fused, rotated, rtol=1e-5, atol=1e-6)
    for a, b in zip(caches, before):  # the caches hold the same rotated keys
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fuse_rope_leaves_a_rotation_it_does_not_know():
    """A q rotated some other way (here: the halves' roles swapped, x * cos + cat(x_lo, -x_hi) * sin) is no
    Hugging Face RoPE: the op keeps its rotated q/k and no cos/sin."""
    from torch import fx

    graph = fx.Graph()
    x, cos, sin, k_cache, v_cache, pos = (graph.placeholder(n) for n in ("x", "cos", "sin", "kc", "vc", "pos"))
    aten = torch.ops.aten
    lo = graph.call_function(aten.slice.Tensor, (x, -1, 0, 8))
    hi = graph.call_function(aten.slice.Tensor, (x, -1, 8, 16))
    turned = graph.call_function(aten.cat.default, ([lo, graph.call_function(aten.neg.default, (hi,))], -1))
    q = graph.call_function(aten.add.Tensor, (graph.call_function(aten.mul.Tensor, (x, cos)),
                                              graph.call_function(aten.mul.Tensor, (turned, sin))))
    op = graph.call_function(OPS["retrieval_attention_cached"], (q, q, x, k_cache, v_cache, pos, 0.25))
    graph.output(op)
    shapes = {"x": (1, 2, 3, 16), "cos": (1, 1, 3, 16), "sin": (1, 1, 3, 16)}
    for node in graph.nodes:
        if node.op != "output":
            node.meta["val"] = torch.empty(shapes.get(node.name, (1, 2, 3, 16)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    ctx = _ctx(np.ones((1, 2)))
    before = op_counts(gm)
    fuse_rope(gm, ctx)
    assert ctx.changed["fuse_rope"] == 0 and op.args[0] is q and not op.kwargs
    assert ctx.changed["fuse_rope"] is not SKIPPED  # it ran and matched nothing
    assert_ops_changed(before, gm)


@torch.no_grad()
def test_run_passes_dumps_each_pass_and_records_a_switched_off_pass_as_skipped(tmp_path, monkeypatch):
    """With DUO_COMPILE_DUMP_GRAPHS set, every pass that runs writes its graph before and after it; a pass switched
    off in the context runs nothing, writes nothing and is recorded as SKIPPED (0, printed "skipped")."""
    folder = tmp_path / "graphs"
    monkeypatch.setenv("DUO_COMPILE_DUMP_GRAPHS", str(folder))
    model = cached_tiny_model("llama", True)
    ctx = _ctx(mixed_gates(3, _kv_heads(model)))
    ctx.fuse_projections = ctx.fuse_rope = False
    gm = run_passes(captured(model, last_logits_only=False), ctx)
    ran = ["01_find_attention", "02_reorder_heads", "04_split_attention", "05_kv_layout", "06_merge_head_groups"]
    text = {path.name: path.read_text() for path in folder.iterdir()}
    assert sorted(text) == sorted(f"{name}_{when}.txt" for name in ran for when in ("before", "after"))
    for earlier, later in pairwise(ran):
        assert text[f"{earlier}_after.txt"] == text[f"{later}_before.txt"]
    assert "scaled_dot_product_attention" in text["04_split_attention_before.txt"]
    assert "scaled_dot_product_attention" not in text["04_split_attention_after.txt"]
    assert text["06_merge_head_groups_after.txt"] == f"{gm.graph}\n\n{gm.code}"
    assert "def forward" in gm.code and "attention_cached" in gm.code
    assert ctx.changed["fuse_projections"] is SKIPPED and ctx.changed["fuse_rope"] is SKIPPED
    assert [str(ctx.changed[name]) for name in ("fuse_projections", "fuse_rope")] == ["skipped", "skipped"]
    assert ctx.changed["fuse_rope"] == 0 and ctx.changed["merge_head_groups"] == 1
    assert _count(gm, aten.neg.default) == 2 * 3 and _count(gm, aten.linear.default) == 7 * 3 + 1  # neither ran


def _repeat_kv_with_slices(y, b, t):
    """repeat_kv as torch 2.11 traces ``y[:, :, None, :, :]``: full slices around the unsqueeze."""
    full = 2**63 - 1
    y = torch.ops.aten.slice.Tensor(torch.ops.aten.slice.Tensor(y, 0, 0, full), 1, 0, full)
    y = torch.ops.aten.unsqueeze.default(y, 2)
    y = torch.ops.aten.slice.Tensor(torch.ops.aten.slice.Tensor(y, 3, 0, full), 4, 0, full)
    return y.expand(b, 1, 4, t, 8).reshape(b, 4, t, 8)


def test_find_attention_looks_through_repeat_kv_written_with_slices():
    """transformers 5.17 traces ``x[:, :, None, :, :]`` in repeat_kv as full slices around the unsqueeze."""

    class SliceRepeatKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 8, bias=False)
            self.v_proj, self.o_proj = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(32, 16, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q = self.q_proj(x).view(b, t, 4, 8).transpose(1, 2)
            k, v = (p(x).view(b, t, 1, 8).transpose(1, 2) for p in (self.k_proj, self.v_proj))
            k, v = (_repeat_kv_with_slices(y, b, t) for y in (k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, 32))

    gm = torch.export.export(SliceRepeatKV(), (torch.randn(2, 5, 16),)).module()
    assert sum(n.target is torch.ops.aten.slice.Tensor for n in gm.graph.nodes) >= 8  # the pattern under test
    ctx = _ctx(np.ones((1, 1)))
    before = op_counts(gm)
    find_attention(gm, ctx)
    assert_ops_changed(before, gm)
    site = ctx.sites[0]
    assert (site.num_heads, site.num_kv_heads) == (4, 1)
    assert site.k_proj.args[1].target == "k_proj.weight"
