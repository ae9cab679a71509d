"""The duo:: custom ops: registration (opcheck), fake shapes, and cache semantics of the reference."""
import pytest
import torch

from duo_compile.kernels import reference
from duo_compile.kernels.ops import OPS


def _inputs(batch=2, heads=4, kv_heads=2, length=5, dim=8, slots=32, start=7):
    q = torch.randn(batch, heads, length, dim)
    k, v = torch.randn(2, batch, kv_heads, length, dim)
    k_cache, v_cache = torch.randn(2, batch, kv_heads, slots, dim)
    return q, k, v, k_cache, v_cache, torch.arange(start, start + length)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_opcheck_all_ops(kv_heads):
    q, k, v, kc, vc, pos = _inputs(kv_heads=kv_heads)
    sink, recent = 2, 3
    ks, vs = kc[:, :, : sink + recent].clone(), vc[:, :, : sink + recent].clone()
    cases = [
        (OPS["retrieval_attention"], (q, k, v, 0.3)),
        (OPS["streaming_attention"], (q, k, v, 0.3, sink, recent)),
        (OPS["retrieval_attention_cached"], (q, k, v, kc, vc, pos, 0.3)),
        (OPS["streaming_attention_cached"], (q, k, v, ks, vs, pos, 0.3, sink, recent, False)),
        (OPS["streaming_attention_cached"], (q, k, v, ks, vs, pos, 0.3, sink, recent, True)),
    ]
    if kv_heads > 1:  # the merged layer op needs both head groups: KV heads [0, 1) retrieval, the rest streaming
        kr, vr = kc[:, :1].clone(), vc[:, :1].clone()
        ks2, vs2 = ks[:, 1:].clone(), vs[:, 1:].clone()
        for chunk_mode in (False, True):
            cases.append((OPS["attention_cached"], (q, k, v, kr, vr, ks2, vs2, pos, 0.3, 1, sink, recent, chunk_mode)))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_retrieval_cached_in_chunks_equals_whole_sequence():
    q, k, v, kc, vc, _ = _inputs(length=11, slots=16)
    whole = reference.retrieval_attention(q, k, v, 0.5)
    parts = [
        OPS["retrieval_attention_cached"](q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], kc, vc, torch.arange(s, e), 0.5)
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
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], kc, vc, torch.arange(s, e), 0.5, sink, recent, False
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
    OPS["streaming_attention_cached"](q[:, :, :4], k[:, :, :4], v[:, :, :4], kc, vc, torch.arange(4), 1.0, sink, recent, True)
    out = OPS["streaming_attention_cached"](q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], kc, vc, torch.arange(4, 8), 1.0, sink, recent, True)
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
        def forward(self, q, k, v, kc, vc, pos):
            return OPS["retrieval_attention_cached"](q, k, v, kc, vc, pos, 0.5)

    q, k, v, kc, vc, pos = _inputs()
    program = torch.export.export(M(), (q, k, v, kc, vc, pos))
    assert any(n.target is OPS["retrieval_attention_cached"] for n in program.graph.nodes)
    out = [n for n in program.graph.nodes if n.op == "output"][0]
    assert tuple(out.args[0][-1].meta["val"].shape) == tuple(q.shape)
