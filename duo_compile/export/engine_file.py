"""The engine file: what ``duo_compile.export`` writes and ``duo_compile.load`` reads.

Two containers, each one self-contained file with the same JSON metadata (``FORMAT``, ``FORMAT_VERSION``):

* ``"aoti"``: a PT2 archive (zip; ``torch._inductor.package.load_package`` reads it) holding the AOTInductor
  model ``prefill`` (every chunk length, decode included) and, if exported with ``separate_decode``, ``decode``
  (one token; prefill then takes 2 .. max_seq_len), and the metadata as the extra file ``extra/duo_engine.json``.
  Zip CRCs are checked on load, so a truncated or damaged file is refused.
* ``"package"``: a zip archive laid out as a PT2 archive: the rewritten graph as JSON (``graph_format.py``), its
  weights in a member of their own (``package_weights.py``), and optionally Inductor's compile caches and the
  compiled Triton kernels (``package_export.py``); the metadata is the same extra file.
* ``"onnx"``: a plain ONNX model (any ONNX tool, onnxruntime or TensorRT's parser opens it directly) whose
  ``metadata_props`` entry ``duo_compile.runtime.engine`` holds the metadata. That entry is written as the file's last bytes
  (protobuf merges a trailing message into the model), and it records the byte length of everything before it.

Integrity (format version 2): ``payload.sha256`` is the SHA-256 of the graph bytes (ONNX: the model bytes before the
metadata entry; AOTI: every archive member but the metadata, names and contents, see ``archive_sha256``), and
``digest`` is the SHA-256 of the canonical JSON of the whole metadata record without ``digest`` itself (sorted
keys, no whitespace: ``canonical_json``), payload hash included. So every value the runtime derives from the file
(masks, sink, recent, mode, max_seq_len, shapes, vocab, dtype, pass counts, ops, ...) and the graphs are covered
by one digest; ``load`` refuses any mismatch. A digest detects accidental damage and hand edits, not a deliberate
forgery: anyone can recompute it (it is not a signature).

Metadata (JSON object):
  format, format_version, backend      what the file is
  producer                             duo_compile/torch/python versions, machine, CPU capability (AOTI code is
                                       native code for that machine)
  config, masks, model_info,           everything ``Engine`` needs besides a runner: ``EngineConfig``,
  cache_specs, dtype, device,          ``HeadMasks.to_dict()``, ``ModelInfo``, the ``CacheSpec`` list in graph
  pass_counts                          argument order
  ops                                  ``{"duo::name": schema}`` of every custom op the graphs call (AOTI calls
                                       them through the dispatcher, so they must be registered, same schema)
  graphs                               backend specifics (AOTI model names and shape bounds; ONNX names, opset)
  graph_inputs                         the graphs' calling convention (per-row ``cache_start [B]``, ``valid [B]``)
  generation_config, tokenizer         optional: generate's defaults and the tokenizer (generation_files.py)
  payload                              ``{"sha256": graph bytes digest}`` (+ ``"bytes"``: ONNX model length;
                                       ``"members"``: archive member count; ``"weights"``: a package's weights
                                       member, its name, SHA-256 and length, outside ``sha256``)
  digest                               SHA-256 of ``canonical_json`` of all of the above
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

from duo_compile.export.generation_files import generation_metadata
from duo_compile.runtime.engine import EngineConfig
from duo_compile.masks import HeadMasks
from duo_compile.models.hf import ModelInfo
from duo_compile.passes import CacheSpec

FORMAT = "duo_compile.runtime.engine"
# 2: the digest covers the whole metadata record and the graph bytes, and the graphs take per-row positions
# (input_ids, position_ids, cache_start [B], valid [B], *caches), returning each row's logits at its last real
# token. Version 1 had no digest over the metadata and took one cache_position [T] for the whole batch.
FORMAT_VERSION = 2
BACKENDS = ("aoti", "onnx", "package")
PT2_META_NAME = "duo_engine.json"  # in the PT2 archive as <archive>/extra/duo_engine.json
ONNX_META_KEY = "duo_compile.runtime.engine"
ZIP_MAGIC = b"PK\x03\x04"
DIGEST_KEY = "digest"
# The graphs' calling convention, recorded in the metadata (so the digest covers it) and checked at load.
GRAPH_INPUTS = ["input_ids [B, T]", "position_ids [B, T]", "cache_start [B]", "valid [B]", "*caches"]


class EngineFileError(ValueError):
    """An engine file that cannot be loaded: foreign, truncated, damaged, another format version, or needing
    something this process lacks (an op library, a device, a runtime)."""


# --------------------------------------------------------------------------------------------------- metadata
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def engine_metadata(engine, backend: str, graphs: dict[str, Any], ops: dict[str, str]) -> dict[str, Any]:
    """The metadata of ``engine`` exported with ``backend``."""
    import duo_compile

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "producer": {
            "duo_compile": duo_compile.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        # Engine files hold engines without paging (export refuses a paged one): the record keeps its fields.
        "config": {k: v for k, v in dataclasses.asdict(engine.config).items() if k != "page_size"},
        "masks": engine.masks.to_dict(),
        "model_info": dataclasses.asdict(engine.info),
        "cache_specs": [dataclasses.asdict(spec) for spec in engine.cache_specs],
        "dtype": _dtype_name(engine.dtype),
        "device": str(engine.device),
        "pass_counts": dict(engine.pass_counts),
        "ops": ops,
        "graphs": graphs,
        "graph_inputs": list(GRAPH_INPUTS),
        **generation_metadata(engine),
    }


def check_format(meta: Any, path: str) -> None:
    """The metadata must be a duo_compile engine file's, of this format version (checked before anything else:
    another version may lay out or digest its metadata differently)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EngineFileError(f"{path}: not a duo_compile engine file (its metadata has no format {FORMAT!r})")
    version = meta.get("format_version")
    if version == FORMAT_VERSION and type(version) is int:
        return
    producer = meta.get("producer")
    made = producer.get("duo_compile", "unknown") if isinstance(producer, dict) else "unknown"
    if type(version) is int and version > FORMAT_VERSION:
        raise EngineFileError(
            f"{path}: engine file format version {version}, but this duo_compile reads version {FORMAT_VERSION}: "
            f"the file was written by a newer duo_compile ({made}); load it with that version, or re-export the "
            f"engine with this one"
        )
    raise EngineFileError(
        f"{path}: engine file format version {version!r}, but this duo_compile reads version {FORMAT_VERSION}: "
        f"an older format (written by duo_compile {made}) whose metadata no digest covers; re-export the engine "
        f"with this duo_compile"
    )


@dataclasses.dataclass
class EngineParts:
    """The metadata parsed and checked: the ``Engine`` constructor arguments besides graph and runner."""

    backend: str
    config: EngineConfig
    masks: HeadMasks
    info: ModelInfo
    cache_specs: list[CacheSpec]
    dtype: torch.dtype
    device: torch.device
    pass_counts: dict[str, int]
    ops: dict[str, str]
    graphs: dict[str, Any]
    producer: dict[str, Any]


def parse_metadata(meta: Any, path: str) -> EngineParts:
    """Check the metadata of the file at ``path`` and turn it into Python objects; EngineFileError if anything
    is missing, inconsistent or of another format version. (The digest is checked by ``read_metadata``.)"""
    check_format(meta, path)
    try:
        backend = meta["backend"]
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        if meta["graph_inputs"] != GRAPH_INPUTS:
            raise ValueError(f"graph inputs {meta['graph_inputs']!r}, this duo_compile runs {GRAPH_INPUTS!r}")
        dtype = getattr(torch, meta["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {meta['dtype']!r}")
        parts = EngineParts(
            backend=backend,
            config=EngineConfig(**meta["config"]),
            masks=HeadMasks.from_dict(meta["masks"]),
            info=ModelInfo(**meta["model_info"]),
            cache_specs=[CacheSpec(**spec) for spec in meta["cache_specs"]],
            dtype=dtype,
            device=torch.device(meta["device"]),
            pass_counts={str(k): int(v) for k, v in meta.get("pass_counts", {}).items()},
            ops=dict(meta["ops"]),
            graphs=dict(meta["graphs"]),
            producer=dict(meta.get("producer", {})),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise EngineFileError(f"{path}: damaged engine metadata ({type(err).__name__}: {err})") from None
    _check_consistent(parts, path)
    return parts


def _check_consistent(parts: EngineParts, path: str) -> None:
    """The cache specs must be the ones the masks and model shapes imply (a cheap guard against hand-edited or
    mismatched metadata, which would otherwise feed wrongly shaped caches to the graphs)."""
    info, masks = parts.info, parts.masks
    try:
        masks.check_shape(info.num_layers, info.num_kv_heads)
    except ValueError as err:
        raise EngineFileError(f"{path}: masks do not fit the model: {err}") from None
    counts = masks.retrieval_counts
    windows = info.window_layers(parts.config.max_seq_len)  # every head of a window layer: its window, no sink
    for spec in parts.cache_specs:
        retrieval = counts[spec.layer] if 0 <= spec.layer < len(counts) else -1
        if spec.layer in windows:
            retrieval = 0
        want = retrieval if spec.kind == "retrieval" else info.num_kv_heads - retrieval
        slots = None if spec.kind == "retrieval" else parts.config.sink_size + parts.config.recent_size
        if spec.layer in windows and spec.kind == "streaming":
            slots = info.layer_windows[spec.layer]
        if spec.num_kv_heads != want or spec.slots != slots or spec.head_dim != info.head_dim:
            raise EngineFileError(f"{path}: cache spec {spec} does not match the masks and model shapes")


def example_inputs(specs, max_seq_len: int, dtype: torch.dtype, device, batch: int, length: int) -> tuple:
    """Inputs in the rewritten graph's calling convention (``input_ids, position_ids, cache_start, valid,
    *caches``) for tracing it at export: ``length`` tokens from position 0 in every row, the last row's last token
    padding (so no value of ``valid`` is specialised on), zero caches laid out as ``specs`` say."""
    ids = torch.zeros(batch, length, dtype=torch.int64, device=device)
    cache_start = torch.zeros(batch, dtype=torch.int64, device=device)
    valid = torch.full((batch,), length, dtype=torch.int64, device=device)
    valid[-1] = length - 1
    position_ids = (cache_start[:, None] + torch.arange(length, device=device)).contiguous()
    caches = [
        torch.zeros(batch, s.num_kv_heads, max_seq_len if s.slots is None else s.slots, s.head_dim, dtype=dtype,
                    device=device)
        for s in specs
    ]
    return (ids, position_ids, cache_start, valid, *caches)


# ------------------------------------------------------------------------------------------------------- ops
def graph_ops(*graphs) -> dict[str, str]:
    """``{"ns::name": schema}`` of every custom (non-aten/prims) op called by the given fx graphs."""
    ops: dict[str, str] = {}
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                if node.target.namespace not in ("aten", "prims", "_operator"):
                    ops[node.target.name()] = str(node.target._schema)
    return dict(sorted(ops.items()))


def check_ops(parts: EngineParts, path: str) -> None:
    """Every op the file's graphs call must be registered here with the same schema (else the AOTI runtime would
    fail mid-run, or call an op whose arguments changed meaning)."""
    for name, schema in parts.ops.items():
        namespace, _, rest = name.partition("::")
        op_name, _, overload = rest.partition(".")
        packet = getattr(getattr(torch.ops, namespace), op_name, None) if namespace and op_name else None
        op = getattr(packet, overload or "default", None) if packet is not None else None
        if op is None:
            raise EngineFileError(
                f"{path}: the engine calls custom op {name}, which is not registered in this process; the op "
                f"library that defines it is missing (engine written by duo_compile "
                f"{parts.producer.get('duo_compile', 'unknown')}): import the module that registers it before "
                f"loading, install the duo_compile version that wrote it, or re-export"
            )
        if str(op._schema) != schema:
            raise EngineFileError(
                f"{path}: custom op {name} has schema {op._schema} here, but the engine was built against "
                f"{schema}; re-export the engine with this duo_compile"
            )


# ------------------------------------------------------------------------------------------------- integrity
def canonical_json(meta: dict[str, Any]) -> bytes:
    """The metadata as its digest sees it: JSON with sorted keys, no whitespace, ASCII only, without ``digest``."""
    body = {key: value for key, value in meta.items() if key != DIGEST_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def metadata_digest(meta: dict[str, Any]) -> str:
    """SHA-256 (hex) of ``canonical_json(meta)``: the whole record, ``payload`` (the graph bytes' SHA-256)
    included."""
    return hashlib.sha256(canonical_json(meta)).hexdigest()


def seal(meta: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with ``payload`` (the graph bytes' SHA-256, ...) and the ``digest`` over the whole record.

    The record is normalised through JSON first (tuples become lists, keys strings), so the digest is that of
    exactly what ``load`` parses back. Any earlier ``digest`` is replaced."""
    meta = json.loads(json.dumps(dict(meta, payload=payload)))
    meta.pop(DIGEST_KEY, None)
    meta[DIGEST_KEY] = metadata_digest(meta)
    return meta


def check_digest(meta: dict[str, Any], path: str) -> dict[str, Any]:
    """The metadata must match its recorded digest; returns its ``payload`` record (what the graph bytes must
    hash to), now trusted."""
    recorded = meta.get(DIGEST_KEY)
    if not isinstance(recorded, str):
        raise EngineFileError(f"{path}: damaged engine metadata (no {DIGEST_KEY!r} record)")
    if metadata_digest(meta) != recorded:
        raise EngineFileError(
            f"{path}: altered or damaged engine file: its metadata does not match the recorded SHA-256 digest "
            f"(edited after export?); re-export the engine"
        )
    payload = meta.get("payload")
    if not isinstance(payload, dict) or not isinstance(payload.get("sha256"), str):
        raise EngineFileError(f"{path}: damaged engine metadata (no payload digest)")
    return payload


def archive_sha256(archive: zipfile.ZipFile, skip: set[str] | frozenset[str] = frozenset()) -> tuple[str, int]:
    """(SHA-256, member count) of a zip archive's members other than those named in ``skip``: each member's name
    and contents, in name order. Reading a member checks its CRC (a damaged member raises ``zipfile.BadZipFile``)."""
    digest = hashlib.sha256()
    count = 0
    for info in sorted(archive.infolist(), key=lambda item: (item.filename, item.header_offset)):
        if info.filename in skip:
            continue
        name = info.filename.encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name + info.file_size.to_bytes(8, "little"))
        with archive.open(info) as member:
            for block in iter(lambda: member.read(1 << 20), b""):
                digest.update(block)
        count += 1
    return digest.hexdigest(), count


def archive_folder(archive: zipfile.ZipFile, path: str) -> str:
    """The top folder of a PT2 archive's members (named after the file it was written as)."""
    names = archive.namelist()
    if not names or "/" not in names[0]:
        raise ValueError(f"{path}: the archive has no archive folder")
    return names[0].split("/")[0]


def seal_pt2(path: str, meta: dict[str, Any], weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append the sealed metadata to the PT2 archive at ``path`` as its last member,
    ``<archive name>/extra/duo_engine.json``: the digest covers every member written before it, a package's
    weights member through its own SHA-256 of pieces (``weights``, its record: package_weights.py), which load
    checks as it reads the weights."""
    with zipfile.ZipFile(path) as archive:
        folder = archive_folder(archive, path)
        sha, count = archive_sha256(archive, skip={weights["member"]} if weights else set())
    meta = seal(meta, {"sha256": sha, "members": count, **({"weights": weights} if weights else {})})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{folder}/extra/{PT2_META_NAME}", json.dumps(meta, sort_keys=True))
    return meta


# --------------------------------------------------------------------------------------------------- writing
def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_free_space(path: str, need: int, what: str) -> None:
    """``OSError(ENOSPC)`` naming both numbers if the folder of ``path`` has fewer than ``need`` bytes free: a
    full disk must be refused before the native writer (which aborts the process on a failed write) starts."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space in {folder!r}: {what} needs about {need} bytes ({_size(need)}), "
            f"{free} bytes ({_size(free)}) are free",
        )


def check_writable(path: str | os.PathLike) -> str:
    """Refuse, before any expensive work, a path the engine file could not be written to."""
    path = os.fspath(path)
    if not path:
        raise ValueError("path is empty")
    if os.path.isdir(path):
        raise ValueError(f"cannot write the engine file to {path!r}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write the engine file to {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write the engine file to {path!r}: permission denied")
    return path


def _replace_durably(tmp: str, path: str) -> None:
    """Flush ``tmp`` to disk, make it readable, and put it in ``path``'s place in one step."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str) -> Iterator[str]:
    """A temporary path beside ``path``; on success it replaces ``path`` in one step (``os.replace``), so readers
    see the old file or the complete new one, never a partial file. Removed on failure."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=parent)
    os.close(fd)
    try:
        yield tmp
        _replace_durably(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_named_path(path: str) -> Iterator[str]:
    """Like ``atomic_path``, for writers that record the file's own name inside it (a PT2 archive stores its
    members under the file's name): a temporary folder beside ``path`` holding a file of the final base name; on
    success that file replaces ``path`` in one step. The folder is removed either way."""
    parent = os.path.dirname(os.path.abspath(path))
    folder = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    tmp = os.path.join(folder, os.path.basename(path))
    try:
        yield tmp
        _replace_durably(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def onnx_trailer(model_bytes: bytes, meta: dict[str, Any]) -> bytes:
    """A serialized ModelProto that holds only the metadata entry, to append after ``model_bytes``. The entry
    records the length and SHA-256 of ``model_bytes`` and the digest over the whole record (``seal``), so load can
    tell a complete, unedited file from a cut, damaged or edited one."""
    import onnx

    meta = seal(meta, {"bytes": len(model_bytes), "sha256": hashlib.sha256(model_bytes).hexdigest()})
    trailer = onnx.ModelProto()
    entry = trailer.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, json.dumps(meta, sort_keys=True)
    return trailer.SerializeToString()


# --------------------------------------------------------------------------------------------------- reading
def read_metadata(path: str | os.PathLike) -> tuple[EngineParts, dict[str, Any]]:
    """Identify and check the engine file at ``path``: (parsed parts, raw metadata). EngineFileError for
    anything that is not a complete, unedited engine file of this format version.

    Order: format and version (another version may digest differently), the metadata digest, the graph bytes
    against the digested payload hash, then the record's own consistency."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no engine file at {path!r}")
    if os.path.isdir(path):
        raise EngineFileError(f"{path}: is a directory, not an engine file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise EngineFileError(f"{path}: empty file, not a duo_compile engine file")
    meta = _read_pt2_metadata(path) if head == ZIP_MAGIC else _read_onnx_metadata(path)
    parts = parse_metadata(meta, path)
    want = ("aoti", "package") if head == ZIP_MAGIC else ("onnx",)
    if parts.backend not in want:
        container = "a PT2" if head == ZIP_MAGIC else "an ONNX"
        raise EngineFileError(f"{path}: metadata says backend {parts.backend!r}, but the file is {container} file")
    return parts, meta


def _parse_json(raw: bytes | str, path: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EngineFileError(f"{path}: damaged engine metadata ({err})") from None


def _read_pt2_metadata(path: str) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{PT2_META_NAME}")]
            if not names:
                archive.testzip()  # a damaged archive says so before "not an engine file"
                raise EngineFileError(
                    f"{path}: a zip/PT2 archive but not a duo_compile engine file (no extra/{PT2_META_NAME})"
                )
            if len(names) > 1:
                raise EngineFileError(f"{path}: damaged engine file ({len(names)} metadata members)")
            meta = _parse_json(archive.read(names[0]), path)
            check_format(meta, path)
            payload = check_digest(meta, path)
            weights = payload.get("weights")  # a package's weights: hashed as load reads them (package_weights.py)
            if weights is not None and not (isinstance(weights, dict) and isinstance(weights.get("member"), str)
                                            and isinstance(weights.get("sha256"), str)
                                            and isinstance(weights.get("bytes"), int)
                                            and isinstance(weights.get("piece_bytes"), int)):
                raise EngineFileError(f"{path}: damaged engine metadata (weights record {weights!r})")
            skip = {names[0], weights["member"]} if weights else {names[0]}
            sha, count = archive_sha256(archive, skip=skip)  # reads every other member, checking its CRC
    except EngineFileError:
        raise
    except zipfile.BadZipFile as err:
        raise EngineFileError(f"{path}: truncated or damaged engine file (zip: {err})") from None
    except Exception as err:  # EOFError, zlib.error, OSError, ...: whatever a damaged archive makes zipfile raise
        raise EngineFileError(f"{path}: truncated or damaged engine file ({type(err).__name__}: {err})") from None
    if sha != payload["sha256"] or count != payload.get("members"):
        raise EngineFileError(
            f"{path}: altered or damaged engine file (the archive members do not match the recorded SHA-256)"
        )
    return meta


def _read_onnx_metadata(path: str) -> Any:
    try:
        import onnx
    except ImportError:
        raise EngineFileError(
            f"{path}: not a PT2 archive; reading an ONNX engine needs the onnx package (pip install onnx "
            f"onnxruntime)"
        ) from None
    with open(path, "rb") as f:
        data = f.read()
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception as err:  # protobuf raises DecodeError, or RuntimeWarning-like errors for garbage
        raise EngineFileError(
            f"{path}: not a duo_compile engine file, or a truncated one (neither a zip/PT2 archive nor a readable "
            f"ONNX model: {type(err).__name__})"
        ) from None
    entries = [p.value for p in model.metadata_props if p.key == ONNX_META_KEY]
    if not entries:
        raise EngineFileError(
            f"{path}: not a duo_compile engine file, or a truncated one (no {ONNX_META_KEY!r} metadata entry)"
        )
    meta = _parse_json(entries[-1], path)
    check_format(meta, path)
    payload = check_digest(meta, path)
    try:
        size, digest = int(payload["bytes"]), str(payload["sha256"])
    except (KeyError, TypeError, ValueError) as err:
        raise EngineFileError(f"{path}: damaged engine metadata ({type(err).__name__}: {err})") from None
    try:
        tail = onnx.ModelProto.FromString(data[size:]) if 0 < size < len(data) else None
    except Exception:
        tail = None
    intact = (
        tail is not None
        and [(p.key, p.value) for p in tail.metadata_props] == [(ONNX_META_KEY, entries[-1])]
        and hashlib.sha256(data[:size]).hexdigest() == digest
    )
    if not intact:
        raise EngineFileError(
            f"{path}: truncated or altered engine file (the model bytes do not match the recorded length/SHA-256)"
        )
    return meta


def check_runtime(parts: EngineParts, path: str) -> None:
    """The loading machine must be able to run the file: device present; for AOTI native code, the same torch
    (major.minor), machine and a CPU at least as capable."""
    device = parts.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineFileError(f"{path}: the engine was exported for {device}, but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise EngineFileError(f"{path}: engines for device {device} are not supported")
    if parts.backend != "aoti":
        return
    made = parts.producer
    here_torch = torch.__version__.split("+")[0].split(".")[:2]
    made_torch = str(made.get("torch", "?")).split("+")[0].split(".")[:2]
    if here_torch != made_torch:
        raise EngineFileError(
            f"{path}: AOTInductor engine built with torch {made.get('torch')}, but this is torch {torch.__version__}; "
            f"AOTInductor packages are native code for one torch version: re-export with this torch"
        )
    if made.get("machine") != platform.machine():
        raise EngineFileError(
            f"{path}: AOTInductor engine compiled for {made.get('machine')}, this machine is {platform.machine()}"
        )
    if device.type == "cpu":
        order = ["DEFAULT", "AVX2", "AVX512"]
        made_isa, here_isa = made.get("cpu_capability"), torch.backends.cpu.get_cpu_capability()
        if made_isa in order and here_isa in order and order.index(made_isa) > order.index(here_isa):
            raise EngineFileError(
                f"{path}: AOTInductor engine compiled for {made_isa} CPUs, this CPU supports {here_isa}; "
                f"re-export on this machine (or use the ONNX engine)"
            )
