"""Engine packages (export backend "package"): export -> load in a fresh process -> the compiled engine's tokens;
the compiled graphs used by a matching torch and refused, with a warning, otherwise; damaged files refused before
anything is loaded; atomic writes.

Tiny Llama with mixed masks (one all-retrieval, one mixed, one all-streaming layer), sink 4 / recent 8. Two
packages: the eager engine's (no Inductor: the program round trip alone), and the Inductor engine's, precompiled
at export; the fresh process (its own, empty Inductor cache folder) must then run both of its graphs (prefill
chunk and decode step) from the package's compiled graphs, compiling none.
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

import duo_compile
from duo_compile.export import engine_file, package_export, package_triton, package_weights
from duo_compile.export.engine_file import EngineFileError
from duo_compile.runtime.inductor_graph import Variant
from tests.tiny_models import mixed_gates, tiny_model

SINK, RECENT, MAX_LEN, PROMPT, NEW, CHUNK = 4, 8, 128, 70, 6, 30
pytestmark = pytest.mark.usefixtures("one_capture_per_model")  # tests/shared_capture.py


@functools.cache
def _engine(backend: str):
    model = tiny_model("llama", gqa=True)
    masks = duo_compile.HeadMasks.from_gates(mixed_gates(3, model.config.num_key_value_heads))
    return duo_compile.compile(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN, backend=backend)


def _prompts():
    ids = torch.randint(0, 96, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, : PROMPT - 21] = 0  # row 1: 21 tokens, left-padded
    return ids, mask


TRITON_KEY = "FAKEKERNELHASH"


def _triton_cache_folder(base) -> str:
    """A kernel folder laid out as Triton's file cache writes one (binary, metadata, and the group file that lists
    them by absolute path); on the CPU no kernel is compiled, so the package test carries this one."""
    folder = os.path.join(base, TRITON_KEY)
    os.makedirs(folder)
    paths = {name: os.path.join(folder, name) for name in ("fake.cubin", "fake.json")}
    with open(paths["fake.cubin"], "wb") as handle:
        handle.write(b"\x7fELF not a real kernel")
    with open(paths["fake.json"], "w") as handle:
        json.dump({"name": "fake", "source": paths["fake.cubin"]}, handle)
    with open(os.path.join(folder, "__grp__fake.json"), "w") as handle:
        json.dump({"child_paths": paths}, handle)
    return folder


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packages")
    eager, inductor = _engine("eager"), _engine("inductor")
    files = {"eager": folder / "eager.pt2", "inductor": folder / "inductor.pt2"}
    duo_compile.export(eager, files["eager"], backend="package")
    kernel = _triton_cache_folder(tmp_path_factory.mktemp("made_triton"))
    with pytest.MonkeyPatch.context() as patch:  # as if this process had compiled that kernel
        patch.setattr(package_triton, "compiled_folders", lambda: [kernel])
        duo_compile.export(inductor, files["inductor"], backend="package")
    assert sorted(os.listdir(folder)) == ["eager.pt2", "inductor.pt2"]  # no temporary files left
    ids, mask = _prompts()
    want = {
        "whole": eager.generate(ids, attention_mask=mask, max_new_tokens=NEW),
        "chunked": eager.generate(ids, attention_mask=mask, max_new_tokens=NEW, prefill_chunk_size=CHUNK),
        "single": eager.generate(ids[:1], max_new_tokens=NEW, prefill_chunk_size=CHUNK),
    }
    return files, want


_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    import duo_compile
    from torch._dynamo.utils import counters

    job = torch.load(sys.argv[1])
    ids, mask = job["ids"], job["mask"]
    eager = duo_compile.load(job["eager"])
    results = {
        "whole": eager.generate(ids, attention_mask=mask, max_new_tokens=job["new"]),
        "chunked": eager.generate(ids, attention_mask=mask, max_new_tokens=job["new"], prefill_chunk_size=job["chunk"]),
        "eager_backend": (eager.backend, eager.config.backend, eager.compile_cache_loaded),
    }
    inductor = duo_compile.load(job["inductor"])
    results["single"] = inductor.generate(ids[:1], max_new_tokens=job["new"], prefill_chunk_size=job["chunk"])
    results["inductor_backend"] = (inductor.backend, inductor.config.backend, inductor.compile_cache_loaded)
    results["load_seconds"] = (sorted(eager.load_seconds), sorted(inductor.load_seconds))
    results["counters"] = dict(counters["inductor"])
    results["variants"] = (inductor._run.compiled, inductor._run.held)
    from duo_compile.serve.scheduler import Scheduler
    from duo_compile.serve.sequence import Sequence
    from duo_compile.serve.warm_up import warm_up

    scheduler = Scheduler(inductor, 2)  # a server's steps: chunks on either row, decodes of two rows
    warm_up(scheduler)
    served = [Sequence.from_generate_args(inductor, row.tolist(), max_new_tokens=job["new"]) for row in ids]
    for seq in served:
        scheduler.add(seq)
    while scheduler.has_work():
        scheduler.step()
    results["served"] = (inductor._run.compiled, [seq.tokens for seq in served])
    results["imported"] = sorted(m for m in sys.modules if m.startswith(("transformers.models", "tests")))
    from triton.runtime.cache import FileCacheManager  # Triton's own reader of its cache folders
    group = FileCacheManager(job["triton_key"]).get_group("fake.json") or {}
    results["triton"] = {name: open(path, "rb").read() for name, path in group.items()}
    torch.save(results, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def fresh_process(packages, tmp_path_factory):
    files, _ = packages
    work = tmp_path_factory.mktemp("fresh")
    ids, mask = _prompts()
    torch.save({"eager": str(files["eager"]), "inductor": str(files["inductor"]), "ids": ids, "mask": mask,
                "new": NEW, "chunk": CHUNK, "triton_key": TRITON_KEY}, work / "job.pt")
    (work / "child.py").write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(duo_compile.__file__)))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor_cache")  # nothing but what the package brings
    env["TRITON_CACHE_DIR"] = str(work / "triton_cache")
    proc = subprocess.run([sys.executable, "child.py", "job.pt", "out.pt"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(work / "out.pt")


@pytest.mark.parametrize("case", ["whole", "chunked", "single"])
def test_package_in_a_fresh_process_generates_the_compiled_engines_tokens(packages, fresh_process, case):
    _, want = packages
    assert torch.equal(fresh_process[case], want[case])


def test_fresh_process_compiles_nothing_the_package_precompiled(fresh_process):
    assert fresh_process["eager_backend"] == ("package", "eager", False)
    assert fresh_process["inductor_backend"] == ("package", "inductor", True)
    assert fresh_process["load_seconds"] == (["checks", "program", "weights"], ["caches", "checks", "program", "weights"])
    compiled, variants = fresh_process["variants"]
    assert compiled == 0 and variants >= 2  # prefill chunk and decode step, at least, loaded and none compiled
    assert fresh_process["counters"].get("fxgraph_cache_miss", 0) == 0, fresh_process["counters"]
    assert fresh_process["imported"] == []  # no model code, no tests


def test_a_server_on_a_loaded_package_compiles_nothing(fresh_process):
    """Export precompiles a server's steps too (a chunk on the second cache row, a decode of two rows): a
    scheduler on the loaded engine warms up and serves two requests at once without compiling, giving each one's
    ``generate`` tokens."""
    compiled, tokens = fresh_process["served"]
    ids, _ = _prompts()
    alone = [_engine("eager").generate(row[None], max_new_tokens=NEW)[0, PROMPT:].tolist() for row in ids]
    assert compiled == 0 and [list(t) for t in tokens] == alone


def test_the_kernel_folders_of_the_projects_compiled_triton_kernels_are_found(tmp_path, monkeypatch):
    """package_triton.compiled_folders: the folders of the kernels each ``@triton.jit`` function of the project's
    kernel modules holds compiled (directly, or wrapped as an autotuner's ``fn``), not other modules' kernels, and
    of the Triton host modules (launchers, driver utilities) the process has loaded, not other libraries."""
    import types

    from triton.runtime.jit import JITFunction

    def kernel_of(name):
        folder = tmp_path / name
        folder.mkdir()
        return types.SimpleNamespace(metadata_group={f"{name}.cubin": str(folder / f"{name}.cubin"),
                                                     f"{name}.json": str(folder / f"{name}.json")})

    def jit(name):
        def body(x):
            pass
        fn = JITFunction(body)
        fn.device_caches = {0: ({"key": kernel_of(name)}, {}, None, None, None)}
        return fn

    ours = types.ModuleType("duo_compile.kernels.fake_triton")
    ours.plain, ours.tuned = jit("plain"), types.SimpleNamespace(fn=jit("tuned"))
    theirs = types.ModuleType("other.kernels")
    theirs.other = jit("other")
    monkeypatch.setitem(sys.modules, ours.__name__, ours)
    monkeypatch.setitem(sys.modules, theirs.__name__, theirs)
    maps = tmp_path / "maps"  # the host modules Triton built, as /proc/self/maps lists what a process loaded
    host = {name: tmp_path / "triton cache" / name for name in ("KEYLAUNCH", "KEYUTILS", "KEYOTHER")}
    files = {"KEYLAUNCH": "__triton_launcher.cpython-312-x86_64-linux-gnu.so", "KEYUTILS": "cuda_utils.so",
             "KEYOTHER": "libsomething.so"}
    maps.write_text("".join(f"7f00-7f01 r-xp 00000000 08:01 {i} {host[key] / name}\n"
                            for i, (key, name) in enumerate(files.items())) + "7f02-7f03 rw-p 00000000 00:00 0\n")
    monkeypatch.setattr(package_triton, "MAPS", str(maps))
    for folder in host.values():
        folder.mkdir(parents=True)
    assert package_triton.compiled_folders() == sorted([str(tmp_path / "plain"), str(tmp_path / "tuned"),
                                                        str(host["KEYLAUNCH"]), str(host["KEYUTILS"])])


def test_the_packages_triton_kernels_are_where_triton_looks_in_a_fresh_process(fresh_process, tmp_path):
    """The attention ops' compiled kernels travel in the package and are written into the loading process's Triton
    cache, where Triton's own reader finds them, their metadata naming their new folder."""
    found = fresh_process["triton"]
    assert sorted(found) == ["fake.cubin", "fake.json"] and found["fake.cubin"] == b"\x7fELF not a real kernel"
    assert json.loads(found["fake.json"])["source"].endswith(f"triton_cache/{TRITON_KEY}/fake.cubin")
    packed = package_triton.pack([_triton_cache_folder(tmp_path / "made")])
    assert not any(os.fsencode(str(tmp_path)) in data for data in packed.values())  # no path of this machine
    assert package_triton.install(packed, [str(tmp_path / "there")]) == 1
    (tmp_path / "there" / TRITON_KEY / "fake.cubin").write_bytes(b"Triton's own copy")
    assert package_triton.install(packed, [str(tmp_path / "there")]) == 0  # a folder present is left as it is
    assert (tmp_path / "there" / TRITON_KEY / "fake.cubin").read_bytes() == b"Triton's own copy"
    assert sorted(os.listdir(tmp_path / "there")) == [TRITON_KEY]  # no staging folder left


def _rewrite(src, dst, edit_meta=None, edit_bytes=None) -> None:
    """Copy a package, passing its metadata through ``edit_meta`` (then resealed, as a well-formed file of another
    producer) and the compiled graphs' members through ``edit_bytes``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith(f"/extra/{engine_file.PT2_META_NAME}") and edit_meta is not None:
                meta = json.loads(data)
                edit_meta(meta)
                data = json.dumps(engine_file.seal(meta, meta["payload"])).encode()
            if f"/{package_export.COMPILED_FOLDER}/" in item.filename and edit_bytes is not None:
                data = edit_bytes(data)
            zout.writestr(item, data)


@pytest.mark.parametrize("key,value", [("torch", "2.0.0"), ("triton", "2.0.0"), ("device", "cuda sm_70")])
def test_caches_of_another_torch_triton_or_gpu_are_not_used(packages, tmp_path, monkeypatch, key, value):
    files, _ = packages
    dst = tmp_path / "other.pt2"
    _rewrite(files["inductor"], dst, edit_meta=lambda meta: meta["graphs"]["inductor_cache"].update({key: value}))
    loaded = []
    monkeypatch.setattr(Variant, "from_bytes", lambda *args: loaded.append(args))
    with pytest.warns(UserWarning, match=f"made for {key} {value}.*compiles the engine afresh"):
        engine = duo_compile.load(dst)
    assert engine.compile_cache_loaded is False and loaded == [] and engine._run.held == 0


def test_compiled_graphs_this_torch_cannot_read_are_compiled_afresh(packages, tmp_path, monkeypatch):
    """A package from another build of the same torch version: its artifacts fail to load, and the engine still
    loads (with a warning), to compile its graphs on its first steps."""
    files, _ = packages
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # where the package's kernels are written

    def unreadable(guards, data):
        raise AssertionError("torch_key differs")

    monkeypatch.setattr(Variant, "from_bytes", unreadable)
    with pytest.warns(UserWarning, match="cannot read the package's compiled graphs.*compiles the engine afresh"):
        engine = duo_compile.load(files["inductor"])
    assert engine.compile_cache_loaded is False and engine._run.held == 0


def _compiled_index(files, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # where the package's kernels are written
    parts, _ = engine_file.read_metadata(str(files["inductor"]))
    index = json.loads(package_export._read_folder(str(files["inductor"]), "compiled")["regions.json"])
    return parts, index


def test_compiled_graphs_taking_weights_in_another_order_are_refused(packages, tmp_path, monkeypatch):
    """The compiled graphs take the weights as inputs in the order their index records: a program that reads them
    in another order is refused rather than run with its weights swapped."""
    files, _ = packages
    parts, index = _compiled_index(files, tmp_path, monkeypatch)
    rebuilt = SimpleNamespace(weight_targets=index["weights"][::-1], class_digests=index["regions"])
    with pytest.raises(EngineFileError, match="weights in another order"):
        package_export.load_variants(str(files["inductor"]), parts.graphs["inductor_cache"], parts.device, rebuilt)


def test_compiled_graphs_of_other_layer_regions_are_compiled_afresh(packages, tmp_path, monkeypatch):
    """A duo_compile that cuts the program into other region classes than the package's maker did (another
    version) does not use its compiled graphs: a warning, and Inductor compiles afresh."""
    files, _ = packages
    parts, index = _compiled_index(files, tmp_path, monkeypatch)
    assert len(index["regions"]) == 3  # three layers, each with another head split: three classes
    rebuilt = SimpleNamespace(weight_targets=index["weights"], class_digests=["0" * 16] * len(index["regions"]))
    with pytest.warns(UserWarning, match="other layer regions.*compiles the engine afresh"):
        loaded = package_export.load_variants(str(files["inductor"]), parts.graphs["inductor_cache"], parts.device,
                                              rebuilt)
    assert loaded == []


def test_damaged_or_truncated_packages_are_refused_before_anything_loads(packages, tmp_path, monkeypatch):
    files, _ = packages
    touched = []
    monkeypatch.setattr(Variant, "from_bytes", lambda *args: touched.append(args))
    monkeypatch.setattr(package_export, "read_graph", touched.append)
    data = files["inductor"].read_bytes()
    for cut in (4, len(data) // 2, len(data) - 100):
        path = tmp_path / f"cut{cut}.pt2"
        path.write_bytes(data[:cut])
        with pytest.raises(EngineFileError, match="truncated|damaged|not a duo_compile"):
            duo_compile.load(path)
    path = tmp_path / "flipped_cache.pt2"
    _rewrite(files["inductor"], path, edit_bytes=lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]))
    with pytest.raises(EngineFileError, match="altered or damaged"):
        duo_compile.load(path)
    assert touched == []


def test_failed_package_export_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.pt2"
    path.write_bytes(b"old")

    def fail(engine, target):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(package_export, "write_program", fail)
    with pytest.raises(OSError, match="cannot write the engine file"):
        duo_compile.export(_engine("eager"), path, backend="package")
    assert os.listdir(tmp_path) == ["m.pt2"] and path.read_bytes() == b"old"


def test_export_refuses_a_non_bool_precompile(tmp_path):
    with pytest.raises(ValueError, match="precompile must be True or False"):
        duo_compile.export(_engine("eager"), tmp_path / "m.pt2", backend="package", precompile="yes")


def _weights_record(path) -> dict:
    parts, meta = engine_file.read_metadata(path)
    return meta["payload"]["weights"]


def test_weights_are_stored_once_as_a_safetensors_member(packages):
    """The weights member, stored uncompressed, is a safetensors file of exactly the tensors the engine's graph reads
    (its parameters as the passes left them, and its buffers); the graph member holds no tensor data."""
    files, _ = packages
    engine = _engine("eager")
    record = _weights_record(files["eager"])
    with zipfile.ZipFile(files["eager"]) as archive:
        member = archive.getinfo(record["member"])
        weights = safetensors.torch.load(archive.read(member))
        others = [i.file_size for i in archive.infolist() if i.filename != record["member"]]
    assert member.compress_type == zipfile.ZIP_STORED and member.file_size == record["bytes"]
    tensors = {**dict(engine.graph.named_parameters()), **dict(engine.graph.named_buffers())}
    read = {node.target for node in engine.graph.graph.nodes if node.op == "get_attr"}
    assert weights.keys() == read and read >= dict(engine.graph.named_parameters()).keys()
    assert all(torch.equal(weights[name], tensors[name]) for name in read)
    assert sum(others) < member.file_size / 4  # the graph and the metadata: no second copy of the weights


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_graph_record_rebuilds_the_compiled_graph(family):
    """graph_format: the rebuilt module's generated code is the compiled engine's (so it takes its weights in the
    compiled graphs' order) and it computes the same logits bitwise."""
    from duo_compile.export import graph_format
    from tests.tiny_models import cached_engine

    engine = _engine("eager") if family == "llama" else cached_engine("qwen2", True, "window", "eager", SINK, RECENT,
                                                                      MAX_LEN)
    record, tensors = graph_format.to_json(engine.graph)
    module = graph_format.to_module(json.loads(json.dumps(record)), tensors)
    assert module.code == engine.graph.code
    engine.allocate(1)
    caches = [torch.zeros_like(c) for c in engine.caches]
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    args = (ids, torch.arange(9)[None], torch.zeros(1, dtype=torch.long), torch.full((1,), 9))
    want = engine.graph(*args, *[c.clone() for c in caches])
    assert torch.equal(module(*args, *caches), want)
    engine.release()


def test_the_graph_record_names_only_ops_and_allowed_functions():
    """What the format cannot write is refused at export with the culprit named; a record naming a function
    outside the allowed modules, an unregistered op or an unknown argument form is refused at load."""
    from duo_compile.export import graph_format

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(lambda t: t, (x,)))
    with pytest.raises(graph_format.GraphFormatError, match="calls <function .*lambda.* cannot name"):
        graph_format.to_json(torch.fx.GraphModule({}, graph))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.add.Tensor, (x, 1), {"alpha": {1, 2}}))
    with pytest.raises(graph_format.GraphFormatError, match="argument {1, 2} of type set"):
        graph_format.to_json(torch.fx.GraphModule({}, graph))

    def record(target, arg=1):
        return {"version": graph_format.VERSION, "nodes": [
            {"name": "x", "op": "placeholder", "target": "x", "args": [], "kwargs": {}},
            {"name": "y", "op": "call_function", "target": target, "args": [{"node": "x"}, arg], "kwargs": {}},
            {"name": "output", "op": "output", "target": "output", "args": [{"node": "y"}], "kwargs": {}}]}

    module = graph_format.to_module(record("fn:operator:add"), {})
    assert module(torch.tensor(2)) == 3
    assert graph_format.to_module(record("op:aten::add.Tensor", {"float": "inf"}), {})(torch.tensor(2.0)) == math.inf
    for target, match in (("fn:os:system", "not an op or a function"), ("op:aten::no_such_op.default",
                                                                          "not registered here")):
        with pytest.raises(graph_format.GraphFormatError, match=match):
            graph_format.to_module(record(target), {})
    with pytest.raises(graph_format.GraphFormatError, match="unknown argument form"):
        graph_format.to_module(record("fn:operator:add", {"eval": "1"}), {})
    with pytest.raises(graph_format.GraphFormatError, match="format version"):
        graph_format.to_module({"version": 99, "nodes": []}, {})


def test_a_damaged_weights_member_is_refused_and_nothing_is_returned(packages, tmp_path, monkeypatch):
    """A flipped byte in the weights (which load hashes as it reads them, not beforehand) or an unreadable
    weights header: EngineFileError naming the weights, before the compile caches are loaded or an engine exists."""
    files, _ = packages
    record = _weights_record(files["inductor"])
    with zipfile.ZipFile(files["inductor"]) as archive:
        info = archive.getinfo(record["member"])
    data = bytearray(files["inductor"].read_bytes())
    local = data[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    for name, at, why in (("weight", start + record["bytes"] - 3, "the weights do not match the recorded SHA-256"),
                          ("header", start + 9, "unreadable weights header")):
        damaged = bytearray(data)
        damaged[at] ^= 0xFF
        path = tmp_path / f"{name}.pt2"
        path.write_bytes(damaged)
        with pytest.raises(EngineFileError, match=f"altered or damaged engine file \\({why}\\)"):
            duo_compile.load(path)
    assert loaded == []


def test_weights_round_trip_every_dtype_on_the_reader(tmp_path):
    """package_weights.write then read: every dtype it stores, empty and scalar tensors, tensors larger than its
    read chunk; the header is the safetensors library's."""
    path = tmp_path / "w.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pkg/data.txt", "x")
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(5, 3, generator=gen).to(dtype)
               for i, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16, torch.float64])}
    tensors.update(ints=torch.arange(-6, 6, dtype=torch.int64).view(3, 4), flags=torch.tensor([True, False]),
                   empty=torch.zeros(0, 4), scalar=torch.tensor(2.5), big=torch.randn(3000, generator=gen))
    original = package_weights.CHUNK_BYTES
    package_weights.CHUNK_BYTES = 4096  # "big" spans several reads
    try:
        record = package_weights.write(str(path), tensors)
        back = package_weights.read(str(path), record, torch.device("cpu"))
    finally:
        package_weights.CHUNK_BYTES = original
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with zipfile.ZipFile(path) as archive:
        assert safetensors.torch.load(archive.read(record["member"])).keys() == tensors.keys()
    with pytest.raises(ValueError, match="weight 'c' has dtype torch.complex64"):
        package_weights.write(str(path), {"c": torch.zeros(2, dtype=torch.complex64)})
