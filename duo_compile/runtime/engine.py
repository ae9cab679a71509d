"""The runtime: owns the static KV cache and drives chunked prefill and the greedy decode loop.

The rewritten graph is ``forward(input_ids, position_ids, cache_position, *caches) -> last logits``; every
call appends its tokens to the caches. The engine allocates the caches once per batch size (sized by
``max_seq_len`` for retrieval heads and ``sink + recent`` for streaming heads), so nothing grows or is copied
while decoding. An engine owns one cache, so its entry points take one lock: calls from several threads run one
after the other, never interleaved.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from duo_compile.checks import check_int
from duo_compile.runtime.cuda_graphs import GraphedDecode
from duo_compile.masks import HeadMasks, KVCacheBytes, kv_cache_bytes
from duo_compile.models.hf import ModelInfo
from duo_compile.passes import CacheSpec

BACKENDS = ("inductor", "eager")
STREAMING_MODES = ("window", "chunk")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that fixes an engine's semantics and memory, checked once at compile time."""

    sink_size: int
    recent_size: int
    max_seq_len: int
    prefill_chunk_size: int | None = None
    streaming_mode: str = "window"
    backend: str = "inductor"

    def __post_init__(self) -> None:
        # Stored back as Python ints (a numpy integer is accepted), so the config serialises as JSON.
        object.__setattr__(self, "sink_size", check_int("sink_size", self.sink_size, 0))
        object.__setattr__(self, "recent_size", check_int("recent_size", self.recent_size, 1))
        object.__setattr__(self, "max_seq_len", check_int("max_seq_len", self.max_seq_len, 1))
        if self.prefill_chunk_size is not None:
            object.__setattr__(
                self, "prefill_chunk_size", check_int("prefill_chunk_size", self.prefill_chunk_size, 1)
            )
        if self.streaming_mode not in STREAMING_MODES:
            raise ValueError(f"streaming_mode must be one of {STREAMING_MODES}, got {self.streaming_mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


def _available_ram() -> int | None:
    """Bytes of RAM available to this process: /proc/meminfo's MemAvailable (else sysconf's available pages),
    lowered to what a cgroup memory limit leaves (containers); None when nothing can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, OSError, ValueError):
            pass
    cgroups = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2, then v1
               ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))
    for limit, usage in cgroups:
        try:
            with open(limit) as f_limit, open(usage) as f_usage:
                found.append(int(f_limit.read().strip()) - int(f_usage.read().strip()))
        except (OSError, ValueError):  # no cgroup file, or no limit ("max")
            pass
    return max(0, min(found)) if found else None


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can take on ``device``: on CUDA the driver's free memory plus what torch's caching
    allocator holds unused; on the CPU the available RAM; None for other devices (no check is made)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return _available_ram()
    return None


def _token_ids(name: str, value) -> tuple[int, ...]:
    """eos/pad ids as Hugging Face takes them: None, one int, or a list of ints."""
    if value is None:
        return ()
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if not isinstance(values, Sequence) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
    return tuple(values)


class Engine:
    """A compiled DuoAttention model: ``generate`` like Hugging Face's greedy search, on a static split cache.

    ``config`` holds the sizes the engine runs with; ``requested_config`` what ``compile`` was asked (they differ
    only where ``compile`` capped a streaming window larger than ``max_seq_len``: see ``compile``).

    Threads: an engine owns one KV cache, so ``generate``, ``prefill``, ``step``, ``allocate``, ``release`` and
    ``kv_cache_bytes`` take one (re-entrant) lock; calls from several threads wait for each other and never
    interleave, and each ``generate`` gives what it gives alone. The lock makes each call atomic, not a sequence
    of calls: ``prefill`` then ``step`` from one thread while another thread uses the engine still share its one
    cache. For parallel decoding use one engine per thread (they share nothing).
    """

    def __init__(
        self,
        graph: fx.GraphModule,
        cache_specs: Sequence[CacheSpec],
        config: EngineConfig,
        info: ModelInfo,
        masks: HeadMasks,
        device: torch.device,
        dtype: torch.dtype,
        pass_counts: dict[str, int] | None = None,
        runner: Callable[..., torch.Tensor] | None = None,
        cuda_graphs: bool = True,
        requested_config: EngineConfig | None = None,
    ):
        """``runner`` replaces the backend's compiled graph (e.g. an engine loaded from a file); same signature.
        ``requested_config``: the sizes the user asked, where ``config`` caps them (default: ``config``)."""
        self._lock = threading.RLock()
        self.graph = graph
        self.cache_specs = list(cache_specs)
        self.config = config
        self.requested_config = config if requested_config is None else requested_config
        self.info = info
        self.masks = masks
        self.device = torch.device(device)
        self.dtype = dtype
        self.pass_counts = dict(pass_counts or {})
        self.caches: list[torch.Tensor] = []
        self.batch_size: int | None = None
        self.cache_len: int | None = None
        # On CUDA, decode steps (one token) replay a captured graph: see cuda_graphs.py.
        self.cuda_graphs = cuda_graphs
        self._graphed: GraphedDecode | None = None
        if runner is not None:
            self._run = runner
        elif config.backend == "inductor":
            # dynamic=True: one graph for every prefill chunk length (decode, T == 1, gets its own).
            self._run = torch.compile(graph, backend="inductor", dynamic=True)
        else:
            self._run = graph

    # ----------------------------------------------------------------------------------------------- cache
    def planned_cache_bytes(self, batch_size: int, max_seq_len: int) -> int:
        """Bytes ``allocate(batch_size, max_seq_len)`` allocates (keys and values of every cache)."""
        return self.dtype.itemsize * batch_size * sum(
            spec.num_kv_heads * (max_seq_len if spec.slots is None else spec.slots) * spec.head_dim
            for spec in self.cache_specs
        )

    def allocate(self, batch_size: int, max_seq_len: int | None = None) -> None:
        """Allocate the static caches for ``batch_size`` (once; again only if the batch size or length changes).

        ``max_seq_len`` (default: the engine's) may be smaller than the engine's, e.g. to measure memory at a
        given context. Zero-filled so that slots never written hold finite values (masked keys still enter
        ``p @ V``). Caches larger than the device's free memory (counting the old caches, freed first) are
        refused before anything is freed, with ``torch.OutOfMemoryError`` (a RuntimeError) naming both sizes.
        Holds the engine's lock.
        """
        with self._lock:
            batch_size = check_int("batch_size", batch_size, 1)
            length = check_int("max_seq_len", self.config.max_seq_len if max_seq_len is None else max_seq_len, 1)
            if length > self.config.max_seq_len:
                raise ValueError(f"max_seq_len {length} exceeds the engine's max_seq_len={self.config.max_seq_len}")
            if (self.batch_size, self.cache_len) == (batch_size, length):
                return
            self._check_fits(batch_size, length)
            self._allocate(batch_size, length)

    def _check_fits(self, batch_size: int, length: int) -> None:
        planned = self.planned_cache_bytes(batch_size, length)
        free = free_memory_bytes(self.device)
        if free is None:
            return
        free += sum(c.numel() * c.element_size() for c in self.caches)  # freed before the new ones are allocated
        if planned > free:
            raise torch.OutOfMemoryError(
                f"allocate(batch_size={batch_size}, max_seq_len={length}) needs {planned} bytes of KV cache "
                f"({planned / 2**30:.2f} GiB), more than the {free} bytes free on {self.device} "
                f"({free / 2**30:.2f} GiB)"
            )

    def _allocate(self, batch_size: int, length: int) -> None:
        self.caches, self._graphed = [], None  # free the old caches (and the graph using them) first
        self.caches = [
            torch.zeros(
                batch_size,
                spec.num_kv_heads,
                length if spec.slots is None else spec.slots,
                spec.head_dim,
                dtype=self.dtype,
                device=self.device,
            )
            for spec in self.cache_specs
        ]
        self.batch_size, self.cache_len = batch_size, length

    def release(self) -> None:
        """Free the caches (and the decode graph that uses them); the next generate allocates again. Holds the
        engine's lock."""
        with self._lock:
            self.caches, self._graphed = [], None
            self.batch_size = self.cache_len = None

    def kv_cache_bytes(self) -> KVCacheBytes:
        """KV bytes actually allocated (retrieval and streaming), beside what full attention would need. Holds the
        engine's lock."""
        with self._lock:
            return self._kv_cache_bytes()

    def _kv_cache_bytes(self) -> KVCacheBytes:
        if self.batch_size is None:
            raise RuntimeError("no cache allocated yet: call generate() or allocate(batch_size) first")
        sizes = {"retrieval": 0, "streaming": 0}
        for spec, cache in zip(self.cache_specs, self.caches):
            sizes[spec.kind] += cache.numel() * cache.element_size()
        full = kv_cache_bytes(
            self.info,
            self.masks,
            seq_len=self.cache_len,
            batch_size=self.batch_size,
            dtype=self.dtype,
            sink_size=self.config.sink_size,
            recent_size=self.config.recent_size,
        ).full_attention
        return KVCacheBytes(sizes["retrieval"], sizes["streaming"], sizes["retrieval"] + sizes["streaming"], full)

    # ----------------------------------------------------------------------------------------------- steps
    def step(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run tokens at positions ``start .. start + T - 1`` through the graph, appending them to the caches.

        Returns the logits of the last position, ``[B, vocab]``. The caches must hold positions ``< start``.
        Holds the engine's lock.
        """
        with self._lock:
            return self._step(input_ids, start)

    @torch.no_grad()
    def _step(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        start = check_int("start", start, 0)  # a negative start would write into the ring's last slots
        batch, length = input_ids.shape
        if self.batch_size != batch:
            raise RuntimeError(f"caches are allocated for batch {self.batch_size}, got input batch {batch}")
        if start + length > self.cache_len:
            raise ValueError(
                f"positions {start}..{start + length - 1} exceed the allocated cache length {self.cache_len}"
            )
        if length == 1 and self.cuda_graphs and self.device.type == "cuda":
            if self._graphed is None:
                self._graphed = GraphedDecode(self._run, self.caches, self.cache_specs, batch, self.device)
            return self._graphed(input_ids, start)[:, -1, :]
        cache_position = torch.arange(start, start + length, device=self.device)
        position_ids = cache_position.unsqueeze(0).expand(batch, length)
        logits = self._run(input_ids, position_ids, cache_position, *self.caches)
        return logits[:, -1, :]

    def prefill(self, input_ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Process a prompt from position 0 in chunks of ``chunk_size`` tokens; returns the last logits. Holds the
        engine's lock (all chunks in one go)."""
        with self._lock:
            return self._prefill(input_ids, chunk_size)

    def _prefill(self, input_ids: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        if chunk_size is not None:
            chunk_size = check_int("chunk_size", chunk_size, 1)
        # Checked before the first chunk is written: a prompt past max_seq_len would otherwise fill the caches
        # chunk by chunk and fail only at the chunk that no longer fits.
        limit = self.cache_len or self.config.max_seq_len
        if input_ids.dim() != 2 or not 1 <= input_ids.shape[1] <= limit:
            raise ValueError(
                f"prefill needs input_ids [batch, 1..{limit}] (the cache length), got shape {tuple(input_ids.shape)}"
            )
        chunk = chunk_size or input_ids.shape[1]
        for begin in range(0, input_ids.shape[1], chunk):
            logits = self._step(input_ids[:, begin : begin + chunk], begin)
        return logits

    # -------------------------------------------------------------------------------------------- generate
    def _check_generate_inputs(self, input_ids, max_new_tokens, attention_mask, chunk) -> tuple[int, int | None]:
        """Raise ValueError for any bad argument; return ``max_new_tokens`` and ``chunk`` as Python ints."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a 2-D tensor [batch, length], got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the engine runs on {self.device}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.info.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids contain token id {bad}, outside the vocabulary [0, {self.info.vocab_size})")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
        total = input_ids.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )
        if chunk is not None:
            chunk = check_int("prefill_chunk_size", chunk, 1)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
                raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {shape}")
            if not bool((attention_mask == 1).all()):
                raise ValueError(
                    "attention_mask has zeros (a padded batch); duo_compile supports batches of equal-length "
                    "prompts only: run unequal prompts as separate calls"
                )
        return max_new_tokens, chunk

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        output_scores: bool = False,
        return_dict_in_generate: bool = False,
        attention_mask: torch.Tensor | None = None,
        prefill_chunk_size: int | None = None,
    ):
        """Greedy generation with Hugging Face's meaning of the arguments; returns prompt + new ids.

        Rows that produced ``eos_token_id`` continue with ``pad_token_id`` (the eos id if none is given) and
        generation stops once every row has finished. ``prefill_chunk_size`` overrides the engine's.

        Holds the engine's lock from the argument checks to the last token: concurrent calls (from other threads)
        of any entry point wait, and each call gives exactly what it gives alone.
        """
        with self._lock:
            return self._generate(input_ids, max_new_tokens, eos_token_id, pad_token_id, output_scores,
                                  return_dict_in_generate, attention_mask, prefill_chunk_size)

    def _generate(self, input_ids, max_new_tokens, eos_token_id, pad_token_id, output_scores,
                  return_dict_in_generate, attention_mask, prefill_chunk_size):
        chunk = prefill_chunk_size if prefill_chunk_size is not None else self.config.prefill_chunk_size
        max_new_tokens, chunk = self._check_generate_inputs(input_ids, max_new_tokens, attention_mask, chunk)
        eos = _token_ids("eos_token_id", eos_token_id)
        pad = _token_ids("pad_token_id", pad_token_id)
        if len(pad) > 1:
            raise ValueError(f"pad_token_id must be a single int, got {pad_token_id!r}")
        pad_id = pad[0] if pad else (eos[0] if eos else None)
        if eos and not 0 <= pad_id < self.info.vocab_size:  # finished rows feed pad_id back into the model
            raise ValueError(
                f"pad_token_id {pad_id}{'' if pad else ' (defaulted to eos_token_id[0])'} is outside the "
                f"vocabulary [0, {self.info.vocab_size})"
            )

        sequences, scores = input_ids, []
        if max_new_tokens > 0:
            self.allocate(input_ids.shape[0])
            logits = self.prefill(input_ids, chunk)
            unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=self.device)
            eos_ids = torch.tensor(eos, device=self.device, dtype=input_ids.dtype) if eos else None
            for i in range(max_new_tokens):
                logits = logits.float()
                if output_scores:
                    scores.append(logits)
                next_tokens = logits.argmax(dim=-1).to(input_ids.dtype)
                if eos_ids is not None:
                    next_tokens = torch.where(unfinished, next_tokens, pad_id)
                    unfinished &= ~torch.isin(next_tokens, eos_ids)
                sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
                if (eos_ids is not None and not bool(unfinished.any())) or i == max_new_tokens - 1:
                    break
                logits = self.step(next_tokens[:, None], sequences.shape[1] - 1)
        if not return_dict_in_generate:
            return sequences
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(scores) if output_scores else None)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Engine({self.info.family}, {self.info.num_layers} layers, retrieval ratio "
            f"{self.masks.retrieval_ratio:.3f}, sink={c.sink_size}, recent={c.recent_size}, "
            f"max_seq_len={c.max_seq_len}, mode={c.streaming_mode}, backend={c.backend})"
        )
