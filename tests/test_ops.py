"""The duo:: custom ops: registration (opcheck), fake shapes, and cache semantics of the reference; paged retrieval
caches (block tables over page pools) against contiguous ones."""
import pytest
import torch

from duo_compile.kernels import paged, reference
from duo_compile.kernels.ops import OPS
from tests.ragged import KINDS, check_rows_alone


def _rows(start, length, batch=2):
    """The cached ops' per-row positions for a batch whose rows all sit at ``start`` with ``length`` real tokens:
    (cache_start [B], valid [B])."""
    return torch.full((batch,), start), torch.full((batch,), length)


def _inputs(batch=2, heads=4, kv_heads=2, length=5, dim=8, slots=32, start=7):
    q = torch.randn(batch, heads, length, dim)
    k, v = torch.randn(2, batch, kv_heads, length, dim)
    k_cache, v_cache = torch.randn(2, batch, kv_heads, slots, dim)
    return q, k, v, k_cache, v_cache, _rows(start, length, batch)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_opcheck_all_ops(kv_heads):
    q, k, v, kc, vc, pos = _inputs(kv_heads=kv_heads)
    sink, recent = 2, 3
    ks, vs = kc[:, :, : sink + recent].clone(), vc[:, :, : sink + recent].clone()
    cases = [
        (OPS["retrieval_attention"], (q, k, v, 0.3)),
        (OPS["streaming_attention"], (q, k, v, 0.3, sink, recent)),
        (OPS["retrieval_attention_cached"], (q, k, v, kc, vc, *pos, 0.3)),
        (OPS["streaming_attention_cached"], (q, k, v, ks, vs, *pos, 0.3, sink, recent, False)),
        (OPS["streaming_attention_cached"], (q, k, v, ks, vs, *pos, 0.3, sink, recent, True)),
    ]
    if kv_heads > 1:  # the merged layer op needs both head groups: KV heads [0, 1) retrieval, the rest streaming
        kr, vr = kc[:, :1].clone(), vc[:, :1].clone()
        ks2, vs2 = ks[:, 1:].clone(), vs[:, 1:].clone()
        for chunk_mode in (False, True):
            cases.append((OPS["attention_cached"], (q, k, v, kr, vr, ks2, vs2, *pos, 0.3, 1, sink, recent, chunk_mode)))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_retrieval_cached_in_chunks_equals_whole_sequence():
    q, k, v, kc, vc, _ = _inputs(length=11, slots=16)
    whole = reference.retrieval_attention(q, k, v, 0.5)
    parts = [
        OPS["retrieval_attention_cached"](q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], kc, vc, *_rows(s, e - s), 0.5)
        for s, e in ((0, 4), (4, 5), (5, 11))
    ]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kc[:, :, :11], k)  # token p lives in slot p


@pytest.mark.parametrize("chunks", [((0, 20),), ((0, 3), (3, 9), (9, 20)), tuple((i, i + 1) for i in range(20))])
def test_streaming_cached_window_mode_equals_whole_sequence(chunks):
    """Window mode is independent of chunking: any split equals one cacheless pass (ring wraps several times)."""
    sink, recent = 2, 3
    q, k, v, _, _, _ = _inputs(length=20)
    kc, vc = torch.zeros(2, 2, 2, sink + recent, 8)
    whole = reference.streaming_attention(q, k, v, 0.5, sink, recent)
    parts = [
        OPS["streaming_attention_cached"](
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], kc, vc, *_rows(s, e - s), 0.5, sink, recent, False
        )
        for s, e in chunks
    ]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-5, atol=1e-6)
    # After 20 tokens: sink slots hold positions 0, 1; the ring holds 17, 18, 19 at slot 2 + (p - 2) % 3.
    for p in (0, 1, 17, 18, 19):
        slot = p if p < sink else sink + (p - sink) % recent
        torch.testing.assert_close(kc[:, :, slot], k[:, :, p])


def test_streaming_chunk_mode_sees_whole_chunk():
    """Chunk mode: a query sees the cached window before its chunk plus the whole chunk up to itself."""
    sink, recent = 1, 2
    q, k, v, _, _, _ = _inputs(length=8, kv_heads=4)
    kc, vc = torch.zeros(2, 2, 4, sink + recent, 8)
    OPS["streaming_attention_cached"](q[:, :, :4], k[:, :, :4], v[:, :, :4], kc, vc, *_rows(0, 4), 1.0, sink, recent, True)
    out = OPS["streaming_attention_cached"](q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], kc, vc, *_rows(4, 4), 1.0, sink, recent, True)
    # Query 7 sees 0 (sink), 2, 3 (cached recent window before the chunk at 4) and 4..7 (its chunk).
    keys = [0, 2, 3, 4, 5, 6, 7]
    scores = (q[:, :, 7:8] @ k[:, :, keys].transpose(-1, -2)).softmax(-1)
    torch.testing.assert_close(out[:, :, 3:4], scores @ v[:, :, keys], rtol=1e-5, atol=1e-6)


def test_streaming_slot_positions_track_the_ring():
    assert reference.streaming_slot_positions(0, 2, 3).tolist() == [-1, -1, -1, -1, -1]
    assert reference.streaming_slot_positions(1, 2, 3).tolist() == [0, -1, -1, -1, -1]
    assert reference.streaming_slot_positions(4, 2, 3).tolist() == [0, 1, 2, 3, -1]
    assert reference.streaming_slot_positions(9, 2, 3).tolist() == [0, 1, 8, 6, 7]
    assert reference.streaming_slot_positions(9, 0, 3).tolist() == [6, 7, 8]


def test_fake_kernels_give_output_shapes_under_export():
    class M(torch.nn.Module):
        def forward(self, q, k, v, kc, vc, start, valid):
            return OPS["retrieval_attention_cached"](q, k, v, kc, vc, start, valid, 0.5)

    q, k, v, kc, vc, pos = _inputs()
    program = torch.export.export(M(), (q, k, v, kc, vc, *pos))
    assert any(n.target is OPS["retrieval_attention_cached"] for n in program.graph.nodes)
    out = [n for n in program.graph.nodes if n.op == "output"][0]
    assert tuple(out.args[0][-1].meta["val"].shape) == tuple(q.shape)


# ---------------------------------------------------------------------- per-row positions (padded / continuous batches)
# (starts, valid, T): rows at different positions and with different numbers of real tokens. Streaming sink 3 +
# recent 10: rows inside the sink, inside the ring, past a wrapped ring; a chunk longer than the ring whose padding
# would land in the ring; a row with no real token at all.
RAGGED = [
    ((0, 0, 0), (12, 5, 1), 12),  # a padded prefill from position 0 (right padding)
    ((0, 4, 30), (20, 20, 3), 20),  # rows at other positions; chunk longer than sink + recent
    ((7, 25, 2), (1, 1, 0), 1),  # a decode step: rows at their own positions, one row idle
    ((13, 0, 40), (2, 6, 6), 6),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_mode", [False, True])
@pytest.mark.parametrize("starts,valid,length", RAGGED)
def test_cached_ops_treat_every_row_as_if_alone(kind, chunk_mode, starts, valid, length):
    """Each row of one call (the registered op) equals that row alone with only its real tokens; caches too: padding
    is never written (so it cannot overwrite a real key in the streaming ring)."""
    if kind == "retrieval" and chunk_mode:
        pytest.skip("chunk mode is a streaming rule")
    check_rows_alone(OPS[f"{'attention' if kind == 'mixed' else kind + '_attention'}_cached"], kind, starts, valid,
                     length, chunk_mode=chunk_mode, hkv=3 if kind == "mixed" else 2)


def test_rope_tables_per_row_positions():
    # cos/sin [B, 1, T, D] of each row's own positions: the op rotates each row at its positions.
    check_rows_alone(OPS["attention_cached"], "mixed", (5, 0, 21), (4, 6, 2), 6, hkv=3, rope=True)


def test_opcheck_per_row_positions():
    q, k, v, kc, vc, _ = _inputs(batch=3)
    pos = torch.tensor([0, 9, 3]), torch.tensor([5, 2, 0])
    ks, vs = kc[:, :, :5].clone(), vc[:, :, :5].clone()
    for op, args in ((OPS["retrieval_attention_cached"], (q, k, v, kc, vc, *pos, 0.3)),
                     (OPS["streaming_attention_cached"], (q, k, v, ks, vs, *pos, 0.3, 2, 3, False))):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("start,valid,match", [
    ([0, -1], [5, 5], "cache_start >= 0"),
    ([0, 0], [6, 5], "valid <= 5"),
    ([0, 0], [-1, 5], "valid <= 5"),
    ([0], [5], "one entry per batch row"),
    ([0, 30], [5, 5], "exceed the retrieval cache"),
])
def test_bad_row_positions_are_refused(start, valid, match):
    q, k, v, kc, vc, _ = _inputs()
    with pytest.raises(ValueError, match=match):
        OPS["retrieval_attention_cached"](q, k, v, kc, vc, torch.tensor(start), torch.tensor(valid), 0.3)


# --------------------------------------------------------------------------------- paged retrieval caches (paged.py)
def _paged(caches, page_size, spare=3, seed=0):
    """The contiguous retrieval caches ``[B, Hkv, L, D]`` (L a multiple of page_size) as page pools with a scrambled
    block table: (pools, block_table int32 [B, L / page_size]); ``spare`` pages belong to no row."""
    batch, heads, length, dim = caches[0].shape
    per_row = length // page_size
    order = torch.randperm(batch * per_row + spare, generator=torch.Generator().manual_seed(seed))
    table = order[: batch * per_row].view(batch, per_row).to(torch.int32)
    pools = []
    for cache in caches:
        pool = torch.randn(batch * per_row + spare, heads, page_size, dim)
        pool[table.long()] = cache.view(batch, heads, per_row, page_size, dim).transpose(1, 2)
        pools.append(pool)
    return pools, table


def _unpaged(pool, table):
    return pool[table.long()].transpose(1, 2).flatten(2, 3)


def _paged_impl(impl: str, name: str):
    """The op ``name`` as registered (the CPU kernel: blockwise.py), or its reference made pageable."""
    return OPS[name] if impl == "registered" else paged.REFERENCE[name]


@pytest.mark.parametrize("impl", ["registered", "reference"])
@pytest.mark.parametrize("page_size", [1, 3, 4])
@pytest.mark.parametrize("kind", ["retrieval", "mixed"])
@pytest.mark.parametrize("starts,valid,length", RAGGED)
def test_paged_ops_equal_contiguous_caches(impl, page_size, kind, starts, valid, length):
    """A retrieval cache held in scrambled pages (block table) gives the outputs of the contiguous cache, and the
    call writes the same keys into the row's pages; spare pages and the streaming caches are as without pages."""
    gen = torch.Generator().manual_seed(page_size)
    batch, hkv, dim, slots = 3, 3 if kind == "mixed" else 2, 8, 48
    n_r = 1 if kind == "mixed" else hkv
    q = torch.randn(batch, 2 * hkv, length, dim, generator=gen)
    k, v = torch.randn(2, batch, hkv, length, dim, generator=gen)
    k_cache, v_cache = torch.randn(2, batch, n_r, slots, dim, generator=gen)
    (k_pool, v_pool), table = _paged((k_cache, v_cache), page_size)
    spare = sorted(set(range(k_pool.shape[0])) - set(table.flatten().tolist()))
    spare_before = k_pool[spare].clone()
    pos = torch.tensor(starts), torch.tensor(valid)
    if kind == "mixed":
        rings = torch.randn(2, batch, hkv - n_r, 13, dim, generator=gen)
        rings_paged = rings.clone()
        want = reference.attention_cached(q, k, v, k_cache, v_cache, *rings, *pos, 0.3, n_r, 3, 10, False)
        got = _paged_impl(impl, "attention_cached")(q, k, v, k_pool, v_pool, *rings_paged, *pos, 0.3, n_r, 3, 10,
                                                     False, None, None, table)
        assert torch.equal(rings, rings_paged)
    else:
        want = reference.retrieval_attention_cached(q, k, v, k_cache, v_cache, *pos, 0.3)
        got = _paged_impl(impl, "retrieval_attention_cached")(q, k, v, k_pool, v_pool, *pos, 0.3, None, None, table)
    for b, n in enumerate(valid):
        torch.testing.assert_close(got[b, :, :n], want[b, :, :n], rtol=1e-5, atol=1e-5)
    assert torch.equal(_unpaged(k_pool, table), k_cache) and torch.equal(_unpaged(v_pool, table), v_cache)
    assert torch.equal(k_pool[spare], spare_before)


def test_opcheck_paged_ops():
    q, k, v, kc, vc, _ = _inputs(batch=3, slots=12)
    pos = torch.tensor([0, 7, 3]), torch.tensor([5, 2, 0])
    (kp, vp), table = _paged((kc, vc), 4)
    torch.library.opcheck(OPS["retrieval_attention_cached"], (q, k, v, kp, vp, *pos, 0.3, None, None, table))
    kr, vr = kp[:, :1].clone(), vp[:, :1].clone()
    ks, vs = torch.randn(2, 3, 1, 5, 8)
    torch.library.opcheck(OPS["attention_cached"],
                          (q, k, v, kr, vr, ks, vs, *pos, 0.3, 1, 2, 3, False, None, None, table.long()))


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.float(), "block_table must be int32 or int64"),
    (lambda t: t[:2], r"block_table must be int32 or int64 \[batch=3"),
    (lambda t: t[:, :2], "exceed the block table's 2 pages of 4"),
    (lambda t: t.index_fill(1, torch.tensor([1]), 99), r"row 0 reaches position 8 through pages .* the pool has"),
    (lambda t: t.index_fill(1, torch.tensor([0]), -1), r"pages \[-1"),
])
def test_bad_block_tables_are_refused(edit, match):
    q, k, v, kc, vc, _ = _inputs(batch=3, slots=12)
    pos = torch.tensor([4, 4, 4]), torch.tensor([5, 5, 5])
    (kp, vp), table = _paged((kc, vc), 4)
    before = kp.clone()
    with pytest.raises(ValueError, match=match):
        OPS["retrieval_attention_cached"](q, k, v, kp, vp, *pos, 0.3, None, None, edit(table))
    assert torch.equal(kp, before)  # refused before anything is written
