"""Per-head gates of DuoAttention: which KV heads are retrieval heads and which are streaming heads.

A gate is one value per layer per KV head (the paper's alpha). Identification produces gates in [0, 1]; the
compiler needs them binary: gate 1 = retrieval head (full KV cache), gate 0 = streaming head (only the
``sink_size`` first and ``recent_size`` last tokens). Binarisation here is deterministic, unlike the reference
implementation, which breaks ties (many gates are exactly 1.0) with unseeded random noise.

File format (the authors' ``full_attention_heads.tsv``): ``np.savetxt`` with tabs, no header,
rows = layers, columns = KV heads.
"""
from __future__ import annotations

import errno
import math
import numbers
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from duo_compile.checks import check_int
from duo_compile.models.hf import read_shape

# The authors' gate files for Llama-2-7B-32K-Instruct, Llama-3-8B-Instruct-Gradient-1048k and
# Mistral-7B-Instruct-v0.2 (MIT licence, beside them): one folder per model with full_attention_heads.tsv.
PATTERNS_DIR = Path(__file__).resolve().parent / "data" / "patterns"

__all__ = ["HeadMasks", "KVCacheBytes", "kv_cache_bytes"]

# The authors' gates have small excursions below 0 (e.g. -1.4e-3) from the optimiser; they clip them on load.
# Anything further out than this tolerance is a corrupt or foreign file, not a rounding artefact.
CLIP_TOLERANCE = 0.05

_DICT_FORMAT = "duo_compile.HeadMasks"
_DICT_VERSION = 1


def _real_in_unit_interval(name: str, value: Any) -> float:
    """A real number in [0, 1] (bool and NaN rejected), or ValueError naming the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")
    as_float = float(value)
    if not (0.0 <= as_float <= 1.0):  # also False for NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return as_float


def _n_streaming(sparsity: float, num_heads: int) -> int:
    """Number of streaming heads for a sparsity: Python ``round`` (half to even) of sparsity * N."""
    return int(round(sparsity * num_heads))


def _write_error(path: str, err: OSError) -> OSError:
    """``err`` (e.g. ENOSPC, EACCES) reworded to name the masks file the user asked for; same OSError subclass."""
    message = f"cannot write the masks file {path!r}: {err.strerror or err}"
    return OSError(err.errno, message) if err.errno is not None else type(err)(message)


class HeadMasks:
    """Gates ``[num_layers, num_kv_heads]`` (float64, in [0, 1]); binary once :meth:`binarize` has run.

    Immutable: the array is a private read-only copy, so masks can be shared between a compiled engine and its
    caller without one changing the other's head split.
    """

    __slots__ = ("_gates",)

    def __init__(self, gates: np.ndarray) -> None:
        """Prefer the ``from_*`` constructors; this one validates too, so no invalid masks exist."""
        self._gates = self._validated(gates)

    @staticmethod
    def _validated(gates: Any) -> np.ndarray:
        try:
            array = np.array(gates, dtype=np.float64)  # always a copy
        except (TypeError, ValueError) as exc:
            raise ValueError(f"gates must be a 2-D array of real numbers: {exc}") from None
        if array.ndim != 2:
            raise ValueError(f"gates must be 2-D [num_layers, num_kv_heads], got shape {array.shape}")
        if array.shape[0] < 1 or array.shape[1] < 1:
            raise ValueError(f"gates must have at least one layer and one KV head, got shape {array.shape}")
        bad = ~(np.isfinite(array) & (array >= 0.0) & (array <= 1.0))
        if bad.any():
            layer, head = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"gate {array[layer, head]!r} at (layer, head) = ({layer}, {head}) is not a finite number "
                f"in [0, 1] ({int(bad.sum())} bad gate(s) in all)"
            )
        array.flags.writeable = False
        return array

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_gates(cls, gates: Any) -> HeadMasks:
        """Masks from any 2-D array-like of gates in [0, 1] (strict: no clipping)."""
        return cls(gates)

    @classmethod
    def all_retrieval(cls, num_layers: int, num_kv_heads: int) -> HeadMasks:
        """Every head keeps a full KV cache: the compiled model must equal plain full attention."""
        return cls(np.ones(cls._shape_args(num_layers, num_kv_heads)))

    @classmethod
    def all_streaming(cls, num_layers: int, num_kv_heads: int) -> HeadMasks:
        """Every head keeps only sink + recent tokens (StreamingLLM on all heads)."""
        return cls(np.zeros(cls._shape_args(num_layers, num_kv_heads)))

    @classmethod
    def random(cls, num_layers: int, num_kv_heads: int, sparsity: float, seed: int) -> HeadMasks:
        """The paper's random-selection baseline: exactly ``round(sparsity * N)`` streaming heads, drawn
        uniformly without replacement over all layers with ``np.random.default_rng(seed)``."""
        shape = cls._shape_args(num_layers, num_kv_heads)
        sparsity = _real_in_unit_interval("sparsity", sparsity)
        seed = check_int("seed", seed, 0)  # default_rng rejects negative seeds too
        num_heads = shape[0] * shape[1]
        streaming = np.random.default_rng(seed).choice(num_heads, size=_n_streaming(sparsity, num_heads), replace=False)
        flat = np.ones(num_heads)
        flat[streaming] = 0.0
        return cls(flat.reshape(shape))

    @staticmethod
    def _shape_args(num_layers: int, num_kv_heads: int) -> tuple[int, int]:
        return check_int("num_layers", num_layers, 1), check_int("num_kv_heads", num_kv_heads, 1)

    # ------------------------------------------------------------------ TSV (the authors' format)

    @classmethod
    def from_tsv(cls, path: str | os.PathLike) -> HeadMasks:
        """Read the authors' ``full_attention_heads.tsv``.

        Values in [-0.05, 0) or (1, 1.05] are clipped to [0, 1] as the authors do (optimiser excursions);
        anything else outside [0, 1], NaN/inf, a non-number, a ragged row or an empty file is a ValueError
        naming the file, the 1-based line number and the bad value. Blank lines are skipped (like np.loadtxt).
        """
        path = os.fspath(path)
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is skipped
            try:
                # not splitlines(): it also splits on \f, \v etc. and skews line numbers
                lines = f.read().split("\n")
            except UnicodeDecodeError as exc:  # a binary or foreign-encoded file: name it
                raise ValueError(f"{path}: not a text file of gates ({exc})") from None
        rows: list[list[float]] = []
        first_line = 0
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r").split("\t")  # a stray tab is an empty field, not a silent skip
            row = []
            for column, field in enumerate(fields):
                try:
                    value = float(field)  # tolerates spaces around a field
                except ValueError:
                    raise ValueError(
                        f"{path}, line {line_no}, column {column + 1}: {field!r} is not a number"
                    ) from None
                if not math.isfinite(value):
                    raise ValueError(f"{path}, line {line_no}, column {column + 1}: gate {field!r} is not finite")
                if -CLIP_TOLERANCE <= value < 0.0:
                    value = 0.0
                elif 1.0 < value <= 1.0 + CLIP_TOLERANCE:
                    value = 1.0
                elif not 0.0 <= value <= 1.0:
                    raise ValueError(
                        f"{path}, line {line_no}, column {column + 1}: gate {field!r} is outside [0, 1] "
                        f"(only excursions up to {CLIP_TOLERANCE} are clipped)"
                    )
                row.append(value)
            if rows and len(row) != len(rows[0]):
                raise ValueError(
                    f"{path}, line {line_no}: ragged row with {len(row)} values, but line {first_line} "
                    f"has {len(rows[0])} (one column per KV head)"
                )
            if not rows:
                first_line = line_no
            rows.append(row)
        if not rows:
            raise ValueError(f"{path}: empty file, no rows of gates (expected one row per layer)")
        return cls(np.array(rows, dtype=np.float64))

    def to_tsv(self, path: str | os.PathLike) -> None:
        """Write the authors' format (``np.savetxt``, tabs, ``%.18e``: float64 round-trips exactly).

        Atomic: a temp file in the same folder is renamed over ``path``, so a reader never sees half a file.
        An existing file's permission bits are kept; a new file gets 0o644.
        """
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        # Errors name the user's path, not the temporary file (mkstemp and os.replace would name that one).
        if not os.path.isdir(folder):
            raise FileNotFoundError(errno.ENOENT, f"cannot write the masks file {path!r}: directory {folder!r} "
                                                  f"does not exist")
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, f"cannot write the masks file {path!r}: it is a directory")
        try:
            mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o644
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        except OSError as err:
            raise _write_error(path, err) from err
        try:
            with os.fdopen(fd, "wb") as f:
                np.savetxt(f, self._gates, delimiter="\t")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException as err:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(err, OSError):
                raise _write_error(path, err) from err
            raise

    # ------------------------------------------------------------------ dict (engine files)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for engine files; Python floats, so ``json`` round-trips them exactly."""
        return {
            "format": _DICT_FORMAT,
            "version": _DICT_VERSION,
            "shape": list(self.shape),
            "gates": self._gates.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadMasks:
        """Inverse of :meth:`to_dict` (also accepts the ``json.loads`` of it)."""
        if not isinstance(data, Mapping) or "gates" not in data:
            raise ValueError(f"not a HeadMasks dict (no 'gates' key): {str(data)[:200]}")
        if data.get("format", _DICT_FORMAT) != _DICT_FORMAT:
            raise ValueError(f"not a HeadMasks dict: format {data.get('format')!r}")
        if data.get("version", _DICT_VERSION) != _DICT_VERSION:
            raise ValueError(f"unsupported HeadMasks dict version {data.get('version')!r} (know {_DICT_VERSION})")
        masks = cls(data["gates"])
        if "shape" in data and tuple(data["shape"]) != masks.shape:
            raise ValueError(f"HeadMasks dict says shape {tuple(data['shape'])} but its gates have {masks.shape}")
        return masks

    # ------------------------------------------------------------------ binarisation

    def binarize(self, sparsity: float | None = None, threshold: float | None = None, *,
                 skip_layers: Iterable[int] = ()) -> HeadMasks:
        """New binary masks; give exactly one of ``sparsity`` or ``threshold``.

        sparsity: fraction of the heads (global over layers, like the authors) made streaming;
            ``n = round(sparsity * N)`` (Python round, half to even) of the N heads outside ``skip_layers``. The n
            heads with the lowest gates become streaming. Tie-break: ``np.argsort(kind="stable")`` over the
            row-major flattened gates, so among equal gates the lower (layer, head) index becomes streaming first.
            No random noise: the same set on every call and on every machine.
        threshold: gate > threshold is a retrieval head (gate == threshold is streaming).
        skip_layers: layers whose rows the engine does not use (a model's sliding-window layers shorter than
            ``max_seq_len``: ``ModelInfo.window_layers``); their rows become 1 and take no share of the sparsity,
            which then counts the full-attention heads only.
        """
        if (sparsity is None) == (threshold is None):
            raise ValueError(
                f"give exactly one of sparsity or threshold, got sparsity={sparsity!r}, threshold={threshold!r}"
            )
        skip = list(skip_layers)
        if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.shape[0]
               for i in skip):
            raise ValueError(f"skip_layers must be layer indices in 0..{self.shape[0] - 1}, got {skip}")
        if threshold is not None:
            threshold = _real_in_unit_interval("threshold", threshold)
            binary = (self._gates > threshold).astype(np.float64)
        else:
            sparsity = _real_in_unit_interval("sparsity", sparsity)
            used = np.ones(self.shape[0], dtype=bool)
            used[skip] = False
            flat = self._gates[used].ravel()
            order = np.argsort(flat, kind="stable")
            chosen = np.ones(flat.size)
            chosen[order[: _n_streaming(sparsity, flat.size)]] = 0.0
            binary = np.ones(self.shape)
            binary[used] = chosen.reshape(-1, self.shape[1])
        binary[skip] = 1.0
        return HeadMasks(binary)

    # ------------------------------------------------------------------ properties

    @property
    def gates(self) -> np.ndarray:
        """The gates, float64 ``[num_layers, num_kv_heads]``, read-only."""
        return self._gates

    @property
    def num_layers(self) -> int:
        return int(self._gates.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self._gates.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, self.num_kv_heads)

    @property
    def is_binary(self) -> bool:
        """True when every gate is exactly 0 or 1 (what the compiler needs)."""
        return bool(np.all((self._gates == 0.0) | (self._gates == 1.0)))

    @property
    def retrieval(self) -> np.ndarray:
        """Bool ``[num_layers, num_kv_heads]``, True = retrieval head (a fresh array). Only for binary masks."""
        if not self.is_binary:
            raise ValueError(
                f"masks of shape {self.shape} are not binary: binarize first (masks.binarize(sparsity=...) "
                f"or masks.binarize(threshold=...))"
            )
        return self._gates == 1.0

    @property
    def retrieval_counts(self) -> list[int]:
        """Retrieval KV heads per layer (they vary widely across layers under global sparsity)."""
        return [int(n) for n in self.retrieval.sum(axis=1)]

    @property
    def streaming_counts(self) -> list[int]:
        """Streaming KV heads per layer."""
        return [int(n) for n in (~self.retrieval).sum(axis=1)]

    @property
    def retrieval_ratio(self) -> float:
        """Fraction of all KV heads that are retrieval heads (1 - sparsity)."""
        return float(self.retrieval.mean())

    def check_shape(self, num_layers: int, num_kv_heads: int, what: str = "model") -> None:
        """ValueError naming both shapes when the masks do not fit ``what`` (a gate per layer per KV head)."""
        if self.shape != (num_layers, num_kv_heads):
            raise ValueError(
                f"masks have shape {self.shape} but the {what} has {num_layers} layers x {num_kv_heads} KV heads"
            )

    # ------------------------------------------------------------------ dunder

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadMasks):
            return NotImplemented
        return self.shape == other.shape and bool(np.array_equal(self._gates, other._gates))

    def __hash__(self) -> int:
        return hash((self.shape, self._gates.tobytes()))

    def __repr__(self) -> str:
        if self.is_binary:
            return f"HeadMasks(shape={self.shape}, retrieval_ratio={self.retrieval_ratio:.3f})"
        return f"HeadMasks(shape={self.shape}, gates in [{self._gates.min():.3g}, {self._gates.max():.3g}], not binary)"

    def __reduce__(self):
        # __slots__ + read-only array: pickle through the validated constructor.
        return (HeadMasks, (np.array(self._gates),))


@dataclass(frozen=True)
class KVCacheBytes:
    """KV cache sizes in bytes: retrieval and streaming parts of the DuoAttention cache, and full attention."""

    retrieval: int
    streaming: int
    total: int
    full_attention: int

    @property
    def saving(self) -> float:
        """How many times smaller than a full-attention cache (full_attention / total)."""
        return self.full_attention / self.total


def kv_cache_bytes(
    model_or_config: Any,
    masks: HeadMasks,
    *,
    seq_len: int,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    sink_size: int,
    recent_size: int,
) -> KVCacheBytes:
    """Bytes the runtime allocates for the KV cache (keys and values) at ``seq_len`` tokens.

    ``model_or_config``: a Hugging Face model, its config, or the ``ModelInfo`` an engine keeps.

    Retrieval heads hold ``seq_len`` tokens; streaming heads hold ``sink_size + recent_size`` tokens whatever the
    sequence length (a static buffer), so at short ``seq_len`` DuoAttention can take more than full attention.
    A sliding-window layer whose window is shorter than ``seq_len`` (``ModelInfo.window_layers``) holds its window
    for every head, whatever its row of the masks says, counted as streaming (and so in ``full_attention``).
    """
    shape = read_shape(model_or_config)
    num_layers, num_kv_heads, head_dim = shape.num_layers, shape.num_kv_heads, shape.head_dim

    if not isinstance(masks, HeadMasks):
        raise ValueError(f"masks must be HeadMasks, got {type(masks).__name__}")
    if not masks.is_binary:
        raise ValueError(f"{masks!r} is not binary: binarize first, the KV cache split needs 0/1 gates")
    masks.check_shape(num_layers, num_kv_heads)
    seq_len = check_int("seq_len", seq_len, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    sink_size = check_int("sink_size", sink_size, 0)
    recent_size = check_int("recent_size", recent_size, 1)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")

    per_token_head = 2 * batch_size * head_dim * dtype.itemsize  # keys and values
    windows = shape.window_layers(seq_len)
    full_layers = [layer for layer in range(num_layers) if layer not in windows]
    num_retrieval = int(masks.retrieval[full_layers].sum())
    num_streaming = len(full_layers) * num_kv_heads - num_retrieval
    window_slots = num_kv_heads * sum(shape.layer_windows[layer] for layer in windows)
    retrieval = per_token_head * num_retrieval * seq_len
    streaming = per_token_head * (num_streaming * (sink_size + recent_size) + window_slots)
    full_attention = per_token_head * (len(full_layers) * num_kv_heads * seq_len + window_slots)
    return KVCacheBytes(retrieval=retrieval, streaming=streaming, total=retrieval + streaming,
                        full_attention=full_attention)
