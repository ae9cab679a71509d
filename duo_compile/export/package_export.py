"""Package backend: what a restart needs to run the engine with Inductor, so ``load`` skips capture, the passes
and (with the package's compiled graphs) Inductor.

The file is a zip archive (the layout of a PT2 archive: one top folder named after the file) holding:

* ``duo_compile/graph.json``: the rewritten graph ``compile`` made, ``forward(input_ids, position_ids,
  cache_start, valid, *caches) -> logits`` (the calling convention of runtime/engine.py), node by node
  (graph_format.py);
* ``duo_compile/weights.safetensors``: every tensor the graph reads, as the passes left them (heads reordered,
  projections fused), read once at load straight onto the device (package_weights.py);
* ``duo_compile/compiled/<i>.bin`` and ``compiled/regions.json`` (optional): the graphs Inductor compiled for the
  engine (runtime/inductor_graph.py), each a ``CompiledArtifact`` with its shape guards: at least the shapes
  ``precompile`` ran at export (one prefill chunk and one decode step on the first cache row, and a server's chunk
  on another row and decode of two rows) and any the engine had run; ``load`` reads the first and the others when
  first run;
* ``duo_compile/triton/<kernel>/<file>`` (optional, packages made on a GPU): the attention ops' compiled Triton
  kernels and host modules, which Inductor's artifacts do not hold (package_triton.py);
* ``extra/duo_engine.json``: the engine file metadata (engine_file.py), its digest covering every other member.

``load`` (``api._load_package``) rebuilds the graph module and runs it as ``compile`` does (an ``InductorGraph``),
starting from the package's compiled graphs, so a loaded engine runs what the compiled one ran. The compiled
graphs and Triton kernels are used only when the package was made by this torch and Triton version on the same
device kind (GPU architecture) and this torch can read them: otherwise the package still loads and runs, with a
warning that Inductor compiles afresh. Why neither AOTInductor nor a ``torch.export`` program here:
benchmarks/DECISIONS.md#engine-package.
"""
from __future__ import annotations

import json
import os
import warnings
import zipfile

import torch

from duo_compile.export import graph_format, package_triton, package_weights
from duo_compile.export.engine_file import EngineFileError, archive_folder
from duo_compile.runtime.inductor_graph import InductorGraph, Variant

COMPILED_FOLDER = "compiled"
INDEX_NAME = "regions.json"
CACHE_FOLDER = package_weights.FOLDER
GRAPH_NAME = "graph.json"
TRITON_FOLDER = "triton"
# The prefill chunk compiled at export when the engine has no prefill_chunk_size (any length above 1 compiles the
# graph every chunk length runs).
PRECOMPILE_CHUNK = 61


def cache_producer(device: torch.device) -> dict[str, str]:
    """What Inductor's compiled code depends on besides the program: torch, Triton and the device kind."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    kind = "cpu"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        kind = f"cuda sm_{major}{minor}"
    return {"torch": torch.__version__, "triton": triton_version, "device": kind}


def write_program(engine, path: str) -> dict:
    """Write a new archive at ``path`` holding the engine's graph and its weights member; returns that member's
    record (package_weights.write)."""
    record, tensors = graph_format.to_json(engine.graph)
    folder = os.path.splitext(os.path.basename(path))[0] or "engine"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{folder}/{CACHE_FOLDER}/{GRAPH_NAME}", json.dumps(record, separators=(",", ":")))
    return package_weights.write(path, tensors)


def read_graph(path: str) -> dict:
    """The graph record (graph_format.to_json) of the package at ``path``; EngineFileError if it has none."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"/{CACHE_FOLDER}/{GRAPH_NAME}")]
        if not names:
            raise EngineFileError(f"{path}: the package holds no {GRAPH_NAME} (made by an earlier duo_compile): "
                                  f"re-export the engine with this one")
        raw = archive.read(names[0])
    try:
        return json.loads(raw)
    except ValueError as err:
        raise EngineFileError(f"{path}: unreadable {GRAPH_NAME} ({err})") from None


def load_module(path: str, record: dict, weights: dict | None, device: torch.device) -> torch.fx.GraphModule:
    """The engine's graph module: ``record`` (``read_graph``) reading the package's weights member ``weights`` (its
    metadata record), read onto ``device``."""
    if weights is None:
        raise EngineFileError(f"{path}: the package records no weights member (made by an earlier duo_compile): "
                              f"re-export the engine with this one")
    tensors = package_weights.read(path, weights, device)
    try:
        return graph_format.to_module(record, tensors)
    except graph_format.GraphFormatError as err:
        raise EngineFileError(f"{path}: {err}") from None


def graphs_record() -> dict:
    """The package's ``graphs`` metadata entry (``api._export_package`` adds the caches' record to it)."""
    return {"program": f"{GRAPH_NAME} version {graph_format.VERSION}", "caches": "explicit inputs, mutated in place"}


def precompile(engine, chunk: int | None) -> dict[str, bytes]:
    """Run one prefill chunk of ``chunk`` tokens (default: the engine's prefill chunk, else ``PRECOMPILE_CHUNK``)
    and one decode step on the first cache row, then what a server runs beside them (serve/warm_up.py): a chunk on
    the second row and a decode step of two rows, compiling what the engine's ``InductorGraph`` lacks for them;
    return the members holding its compiled graphs (``compiled_members``). Caches of two rows that do not fit the
    device leave out the server's two, with a warning."""
    max_len = engine.config.max_seq_len
    chunk = min(chunk or engine.config.prefill_chunk_size or PRECOMPILE_CHUNK, max_len - 1)
    try:
        engine.allocate(2)  # the program's caches have the engine's shapes (full length: what a load allocates)
        rows = 2
    except torch.OutOfMemoryError as err:
        warnings.warn(f"export precompiles no server steps ({err}); a server loading the package compiles them at "
                      f"its warm-up", UserWarning, stacklevel=4)
        engine.allocate(1)
        rows = 1
    ids = torch.zeros(rows, chunk, dtype=torch.long, device=engine.device)
    first = slice(0, 1)  # views of the first row: the graphs a batch-1 allocation runs
    engine.step(ids[first], 0, rows=first)
    engine.step(ids[first, :1], chunk, rows=first)
    if rows == 2:
        engine.step(ids[first], 0, rows=slice(1, 2))
        engine.step(ids[:, :1], chunk)
    engine.release()
    return compiled_members(engine._run)


def compiled_members(run: InductorGraph) -> dict[str, bytes]:
    """``{"compiled/<i>.bin": artifact, "compiled/regions.json": index}`` for every variant of ``run`` that can be
    saved (empty if none can). The index lists each file's region class and guards, the region classes (by
    ``layer_regions.digest``) and the weights' order as graph inputs."""
    entries, members = [], {}
    for cls, held in enumerate(run.variants):
        for variant in held:
            data = variant.to_bytes()
            if data is not None:
                entries.append({"file": f"{len(entries)}.bin", "region": cls, "guards": variant.guards})
                members[f"{COMPILED_FOLDER}/{entries[-1]['file']}"] = data
    if entries:
        index = {"weights": run.weight_targets, "regions": run.class_digests, "variants": entries}
        members[f"{COMPILED_FOLDER}/{INDEX_NAME}"] = json.dumps(index).encode()
    return members


def add_members(path: str, members: dict[str, bytes]) -> None:
    """Append ``members`` (names relative to the package's ``duo_compile/`` folder) to the archive at ``path``."""
    with zipfile.ZipFile(path) as archive:
        folder = archive_folder(archive, path)
    with zipfile.ZipFile(path, "a") as archive:
        for name, data in members.items():
            archive.writestr(f"{folder}/{CACHE_FOLDER}/{name}", data)


def add_caches(path: str, compiled: dict[str, bytes], triton: dict[str, bytes]) -> None:
    """Append the compiled graphs (``compiled_members``) and the packed Triton kernels (package_triton.pack) to the
    archive."""
    add_members(path, {**compiled, **{f"{TRITON_FOLDER}/{name}": data for name, data in triton.items()}})


def _read_folder(path: str, folder: str) -> dict[str, bytes]:
    """The members under ``duo_compile/<folder>/`` of the archive at ``path``, by their names below it."""
    marker = f"/{CACHE_FOLDER}/{folder}/"
    with zipfile.ZipFile(path) as archive:
        return {name.split(marker, 1)[1]: archive.read(name) for name in archive.namelist() if marker in name}


def read_triton(path: str) -> dict[str, bytes]:
    """The packed Triton kernels of the archive at ``path`` (``{"<kernel>/<file>": bytes}``; empty if none)."""
    return _read_folder(path, TRITON_FOLDER)


def _compiled_afresh(path: str, why: str) -> list[Variant]:
    """No compiled graphs, with a warning saying why (attributed to the caller of ``load``)."""
    warnings.warn(f"{os.fspath(path)}: {why}; Inductor compiles the engine afresh on its first steps (re-export the "
                  f"package here to skip that)", UserWarning, stacklevel=5)
    return []


def load_variants(path: str, recorded: dict | None, device: torch.device,
                  run: InductorGraph) -> list[list[Variant]]:
    """The package's compiled graphs, per region class of ``run`` (the rebuilt graph, whose weights order and region
    classes must be the compiled graphs'), after writing its Triton kernels where Triton will find them
    (package_triton.install), if they were made for this torch, Triton and device kind and this torch reads them;
    else a warning that Inductor compiles afresh, and none."""
    if not recorded:
        return []
    here = cache_producer(device)
    made = {key: recorded.get(key) for key in here}
    if made != here:
        differ = ", ".join(f"{key} {made[key]} (here {here[key]})" for key in here if made[key] != here[key])
        return _compiled_afresh(path, f"the package's compiled code was made for {differ}")
    if recorded.get("triton_kernels"):
        package_triton.install(read_triton(path), package_triton.cache_bases(device))
    members = _read_folder(path, COMPILED_FOLDER)
    if INDEX_NAME not in members:
        return _compiled_afresh(path, "the package holds no compiled graphs this duo_compile reads (made by an "
                                      "earlier one)")
    try:
        index = json.loads(members[INDEX_NAME])
        entries = [(int(entry["region"]), entry["guards"], members[entry["file"]]) for entry in index["variants"]]
        weights, classes = index["weights"], index["regions"]
        if any(not 0 <= cls < len(classes) for cls, _, _ in entries):
            raise ValueError("a variant names a region class the index does not list")
    except (ValueError, KeyError, TypeError) as err:
        raise EngineFileError(f"{path}: unreadable {COMPILED_FOLDER}/{INDEX_NAME} ({type(err).__name__}: {err})")
    if weights != run.weight_targets:
        raise EngineFileError(f"{path}: the compiled graphs take the weights in another order than the program "
                              f"reads them")
    if classes != run.class_digests:
        return _compiled_afresh(path, "the package's compiled graphs are for other layer regions than this "
                                      "duo_compile cuts the program into")
    if not entries:
        return []
    # The first is read now, which tells whether this torch reads what the producer wrote; the others (steps this
    # process may never take, such as a server's) when first run.
    variants: list[list[Variant]] = [[] for _ in classes]
    try:
        first, *rest = entries
        variants[first[0]].append(Variant.from_bytes(*first[1:]))
    except Exception as err:  # the digest matched: this torch cannot read what another build of it wrote
        return _compiled_afresh(path, f"this torch cannot read the package's compiled graphs "
                                      f"({type(err).__name__}: {err})")
    for cls, guards, data in rest:
        variants[cls].append(Variant.deferred(guards, data))
    return variants
