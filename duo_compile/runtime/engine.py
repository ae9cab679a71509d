"""The runtime: owns the static KV cache and drives chunked prefill; ``generate`` runs ``generation.py``'s loop.

The rewritten graph is ``forward(input_ids [B, T], position_ids [B, T], cache_start [B], valid [B], *caches) ->
logits [B, 1, V]``: token t of row b sits at position ``cache_start[b] + t`` and is real for ``t < valid[b]`` (the
rest of the row is padding, never cached); the logits are each row's at its last real token. Every call appends
each row's real tokens to its caches. Padded batches (``generate(attention_mask=...)``): see padding.py. The
engine allocates the caches once per batch size (sized by ``max_seq_len`` for retrieval heads and ``sink +
recent`` for streaming heads), so nothing grows or is copied while decoding. An engine owns one cache, so its
entry points take one lock: calls from several threads run one after the other, never interleaved.

A paged engine (``EngineConfig.page_size``) holds each retrieval cache as one pool of pages, and its graph takes a
last input, ``block_table`` ``[B, max_pages]``: row b's pages in order (kernels/paged.py). ``allocate`` sizes the
pool (``num_pages``); ``step`` takes the table of the rows it runs, by default the engine's own, which gives row
b the pages ``b * max_pages ..`` (so ``generate`` runs as on any engine). The serving scheduler passes its own
tables instead (serve/scheduler.py). The Triton kernels read the table on the device, so a paged decode step is
replayed from a CUDA graph like any other (cuda_graphs.py: the table is one more static buffer).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from duo_compile.checks import check_int
from duo_compile.kernels.paged import check_table, pages_for
from duo_compile.runtime import padding
from duo_compile.runtime.cuda_graphs import GraphedDecode
from duo_compile.runtime.inductor_graph import InductorGraph
from duo_compile.masks import HeadMasks, KVCacheBytes, kv_cache_bytes
from duo_compile.models.hf import ModelInfo
from duo_compile.parallel import group as parallel_group
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
    # Paged retrieval caches: positions per page (kernels/paged.py), or None for one cache row per sequence.
    page_size: int | None = None

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
        if self.page_size is not None:
            object.__setattr__(self, "page_size", check_int("page_size", self.page_size, 1))


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


def _host_rows(name: str, value, batch: int) -> torch.Tensor:
    """A per-row int argument of ``step`` (tensor or list) as an int64 CPU tensor ``[batch]``."""
    rows = torch.as_tensor(value).reshape(-1)
    if rows.numel() != batch or rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(f"{name} needs one integer per row ({batch}), got {value!r}")
    return rows.to(device="cpu", dtype=torch.long)


def _last_real(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, vocab]``: each row's logits at its last real token. The graph gives them as ``[B, 1, V]`` (kv_layout
    gathers the last real token's hidden state); a graph that returns every position's (``[B, T, V]``) is
    gathered here."""
    if logits.shape[1] == 1:
        return logits[:, 0, :]
    index = (valid - 1).clamp(min=0).to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), index]



class Engine:
    """A compiled DuoAttention model: ``generate`` like Hugging Face's, on a static split cache.

    ``config`` holds the sizes the engine runs with; ``requested_config`` what ``compile`` was asked (they differ
    only where ``compile`` capped a streaming window larger than ``max_seq_len``: see ``compile``).

    Threads: an engine owns one KV cache, so ``generate``, ``prefill``, ``step``, ``allocate``, ``release`` and
    ``kv_cache_bytes`` take one (re-entrant) lock; calls from several threads wait for each other and never
    interleave, and each ``generate`` gives what it gives alone. The lock makes each call atomic, not a sequence
    of calls: ``prefill`` then ``step`` from one thread while another thread uses the engine still share its one
    cache. For parallel decoding use one engine per thread (they share nothing).
    """

    # Like a Hugging Face model's: generate's defaults (compile keeps the model's) and the tokenizer compile was
    # given; engine files carry both. None: transformers' global defaults, no tokenizer.
    generation_config = None
    tokenizer = None
    # Under tensor parallelism (compile's tensor_parallel_size > 1): this rank's share (parallel.group.TensorParallel).
    tensor_parallel = None

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
        self.backend = config.backend  # what runs the graph (an engine loaded from a file names its runtime)
        self.caches: list[torch.Tensor] = []
        self.batch_size: int | None = None
        self.cache_len: int | None = None
        self.num_pages: int | None = None  # paged engines: pages in each retrieval pool
        self.block_table: torch.Tensor | None = None  # paged engines: the default table (one run of pages per row)
        # On CUDA, decode steps (one token) replay a captured graph, one per batch size: see cuda_graphs.py.
        self.cuda_graphs = cuda_graphs
        self._graphed: dict[int, GraphedDecode] = {}
        self._graph_pool = None  # the graphs' shared memory pool (they never run at the same time)
        if runner is not None:
            self._run = runner
        elif config.backend == "inductor":
            # Inductor on the graph as it is, no Dynamo retrace; one compiled graph for every prefill chunk length
            # (decode, T == 1, gets its own): inductor_graph.py.
            self._run = InductorGraph(graph)
        else:
            self._run = graph

    # ----------------------------------------------------------------------------------------------- cache
    @property
    def paged(self) -> bool:
        return self.config.page_size is not None

    def pages_per_row(self, length: int) -> int:
        """Pages a row of ``length`` positions needs (paged engines)."""
        return pages_for(length, self.config.page_size)

    def page_bytes(self) -> int:
        """Bytes of one page of every retrieval pool (keys and values; paged engines)."""
        return self.dtype.itemsize * self.config.page_size * sum(
            spec.num_kv_heads * spec.head_dim for spec in self.cache_specs if spec.slots is None
        )

    def streaming_row_bytes(self) -> int:
        """Bytes of one row (one sequence) of every streaming cache: the same for every sequence."""
        return self.dtype.itemsize * sum(
            spec.num_kv_heads * spec.slots * spec.head_dim for spec in self.cache_specs if spec.slots is not None
        )

    def planned_cache_bytes(self, batch_size: int, max_seq_len: int, num_pages: int | None = None) -> int:
        """Bytes ``allocate(batch_size, max_seq_len, num_pages)`` allocates (keys and values of every cache)."""
        if self.paged:
            pages = batch_size * self.pages_per_row(max_seq_len) if num_pages is None else num_pages
            return batch_size * self.streaming_row_bytes() + pages * self.page_bytes()
        return self.dtype.itemsize * batch_size * sum(
            spec.num_kv_heads * (max_seq_len if spec.slots is None else spec.slots) * spec.head_dim
            for spec in self.cache_specs
        )

    def allocate(self, batch_size: int, max_seq_len: int | None = None, num_pages: int | None = None) -> None:
        """Allocate the static caches for ``batch_size`` (once; again only if the batch size or length changes).

        ``max_seq_len`` (default: the engine's) may be smaller than the engine's, e.g. to measure memory at a
        given context. Zero-filled so that slots never written hold finite values (masked keys still enter
        ``p @ V``). Caches larger than the device's free memory (counting the old caches, freed first) are
        refused before anything is freed, with ``torch.OutOfMemoryError`` (a RuntimeError) naming both sizes.
        Holds the engine's lock.

        Paged engines: ``num_pages`` pages in each retrieval pool (default: enough for every row's
        ``max_seq_len``, which also sets the default block table ``self.block_table``; with fewer pages there is
        none and ``step`` needs a table). Streaming caches have ``batch_size`` rows.
        """
        with self._lock:
            batch_size = check_int("batch_size", batch_size, 1)
            length = check_int("max_seq_len", self.config.max_seq_len if max_seq_len is None else max_seq_len, 1)
            if length > self.config.max_seq_len:
                raise ValueError(f"max_seq_len {length} exceeds the engine's max_seq_len={self.config.max_seq_len}")
            if num_pages is not None:
                if not self.paged:
                    raise ValueError(f"num_pages={num_pages!r} needs a paged engine (compile with page_size)")
                num_pages = check_int("num_pages", num_pages, 1)
            elif self.paged:
                num_pages = batch_size * self.pages_per_row(length)
            if (self.batch_size, self.cache_len, self.num_pages) == (batch_size, length, num_pages):
                return
            self._check_fits(batch_size, length, num_pages)
            self._allocate(batch_size, length, num_pages)

    def _check_fits(self, batch_size: int, length: int, num_pages: int | None = None) -> None:
        planned = self.planned_cache_bytes(batch_size, length, num_pages)
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

    def _allocate(self, batch_size: int, length: int, num_pages: int | None = None) -> None:
        self._drop_caches()  # free the old caches (and graphs) first
        shapes = {
            spec.name: (batch_size, spec.num_kv_heads, spec.slots, spec.head_dim) if spec.slots is not None
            else (batch_size, spec.num_kv_heads, length, spec.head_dim) if num_pages is None
            else (num_pages, spec.num_kv_heads, self.config.page_size, spec.head_dim)
            for spec in self.cache_specs
        }
        self.caches = [torch.zeros(shapes[spec.name], dtype=self.dtype, device=self.device)
                       for spec in self.cache_specs]
        self.batch_size, self.cache_len, self.num_pages = batch_size, length, num_pages
        if num_pages is not None and num_pages >= batch_size * self.pages_per_row(length):
            self.block_table = torch.arange(batch_size * self.pages_per_row(length), dtype=torch.int32,
                                            device=self.device).view(batch_size, -1)

    def release(self) -> None:
        """Free the caches (and the decode graphs that use them); the next generate allocates again. Holds the
        engine's lock."""
        with self._lock:
            self._drop_caches()
            self.batch_size = self.cache_len = self.num_pages = None

    def _drop_caches(self) -> None:
        """Drop the caches, the decode graphs that read them and the graphs' memory pool. The pool goes with the
        graphs: once its last graph is freed CUDA's allocator forgets the pool, and capturing into its handle again
        fails an internal assertion, so the next graphs get a pool of their own."""
        self.caches, self._graphed, self.block_table, self._graph_pool = [], {}, None, None

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
    def step(self, input_ids: torch.Tensor, start, valid: torch.Tensor | None = None,
             rows: slice | None = None, block_table: torch.Tensor | None = None) -> torch.Tensor:
        """Run tokens through the graph, appending them to the caches: row b's tokens sit at positions
        ``start[b] .. start[b] + T - 1`` (``start`` an int for every row, or int64 ``[B]``), of which the first
        ``valid[b]`` are real (default: all T); the rest are padding, neither cached nor used.

        ``rows`` (a slice of the allocated batch, step 1): run only those cache rows, ``input_ids`` having one row
        each; the other rows are neither read nor written. A server prefills one request's chunk this way without
        running the padding of every other row through the model (serve/scheduler.py).

        ``block_table`` (paged engines): int ``[B, max_pages]``, the pages of each row run (of the rows selected by
        ``rows``); default: the engine's own table (``allocate``). With ``rows``, only the streaming caches are
        sliced: the retrieval pools are shared, and the table says where each row's positions are.

        Returns each row's logits at its last real token, ``[B, vocab]`` (a row with no real token: don't-care). The
        caches of row b must hold its positions ``< start[b]``. Holds the engine's lock.
        """
        with self._lock:
            return self._step(input_ids, start, valid, rows, block_table)

    def _table(self, block_table: torch.Tensor | None, rows: slice | None, batch: int) -> tuple[torch.Tensor, ...]:
        """The graph's trailing inputs: ``(block_table,)`` for a paged engine, else ``()``."""
        if not self.paged:
            return ()
        if block_table is None:
            if self.block_table is None:
                raise ValueError(f"this engine's pools hold {self.num_pages} pages, fewer than every row's "
                                 f"max_seq_len: step needs a block_table")
            block_table = self.block_table if rows is None else self.block_table[rows]
        check_table(block_table, batch)
        return (block_table.to(self.device),)

    @torch.no_grad()
    def _step(self, input_ids: torch.Tensor, start, valid: torch.Tensor | None = None,
              rows: slice | None = None, block_table: torch.Tensor | None = None) -> torch.Tensor:
        if block_table is not None and not self.paged:
            raise ValueError("block_table needs a paged engine (compile with page_size)")
        batch, length = input_ids.shape
        caches, first_row = self.caches, 0
        if rows is not None:
            if self.batch_size is None or not isinstance(rows, slice) or rows.step not in (None, 1):
                raise ValueError(f"rows must be a slice (step 1) of the allocated batch, got {rows!r}")
            first_row, stop, _ = rows.indices(self.batch_size)
            if stop - first_row != batch:
                raise ValueError(f"rows {rows!r} select {max(stop - first_row, 0)} cache rows, got input batch {batch}")
            # Views: the step writes into the caches. Paged retrieval pools are shared by all rows: not sliced.
            caches = [cache if self.paged and spec.slots is None else cache[first_row:stop]
                      for spec, cache in zip(self.cache_specs, self.caches)]
        elif self.batch_size != batch:
            raise RuntimeError(f"caches are allocated for batch {self.batch_size}, got input batch {batch}")
        table = self._table(block_table, rows, batch)
        # Per-row positions are checked on the host: pass them as CPU tensors (or lists) to keep a decode step
        # free of a device sync; a device tensor is copied to the host for the check.
        if isinstance(start, (torch.Tensor, list, tuple)):
            cache_start = _host_rows("start", start, batch)
            first, last = int(cache_start.min()), int(cache_start.max())
            if first < 0:  # a negative start would write into the ring's last slots
                raise ValueError(f"start must be >= 0 in every row, got {cache_start.tolist()}")
        else:
            first = last = check_int("start", start, 0)  # a negative start would write into the ring's last slots
            cache_start = None
        if valid is None:
            end = last + length
        else:
            valid = _host_rows("valid", valid, batch)
            if bool(((valid < 0) | (valid > length)).any()):
                raise ValueError(f"valid must hold one count in 0..{length} per row, got {valid.tolist()}")
            end = int(((first if cache_start is None else cache_start) + valid).max())
        if end > self.cache_len:
            raise ValueError(
                f"positions {last}..{end - 1} exceed the allocated cache length {self.cache_len}"
            )
        if length == 1 and (rows is None or first_row == 0) and self.cuda_graphs and self.device.type == "cuda":
            return self._graphed_decode(batch, caches)(input_ids, first if cache_start is None else cache_start,
                                                       valid, *table)[:, -1, :]
        if cache_start is None:
            cache_start = torch.full((batch,), first, dtype=torch.long, device=self.device)
        else:
            cache_start = cache_start.to(self.device)
        valid = (torch.full((batch,), length, dtype=torch.long, device=self.device) if valid is None
                 else valid.to(self.device))
        position_ids = cache_start[:, None] + torch.arange(length, device=self.device)
        # Dense strides: a prefill chunk is a view of the prompt (``contiguous`` keeps a view of one row as it is);
        # one input layout means one compiled graph (the one an engine package precompiled) whether or not the
        # prompt is cut into chunks.
        input_ids = input_ids.clone(memory_format=torch.contiguous_format)
        logits = self._run(input_ids, position_ids, cache_start, valid, *caches, *table)
        return _last_real(logits, valid)

    def _graphed_decode(self, batch: int, caches: list[torch.Tensor]) -> GraphedDecode:
        """The decode graph of the first ``batch`` cache rows (``caches``: their views), captured at its first step.
        A server decodes its running rows in a few batch sizes (serve/scheduler.py): one graph each, in one memory
        pool."""
        if batch not in self._graphed:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            pages = self.pages_per_row(self.cache_len) if self.paged else None
            self._graphed[batch] = GraphedDecode(self._run, caches, self.cache_specs, batch, self.device, pages,
                                                 pool=self._graph_pool)
        return self._graphed[batch]

    def move_row(self, source: int, target: int, positions: int) -> None:
        """Copy cache row ``source`` to row ``target``: every streaming cache's row, and without paging the first
        ``positions`` positions of every retrieval cache's row (a paged row's positions stay in its pages). A
        server moves a request this way to keep its running rows first (serve/scheduler.py). Holds the engine's
        lock."""
        with self._lock:
            if self.batch_size is None:
                raise RuntimeError("no cache allocated yet: call allocate(batch_size) first")
            for name, row in (("source", source), ("target", target)):
                check_int(name, row, 0)
                if row >= self.batch_size:
                    raise ValueError(f"{name} row {row} is outside the allocated batch of {self.batch_size}")
            positions = check_int("positions", positions, 0)
            for spec, cache in zip(self.cache_specs, self.caches):
                if spec.slots is not None:
                    cache[target].copy_(cache[source])
                elif not self.paged:
                    cache[target, :, :positions].copy_(cache[source, :, :positions])

    def prefill(self, input_ids: torch.Tensor, chunk_size: int | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Process a prompt from position 0 in chunks of ``chunk_size`` tokens; returns the last logits. Holds the
        engine's lock (all chunks in one go).

        ``lengths`` (int64 ``[B]``): a right-padded batch, row b's real tokens are its first ``lengths[b]`` (the
        rest padding, never cached); the logits returned are each row's at its own last real token."""
        with self._lock:
            return self._prefill(input_ids, chunk_size, lengths)

    def _prefill(self, input_ids: torch.Tensor, chunk_size: int | None,
                 lengths: torch.Tensor | None = None) -> torch.Tensor:
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
        last = padding.LastLogits()
        for begin in range(0, input_ids.shape[1], chunk):
            ids = input_ids[:, begin : begin + chunk]
            if lengths is None:
                last.update(self._step(ids, begin), None)
            else:
                valid = padding.chunk_valid(lengths, begin, ids.shape[1])
                last.update(self._step(ids, begin, valid), valid)
        return last.logits

    # -------------------------------------------------------------------------------------------- generate
    def generate(
        self,
        input_ids: torch.Tensor,
        generation_config=None,
        *,
        logits_processor=None,
        stopping_criteria=None,
        streamer=None,
        generator: torch.Generator | None = None,
        tokenizer=None,
        attention_mask: torch.Tensor | None = None,
        prefill_chunk_size: int | None = None,
        **kwargs,
    ):
        """Hugging Face's ``model.generate`` on this engine (greedy or sampling); returns prompt + new ids, or a
        ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``.

        Takes what ``model.generate`` takes for decoder-only greedy search and sampling: ``generation_config`` (over
        ``self.generation_config``, the model's), its fields as keywords (``max_new_tokens``, ``max_length``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
        ``no_repeat_ngram_size``, ``eos_token_id``, ``pad_token_id``, ``stop_strings``, ``output_scores``,
        ``output_logits``, ``return_dict_in_generate``, ...), ``logits_processor``, ``stopping_criteria``,
        ``streamer``, ``tokenizer`` (for ``stop_strings``; default ``self.tokenizer``) and ``attention_mask``. Also
        ``generator`` (a ``torch.Generator`` for sampling; default the global RNG, as Hugging Face) and
        ``prefill_chunk_size`` (overrides the engine's). Anything it cannot honour is a ValueError naming it, raised
        before any work. The loop is in ``runtime/generation.py``.

        ``attention_mask`` may pad the batch on the left (Hugging Face's ``padding_side="left"``) or on the right:
        every row then runs as if alone (its real tokens from position 0) and the result keeps Hugging Face's layout,
        the input rows as given, then the new tokens (padding.py).

        Holds the engine's lock from the argument checks to the last token: concurrent calls (from other threads)
        of any entry point wait, and each call gives exactly what it gives alone.

        Tensor parallel (``self.tensor_parallel``): every rank calls ``generate`` with the same arguments; it runs
        on rank 0's ``input_ids`` and ``attention_mask`` (other ranks may pass anything, e.g. None) and each token
        is rank 0's (sampled with rank 0's generator or RNG), so every rank returns the same tokens.
        """
        from duo_compile.runtime import generation

        with self._lock:
            if self.tensor_parallel is not None:
                input_ids, attention_mask = parallel_group.from_rank0(input_ids, attention_mask, device=self.device)
            request = generation.plan(
                self, input_ids, generation_config, logits_processor, stopping_criteria, streamer, generator,
                tokenizer, attention_mask, prefill_chunk_size, **kwargs,
            )
            if self.tensor_parallel is not None:  # ranks that would run different steps would wait forever
                parallel_group.check_same(generate=repr((request.new_tokens, request.chunk, request.check_stop,
                                                         request.config.do_sample, tuple(request.input_ids.shape))))
            return generation.decode(self, request)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Engine({self.info.family}, {self.info.num_layers} layers, retrieval ratio "
            f"{self.masks.retrieval_ratio:.3f}, sink={c.sink_size}, recent={c.recent_size}, "
            f"max_seq_len={c.max_seq_len}, mode={c.streaming_mode}, backend={self.backend}"
            f"{'' if c.page_size is None else f', page_size={c.page_size}'})"
        )
