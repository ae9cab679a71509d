"""Package backend: what a restart needs to run the engine with Inductor, so ``load`` skips capture, the passes
and (with the package's compile caches) most of Inductor.

The file is a zip archive (the layout of a PT2 archive: one top folder named after the file) holding:

* ``duo_compile/graph.json``: the rewritten graph ``compile`` made, ``forward(input_ids, position_ids,
  cache_start, valid, *caches) -> logits`` (the calling convention of runtime/engine.py), node by node
  (graph_format.py);
* ``duo_compile/weights.safetensors``: every tensor the graph reads, as the passes left them (heads reordered,
  projections fused), read once at load straight onto the device (package_weights.py);
* ``duo_compile/inductor_cache.bin`` (optional): Inductor's portable compile caches
  (``torch.compiler.save_cache_artifacts``) for the shapes ``precompile`` ran at export: one prefill chunk and
  one decode step at batch 1;
* ``duo_compile/triton/<kernel>/<file>`` (optional, packages made on a GPU): the attention ops' compiled Triton
  kernels, which Inductor's caches do not hold (package_triton.py);
* ``extra/duo_engine.json``: the engine file metadata (engine_file.py), its digest covering every other member.

``load`` (``api._load_package``) rebuilds the graph module and compiles it with Inductor as ``compile`` does, so a
loaded engine runs the graph the compiled one ran. The caches (Inductor's and the Triton kernels) are used only
when the package was made by this torch and Triton version on the same device kind (GPU architecture):
otherwise the package still loads and runs, with a warning that Inductor compiles afresh (the caches would only
miss). Why neither AOTInductor nor a ``torch.export`` program here: benchmarks/DECISIONS.md#engine-package.
"""
from __future__ import annotations

import json
import os
import warnings
import zipfile

import torch

from duo_compile.export import graph_format, package_triton, package_weights
from duo_compile.export.engine_file import EngineFileError, archive_folder

CACHE_NAME = "inductor_cache.bin"
CACHE_FOLDER = package_weights.FOLDER
GRAPH_NAME = "graph.json"
TRITON_FOLDER = "triton"
# The prefill chunk compiled at export when the engine has no prefill_chunk_size: a prime, because Dynamo gives
# sizes that are equal while it traces one symbol (a chunk as long as head_dim would trace another graph).
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


def precompile(engine, chunk: int | None) -> bytes | None:
    """Compile and run, at batch 1, one prefill chunk of ``chunk`` tokens (default: the engine's prefill chunk, else
    ``PRECOMPILE_CHUNK``) and one decode step; return Inductor's cache artifacts (None if it recorded none)."""
    max_len = engine.config.max_seq_len
    chunk = min(chunk or engine.config.prefill_chunk_size or PRECOMPILE_CHUNK, max_len - 1)
    engine.allocate(1)  # the program's caches have the engine's shapes
    ids = torch.zeros(1, chunk, dtype=torch.long, device=engine.device)
    engine.step(ids, 0)
    engine.step(ids[:, :1], chunk)
    engine.release()
    saved = torch.compiler.save_cache_artifacts()
    return None if saved is None else saved[0]


def add_members(path: str, members: dict[str, bytes]) -> None:
    """Append ``members`` (names relative to the package's ``duo_compile/`` folder) to the archive at ``path``."""
    with zipfile.ZipFile(path) as archive:
        folder = archive_folder(archive, path)
    with zipfile.ZipFile(path, "a") as archive:
        for name, data in members.items():
            archive.writestr(f"{folder}/{CACHE_FOLDER}/{name}", data)


def add_caches(path: str, inductor: bytes | None, triton: dict[str, bytes]) -> None:
    """Append Inductor's cache artifacts and the packed Triton kernels (package_triton.pack) to the archive."""
    members = {f"{TRITON_FOLDER}/{name}": data for name, data in triton.items()}
    if inductor:
        members[CACHE_NAME] = inductor
    add_members(path, members)


def read_cache(path: str) -> bytes | None:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"/{CACHE_FOLDER}/{CACHE_NAME}")]
        return archive.read(names[0]) if names else None


def read_triton(path: str) -> dict[str, bytes]:
    """The packed Triton kernels of the archive at ``path`` (``{"<kernel>/<file>": bytes}``; empty if none)."""
    marker = f"/{CACHE_FOLDER}/{TRITON_FOLDER}/"
    with zipfile.ZipFile(path) as archive:
        return {name.split(marker, 1)[1]: archive.read(name) for name in archive.namelist() if marker in name}


def use_cache(path: str, recorded: dict | None, device: torch.device) -> bool:
    """Load the package's Inductor caches and write its Triton kernels where Triton will find them
    (package_triton.install), if they were made for this torch, Triton and device kind; else warn that Inductor
    compiles afresh. Returns whether the Inductor caches were loaded."""
    if not recorded:
        return False
    here = cache_producer(device)
    made = {key: recorded.get(key) for key in here}
    if made != here:
        differ = ", ".join(f"{key} {made[key]} (here {here[key]})" for key in here if made[key] != here[key])
        warnings.warn(
            f"{os.fspath(path)}: the package's compiled code was made for {differ}; Inductor compiles the engine "
            f"afresh on its first steps (re-export the package here to skip that)",
            UserWarning,
            stacklevel=3,
        )
        return False
    if recorded.get("triton_kernels"):
        package_triton.install(read_triton(path), package_triton.cache_bases(device))
    data = read_cache(path)
    if data:
        torch.compiler.load_cache_artifacts(data)
    return bool(data)
