"""An engine package's weights: one member of the package's zip archive, read once, straight into the tensors.

The weights are most of a package's bytes, so they are read once: the archive's digest (engine_file.archive_sha256)
skips them, and they go into one member stored without compression: ``read`` streams its bytes from the file in
order into the tensors it fills (on CUDA through pinned buffers copied asynchronously), hashing them on worker
threads while the next bytes are read, so each byte leaves the disk once. The hash is a SHA-256 of pieces: the
member is cut into pieces (the length and header, then each tensor in slices of at most ``piece_bytes``), each piece
is hashed on its own, and the record's ``sha256`` is the SHA-256 of the pieces' digests in order, so the pieces hash
in parallel (one SHA-256 stream hashes about as fast as a disk reads). The record is in the engine's metadata
(``payload.weights``), which the metadata digest covers; ``read`` compares it after the last byte and refuses a
mismatch before the tensors reach anything.

Layout: the safetensors format (an 8-byte little-endian length N, a JSON header of N bytes mapping each name to
its ``dtype``, ``shape`` and ``data_offsets`` ``[begin, end]``, padded with spaces to a multiple of 8, then the
tensors' bytes back to back in header order), so the member, once extracted, opens with the ``safetensors``
library. Written and read here rather than by that library because the member lives inside the engine's single
zip file, which its readers cannot open at an offset.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import torch

from duo_compile.export.engine_file import EngineFileError, archive_folder

FOLDER = "duo_compile"  # under the archive's folder, beside extra/ (the metadata)
WEIGHTS_NAME = "weights.safetensors"
CHUNK_BYTES = 64 << 20  # a piece: bytes hashed on their own, read (and, on CUDA, staged in pinned memory) at a time
HASHERS = min(4, os.cpu_count() or 1)  # pieces hashed at once
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes."""
    return tensor.reshape(-1).view(torch.uint8)


def _header(tensors: dict[str, torch.Tensor]) -> bytes:
    entries, offset = {}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"weight {name!r} has dtype {tensor.dtype}, which an engine package cannot store")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write(path: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Append ``tensors`` to the zip archive at ``path`` as its weights member (one tensor on the host at a time);
    returns the member's record for the metadata: ``{"member", "bytes", "piece_bytes", "sha256"}``."""
    header = _header(tensors)
    with zipfile.ZipFile(path) as archive:
        member = f"{archive_folder(archive, path)}/{FOLDER}/{WEIGHTS_NAME}"
    info = zipfile.ZipInfo(member)
    info.compress_type = zipfile.ZIP_STORED
    pieces, size = [hashlib.sha256(header).digest()], len(header)
    with zipfile.ZipFile(path, "a") as archive, archive.open(info, "w", force_zip64=True) as out:
        out.write(header)
        for tensor in tensors.values():
            data = _as_bytes(tensor.detach().contiguous().cpu()).numpy()
            out.write(data)
            pieces += [hashlib.sha256(data[begin : begin + CHUNK_BYTES]).digest()
                       for begin in range(0, data.nbytes, CHUNK_BYTES)]
            size += data.nbytes
    return {"member": member, "bytes": size, "piece_bytes": CHUNK_BYTES,
            "sha256": hashlib.sha256(b"".join(pieces)).hexdigest()}


def _damaged(path: str, why: str) -> EngineFileError:
    return EngineFileError(f"{path}: altered or damaged engine file ({why})")


def _data_offset(path: str, record: dict) -> int:
    """Where the member's bytes start in the file (after its local zip header), checked against the record."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(record["member"])
    except KeyError:
        raise _damaged(path, f"no weights member {record['member']!r}") from None
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != record["bytes"]:
        raise _damaged(path, "the weights member is not the one recorded")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise _damaged(path, "no zip header before the weights")
    return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


def _entries(path: str, header: bytes, data_bytes: int) -> list[tuple[str, torch.dtype, list[int], int]]:
    """(name, dtype, shape, bytes) of each tensor in file order, checked to tile the data exactly."""
    try:
        entries = json.loads(header)
        rows = sorted(((name, e["dtype"], e["shape"], *e["data_offsets"]) for name, e in entries.items()
                       if name != "__metadata__"), key=lambda row: row[3])
    except (ValueError, TypeError, KeyError, AttributeError):
        raise _damaged(path, "unreadable weights header") from None
    out, offset = [], 0
    for name, dtype, shape, begin, end in rows:
        if dtype not in _BY_NAME or not all(isinstance(n, int) and n >= 0 for n in shape) or begin != offset:
            raise _damaged(path, f"weights header entry {name!r}")
        size = _BY_NAME[dtype].itemsize * torch.Size(shape).numel()
        if end - begin != size:
            raise _damaged(path, f"weights header entry {name!r}")
        out.append((name, _BY_NAME[dtype], shape, size))
        offset = end
    if offset != data_bytes:
        raise _damaged(path, "the weights header does not cover the member")
    return out


def read(path: str, record: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The weights member described by ``record`` (its metadata entry) as tensors on ``device``, each byte read
    from the file once and hashed; EngineFileError if they do not hash to the recorded SHA-256 of pieces."""
    start = _data_offset(path, record)
    piece = record.get("piece_bytes")
    if not isinstance(piece, int) or piece < 1:
        raise _damaged(path, f"weights piece size {piece!r}")
    device = torch.device(device)
    tensors, pieces = {}, []
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(HASHERS) as hasher:
        f.seek(start)
        length = f.read(8)
        size = int.from_bytes(length, "little")
        if len(length) != 8 or size > record["bytes"] - 8:
            raise _damaged(path, "unreadable weights header")
        header = f.read(size)
        pieces.append(hasher.submit(_digest, length + header))
        staging = _Staging(device, piece, HASHERS + 2) if device.type == "cuda" else None
        for name, dtype, shape, nbytes in _entries(path, header, record["bytes"] - 8 - size):
            tensor = torch.empty(shape, dtype=dtype, device=device)
            target = _as_bytes(tensor)
            for begin in range(0, nbytes, piece):
                count = min(piece, nbytes - begin)
                buffer = target[begin : begin + count] if staging is None else staging.next(count)
                _read_exactly(f, buffer.numpy(), path)
                pieces.append(hasher.submit(_digest, buffer.numpy()))
                if staging is not None:
                    staging.copy(target[begin : begin + count], pieces[-1])
            tensors[name] = tensor
        digests = b"".join(hashed.result() for hashed in pieces)
        if staging is not None:
            torch.cuda.synchronize(device)
    if hashlib.sha256(digests).hexdigest() != record["sha256"]:
        raise _damaged(path, "the weights do not match the recorded SHA-256")
    return tensors


def _digest(data) -> bytes:
    return hashlib.sha256(data).digest()


def _read_exactly(f, view, path: str) -> None:
    done = 0
    while done < view.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise _damaged(path, "the weights end early")
        done += n


class _Staging:
    """A ring of pinned host buffers: each is filled from the file, hashed and copied to the device; a buffer is
    refilled only once its hash and its copy are done."""

    def __init__(self, device: torch.device, piece: int, slots: int):
        self.buffers = [torch.empty(piece, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.pending: list[tuple | None] = [None] * slots
        self.device = device
        self.index = -1

    def next(self, count: int) -> torch.Tensor:
        self.index = (self.index + 1) % len(self.buffers)
        if self.pending[self.index] is not None:
            hashed, copied = self.pending[self.index]
            hashed.result()
            copied.synchronize()
        return self.buffers[self.index][:count]

    def copy(self, target: torch.Tensor, hashed) -> None:
        target.copy_(self.buffers[self.index][: target.numel()], non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))
        self.pending[self.index] = (hashed, copied)
