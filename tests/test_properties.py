"""Property-based tests (hypothesis): the duo ops and the whole runtime against independent formulations.

(a) Ops. The test writes the rule of docs/design.md out again as one dense ``[query, key]`` mask over absolute positions
    (float64 attention, GQA by explicit head index) and compares it with the cached ops run chunk by chunk, so
    the streaming ring wraps around whenever the sequence is longer than ``sink + recent``. It also checks the
    cache contents afterwards: every slot holds the key of the position the layout says, and slots that were never
    written still hold the garbage they started with (nothing is written out of bounds; garbage in unwritten
    slots never leaks into outputs). The same rule checks the tiled one-token streaming decode kernel under the
    Triton interpreter (it is off by default, so the runtime tests below do not reach it).
(b) Runtime. Random masks (any layer may be all-retrieval or all-streaming), sink (incl. 0), recent, chunk size,
    prompt length, batch, mode, family, MHA/GQA: a compiled engine (eager backend) against
    ``duo_compile.oracle.oracle_generate``: greedy tokens identical, scores within 1e-4 relative.

Sizes come from the hypothesis profile in ``tests/reliability.py`` (``DUO_HYPOTHESIS_PROFILE=ci|long``).
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import duo_compile
from duo_compile.kernels import reference
from duo_compile.kernels.ops import OPS
from duo_compile.oracle import oracle_generate
from tests.reliability import examples, relative_error
from tests.shared_capture import compile_reuses_captures
from tests.tiny_models import ARCHS, cached_tiny_model, rope_tables


GARBAGE = 1e4  # start value of every cache slot: large enough that reading an unwritten slot changes the output


# ------------------------------------------------------------------------------------------ the dense rule
def dense_visible(kind: str, chunk_starts: torch.Tensor, sink: int, recent: int, mode: str) -> torch.Tensor:
    """``[T, T]`` bool, docs/design.md "Semantics": may the query at position p see the key at position j.

    ``chunk_starts[p]`` is the first position of the call that processed token p (chunk mode only).
    """
    length = chunk_starts.numel()
    p = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    causal = j <= p
    if kind == "retrieval":
        return causal
    lower = p - recent + 1 if mode == "window" else chunk_starts[:, None] - recent
    return causal & ((j < sink) | (j >= lower))


def dense_attention(q, k, v, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 softmax attention; query head h reads KV head h // (Hq / Hkv)."""
    kv_head = torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    k, v = k.double()[:, kv_head], v.double()[:, kv_head]
    scores = torch.einsum("bhtd,bhsd->bhts", q.double(), k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", torch.softmax(scores, dim=-1), v)


def streaming_slot(p: int, sink: int, recent: int) -> int:
    """The layout of docs/design.md / kernels/reference.py: sink slots, then a ring of ``recent`` slots."""
    return p if p < sink else sink + (p - sink) % recent


# ---------------------------------------------------------------------------------------------- (a) ops
@st.composite
def op_cases(draw):
    kv_heads = draw(st.integers(1, 3))
    case = dict(
        batch=draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        heads=kv_heads * draw(st.integers(1, 3)),  # GQA groups 1..3 (1 = MHA)
        head_dim=draw(st.sampled_from([1, 4, 8, 16])),
        sink=draw(st.integers(0, 5)),
        recent=draw(st.integers(1, 9)),
        prompt=draw(st.integers(1, 40)),
        chunk=draw(st.integers(1, 17)),
        decode=draw(st.integers(0, 12)),  # one-token calls after the prompt
        spare=draw(st.integers(0, 4)),  # retrieval slots past the sequence, must stay untouched
        mode=draw(st.sampled_from(["window", "chunk"])),
        scale=draw(st.floats(0.1, 1.0)),
        use_op=draw(st.booleans()),  # through the registered duo:: op, or the reference function itself
        seed=draw(st.integers(0, 2**16)),
    )
    return case


def _calls(prompt: int, chunk: int, decode: int) -> list[tuple[int, int]]:
    calls = [(b, min(b + chunk, prompt)) for b in range(0, prompt, chunk)]
    return calls + [(p, p + 1) for p in range(prompt, prompt + decode)]


def _rows(begin: int, end: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached ops' per-row positions for a call of tokens ``begin .. end - 1`` in every row: (cache_start,
    valid), each ``[batch]``."""
    return torch.full((batch,), begin), torch.full((batch,), end - begin)


def _qkv(c, length):
    gen = torch.Generator().manual_seed(c["seed"])
    q = 2 * torch.randn(c["batch"], c["heads"], length, c["head_dim"], generator=gen)
    k = torch.randn(c["batch"], c["kv_heads"], length, c["head_dim"], generator=gen)
    v = torch.randn(c["batch"], c["kv_heads"], length, c["head_dim"], generator=gen)
    return q, k, v


@examples(ci=100, long=1000)
@given(op_cases())
def test_cached_ops_chunk_by_chunk_equal_one_dense_masked_attention(c):
    calls = _calls(c["prompt"], c["chunk"], c["decode"])
    length = calls[-1][1]
    q, k, v = _qkv(c, length)
    chunk_starts = torch.tensor([begin for begin, end in calls for _ in range(begin, end)])
    sink, recent = c["sink"], c["recent"]
    shape = (c["batch"], c["kv_heads"])
    r_k = torch.full((*shape, length + c["spare"], c["head_dim"]), GARBAGE)
    s_k = torch.full((*shape, sink + recent, c["head_dim"]), GARBAGE)
    r_v, s_v = r_k.clone() * -1, s_k.clone() * -1
    retrieval = OPS["retrieval_attention_cached"] if c["use_op"] else reference.retrieval_attention_cached
    streaming = OPS["streaming_attention_cached"] if c["use_op"] else reference.streaming_attention_cached
    r_out, s_out = [], []
    for begin, end in calls:
        args = (q[:, :, begin:end], k[:, :, begin:end], v[:, :, begin:end])
        position = _rows(begin, end, c["batch"])
        r_out.append(retrieval(*args, r_k, r_v, *position, c["scale"]))
        s_out.append(streaming(*args, s_k, s_v, *position, c["scale"], sink, recent, c["mode"] == "chunk"))

    for kind, outs in (("retrieval", r_out), ("streaming", s_out)):
        want = dense_attention(q, k, v, dense_visible(kind, chunk_starts, sink, recent, c["mode"]), c["scale"])
        got = torch.cat(outs, dim=2)
        assert got.dtype == q.dtype and got.shape == q.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{kind}: {m}")

    # Retrieval cache: token p in slot p; the slots past the sequence were never touched.
    assert torch.equal(r_k[:, :, :length], k) and torch.equal(r_v[:, :, :length], v)
    assert bool((r_k[:, :, length:] == GARBAGE).all()) and bool((r_v[:, :, length:] == -GARBAGE).all())
    # Streaming cache: the sink and the last `recent` positions at their slots; empty slots untouched.
    _assert_streaming_layout(s_k, s_v, k, v, sink, recent)


@examples(ci=50, long=500)
@given(op_cases())
def test_cacheless_ops_equal_one_dense_masked_attention(c):
    """The whole-sequence ops (split_attention's output before kv_layout) follow the window rule from 0."""
    length = c["prompt"]
    q, k, v = _qkv(c, length)
    starts = torch.zeros(length, dtype=torch.long)
    retrieval = OPS["retrieval_attention"] if c["use_op"] else reference.retrieval_attention
    streaming = OPS["streaming_attention"] if c["use_op"] else reference.streaming_attention
    got_r = retrieval(q, k, v, c["scale"])
    got_s = streaming(q, k, v, c["scale"], c["sink"], c["recent"])
    want_r = dense_attention(q, k, v, dense_visible("retrieval", starts, 0, 1, "window"), c["scale"])
    want_s = dense_attention(q, k, v, dense_visible("streaming", starts, c["sink"], c["recent"], "window"), c["scale"])
    torch.testing.assert_close(got_r.double(), want_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_s.double(), want_s, rtol=1e-4, atol=1e-5)


def _assert_streaming_layout(s_k, s_v, k, v, sink, recent):
    """Streaming K/V caches (filled with GARBAGE / -GARBAGE) after positions ``0 .. k.shape[2] - 1``: the sink
    and the last ``recent`` positions at their slots; every other slot untouched."""
    length = k.shape[2]
    held = {streaming_slot(p, sink, recent): p for p in range(length) if p < sink or p >= max(sink, length - recent)}
    for slot in range(sink + recent):
        if slot in held:
            p = held[slot]
            assert torch.equal(s_k[:, :, slot], k[:, :, p]) and torch.equal(s_v[:, :, slot], v[:, :, p]), (p, slot)
        else:
            assert bool((s_k[:, :, slot] == GARBAGE).all()) and bool((s_v[:, :, slot] == -GARBAGE).all()), slot


@examples(ci=12, long=120)
@given(
    kv_heads=st.integers(1, 2), groups=st.sampled_from([1, 2, 3, 4]), sink=st.integers(0, 5), recent=st.integers(1, 9),
    prompt=st.integers(1, 20), decode=st.integers(1, 14), block_n=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_triton_tiled_streaming_decode_follows_the_dense_rule(kv_heads, groups, sink, recent, prompt, decode,
                                                               block_n, seed):
    """The tiled one-token streaming kernel (kernels/triton_streaming_decode.py, under the interpreter) after a
    Triton prefill, token by token: outputs equal the dense window rule; the cache ends in the layout, and slots
    never written keep their garbage (the fused slot write lands only where the layout says)."""
    from dataclasses import replace

    from duo_compile.kernels.launchers import triton_streaming_attention_cached
    from duo_compile.kernels.tuning import decode_config

    c = dict(batch=1, heads=kv_heads * groups, kv_heads=kv_heads, head_dim=16, seed=seed)
    length = prompt + decode
    q, k, v = _qkv(c, length)
    s_k = torch.full((1, kv_heads, sink + recent, 16), GARBAGE)
    s_v = -s_k.clone()
    tiles = replace(decode_config(q[:, :, :1], groups), block_n=block_n)  # the launcher's tile, other widths
    outs = []
    for begin, end in [(0, prompt)] + [(p, p + 1) for p in range(prompt, length)]:
        outs.append(triton_streaming_attention_cached(
            q[:, :, begin:end], k[:, :, begin:end], v[:, :, begin:end], s_k, s_v, *_rows(begin, end, 1), 0.25,
            sink, recent, False, config=None if end - begin > 1 else tiles, split_decode=True))
    want = dense_attention(q, k, v, dense_visible("streaming", torch.zeros(length, dtype=torch.long), sink, recent,
                                                  "window"), 0.25)
    torch.testing.assert_close(torch.cat(outs, dim=2).double(), want, rtol=1e-4, atol=1e-5)
    _assert_streaming_layout(s_k, s_v, k, v, sink, recent)


@examples(ci=8, long=80)
@given(
    kv_heads=st.integers(2, 3), retrieval_frac=st.floats(0, 1), groups=st.sampled_from([1, 2, 4]),
    sink=st.integers(0, 5), recent=st.integers(1, 9), prompt=st.integers(1, 20), decode=st.integers(1, 10),
    seed=st.integers(0, 2**16), rope=st.booleans(),
)
def test_triton_mixed_layer_decode_follows_the_dense_rule(kv_heads, retrieval_frac, groups, sink, recent, prompt,
                                                          decode, seed, rope):
    """A mixed layer's one-grid decode (kernels/triton_mixed_decode.py, under the interpreter) after a Triton
    prefill, token by token: retrieval heads equal causal attention, streaming heads the dense window rule; both
    caches end in their layouts and slots never written keep their garbage. With ``rope`` the op gets q/k before
    the rotary embedding and the tables (what fuse_rope emits): the rule holds for the rotated q/k, and the caches
    hold rotated keys."""
    from duo_compile.kernels import launchers, tuning

    assert tuning.STREAMING_DECODE == "mixed"  # the default, which this test is about
    n = 1 + round(retrieval_frac * (kv_heads - 2))  # 1 .. kv_heads - 1 retrieval KV heads
    c = dict(batch=1, heads=kv_heads * groups, kv_heads=kv_heads, head_dim=16, seed=seed)
    length = prompt + decode
    q_in, k_in, v = _qkv(c, length)
    tables = rope_tables(torch.arange(length)[None], 16) if rope else None
    q, k = (reference.rope(x, *tables) for x in (q_in, k_in)) if rope else (q_in, k_in)
    r_k = torch.full((1, n, length + 3, 16), GARBAGE)
    s_k = torch.full((1, kv_heads - n, sink + recent, 16), GARBAGE)
    r_v, s_v = -r_k.clone(), -s_k.clone()
    outs = []
    for begin, end in [(0, prompt)] + [(p, p + 1) for p in range(prompt, length)]:
        cos, sin = (t[:, :, begin:end] for t in tables) if rope else (None, None)
        outs.append(launchers.triton_attention_cached(
            q_in[:, :, begin:end], k_in[:, :, begin:end], v[:, :, begin:end], r_k, r_v, s_k, s_v,
            *_rows(begin, end, 1), 0.25, n, sink, recent, False, cos=cos, sin=sin))
    out = torch.cat(outs, dim=2).double()
    starts = torch.zeros(length, dtype=torch.long)
    a = n * groups
    want_r = dense_attention(q[:, :a], k[:, :n], v[:, :n], dense_visible("retrieval", starts, 0, 1, "window"), 0.25)
    want_s = dense_attention(q[:, a:], k[:, n:], v[:, n:],
                             dense_visible("streaming", starts, sink, recent, "window"), 0.25)
    torch.testing.assert_close(out[:, :a], want_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, a:], want_s, rtol=1e-4, atol=1e-5)
    assert torch.equal(r_k[:, :, :length], k[:, :n]) and bool((r_k[:, :, length:] == GARBAGE).all())
    _assert_streaming_layout(s_k, s_v, k[:, n:], v[:, n:], sink, recent)


@examples(ci=40, long=400)
@given(
    kind=st.sampled_from(["retrieval", "streaming", "mixed"]), rows=st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 12)), min_size=1, max_size=4),
    length=st.integers(1, 12), groups=st.integers(1, 3), sink=st.integers(0, 5), recent=st.integers(1, 9),
    chunk_mode=st.booleans(), rope=st.booleans(), use_op=st.booleans(), seed=st.integers(0, 2**16),
)
def test_cached_ops_rows_at_their_own_positions_equal_each_row_alone(kind, rows, length, groups, sink, recent,
                                                                     chunk_mode, rope, use_op, seed):
    """A batch whose rows sit at any positions with any number of real tokens (the rest padding): every row's
    outputs and caches equal that row alone with only its real tokens (tests/ragged.py); the reference alone
    follows the dense rule (the tests above)."""
    from tests.ragged import REFERENCE, check_rows_alone

    starts = [s for s, _ in rows]
    valid = [min(n, length) for _, n in rows]
    name = "attention_cached" if kind == "mixed" else f"{kind}_attention_cached"
    check_rows_alone(OPS[name] if use_op else REFERENCE[kind], kind, starts, valid, length, hkv=3 if kind == "mixed"
                     else 2, groups=groups, n_retrieval=1 + seed % 2, sink=sink, recent=recent,
                     chunk_mode=chunk_mode and kind != "retrieval", d=8, rope=rope, seed=seed)


def test_dense_rule_sanity():
    """The test's own rule on a hand-checked case: sink 2, recent 3, query 9 sees 0, 1, 7, 8, 9."""
    starts = torch.arange(10)  # every token its own call
    row = dense_visible("streaming", starts, 2, 3, "window")[9]
    assert row.nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    # chunk mode, one chunk 0..9 starting at 0: everything up to the query is visible
    assert dense_visible("streaming", torch.zeros(10, dtype=torch.long), 2, 3, "chunk")[9].all()
    # chunk mode, a one-token call at 9: sink + the `recent` tokens before it + itself
    row = dense_visible("streaming", starts, 2, 3, "chunk")[9]
    assert row.nonzero().flatten().tolist() == [0, 1, 6, 7, 8, 9]


# ------------------------------------------------------------------------------------------ (b) runtime
_model = cached_tiny_model  # test_compile.py's models, whose captures compile reuses below


_LAYER_KINDS = ("all_retrieval", "all_streaming", "mixed")


@st.composite
def runtime_cases(draw):
    arch, gqa = draw(st.sampled_from(ARCHS)), draw(st.booleans())
    kv_heads, layers = (2 if gqa else 4), 3
    rows = []
    for _ in range(layers):
        kind = draw(st.sampled_from(_LAYER_KINDS))
        if kind == "mixed":
            rows.append(draw(st.lists(st.booleans(), min_size=kv_heads, max_size=kv_heads)))
        else:
            rows.append([kind == "all_retrieval"] * kv_heads)
    prompt, new = draw(st.integers(1, 40)), draw(st.integers(1, 12))
    return dict(
        arch=arch,
        gqa=gqa,
        gates=np.array(rows, dtype=np.float64),
        sink=draw(st.integers(0, 6)),
        recent=draw(st.integers(1, 12)),
        chunk=draw(st.one_of(st.none(), st.integers(1, 20))),
        prompt=prompt,
        new=new,
        max_seq_len=prompt + new + draw(st.integers(0, 8)),  # 0: the request fills the cache exactly
        batch=draw(st.integers(1, 3)),
        mode=draw(st.sampled_from(["window", "chunk"])),
        seed=draw(st.integers(0, 2**16)),
    )


@examples(ci=5, long=60)
@given(runtime_cases())
def test_runtime_matches_oracle(c):
    model = _model(c["arch"], c["gqa"])
    masks = duo_compile.HeadMasks.from_gates(c["gates"])
    with compile_reuses_captures():  # one capture per model (tests/shared_capture.py): not the subject here
        engine = duo_compile.compile(
            model, masks, sink_size=c["sink"], recent_size=c["recent"], max_seq_len=c["max_seq_len"],
            prefill_chunk_size=c["chunk"], streaming_mode=c["mode"], backend="eager",
        )
    gen = torch.Generator().manual_seed(c["seed"])
    ids = torch.randint(0, model.config.vocab_size, (c["batch"], c["prompt"]), generator=gen)
    out = engine.generate(ids, max_new_tokens=c["new"], output_scores=True, return_dict_in_generate=True)
    tokens, scores = oracle_generate(
        model, masks, ids, c["new"], sink_size=c["sink"], recent_size=c["recent"], streaming_mode=c["mode"],
        prefill_chunk_size=c["chunk"],
    )
    assert torch.equal(out.sequences, tokens)
    assert len(out.scores) == len(scores) == c["new"]
    for step, (got, want) in enumerate(zip(out.scores, scores)):
        rel = relative_error(got, want)
        assert rel < 1e-4, f"step {step}: relative score error {rel:.2e}"
