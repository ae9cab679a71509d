"""Decode steps replayed from a captured CUDA graph.

A decode step of a 7B model is a few hundred small kernels; launched one by one from Python their overhead is of
the same order as the step itself. The duo kernels read each row's position (and whether its token is real) from
device memory, so one captured graph serves every position, and rows at different positions: each step only
copies the new tokens, the rows' positions and their real-token counts into static buffers (and, for a paged
engine, its block table: the kernels read it on the device too). An engine keeps one graph per batch size it
decodes (a server's running rows come in a few bucket sizes), all in one memory pool: they never run at once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from duo_compile.passes import CacheSpec


class GraphedDecode:
    """Capture ``run(input_ids [B,1], position_ids [B,1], cache_start [B], valid [B], *caches[, block_table])``
    once, then replay it per step. ``table_pages``: a paged engine's block-table width (its rows' most pages;
    narrower tables are padded with page 0, which no row reads past its own positions), else None. ``pool``: the
    memory pool to capture into (``torch.cuda.graph_pool_handle()``, shared with the engine's other decode graphs),
    or None for a pool of its own."""

    def __init__(self, run: Callable[..., torch.Tensor], caches: Sequence[torch.Tensor],
                 specs: Sequence[CacheSpec], batch_size: int, device: torch.device, table_pages: int | None = None,
                 pool=None):
        self.run, self.caches, self.specs, self.pool = run, list(caches), list(specs), pool
        self.block_table = (None if table_pages is None else
                            torch.zeros(batch_size, table_pages, dtype=torch.int32, device=device))
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.cache_start = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.valid = torch.ones(batch_size, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _load(self, input_ids: torch.Tensor, start, valid: torch.Tensor | None, block_table=None) -> None:
        """``start``: one int for every row, or int64 ``[B]``; ``valid``: int64 ``[B]`` of 0/1 (default all 1);
        ``block_table``: a paged engine's ``[B, <= table_pages]``."""
        self.input_ids.copy_(input_ids)
        if self.block_table is not None:
            self.block_table.zero_()
            self.block_table[:, : block_table.shape[1]].copy_(block_table)
        if isinstance(start, torch.Tensor):
            self.cache_start.copy_(start)
        else:
            self.cache_start.fill_(start)
        self.position_ids.copy_(self.cache_start[:, None])
        if valid is None:
            self.valid.fill_(1)
        else:
            self.valid.copy_(valid)

    def _capture(self) -> None:
        """Warm up on a side stream (kernel compilation, library handles), then capture.

        The warm-up really runs the step, writing this position into the caches. For retrieval caches the real
        replay writes the same values again; the streaming ring is restored from a snapshot (it is small),
        because in chunk mode the step must still read the slot its own write replaces.
        """
        snapshot = [(c, c.clone()) for c, s in zip(self.caches, self.specs) if s.kind == "streaming"]
        table = () if self.block_table is None else (self.block_table,)
        args = (self.input_ids, self.position_ids, self.cache_start, self.valid, *self.caches, *table)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.run(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.logits = self.run(*args)
        for cache, saved in snapshot:
            cache.copy_(saved)

    def __call__(self, input_ids: torch.Tensor, start, valid: torch.Tensor | None = None,
                 block_table: torch.Tensor | None = None) -> torch.Tensor:
        self._load(input_ids, start, valid, block_table)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits.clone()  # the static buffer is overwritten by the next replay
