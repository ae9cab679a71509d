"""Engine files: export -> load in a fresh process -> generate equals the compiled engine; and every refusal.

Tiny Llama (window mode) and Qwen2 (GQA, q/k/v biases, chunk mode) with mixed masks, sink 4 / recent 8, a
40-token prompt, batch 3 (the export examples use batch 2, so the batch really is dynamic), whole prefill and
chunks of 13 (40 = 13 + 13 + 13 + 1: the last chunk is a one-token step). Exported once per module: three AOTI
compiles (Llama with a separate decode model, Qwen2 with one model for both) and, in a helper process beside
them, two ONNX exports. One fresh Python process loads all four files and generates; it never imports the models
or the tests.

The reference is the compiled engine on the eager backend (the rewritten graph with the reference ops), so the
comparison isolates export + load + runner from the compiler, which test_compile.py checks against the oracle.
"""
from __future__ import annotations

import functools
import json
import os
import re
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


def _padded_prompt(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts cut to 40, 9 and 25 tokens, left-padded (Hugging Face's padding_side="left"): (ids, mask)."""
    ids, mask = _prompt(arch).clone(), torch.ones(BATCH, PROMPT, dtype=torch.long)
    for row, length in enumerate((PROMPT, 9, 25)):
        mask[row, : PROMPT - length] = 0
        ids[row, : PROMPT - length] = 0
    return ids, mask


_ONNX_HELPER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import duo_compile
    from tests.test_export import _engine

    for arch, path in zip(sys.argv[2::2], sys.argv[3::2]):
        assert duo_compile.export(_engine(arch), path, backend="onnx") == path
    """
)


@pytest.fixture(scope="module")
def engine_files(tmp_path_factory):
    """Every file of EXPORTS. The ONNX exports run in a helper process while this one compiles the AOTI files (it
    waits for their C++ builds): a second core's work. compile is deterministic (test_determinism.py), so the
    helper's engines are this process's ``_engine``."""
    folder = tmp_path_factory.mktemp("engines")
    files = {(arch, backend): folder / f"{arch}{SUFFIX[backend]}" for arch, backend, _ in EXPORTS}
    onnx_jobs = [str(x) for (arch, backend), path in files.items() if backend == "onnx" for x in (arch, path)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = tmp_path_factory.mktemp("onnx_helper") / "output.txt"  # not a pipe: this process reads it only at the end
    with open(log, "w") as out:
        helper = subprocess.Popen([sys.executable, "-c", _ONNX_HELPER, root, *onnx_jobs], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        for arch, backend, separate in EXPORTS:
            if backend != "onnx":
                path = files[arch, backend]
                assert duo_compile.export(_engine(arch), path, backend=backend, separate_decode=separate) == str(path)
        helper.wait(timeout=900)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    assert helper.returncode == 0, log.read_text()[-4000:]
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
            ids, mask = job["padded"][key.split("/")[0]]
            out = engine.generate(ids, attention_mask=mask, max_new_tokens=job["new"], prefill_chunk_size=chunk,
                                  output_scores=True, return_dict_in_generate=True)
            results[f"{key}/{chunk}/padded"] = (out.sequences, torch.stack(out.scores))
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
        "padded": {arch: _padded_prompt(arch) for arch in MODES},
        "new": NEW,
        "chunk": CHUNK,
    }
    torch.save(job, work / "job.pt")
    (work / "child.py").write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The duo_compile under test (a checkout may differ from the installed one), nothing else of the checkout.
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(duo_compile.__file__)))
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


@pytest.mark.parametrize("arch,backend,chunk", CASES,
                         ids=[f"{a}-{b}-{'chunked' if c else 'whole'}" for a, b, c in CASES])
def test_loaded_engine_runs_padded_batches_like_the_compiled_engine(fresh_process_results, arch, backend, chunk):
    """A left-padded batch (rows of 40, 9 and 25 tokens) through the loaded engine: the graphs' per-row positions
    (cache_start, valid) and the runners' per-row cache writes equal the compiled engine's."""
    ids, mask = _padded_prompt(arch)
    want = _engine(arch).generate(ids, attention_mask=mask, max_new_tokens=NEW, prefill_chunk_size=chunk,
                                  output_scores=True, return_dict_in_generate=True)
    tokens, scores = fresh_process_results[f"{arch}/{backend}/{chunk}/padded"]
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
    assert inputs["input_ids"] == ["batch", "chunk"]
    assert inputs["cache_start"] == ["batch"] and inputs["valid"] == ["batch"]  # per-row positions
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
def _rewrite_pt2(src, dst, edit, reseal: bool = True) -> None:
    """Copy a PT2 archive, passing its duo_compile metadata through ``edit``. ``reseal``: recompute the digest
    (a well-formed file, as another duo_compile would write it); else keep the recorded one (a hand edit)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/extra/duo_engine.json"):
                meta = json.loads(data)
                edit(meta)
                if reseal:
                    meta = engine_file.seal(meta, meta["payload"])
                data = json.dumps(meta).encode()
            zout.writestr(item, data)


def _rewrite_onnx(src, dst, edit, reseal: bool = True) -> None:
    """Copy an ONNX engine with edited metadata. ``reseal``: a well-formed file (payload length and digest
    recomputed); else the edited metadata keeps the recorded payload and digest (a hand edit)."""
    data = src.read_bytes()
    entry = next(p for p in onnx.ModelProto.FromString(data).metadata_props if p.key == engine_file.ONNX_META_KEY)
    meta = json.loads(entry.value)
    size = meta["payload"]["bytes"]
    payload = data[:size]
    if reseal:
        meta.pop("payload")
        edit(meta)
        dst.write_bytes(payload + engine_file.onnx_trailer(payload, meta))
        return
    edit(meta)
    trailer = onnx.ModelProto()
    trailer.metadata_props.add(key=engine_file.ONNX_META_KEY, value=json.dumps(meta, sort_keys=True))
    dst.write_bytes(payload + trailer.SerializeToString())


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
    with pytest.raises(EngineFileError, match=f"format version 99.*reads version {engine_file.FORMAT_VERSION}.*newer"):
        duo_compile.load(dst)
    # Files of the first format (metadata outside the digest; one cache_position for the whole batch, before
    # per-row positions) are refused as older, not half-trusted.
    rewrite(src, tmp_path / f"v1{SUFFIX[backend]}", lambda meta: meta.update(format_version=1))
    with pytest.raises(EngineFileError, match="format version 1, but this duo_compile reads version 2.*older.*re-export"):
        duo_compile.load(tmp_path / f"v1{SUFFIX[backend]}")
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
        "backend": (lambda meta: meta.update(backend="aoti"), "backend 'aoti', but the file is an ONNX file"),
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


# ------------------------------------------------------------------------------- integrity of the whole metadata
def _swap_heads(meta):  # layer 1 is mixed: the other head becomes the retrieval head (same counts, same caches)
    meta["masks"]["gates"][1] = meta["masks"]["gates"][1][::-1]


def _flip_mode(meta):
    meta["config"].update(streaming_mode={"window": "chunk", "chunk": "window"}[meta["config"]["streaming_mode"]])


# Edits a consistency check cannot see (sink 4 -> 6 with recent 8 -> 6 keeps the 12 streaming slots; a swapped
# head keeps the counts; ...), and a few it could: the digest refuses them all, before anything is parsed.
METADATA_EDITS = {
    "sink_recent": lambda meta: meta["config"].update(sink_size=6, recent_size=6),
    "masks": _swap_heads,
    "mode": _flip_mode,
    "max_seq_len": lambda meta: meta["config"].update(max_seq_len=48),
    "vocab": lambda meta: meta["model_info"].update(vocab_size=meta["model_info"]["vocab_size"] + 1000),
    "shapes": lambda meta: meta["cache_specs"][0].update(num_kv_heads=7),
    "dtype": lambda meta: meta.update(dtype="float16"),
    "pass_counts": lambda meta: meta["pass_counts"].update(fuse_rope=0),
    "ops": lambda meta: meta["ops"].update({"duo::x": "duo::x() -> ()"}),
    "graphs": lambda meta: meta["graphs"].update(max_batch=1 << 20),
    "producer": lambda meta: meta["producer"].update(duo_compile="0.0.0"),
    "payload": lambda meta: meta["payload"].update(sha256="0" * 64),
    "digest": lambda meta: meta.update(digest="0" * 64),
}


@pytest.mark.parametrize("edit", sorted(METADATA_EDITS))
@pytest.mark.parametrize("backend", ["aoti", "onnx"])
def test_load_refuses_edited_metadata(engine_files, tmp_path, backend, edit):
    """The recorded digest covers the whole metadata record: any field edited by hand (digest left as written)
    is refused by load, with an EngineFileError naming the file."""
    dst = tmp_path / f"edited{SUFFIX[backend]}"
    rewrite = _rewrite_pt2 if backend == "aoti" else _rewrite_onnx
    rewrite(engine_files["qwen2", backend], dst, METADATA_EDITS[edit], reseal=False)
    with pytest.raises(EngineFileError, match="does not match the recorded SHA-256 digest") as err:
        duo_compile.load(dst)
    assert str(err.value).startswith(f"{dst}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("backend", ["aoti", "onnx"])
def test_load_refuses_metadata_without_a_digest(engine_files, tmp_path, backend):
    dst = tmp_path / f"nodigest{SUFFIX[backend]}"
    rewrite = _rewrite_pt2 if backend == "aoti" else _rewrite_onnx
    rewrite(engine_files["qwen2", backend], dst, lambda meta: meta.pop("digest"), reseal=False)
    with pytest.raises(EngineFileError, match="no 'digest' record"):
        duo_compile.load(dst)


@pytest.mark.parametrize("backend", ["aoti", "onnx"])
def test_unedited_copy_loads_and_generates_the_same_tokens(engine_files, tmp_path, backend):
    """The digest is of the parsed record (canonical JSON), so rewriting the metadata unchanged keeps it valid."""
    dst = tmp_path / f"copy{SUFFIX[backend]}"
    rewrite = _rewrite_pt2 if backend == "aoti" else _rewrite_onnx
    rewrite(engine_files["llama", backend], dst, lambda meta: None, reseal=False)
    loaded, compiled = duo_compile.load(dst), _engine("llama")
    assert loaded.masks == compiled.masks and loaded.config == compiled.config
    got = loaded.generate(_prompt("llama"), max_new_tokens=NEW, prefill_chunk_size=CHUNK)
    assert torch.equal(got, compiled.generate(_prompt("llama"), max_new_tokens=NEW, prefill_chunk_size=CHUNK))


def test_load_refuses_resealed_onnx_metadata_that_contradicts_the_graph(engine_files, tmp_path):
    """Beside the digest (which anyone can recompute), the ONNX graph's declared shapes must match the metadata."""
    src = engine_files["qwen2", "onnx"]
    cases = {
        "vocab": lambda meta: meta["model_info"].update(vocab_size=meta["model_info"]["vocab_size"] + 1000),
        "max_seq_len": lambda meta: meta["config"].update(max_seq_len=48),
    }
    for name, edit in cases.items():
        dst = tmp_path / f"{name}.onnx"
        _rewrite_onnx(src, dst, edit)
        with pytest.raises(EngineFileError, match="does not describe the ONNX graph"):
            duo_compile.load(dst)


# ----------------------------------------------------------------------------------- what a loaded engine says
def test_loaded_engine_repr_names_what_runs_it(engine_files):
    for (arch, backend), path in engine_files.items():
        loaded = duo_compile.load(path)
        assert loaded.backend == backend
        assert f"backend={backend})" in repr(loaded) and "eager" not in repr(loaded)
        assert repr(loaded).replace(f"backend={backend}", "") == repr(_engine(arch)).replace("backend=eager", "")


def test_aoti_archive_members_carry_the_final_file_name(engine_files):
    """The archive is written under a temporary name, but its members are stored under the final file's name."""
    for arch in MODES:
        path = engine_files[arch, "aoti"]
        with zipfile.ZipFile(path) as archive:
            roots = {name.split("/")[0] for name in archive.namelist()}
        assert roots == {path.stem}, roots


# --------------------------------------------------------------------------------- AOTI export to a full disk
def _fake_compiled_files(folder, size: int = 2 << 20) -> list[str]:
    """Stand-ins for the files AOTInductor compiles (what package_pt2 zips), so no test here waits for a compile."""
    folder.mkdir()
    so, cpp = folder / "fake.wrapper.so", folder / "fake.wrapper.cpp"
    so.write_bytes(os.urandom(size))
    cpp.write_text("// fake\n")
    return [str(cpp), str(so)]


@pytest.mark.parametrize("when", ["before_compiling", "before_packaging"])
def test_aoti_export_refuses_a_full_disk(tmp_path, monkeypatch, when):
    """A disk without room for the package is refused with a clean OSError naming the bytes needed and free
    (before compiling if the weights alone do not fit), the old file kept, no temporary left."""
    import shutil

    fake = _fake_compiled_files(tmp_path / "compiled")
    target = tmp_path / "out"
    target.mkdir()
    path = target / "m.pt2"
    path.write_bytes(b"previous engine")
    compiled = []
    monkeypatch.setattr(torch._inductor, "aot_compile", lambda *a, **k: compiled.append(1) or list(fake))
    weights = sum(t.numel() * t.element_size() for t in (*_engine("llama").graph.parameters(),
                                                         *_engine("llama").graph.buffers()))
    free = 1000 if when == "before_compiling" else weights + 1000  # the weights fit, the 2 MiB package does not
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))
    with pytest.raises(OSError, match=r"cannot write the engine file .*not enough free space") as err:
        duo_compile.export(_engine("llama"), path)
    assert err.value.errno == 28
    need = int(re.search(r"needs about (\d+) bytes", str(err.value)).group(1))
    assert f"{free} bytes" in str(err.value) and need > free
    assert bool(compiled) == (when == "before_packaging")
    if when == "before_packaging":
        assert need > 2 << 20
    assert path.read_bytes() == b"previous engine"
    assert os.listdir(target) == ["m.pt2"]


def test_aoti_export_survives_a_native_write_failure(tmp_path, monkeypatch):
    """The archive writer is native code that aborts its process when a write fails; export runs it in a child
    process, so the caller gets an OSError, keeps the old file and has no temporary left. Here the caller is this
    test's process, under a file size limit of 1 MiB while it packages (inherited by the packaging child), as on a
    full disk: writing the archive in this process would kill it (SIGXFSZ; rc 134 from c10::Error on ENOSPC)."""
    import resource

    from duo_compile.export import aoti_export

    fake = _fake_compiled_files(tmp_path / "compiled")
    target = tmp_path / "out"
    target.mkdir()
    path = target / "m.pt2"
    path.write_bytes(b"previous engine")
    monkeypatch.setattr(torch._inductor, "aot_compile", lambda *a, **k: list(fake))
    package = aoti_export.write_package

    def under_a_file_size_limit(files, where):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        try:
            package(files, where)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(aoti_export, "write_package", under_a_file_size_limit)
    with pytest.raises(OSError) as err:
        duo_compile.export(_engine("llama"), path)
    caught = str(err.value)
    assert "cannot write the engine file" in caught and "AOTInductor packaging failed" in caught
    assert "ulimit -f" in caught  # the cause this process can see (torch's own message lost the OS error)
    assert path.read_bytes() == b"previous engine"
    assert os.listdir(target) == ["m.pt2"]
