"""HeadMasks (gates, TSV format, deterministic binarisation) and kv_cache_bytes."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duo_compile.masks import PATTERNS_DIR, HeadMasks, KVCacheBytes, kv_cache_bytes
from tests.tiny_models import mixed_gates, tiny_config, tiny_model

PATTERNS = PATTERNS_DIR
PATTERN_SHAPES = {
    "Llama-2-7B-32K-Instruct": (32, 32),
    "Llama-3-8B-Instruct-Gradient-1048k": (32, 8),
    "Mistral-7B-Instruct-v0.2": (32, 8),
}


def pattern(name: str) -> Path:
    return PATTERNS / name / "full_attention_heads.tsv"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "full_attention_heads.tsv"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- TSV

def test_tsv_round_trip_is_exact(tmp_path):
    gates = np.random.default_rng(0).random((5, 3))
    gates[0, 0], gates[1, 1], gates[2, 2] = 0.0, 1.0, 1 / 3
    masks = HeadMasks.from_gates(gates)
    path = tmp_path / "g.tsv"
    masks.to_tsv(path)
    back = HeadMasks.from_tsv(path)
    assert back == masks
    assert np.array_equal(back.gates, gates)
    # Same format as the authors: np.loadtxt reads it, tabs, no header.
    assert np.array_equal(np.loadtxt(path, delimiter="\t"), gates)
    assert path.read_text().splitlines()[0].count("\t") == 2


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6),
                  elements=st.floats(0.0, 1.0, allow_subnormal=True)))
def test_tsv_and_dict_round_trip_property(tmp_path_factory, gates):
    masks = HeadMasks.from_gates(gates)
    path = tmp_path_factory.mktemp("rt") / "g.tsv"
    masks.to_tsv(path)
    assert np.array_equal(HeadMasks.from_tsv(path).gates, gates)
    assert HeadMasks.from_dict(json.loads(json.dumps(masks.to_dict()))) == masks


def test_to_tsv_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "g.tsv"
    HeadMasks.all_retrieval(2, 2).to_tsv(path)
    HeadMasks.all_streaming(2, 2).to_tsv(path)
    assert HeadMasks.from_tsv(path) == HeadMasks.all_streaming(2, 2)
    assert os.listdir(tmp_path) == ["g.tsv"]  # no temp file left behind


def test_to_tsv_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "g.tsv"
    HeadMasks.all_retrieval(2, 2).to_tsv(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savetxt", boom)
    with pytest.raises(OSError, match="disk full"):
        HeadMasks.all_streaming(2, 2).to_tsv(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["g.tsv"]


def test_small_excursions_are_clipped_like_the_authors(tmp_path):
    path = write(tmp_path, "-1.4e-3\t0.5\t1.0\n-0.05\t1.05\t1.0000001\n\n")  # trailing blank line is fine
    masks = HeadMasks.from_tsv(path)
    assert np.array_equal(masks.gates, [[0.0, 0.5, 1.0], [0.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    "text, line, bad",
    [
        ("0.5\t0.5\n0.5\t-0.2\n", 2, "-0.2"),
        ("0.5\t0.5\n1.5\t0.5\n", 2, "1.5"),
        ("0.5\tnan\n", 1, "nan"),
        ("0.5\tinf\n", 1, "inf"),
        ("0.5\t-inf\n", 1, "-inf"),
        ("0.5\t0.5\n0.5\tabc\n", 2, "abc"),
        ("0.5\t0.5\n0.5\t\n", 2, "''"),  # trailing tab = empty field
        ("0.5\t\t0.5\n", 1, "''"),
        ("0.5 0.5\n", 1, "0.5 0.5"),
        ("0.5\t0.5\n\n0.5\n", 3, "1 values"),  # ragged; line counts include the blank line
        ("0.5\t0.5\n0.5\t0.5\t0.5\n", 2, "3 values"),
    ],
)
def test_bad_tsv_names_file_line_and_value(tmp_path, text, line, bad):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        HeadMasks.from_tsv(path)
    message = str(info.value)
    assert str(path) in message
    assert f"line {line}" in message
    assert bad in message


@pytest.mark.parametrize("text", ["", "\n\n", "  \n"])
def test_empty_tsv_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="empty") as info:
        HeadMasks.from_tsv(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- real pattern files

@pytest.mark.parametrize("name", sorted(PATTERN_SHAPES))
def test_real_pattern_files_load(name):
    masks = HeadMasks.from_tsv(pattern(name))
    assert masks.shape == PATTERN_SHAPES[name]
    assert masks.gates.dtype == np.float64
    assert masks.gates.min() >= 0.0 and masks.gates.max() <= 1.0
    raw = np.loadtxt(pattern(name), delimiter="\t")
    assert raw.min() < 0.0  # the authors' files really have small negatives ...
    assert np.array_equal(masks.gates, np.clip(raw, 0.0, 1.0))  # ... and loading clips them like the authors


def test_llama3_sparsity_half_is_exact_and_deterministic(tmp_path):
    gates = HeadMasks.from_tsv(pattern("Llama-3-8B-Instruct-Gradient-1048k"))
    binary = gates.binarize(sparsity=0.5)
    assert binary.is_binary
    assert int(binary.retrieval.sum()) == 128 and binary.num_layers * binary.num_kv_heads == 256
    assert sum(binary.retrieval_counts) == 128 and sum(binary.streaming_counts) == 128
    assert binary.retrieval_ratio == 0.5
    for _ in range(3):
        assert gates.binarize(sparsity=0.5) == binary
    gates.to_tsv(tmp_path / "g.tsv")
    assert HeadMasks.from_tsv(tmp_path / "g.tsv").binarize(sparsity=0.5) == binary
    # Every streaming head has a gate <= every retrieval head's gate.
    assert gates.gates[~binary.retrieval].max() <= gates.gates[binary.retrieval].min()


def test_authors_sparsities_on_llama2():
    gates = HeadMasks.from_tsv(pattern("Llama-2-7B-32K-Instruct"))
    binary = gates.binarize(sparsity=0.75)
    assert int(binary.retrieval.sum()) == 256  # 1024 heads, 768 streaming


# ---------------------------------------------------------------- binarize

def test_sparsity_edge_cases():
    gates = HeadMasks.from_gates(np.random.default_rng(1).random((4, 3)))
    assert gates.binarize(sparsity=0) == HeadMasks.all_retrieval(4, 3)
    assert gates.binarize(sparsity=1.0) == HeadMasks.all_streaming(4, 3)
    assert gates.binarize(sparsity=np.float32(0.5)).retrieval_ratio == 0.5


def test_sparsity_rounds_to_nearest_head_count():
    gates = HeadMasks.from_gates(np.linspace(0.1, 0.9, 10).reshape(2, 5))
    assert sum(gates.binarize(sparsity=0.34).streaming_counts) == 3
    assert sum(gates.binarize(sparsity=0.36).streaming_counts) == 4


def test_tie_break_matches_hand_computed_set():
    # Ties at 1.0 and at 0.0 (as in the authors' files). n_streaming = round(0.5 * 6) = 3:
    # the two 0.0 gates at (1, 0) and (2, 1), then the first 1.0 in row-major order, (0, 0).
    gates = HeadMasks.from_gates([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    expected = np.array([[False, True], [False, True], [True, False]])
    assert np.array_equal(gates.binarize(sparsity=0.5).retrieval, expected)

    # All tied: lower (layer, head) index becomes streaming first, so layer 0 goes first.
    ones = HeadMasks.all_retrieval(3, 4)
    assert ones.binarize(sparsity=0.5).retrieval_counts == [0, 2, 4]
    assert ones.binarize(sparsity=0.25).retrieval_counts == [1, 4, 4]

    # Mixed ties: 0.3 x3 and 0.7 x3, n = round(4/6 * 6) = 4 -> all 0.3s then the first 0.7 (at (0, 1)).
    mixed = HeadMasks.from_gates([[0.3, 0.7, 0.3], [0.7, 0.3, 0.7]])
    expected = np.array([[False, False, False], [True, False, True]])
    assert np.array_equal(mixed.binarize(sparsity=4 / 6).retrieval, expected)


def test_threshold():
    gates = HeadMasks.from_gates([[0.2, 0.5, 0.50001], [1.0, 0.0, 0.7]])
    assert np.array_equal(gates.binarize(threshold=0.5).retrieval, [[False, False, True], [True, False, True]])
    assert gates.binarize(threshold=0).retrieval_counts == [3, 2]
    assert gates.binarize(threshold=1) == HeadMasks.all_streaming(2, 3)


def test_skipped_layers_become_retrieval_and_take_no_share_of_the_sparsity():
    """``skip_layers`` (a model's window layers, whose rows the engine does not use): their rows are 1, and the
    sparsity counts the other layers' heads only (here round(0.5 * 6) = 3 of them, the lowest gates there)."""
    gates = HeadMasks.from_gates([[0.9, 0.8], [0.0, 0.1], [0.5, 0.2], [0.7, 0.3]])
    masks = gates.binarize(sparsity=0.5, skip_layers=[1])
    assert np.array_equal(masks.retrieval, [[True, True], [True, True], [False, False], [True, False]])
    assert gates.binarize(sparsity=0.5).retrieval_counts == [2, 0, 1, 1]  # without: layer 1 takes two of four
    assert gates.binarize(threshold=0.4, skip_layers=(1, 3)).retrieval_counts == [2, 2, 1, 2]
    for bad in ([4], [-1], [True], ["0"]):
        with pytest.raises(ValueError, match="skip_layers must be layer indices in 0..3"):
            gates.binarize(sparsity=0.5, skip_layers=bad)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({}, "exactly one"),
        ({"sparsity": 0.5, "threshold": 0.5}, "exactly one"),
        ({"sparsity": 1.5}, "1.5"),
        ({"sparsity": -0.1}, "-0.1"),
        ({"sparsity": float("nan")}, "nan"),
        ({"sparsity": "0.5"}, "'0.5'"),
        ({"sparsity": True}, "True"),
        ({"threshold": 2}, "2"),
        ({"threshold": float("inf")}, "inf"),
        ({"threshold": None, "sparsity": [0.5]}, "[0.5]"),
    ],
)
def test_binarize_rejects_bad_arguments(kwargs, named):
    with pytest.raises(ValueError) as info:
        HeadMasks.all_retrieval(2, 2).binarize(**kwargs)
    assert named in str(info.value)


# ---------------------------------------------------------------- construction and properties

@pytest.mark.parametrize(
    "gates, named",
    [
        ([[0.5, 1.2]], "1.2"),
        ([[0.5, 0.5], [-0.01, 0.5]], "(1, 0)"),
        ([[0.5, float("nan")]], "nan"),
        ([[0.5], [float("inf")]], "inf"),
        ([0.5, 0.5], "2-D"),
        ([[[0.5]]], "2-D"),
        (np.zeros((0, 3)), "(0, 3)"),
        ([["a", 0.5]], "real numbers"),
    ],
)
def test_from_gates_rejects_bad_input(gates, named):
    with pytest.raises(ValueError) as info:
        HeadMasks.from_gates(gates)
    assert named in str(info.value)


def test_from_gates_names_value_and_position():
    with pytest.raises(ValueError, match=r"1\.7.*\(2, 1\)"):
        HeadMasks.from_gates([[0, 0], [0, 0], [0, 1.7]])


def test_masks_are_immutable_copies():
    source = np.full((2, 2), 0.5)
    masks = HeadMasks.from_gates(source)
    source[0, 0] = 0.0
    assert masks.gates[0, 0] == 0.5
    with pytest.raises(ValueError):
        masks.gates[0, 0] = 1.0
    binary = masks.binarize(threshold=0.4)
    binary.retrieval[0, 0] = False  # a fresh array: changing it leaves the masks alone
    assert binary.retrieval.all()
    assert pickle.loads(pickle.dumps(binary)) == binary


def test_properties_and_repr():
    masks = HeadMasks.from_gates(mixed_gates(3, 4))
    assert masks.shape == (3, 4) and masks.num_layers == 3 and masks.num_kv_heads == 4
    assert masks.is_binary
    assert masks.retrieval_counts == [4, 2, 0]
    assert masks.streaming_counts == [0, 2, 4]
    assert masks.retrieval_ratio == 0.5
    assert repr(masks) == "HeadMasks(shape=(3, 4), retrieval_ratio=0.500)"
    assert masks == HeadMasks.from_gates(mixed_gates(3, 4)) and hash(masks) == hash(HeadMasks(mixed_gates(3, 4)))
    assert masks != HeadMasks.all_retrieval(3, 4) and masks != "masks"

    soft = HeadMasks.from_gates([[0.2, 0.9]])
    assert not soft.is_binary
    assert "(1, 2)" in repr(soft) and "not binary" in repr(soft)
    for attr in ("retrieval", "retrieval_counts", "streaming_counts", "retrieval_ratio"):
        with pytest.raises(ValueError, match="binarize first"):
            getattr(soft, attr)


def test_all_retrieval_all_streaming():
    assert HeadMasks.all_retrieval(2, 3).retrieval_ratio == 1.0
    assert HeadMasks.all_streaming(2, 3).retrieval_counts == [0, 0]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
            HeadMasks.all_retrieval(bad, 3)


def test_random_baseline():
    masks = HeadMasks.random(32, 8, sparsity=0.5, seed=0)
    assert masks.is_binary and sum(masks.streaming_counts) == 128
    assert HeadMasks.random(32, 8, 0.5, 0) == masks
    assert HeadMasks.random(32, 8, 0.5, 1) != masks
    assert sum(HeadMasks.random(3, 3, 1 / 3, 7).streaming_counts) == 3
    assert HeadMasks.random(2, 2, 0.0, 0) == HeadMasks.all_retrieval(2, 2)
    assert HeadMasks.random(2, 2, 1.0, 0) == HeadMasks.all_streaming(2, 2)
    # Exactly the draw of default_rng(seed): reproducible across versions of this code.
    expected = np.ones(12)
    expected[np.random.default_rng(5).choice(12, size=round(0.25 * 12), replace=False)] = 0.0
    assert np.array_equal(HeadMasks.random(3, 4, 0.25, 5).gates.ravel(), expected)
    with pytest.raises(ValueError, match="1.5"):
        HeadMasks.random(2, 2, 1.5, 0)
    with pytest.raises(ValueError, match="'x'"):
        HeadMasks.random(2, 2, 0.5, "x")


def test_dict_round_trip_and_errors():
    masks = HeadMasks.from_gates([[0.25, 1 / 3], [0.0, 1.0]])
    data = masks.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert HeadMasks.from_dict(json.loads(json.dumps(data))) == masks
    with pytest.raises(ValueError, match="gates"):
        HeadMasks.from_dict({"shape": [2, 2]})
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        HeadMasks.from_dict({**data, "shape": [3, 2]})
    with pytest.raises(ValueError, match="99"):
        HeadMasks.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="1.5"):
        HeadMasks.from_dict({**data, "gates": [[1.5, 0.0]], "shape": [1, 2]})


def test_check_shape_names_both_shapes():
    masks = HeadMasks.all_retrieval(32, 8)
    masks.check_shape(32, 8)
    with pytest.raises(ValueError) as info:
        masks.check_shape(3, 2)
    assert str(info.value) == "masks have shape (32, 8) but the model has 3 layers x 2 KV heads"
    with pytest.raises(ValueError, match="the engine has"):
        masks.check_shape(32, 4, what="engine")


# ---------------------------------------------------------------- kv_cache_bytes

def test_kv_cache_bytes_by_hand():
    config = tiny_config("llama", gqa=True)  # 3 layers, 2 KV heads, head_dim 64 / 4 = 16
    masks = HeadMasks.from_gates(mixed_gates(3, 2))  # retrieval heads: 2 + 1 + 0 = 3, streaming: 3
    got = kv_cache_bytes(config, masks, seq_len=100, batch_size=2, dtype=torch.float16, sink_size=4, recent_size=8)
    per_token_head = 2 * 2 * 16 * 2  # K and V, batch 2, head_dim 16, 2 bytes
    assert per_token_head == 128
    assert got == KVCacheBytes(retrieval=38400, streaming=4608, total=43008, full_attention=76800)
    assert got.retrieval == per_token_head * 3 * 100
    assert got.streaming == per_token_head * 3 * (4 + 8)
    assert got.full_attention == per_token_head * 3 * 2 * 100
    assert got.saving == pytest.approx(76800 / 43008)
    assert all(isinstance(getattr(got, f), int) for f in ("retrieval", "streaming", "total", "full_attention"))
    with pytest.raises(Exception):
        got.total = 0  # frozen


def test_kv_cache_bytes_from_model_and_edge_masks():
    model = tiny_model("llama", gqa=False)  # 3 layers, 4 KV heads (MHA)
    full = kv_cache_bytes(model, HeadMasks.all_retrieval(3, 4), seq_len=10, sink_size=2, recent_size=3)
    assert full.retrieval == full.total == full.full_attention == 2 * 12 * 10 * 16 * 4 and full.streaming == 0
    assert full.saving == 1.0
    stream = kv_cache_bytes(model.config, HeadMasks.all_streaming(3, 4), seq_len=10, sink_size=0, recent_size=5)
    assert stream.retrieval == 0 and stream.total == stream.streaming == 2 * 12 * 5 * 16 * 4
    assert stream.saving == 2.0


def test_kv_cache_bytes_config_defaults():
    # No num_key_value_heads (-> MHA) and no head_dim (-> hidden_size // num_attention_heads).
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=32)
    got = kv_cache_bytes(config, HeadMasks.all_retrieval(2, 4), seq_len=3, sink_size=1, recent_size=1)
    assert got.full_attention == 2 * 2 * 4 * 3 * 8 * 4
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=None, hidden_size=32,
                             head_dim=5)
    got = kv_cache_bytes(config, HeadMasks.all_retrieval(2, 4), seq_len=3, sink_size=1, recent_size=1)
    assert got.full_attention == 2 * 2 * 4 * 3 * 5 * 4


@pytest.mark.parametrize(
    "masks, kwargs, named",
    [
        (HeadMasks.all_retrieval(32, 8), {}, "masks have shape (32, 8) but the model has 3 layers x 2 KV heads"),
        (HeadMasks.all_retrieval(3, 4), {}, "3 layers x 2 KV heads"),
        (HeadMasks.from_gates(np.full((3, 2), 0.5)), {}, "binarize first"),
        (HeadMasks.all_retrieval(3, 2), {"seq_len": 0}, "seq_len"),
        (HeadMasks.all_retrieval(3, 2), {"seq_len": 1.5}, "1.5"),
        (HeadMasks.all_retrieval(3, 2), {"batch_size": 0}, "batch_size"),
        (HeadMasks.all_retrieval(3, 2), {"sink_size": -1}, "sink_size"),
        (HeadMasks.all_retrieval(3, 2), {"recent_size": 0}, "recent_size"),
        (HeadMasks.all_retrieval(3, 2), {"dtype": "float16"}, "float16"),
        (np.ones((3, 2)), {}, "HeadMasks"),
    ],
)
def test_kv_cache_bytes_errors(masks, kwargs, named):
    args = dict(seq_len=10, sink_size=2, recent_size=3) | kwargs
    with pytest.raises(ValueError) as info:
        kv_cache_bytes(tiny_config("llama", gqa=True), masks, **args)
    assert named in str(info.value)
