"""The compiled Triton kernels of the attention ops, carried in an engine package so that a loaded engine's first
steps do not compile them again.

Inductor's portable caches (package_export.py) hold the kernels Inductor generates, but not the duo ops' own
``@triton.jit`` kernels (kernels/triton_*.py): Triton compiles those on their first launch in a process, for each
specialisation of their arguments, and keeps them in its on-disk cache, one folder per compiled kernel named by
the kernel's hash (the binary, its metadata, the IR of each stage and a group file listing them). Launching them
also needs small host modules Triton builds with the C compiler and caches the same way (its driver utilities
and, in some Triton versions, a launcher per kernel signature). A package made on a GPU carries those folders for
every kernel the exporting process compiled (its precompile steps included) and every such module it has loaded;
``load`` writes them into the cache folders Triton will search, where Triton finds them as if it had built them
itself.

The metadata files name their own folder by absolute path; it is replaced by a placeholder when packed and by
the new folder when written back. A folder that already holds files is left as it is (Triton's own copy). Each
folder is written under a temporary name and renamed into place, so a process that reads the cache at the same
time sees a whole folder or none. The kernels are machine code: they are used only by the same torch, Triton and
GPU architecture that made them (``package_export.use_cache`` checks that first), and a package is trusted like
any program one runs.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import torch

PLACEHOLDER = b"[duo_compile:triton-folder]"
# Files a cache folder may hold besides the kernel's: Triton's lock file.
SKIPPED = ("lock",)
# The host modules Triton builds for launching kernels (file name prefixes of their shared objects).
HOST_MODULES = ("__triton_launcher", "cuda_utils", "hip_utils")
MAPS = "/proc/self/maps"  # the files mapped into this process (Linux)


def _jit_functions():
    """The ``@triton.jit`` functions of the project's kernel modules (an autotuner's or heuristics' wrapped one)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("duo_compile.kernels."):
            continue
        for obj in list(vars(module).values()):
            if not isinstance(obj, JITFunction):  # a JITFunction's own ``fn`` is its Python function
                obj = getattr(obj, "fn", None)
            if isinstance(obj, JITFunction):
                yield obj


def _loaded_host_modules() -> set[str]:
    """The folders of Triton's host modules (``HOST_MODULES``) this process has loaded (Linux: from
    ``/proc/self/maps``; elsewhere none)."""
    try:
        with open(MAPS) as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if ".so" in line}
    except OSError:
        return set()
    return {os.path.dirname(path) for path in paths
            if os.path.basename(path).startswith(HOST_MODULES) and path.endswith(".so")}


def compiled_folders() -> list[str]:
    """The on-disk cache folder of every kernel this process has compiled or loaded from the project's kernels,
    and of every Triton host module it has loaded."""
    folders = _loaded_host_modules()
    for fn in _jit_functions():
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) and cache and isinstance(cache[0], dict) else {}
            for kernel in kernels.values():
                paths = set(map(os.path.dirname, (getattr(kernel, "metadata_group", None) or {}).values()))
                if len(paths) == 1:
                    folders |= paths
    return sorted(folder for folder in folders if os.path.isdir(folder))


def pack(folders: list[str]) -> dict[str, bytes]:
    """The files of ``folders`` as ``{"<folder name>/<file name>": bytes}``, each metadata file's own folder path
    replaced by ``PLACEHOLDER``."""
    files = {}
    for folder in folders:
        key = os.path.basename(folder.rstrip(os.sep))
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name in SKIPPED or not os.path.isfile(path):
                continue
            with open(path, "rb") as handle:
                data = handle.read()
            if name.endswith(".json"):
                data = data.replace(os.fsencode(folder), PLACEHOLDER)
            files[f"{key}/{name}"] = data
    return files


def cache_bases(device: torch.device) -> list[str]:
    """The folders Triton will search for compiled kernels in this process: ``TRITON_CACHE_DIR`` when it is set;
    otherwise both the one Inductor points Triton at once it runs (its own cache folder's ``triton/<device>``)
    and Triton's default, because an engine's first kernels may run before or after Inductor's."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return [os.environ["TRITON_CACHE_DIR"]]
    bases = []
    try:
        from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

        bases.append(triton_cache_dir(device.index or 0))
    except (ImportError, AttributeError):
        pass
    try:
        from triton import knobs

        bases.append(knobs.cache.dir)
    except (ImportError, AttributeError):
        from triton.runtime.cache import default_cache_dir

        bases.append(default_cache_dir())
    return list(dict.fromkeys(bases))


def by_folder(files: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """Packed files (``pack``) grouped by their folder: ``{"<folder name>": {"<file name>": bytes}}``."""
    folders: dict[str, dict[str, bytes]] = {}
    for member, data in files.items():
        key, name = member.split("/", 1)
        folders.setdefault(key, {})[name] = data
    return folders


def install(files: dict[str, bytes], bases: list[str]) -> int:
    """Write the packed folders ``files`` (``pack``) under each of ``bases``; returns the folders written (those
    already present are skipped)."""
    folders, written = by_folder(files), 0
    for base in bases:
        for key, members in folders.items():
            folder = os.path.join(base, key)
            if os.path.isdir(folder) and os.listdir(folder):
                continue
            os.makedirs(base, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f"tmp.{key}.", dir=base)
            for name, data in members.items():
                if name.endswith(".json"):
                    data = data.replace(PLACEHOLDER, os.fsencode(folder))
                with open(os.path.join(staging, name), "wb") as handle:
                    handle.write(data)
            try:
                os.replace(staging, folder)  # onto a missing or empty folder
                written += 1
            except OSError:  # another process put it there first
                shutil.rmtree(staging, ignore_errors=True)
    return written
