"""Engine files: export -> load in a fresh process -> generate equals the compiled engine; and every refusal.

Tiny Llama (window mode) and Qwen2 (GQA, q/k/v biases, chunk mode) with mixed masks, sink 4 / recent 8, a
40-token prompt, batch 3 (the export examples use batch 2, so the batch really is dynamic), whole prefill and
chunks of 13 (40 = 13 + 13 + 13 + 1: the last chunk is a one-token step). Exported once per module: three AOTI
compiles (Llama with a separate decode model, Qwen2 with one model for both) and two ONNX exports. One fresh
Python process loads all four files and generates; it never imports the models or the tests.

The reference is the compiled engine on the eager backend (the rewritten graph with the reference ops), so the
comparison isolates export + load + runner from the compiler, which test_compile.py checks against the oracle.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import onnx
import pytest
import torch

import duo_compile
from duo_compile.export import engine_file
from duo_compile.export.engine_file import EngineFileError
from duo_compile.export import BackendUnavailableError
from tests.tiny_models import mixed_gates, tiny_model

SINK, RECENT, PROMPT, NEW, CHUNK, MAX_LEN, BATCH = 4, 8, 40, 10, 13, 64, 3
MODES = {"llama": "window", "qwen2": "chunk"}
# (arch, backend, separate_decode)
EXPORTS = [("llama", "aoti", True), ("qwen2", "aoti", False), ("llama", "onnx", False), ("qwen2", "onnx", False)]
SUFFIX = {"aoti": ".pt2", "onnx": ".onnx"}


@functools.lru_cache(maxsize=None)
def _engine(arch: str):
    model = tiny_model(arch, gqa=True)
    masks = duo_compile.HeadMasks.from_gates(mixed_gates(3, model.config.num_key_value_heads))
    return duo_compile.compile(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                               streaming_mode=MODES[arch], backend="eager")


def _prompt(arch: str) -> torch.Tensor:
    vocab = _engine(arch).info.vocab_size
    return torch.randint(0, vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(len(arch)))


@pytest.fixture(scope="module")
def engine_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    files = {}
    for arch, backend, separate in EXPORTS:
        path = folder / f"{arch}{SUFFIX[backend]}"
        assert duo_compile.export(_engine(arch), path, backend=backend, separate_decode=separate) == str(path)
        files[arch, backend] = path
    assert sorted(os.listdir(folder)) == sorted(p.name for p in files.values())  # no temporary files left
    return files


_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    import duo_compile

    job = torch.load(sys.argv[1])
    results = {}
    for key, path in job["files"].items():
        engine = duo_compile.load(path)
        prompt = job["prompts"][key.split("/")[0]]
        for chunk in (None, job["chunk"]):
            out = engine.generate(prompt, max_new_tokens=job["new"], prefill_chunk_size=chunk, output_scores=True,
                                  return_dict_in_generate=True)
            results[f"{key}/{chunk}"] = (out.sequences, torch.stack(out.scores))
    results["imported"] = sorted(m for m in sys.modules if m.startswith(("transformers.models", "tests")))
    torch.save(results, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def fresh_process_results(engine_files, tmp_path_factory):
    """Load every engine file in one new Python process (not the models, not the tests) and generate."""
    work = tmp_path_factory.mktemp("fresh")
    job = {
        "files": {f"{arch}/{backend}": str(path) for (arch, backend), path in engine_files.items()},
        "prompts": {arch: _prompt(arch) for arch in MODES},
        "new": NEW,
        "chunk": CHUNK,
    }
    torch.save(job, work / "job.pt")
    (work / "child.py").write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "child.py", "job.pt", "results.pt"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(work / "results.pt")


CASES = [(arch, backend, chunk) for arch, backend, _ in EXPORTS for chunk in (None, CHUNK)]


@pytest.mark.parametrize("arch,backend,chunk", CASES,
                         ids=[f"{a}-{b}-{'chunked' if c else 'whole'}" for a, b, c in CASES])
def test_loaded_engine_matches_compiled_engine(fresh_process_results, arch, backend, chunk):
    want = _engine(arch).generate(_prompt(arch), max_new_tokens=NEW, prefill_chunk_size=chunk, output_scores=True,
                                  return_dict_in_generate=True)
    tokens, scores = fresh_process_results[f"{arch}/{backend}/{chunk}"]
    assert tokens.shape == (BATCH, PROMPT + NEW)
    assert torch.equal(tokens, want.sequences)
    for step, (got, ref) in enumerate(zip(scores, want.scores)):
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-4, f"step {step}: relative score error {rel:.2e}"


def test_fresh_process_needs_no_model_code(fresh_process_results):
    assert fresh_process_results["imported"] == []


def test_loaded_engine_carries_config_masks_and_caches(engine_files):
    for (arch, backend), path in engine_files.items():
        loaded, compiled = duo_compile.load(path), _engine(arch)
        assert loaded.graph is None
        assert loaded.config == compiled.config
        assert loaded.masks == compiled.masks
        assert loaded.info == compiled.info
        assert loaded.cache_specs == compiled.cache_specs
        assert loaded.dtype == compiled.dtype and loaded.device == compiled.device
        loaded.allocate(2)
        compiled.allocate(2)
        assert loaded.kv_cache_bytes() == compiled.kv_cache_bytes()


def test_aoti_package_layout(engine_files):
    """One PT2 archive per engine: the models AOTInductor can load by name, and the metadata as an extra file."""
    with zipfile.ZipFile(engine_files["llama", "aoti"]) as archive:
        names = archive.namelist()
    models = {n.split("/")[3] for n in names if "/data/aotinductor/" in n}
    assert models == {"prefill", "decode"}
    assert any(n.endswith("/extra/duo_engine.json") for n in names)
    parts, meta = engine_file.read_metadata(engine_files["qwen2", "aoti"])
    assert parts.graphs["models"] == {"prefill": "prefill", "decode": "prefill"}
    # mixed_gates: layer 0 all retrieval, layer 1 both kinds (merged into one op), layer 2 all streaming
    assert set(meta["ops"]) == {"duo::retrieval_attention_cached", "duo::attention_cached",
                                "duo::streaming_attention_cached"}


def test_onnx_model_is_standard_ops_with_documented_shapes(engine_files):
    model = onnx.load(str(engine_files["qwen2", "onnx"]))
    onnx.checker.check_model(model)
    assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert not model.functions
    assert "Attention" not in {node.op_type for node in model.graph.node}

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in model.graph.input}
    outputs = {v.name: dims(v) for v in model.graph.output}
    assert inputs["input_ids"] == ["batch", "chunk"] and inputs["cache_position"] == ["chunk"]
    engine = _engine("qwen2")
    for spec in engine.cache_specs:
        slots = MAX_LEN if spec.slots is None else SINK + RECENT
        assert inputs[spec.name] == ["batch", spec.num_kv_heads, slots, spec.head_dim]
        assert outputs["new_" + spec.name] == ["batch", spec.num_kv_heads, "chunk", spec.head_dim]
    assert outputs["logits"] == ["batch", 1, engine.info.vocab_size]


# ------------------------------------------------------------------------------------------------ export errors
def test_export_refuses_a_model_that_was_not_compiled(tmp_path):
    with pytest.raises(TypeError, match="compile it first"):
        duo_compile.export(tiny_model("llama"), tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="Engine"):
        duo_compile.export("engine", tmp_path / "m.pt2")


def test_export_refuses_an_engine_loaded_from_a_file(engine_files, tmp_path):
    with pytest.raises(ValueError, match="no graph"):
        duo_compile.export(duo_compile.load(engine_files["qwen2", "onnx"]), tmp_path / "again.onnx", backend="onnx")


def test_export_refuses_unknown_backend_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'tflite'"):
        duo_compile.export(_engine("llama"), tmp_path / "m.bin", backend="tflite")
    with pytest.raises(ValueError, match="separate_decode"):
        duo_compile.export(_engine("llama"), tmp_path / "m.onnx", backend="onnx", separate_decode=True)


def test_tensorrt_backend_says_it_is_unavailable_and_points_to_onnx(tmp_path):
    with pytest.raises(BackendUnavailableError, match="torch-tensorrt") as err:
        duo_compile.export(_engine("llama"), tmp_path / "m.engine", backend="tensorrt")
    assert "backend='onnx'" in str(err.value)
    assert not os.listdir(tmp_path)


def test_export_refuses_unwritable_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        duo_compile.export(_engine("llama"), tmp_path / "missing" / "m.onnx", backend="onnx")
    with pytest.raises(ValueError, match="is a directory"):
        duo_compile.export(_engine("llama"), tmp_path, backend="onnx")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="permission denied"):
            duo_compile.export(_engine("llama"), locked / "m.onnx", backend="onnx")


def test_failed_export_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """Writing is atomic: a failure half-way (here: the disk fills up) keeps the previous file as it was."""
    from duo_compile.export import onnx_export

    export_module = sys.modules["duo_compile.export.api"]
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous engine")

    def disk_full(data, meta):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_export, "export_onnx_bytes", lambda engine: (b"x" * 100, {}))
    monkeypatch.setattr(export_module, "onnx_trailer", disk_full)
    with pytest.raises(OSError, match="cannot write the engine file .*No space left"):
        duo_compile.export(_engine("llama"), path, backend="onnx")
    assert path.read_bytes() == b"previous engine"
    assert os.listdir(tmp_path) == ["m.onnx"]


# -------------------------------------------------------------------------------------------------- load errors
def _rewrite_pt2(src, dst, edit) -> None:
    """Copy a PT2 archive, passing its duo_compile metadata through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/extra/duo_engine.json"):
                meta = json.loads(data)
                edit(meta)
                data = json.dumps(meta).encode()
            zout.writestr(item, data)


def _rewrite_onnx(src, dst, edit) -> None:
    """Copy an ONNX engine with edited metadata (a well-formed file: payload length and digest recomputed)."""
    data = src.read_bytes()
    entry = next(p for p in onnx.ModelProto.FromString(data).metadata_props if p.key == engine_file.ONNX_META_KEY)
    meta = json.loads(entry.value)
    payload = data[: meta.pop("payload")["bytes"]]
    edit(meta)
    dst.write_bytes(payload + engine_file.onnx_trailer(payload, meta))


def test_load_refuses_missing_empty_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        duo_compile.load(tmp_path / "nothing.pt2")
    (tmp_path / "empty.pt2").write_bytes(b"")
    with pytest.raises(EngineFileError, match="empty"):
        duo_compile.load(tmp_path / "empty.pt2")
    (tmp_path / "text.pt2").write_text("hello, not an engine\n" * 20)
    with pytest.raises(EngineFileError, match="not a duo_compile engine file"):
        duo_compile.load(tmp_path / "text.pt2")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("other/data.txt", "x")
    with pytest.raises(EngineFileError, match="not a duo_compile engine file"):
        duo_compile.load(tmp_path / "other.zip")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), tmp_path / "plain.onnx")
    with pytest.raises(EngineFileError, match="not a duo_compile engine file"):
        duo_compile.load(tmp_path / "plain.onnx")
    with pytest.raises(EngineFileError, match="directory"):
        duo_compile.load(tmp_path)


@pytest.mark.parametrize("backend", ["aoti", "onnx"])
def test_load_refuses_truncated_and_damaged_files(engine_files, tmp_path, backend):
    data = engine_files["qwen2", backend].read_bytes()
    cuts = [4, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}{SUFFIX[backend]}"
        path.write_bytes(data[:cut])
        with pytest.raises(EngineFileError, match="truncated|damaged|not a duo_compile"):
            duo_compile.load(path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the weights / compiled code
    path = tmp_path / f"flipped{SUFFIX[backend]}"
    path.write_bytes(bytes(flipped))
    with pytest.raises(EngineFileError, match="damaged|altered|truncated|CRC"):
        duo_compile.load(path)


@pytest.mark.parametrize("backend", ["aoti", "onnx"])
def test_load_refuses_another_format_version(engine_files, tmp_path, backend):
    src, dst = engine_files["qwen2", backend], tmp_path / f"v99{SUFFIX[backend]}"
    rewrite = _rewrite_pt2 if backend == "aoti" else _rewrite_onnx
    rewrite(src, dst, lambda meta: meta.update(format_version=99))
    with pytest.raises(EngineFileError, match="format version 99.*reads version 1"):
        duo_compile.load(dst)
    # The rewrite itself is faithful: the unedited copy loads.
    rewrite(src, tmp_path / f"same{SUFFIX[backend]}", lambda meta: None)
    duo_compile.load(tmp_path / f"same{SUFFIX[backend]}")


def test_load_refuses_missing_or_changed_op_library(engine_files, tmp_path):
    src = engine_files["qwen2", "aoti"]
    _rewrite_pt2(src, tmp_path / "missing.pt2", lambda meta: meta["ops"].update({"duo::fused_attention": "duo::x()"}))
    with pytest.raises(EngineFileError, match="duo::fused_attention, which is not registered"):
        duo_compile.load(tmp_path / "missing.pt2")
    _rewrite_pt2(src, tmp_path / "nslib.pt2", lambda meta: meta["ops"].update({"duo_ext::op": "duo_ext::op()"}))
    with pytest.raises(EngineFileError, match="not registered"):
        duo_compile.load(tmp_path / "nslib.pt2")

    def old_schema(meta):
        name = "duo::retrieval_attention_cached"
        meta["ops"][name] = meta["ops"][name].replace("float scale", "float scale, int extra")

    _rewrite_pt2(src, tmp_path / "schema.pt2", old_schema)
    with pytest.raises(EngineFileError, match="schema"):
        duo_compile.load(tmp_path / "schema.pt2")


def test_load_refuses_inconsistent_metadata_and_foreign_runtimes(engine_files, tmp_path):
    src = engine_files["qwen2", "onnx"]
    cases = {
        "specs": (lambda meta: meta["cache_specs"][0].update(num_kv_heads=7), "does not match"),
        "masks": (lambda meta: meta["masks"].update(gates=[[1.0, 0.0]], shape=[1, 2]), "masks do not fit"),
        "config": (lambda meta: meta["config"].update(sink_size=-1), "damaged engine metadata"),
        "backend": (lambda meta: meta.update(backend="aoti"), "onnx container"),
        "device": (lambda meta: meta.update(device="cuda"), "CUDA is not available"),
    }
    for name, (edit, message) in cases.items():
        if name == "device" and torch.cuda.is_available():
            continue
        dst = tmp_path / f"{name}.onnx"
        _rewrite_onnx(src, dst, edit)
        with pytest.raises(EngineFileError, match=message):
            duo_compile.load(dst)
    dst = tmp_path / "torch.pt2"
    _rewrite_pt2(engine_files["qwen2", "aoti"], dst, lambda meta: meta["producer"].update(torch="1.0.0"))
    with pytest.raises(EngineFileError, match="torch 1.0.0"):
        duo_compile.load(dst)
