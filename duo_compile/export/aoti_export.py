"""AOTInductor backend: the rewritten graph compiled ahead of time into a PT2 archive of one or two native models.

* ``prefill``: ``forward(input_ids [B, T], position_ids [B, T], cache_start [B], valid [B], *caches) -> logits
  [B, 1, V]`` (each row's at its last real token; the rows' positions and padding as in runtime/engine.py)
  for chunks of 1 .. ``max_seq_len`` tokens, so it also runs decode steps. With ``separate_decode=True`` it takes
  chunks of 2 .. ``max_seq_len`` and a second model, ``decode``, is the same graph compiled for T = 1 (Inductor
  specialises the one-token step instead of running the chunk code with a symbolic length). That doubles the
  compile time (6-30 s per model on CPU) and was not needed for correctness on CPU: whether it pays on GPU is for
  the benchmarks to say. Batch is dynamic (1 .. ``MAX_BATCH``) in both.
* Caches are explicit inputs, mutated in place by the ``duo::*_cached`` ops, exactly as in the compiled engine:
  the ``Engine`` allocates them (``engine.allocate``), so the batch size stays dynamic, the KV bytes stay visible to
  ``kv_cache_bytes``, and AOTInductor passes the caller's tensors straight to the ops (no copy: checked in the
  generated wrapper). Buffers inside the package would fix the batch size at export time and hide the memory.
* The duo ops stay custom-op calls in the package (AOTInductor's proxy executor calls them through the
  dispatcher), so loading needs ``duo_compile`` imported for their registrations (``load`` checks them), but not
  the model code or weights: the weights are constants in the package.
* Writing: ``compile_files`` runs AOTInductor in this process (its files go to Inductor's cache folder), then
  ``write_package`` zips them into the PT2 archive in a child process. torch's archive writer is native code that
  throws a C++ exception from a destructor when a write fails (full disk, file size limit), which terminates the
  whole process (``terminate called after throwing an instance of 'c10::Error'``, even inside a ``try``); in a
  child, that becomes an ``OSError`` here. ``export`` also checks the free space before compiling (the package
  holds at least the weights) and again before packaging (the compiled files' sizes are then known).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch

from duo_compile.export.engine_file import example_inputs

MAX_BATCH = 1024
PREFILL, DECODE = "prefill", "decode"


def export_programs(engine, separate_decode: bool = False) -> dict[str, torch.export.ExportedProgram]:
    """torch.export the engine's graph: ``prefill`` for any chunk length (1 .. max_seq_len; it also serves decode),
    or with ``separate_decode`` chunks of 2 .. max_seq_len plus a ``decode`` program for T = 1."""
    specs, max_len = engine.cache_specs, engine.config.max_seq_len
    if max_len < 2:
        raise ValueError(f"AOTI export needs max_seq_len >= 2, got {max_len}")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    length = torch.export.Dim("chunk", min=2 if separate_decode else 1, max=max_len)
    prefill_shapes = ({0: batch, 1: length}, {0: batch, 1: length}, {0: batch}, {0: batch},
                      *[{0: batch} for _ in specs])
    decode_shapes = ({0: batch}, {0: batch}, {0: batch}, {0: batch}, *[{0: batch} for _ in specs])
    plan = [(PREFILL, min(3, max_len), prefill_shapes)]
    if separate_decode:
        plan.append((DECODE, 1, decode_shapes))
    programs = {}
    for name, chunk, shapes in plan:
        args = example_inputs(specs, max_len, engine.dtype, engine.device, batch=2, length=chunk)
        with torch.no_grad():
            programs[name] = torch.export.export(engine.graph, args, dynamic_shapes=shapes)
    return programs


def compile_files(programs: dict[str, torch.export.ExportedProgram]) -> dict[str, list]:
    """AOTInductor-compile every program: ``{model name: the files aot_compile made}`` (in Inductor's cache
    folder), what ``package_pt2`` takes as ``aoti_files`` (``aoti_compile_and_package`` does this for one program;
    its docstring shows this multi-model form)."""
    return {
        name: torch._inductor.aot_compile(_module(program), *program.example_inputs,
                                          options={"aot_inductor.package": True})
        for name, program in programs.items()
    }


def weights_bytes(engine) -> int:
    """Bytes of the engine graph's parameters and buffers: a lower bound of the package size (its constants)."""
    tensors = [*engine.graph.parameters(), *engine.graph.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# Zip headers per member (local + central directory + zip64 extras + torch's 64-byte alignment), beyond the names.
_MEMBER_OVERHEAD = 256
PACKAGE_MARGIN = 1 << 20  # torch's own records, the metadata, and slack


def package_bytes(files: dict[str, list]) -> int:
    """About how many bytes ``write_package`` will write for ``files`` (their sizes plus zip overhead)."""
    total = PACKAGE_MARGIN
    for name, paths in files.items():
        for path in paths:
            if isinstance(path, str) and path:
                member = f"data/aotinductor/{name}/{os.path.basename(path)}"
                total += os.path.getsize(path) + _MEMBER_OVERHEAD + 2 * len(member)
            elif isinstance(path, dict):  # a Weights object {name: (tensor, properties)}: constants out of the .so
                total += sum(value[0].numel() * value[0].element_size() for value in path.values())
    return total


_PACKAGER = """
import json, sys
from torch.export.pt2_archive._package import package_pt2
job = json.load(sys.stdin)
package_pt2(job["path"], aoti_files=job["files"])
"""


def write_package(files: dict[str, list], path: str) -> None:
    """Write the PT2 archive of ``files`` at ``path`` (members under ``path``'s base name) in a child process, so
    that a failed native write is an ``OSError`` here, never an abort of this process."""
    if not all(isinstance(f, str) for paths in files.values() for f in paths):  # Weights objects: not JSON
        from torch.export.pt2_archive._package import package_pt2

        package_pt2(path, aoti_files=files)
        return
    job = json.dumps({"path": path, "files": files})
    proc = subprocess.run([sys.executable, "-c", _PACKAGER], input=job, capture_output=True, text=True,
                          check=False)
    if proc.returncode == 0:
        return
    code = proc.returncode
    how = f"exit status {code}"
    if code < 0:
        how = "killed by " + next((s.name for s in signal.Signals if s.value == -code), f"signal {-code}")
    # torch's writer loses the OS error ("iostream error"): say what this process can see instead.
    need = package_bytes(files)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else -1
    err = proc.stderr or ""
    if "No space left" in err or free < need:
        number, cause = errno.ENOSPC, f"the disk is full: the package needs about {need} bytes, {free} bytes are free"
    elif "File too large" in err or 0 <= limit < need:
        number, cause = errno.EFBIG, (f"the file size limit (ulimit -f) is {limit} bytes, the package needs about "
                                      f"{need} bytes")
    else:
        number, cause = errno.EIO, "the write failed"
    raise OSError(number, f"AOTInductor packaging failed in its subprocess ({how}): {cause}; torch: {_error_line(err)}")


def _error_line(stderr: str) -> str:
    """The first error line of the packager's stderr (the one nearest the cause), as one short line."""
    lines = [" ".join(line.split()) for line in stderr.splitlines() if line.strip()]
    telling = [line for line in lines if "Error" in line or "error" in line or "what()" in line]
    line = (telling or lines[-1:] or ["no error message"])[0]
    return line if len(line) <= 200 else line[:197] + "..."


def _module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The module ``aoti_compile_and_package`` hands to ``aot_compile``: the program's, without the Python-side
    input guards."""
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

        self.backend = "aoti"
        self.device = device
        self.max_batch = int(graphs.get("max_batch", MAX_BATCH))
        device_index = device.index if device.type == "cuda" and device.index is not None else -1
        names = graphs["models"]  # role -> model name in the package; decode may share the prefill model
        loaded = {
            model: load_package(path, model_name=model, device_index=device_index)
            for model in sorted(set(names.values()))
        }
        self.models = {role: loaded[names[role]] for role in (PREFILL, DECODE)}

    def __call__(self, input_ids, position_ids, cache_start, valid, *caches):
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
            cache_start.to(torch.int64).contiguous(),
            valid.to(torch.int64).contiguous(),
            *caches,
        )

