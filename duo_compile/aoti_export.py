"""AOTInductor backend: the rewritten graph compiled ahead of time into a PT2 archive of two native models.

* ``prefill``: ``forward(input_ids [B, T], position_ids [B, T], cache_position [T], *caches) -> logits [B, 1, V]``
  for chunks of 2 .. ``max_seq_len`` tokens; ``decode``: the same graph with T = 1 (its own program, so Inductor
  specialises the one-token step instead of running the chunk code with a symbolic length of 1).
  Batch is dynamic (1 .. ``MAX_BATCH``) in both.
* Caches are explicit inputs, mutated in place by the ``duo::*_cached`` ops, exactly as in the compiled engine:
  the ``Engine`` allocates them (``engine.allocate``), so the batch size stays dynamic, the KV bytes stay visible to
  ``kv_cache_bytes``, and AOTInductor passes the caller's tensors straight to the ops (no copy: checked in the
  generated wrapper). Buffers inside the package would fix the batch size at export time and hide the memory.
* The duo ops stay custom-op calls in the package (AOTInductor's proxy executor calls them through the
  dispatcher), so loading needs ``duo_compile`` imported for their registrations (``load`` checks them), but not
  the model code or weights: the weights are constants in the package.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from duo_compile.passes import CacheSpec

MAX_BATCH = 1024
PREFILL, DECODE = "prefill", "decode"


def _example_inputs(specs: Sequence[CacheSpec], max_seq_len: int, dtype, device, batch: int, length: int):
    ids = torch.zeros(batch, length, dtype=torch.int64, device=device)
    cache_position = torch.arange(length, device=device)
    position_ids = cache_position[None].expand(batch, length).contiguous()
    caches = [
        torch.zeros(batch, s.num_kv_heads, max_seq_len if s.slots is None else s.slots, s.head_dim, dtype=dtype,
                    device=device)
        for s in specs
    ]
    return (ids, position_ids, cache_position, *caches)


def export_programs(engine) -> dict[str, torch.export.ExportedProgram]:
    """torch.export the engine's graph twice: chunked prefill (dynamic T >= 2) and decode (T = 1)."""
    specs, max_len = engine.cache_specs, engine.config.max_seq_len
    if max_len < 2:
        raise ValueError(f"AOTI export needs max_seq_len >= 2, got {max_len}")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    length = torch.export.Dim("chunk", min=2, max=max_len)
    prefill_shapes = ({0: batch, 1: length}, {0: batch, 1: length}, {0: length}, *[{0: batch} for _ in specs])
    decode_shapes = ({0: batch}, {0: batch}, None, *[{0: batch} for _ in specs])
    programs = {}
    for name, chunk, shapes in ((PREFILL, min(3, max_len), prefill_shapes), (DECODE, 1, decode_shapes)):
        args = _example_inputs(specs, max_len, engine.dtype, engine.device, batch=2, length=chunk)
        with torch.no_grad():
            programs[name] = torch.export.export(engine.graph, args, dynamic_shapes=shapes)
    return programs


def compile_package(programs: dict[str, torch.export.ExportedProgram], path: str, extra_files: dict[str, str],
                    inductor_configs: dict | None = None) -> None:
    """AOTInductor-compile every program and write them, with ``extra_files``, as one PT2 archive at ``path``."""
    from torch.export.pt2_archive._package import package_pt2

    options = dict(inductor_configs or {})
    options["aot_inductor.package"] = True
    files = {
        name: torch._inductor.aot_compile(_module(program), *program.example_inputs, options=dict(options))
        for name, program in programs.items()
    }
    package_pt2(path, aoti_files=files, extra_files=extra_files)


def _module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """What ``aoti_compile_and_package`` compiles: the program's module without its input guards (the shape
    guards are compiled into the package instead)."""
    try:
        return program.module(check_guards=False)
    except TypeError:  # torch versions without the argument
        return program.module()


class AOTIRunner:
    """Runs a loaded AOTI engine with the ``Engine`` runner signature: T == 1 on ``decode``, else ``prefill``.

    Inputs are made contiguous int64 (the compiled code assumes the example inputs' dtype and dense strides; the
    engine passes ``position_ids`` as an expanded view); caches must be the engine's dense caches.
    """

    def __init__(self, path: str, graphs: dict, device: torch.device):
        from torch._inductor.package import load_package

        self.device = device
        self.max_batch = int(graphs.get("max_batch", MAX_BATCH))
        device_index = device.index if device.type == "cuda" and device.index is not None else -1
        with _quiet():
            self.models = {
                name: load_package(path, model_name=graphs["models"][name], device_index=device_index)
                for name in (PREFILL, DECODE)
            }

    def __call__(self, input_ids, position_ids, cache_position, *caches):
        batch, length = input_ids.shape
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds the exported engine's maximum batch {self.max_batch}")
        for cache in caches:
            if not cache.is_contiguous() or cache.shape[0] != batch:
                raise ValueError("caches must be the engine's dense caches for this batch (engine.allocate)")
        model = self.models[DECODE if length == 1 else PREFILL]
        return model(
            input_ids.to(torch.int64).contiguous(),
            position_ids.to(torch.int64).contiguous(),
            cache_position.to(torch.int64).contiguous(),
            *caches,
        )


@contextlib.contextmanager
def _quiet():
    """load_package logs a warning per model about a future default; keep loads silent."""
    import logging

    logger = logging.getLogger("torch._inductor")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
