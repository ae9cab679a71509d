"""``duo_compile.export`` and ``duo_compile.load``: compiled engines to and from engine files.

    engine = duo_compile.compile(model, masks, ...)
    duo_compile.export(engine, "model.pt2")                   # AOTInductor package (default)
    duo_compile.export(engine, "model.onnx", backend="onnx")  # standard-op ONNX, run by onnxruntime
    duo_compile.export(engine, "engine.pt2", backend="package")  # program + weights + Inductor caches
    engine2 = duo_compile.load("model.pt2")                   # no model code or weights needed
    engine2.generate(input_ids, max_new_tokens=64)            # same API as the compiled engine

Backends: ``aoti_export.py``, ``onnx_export.py`` and ``package_export.py``; the file format and its checks:
``engine_file.py``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch

from duo_compile.runtime.engine import Engine
from duo_compile.runtime.inductor_graph import InductorGraph
from duo_compile.export.generation_files import attach_generation_metadata
from duo_compile.export.engine_file import (
    EngineFileError,
    atomic_named_path,
    atomic_path,
    check_free_space,
    check_ops,
    check_runtime,
    check_writable,
    engine_metadata,
    graph_ops,
    onnx_trailer,
    read_metadata,
    seal_pt2,
)

BACKENDS = ("aoti", "onnx", "package", "tensorrt")

__all__ = ["export", "load", "BACKENDS", "EngineFileError", "BackendUnavailableError", "LoadedEngine"]


class BackendUnavailableError(RuntimeError):
    """The backend exists in the API but cannot run in this installation."""


_TENSORRT_MESSAGE = (
    "backend 'tensorrt' is not available: it needs torch-tensorrt, which cannot be installed on these machines "
    "(the TensorRT libraries come only from NVIDIA's own package index, and torch-tensorrt needs libnvinfer and a "
    "CUDA build of torch). Export with backend='onnx' instead: that engine uses standard ONNX ops only (opset "
    "{opset}, no custom domain) with static cache shapes and a dynamic batch/chunk length, so TensorRT's ONNX parser "
    "can build an engine from it, e.g. trtexec --onnx=model.onnx --minShapes=input_ids:1x1,... (the shapes are "
    "documented in duo_compile/export/onnx_export.py and in the file's metadata)."
)


def _check_engine(engine) -> None:
    if not isinstance(engine, Engine):
        if isinstance(engine, torch.nn.Module):
            raise TypeError(
                f"export takes a compiled engine, got the model {type(engine).__name__}: compile it first with "
                f"engine = duo_compile.compile(model, masks, ...), then duo_compile.export(engine, path)"
            )
        raise TypeError(f"export takes an Engine from duo_compile.compile(...), got {type(engine).__name__}")
    if engine.graph is None:
        raise ValueError(
            "this engine has no graph (it was loaded from an engine file): export the engine returned by "
            "duo_compile.compile, or copy the engine file"
        )
    if engine.config.page_size is not None:
        raise ValueError(f"this engine has paged retrieval caches (page_size={engine.config.page_size}); engine files "
                         f"hold engines without paging: export an engine compiled without page_size")
    if engine.tensor_parallel is not None:
        share = engine.tensor_parallel
        raise ValueError(
            f"this engine is rank {share.rank}'s share of a tensor-parallel engine (tensor_parallel_size={share.size}); "
            f"engine files hold whole engines: export an engine compiled without tensor_parallel_size"
        )


def export(engine: Engine, path: str | os.PathLike, backend: str = "aoti", *, separate_decode: bool = False,
           precompile: bool = True) -> str:
    """Write ``engine`` to the engine file ``path`` (atomically); returns the path.

    ``backend``: ``"aoti"`` (AOTInductor PT2 archive; seconds to minutes of C++ compilation), ``"onnx"``
    (standard-op ONNX model), ``"package"`` (the rewritten program and weights, run with Inductor after ``load``
    as the compiled engine is, on CPU or CUDA: package_export.py), or ``"tensorrt"`` (not available here: a clear
    error that points to ``"onnx"``). ``precompile`` (package of an Inductor engine only): compile a prefill chunk
    and a decode step at batch 1, and a server's chunk on another cache row and decode of two rows, now, if the
    engine has not yet, and put the engine's compiled graphs in the package, so that a ``load`` by the same
    torch / Triton / GPU architecture compiles nothing for them (nor does a server's warm-up).
    ``separate_decode`` (AOTI only): compile the one-token decode step as its own model beside the chunk model
    (twice the compile time). The file carries the engine's config, masks, model shapes and cache layout, and a format
    version, which ``load`` checks.
    """
    _check_engine(engine)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "tensorrt":
        from duo_compile.export.onnx_export import OPSET

        raise BackendUnavailableError(_TENSORRT_MESSAGE.format(opset=OPSET))
    if separate_decode and backend != "aoti":
        raise ValueError("separate_decode applies to backend='aoti' only")
    if not isinstance(precompile, bool):
        raise ValueError(f"precompile must be True or False, got {precompile!r}")
    path = check_writable(path)
    if backend == "aoti":
        _export_aoti(engine, path, separate_decode)
    elif backend == "package":
        _export_package(engine, path, precompile)
    else:
        _export_onnx(engine, path)
    return path


def _export_package(engine: Engine, path: str, precompile: bool) -> None:
    from duo_compile.export import aoti_export, package_export, package_triton

    graphs = package_export.graphs_record()
    with _writing(path), atomic_named_path(path) as tmp:
        check_free_space(path, aoti_export.weights_bytes(engine) + aoti_export.PACKAGE_MARGIN, "the engine's weights")
        weights = package_export.write_program(engine, tmp)
        cache = None
        if precompile and isinstance(engine._run, InductorGraph):
            # A second engine on the same compiled graphs and weights, with caches of its own: the user's engine
            # keeps its caches, and the graphs compiled here are the user's engine's too.
            warm = Engine(engine.graph, engine.cache_specs, engine.config, engine.info, engine.masks,
                          device=engine.device, dtype=engine.dtype, cuda_graphs=engine.cuda_graphs, runner=engine._run)
            compiled = package_export.precompile(warm, None)
            del warm
            # Every attention-op kernel this process compiled (the precompile's and the user's own steps') and the
            # Triton host modules it loaded to launch them.
            kernels = package_triton.pack(package_triton.compiled_folders())
            if compiled or kernels:
                package_export.add_caches(tmp, compiled, kernels)
                cache = {**package_export.cache_producer(engine.device),
                         "bytes": sum(len(data) for data in compiled.values()),
                         "variants": sum(name.endswith(".bin") for name in compiled),
                         "triton_kernels": len(package_triton.by_folder(kernels))}
        graphs["inductor_cache"] = cache
        seal_pt2(tmp, engine_metadata(engine, "package", graphs, graph_ops(engine.graph.graph)), weights)


def _export_aoti(engine: Engine, path: str, separate_decode: bool) -> None:
    from duo_compile.export import aoti_export

    with _writing(path):  # before minutes of compilation: the package holds at least the weights
        check_free_space(path, aoti_export.weights_bytes(engine), "the engine's weights")
    programs = aoti_export.export_programs(engine, separate_decode)
    prefill, decode = aoti_export.PREFILL, aoti_export.DECODE
    max_len = engine.config.max_seq_len
    graphs = {
        "models": {prefill: prefill, decode: decode if decode in programs else prefill},
        "max_batch": aoti_export.MAX_BATCH,
        "chunk_range": {prefill: [2 if decode in programs else 1, max_len], decode: [1, 1]},
        "caches": "explicit inputs, mutated in place",
    }
    meta = engine_metadata(engine, "aoti", graphs, graph_ops(*(p.graph for p in programs.values())))
    files = aoti_export.compile_files(programs)
    # The archive names its members after the file it is written to: write it under the final name, in a
    # temporary folder beside ``path``, packaged in a child process (a failed native write cannot abort this one).
    with _writing(path), atomic_named_path(path) as tmp:
        check_free_space(path, aoti_export.package_bytes(files), "the AOTInductor package")
        aoti_export.write_package(files, tmp)
        seal_pt2(tmp, meta)


def _export_onnx(engine: Engine, path: str) -> None:
    from duo_compile.export import onnx_export

    data, description = onnx_export.export_onnx_bytes(engine)
    meta = engine_metadata(engine, "onnx", description, {})
    with _writing(path), atomic_path(path, ".onnx") as tmp:
        check_free_space(path, len(data) + (1 << 16), "the ONNX model")
        with open(tmp, "wb") as f:
            f.write(data)
            f.write(onnx_trailer(data, meta))


class _writing:
    """Turn an OSError while writing the file into one clear error naming the path."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is not None and issubclass(kind, OSError):
            raise OSError(err.errno, f"cannot write the engine file {self.path!r}: {err.strerror or err}") from err
        return False


def _load_package(parts, path: str, payload: dict, seconds: dict[str, float]):
    """(runner, whether compiled graphs were loaded) for a package: its program, run as ``compile`` runs it.
    ``seconds`` gets the time of each part: ``program``, ``weights`` and (Inductor) ``caches`` (the compiled graphs
    and Triton kernels)."""
    from duo_compile.export import package_export

    check_ops(parts, path)
    began = time.perf_counter()
    record = package_export.read_graph(path)
    seconds["program"] = time.perf_counter() - began
    graph = package_export.load_module(path, record, payload.get("weights"), parts.device)
    seconds["weights"] = time.perf_counter() - began - seconds["program"]
    if parts.config.backend != "inductor":
        return graph, False
    began = time.perf_counter()
    run = InductorGraph(graph)
    loaded = package_export.load_variants(path, parts.graphs.get("inductor_cache"), parts.device, run)
    if loaded:
        run.variants = loaded
    seconds["caches"] = time.perf_counter() - began
    return run, bool(loaded)


class LoadedEngine(Engine):
    """An engine loaded from an engine file: the compiled engine's API, run by the file's runtime.

    ``backend``: what runs it, ``"aoti"`` (the AOTInductor package), ``"onnx"`` (onnxruntime) or ``"package"``
    (the program, compiled by the backend of ``config``); ``config`` is the exported engine's, unchanged (its
    ``backend`` names the backend it was compiled with). ``path``: the file. ``compile_cache_loaded``: whether a
    package's compiled graphs were loaded (False for other backends). ``load_seconds``: where ``load`` spent its
    time, ``checks`` (the metadata, the digest over the file's members) then, for a package, ``program`` (reading
    the graph record), ``weights`` (reading them onto the device, building the graph module) and ``caches``; for the
    other backends ``runtime``.
    """

    def __init__(self, *args, backend: str, path: str, compile_cache_loaded: bool = False,
                 load_seconds: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.path = path
        self.compile_cache_loaded = compile_cache_loaded
        self.load_seconds = dict(load_seconds or {})


def load(path: str | os.PathLike, *, providers: Sequence[str] | None = None) -> LoadedEngine:
    """Load an engine file written by ``export``; the result has the compiled engine's ``generate`` API.

    Checks before running anything: the file is a complete duo_compile engine file of this format version whose
    metadata and graph bytes match its recorded SHA-256 digest, the metadata is consistent, the device is present,
    and (AOTI) the custom ops it calls are registered with the same schemas and the package was built for this
    torch and CPU; (ONNX) the graph's declared shapes match the metadata. ``providers``: onnxruntime execution
    providers for an ONNX engine (default: CPU, or CUDA for an engine exported on CUDA).
    """
    path = os.fspath(path)
    began = time.perf_counter()
    parts, meta = read_metadata(path)
    check_runtime(parts, path)
    seconds = {"checks": time.perf_counter() - began}
    began = time.perf_counter()
    cache_loaded = False
    if parts.backend == "package":
        runner, cache_loaded = _load_package(parts, path, meta["payload"], seconds)
    elif parts.backend == "aoti":
        from duo_compile.export.aoti_export import AOTIRunner

        check_ops(parts, path)
        try:
            runner = AOTIRunner(path, parts.graphs, parts.device)
        except Exception as err:  # the archive passed its checks, so this is the runtime refusing it
            raise EngineFileError(f"{path}: AOTInductor could not load the package ({type(err).__name__}: {err})")
    else:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise EngineFileError(
                f"{path}: an ONNX engine runs on onnxruntime, which is not installed (pip install onnxruntime)"
            ) from None
        from duo_compile.export.onnx_export import OnnxRunner, graph_mismatches

        try:
            runner = OnnxRunner(
                path, parts.cache_specs, parts.config.sink_size, parts.config.recent_size, parts.info.vocab_size,
                parts.device, parts.graphs, providers=providers,
            )
        except Exception as err:  # the file passed its checks: onnxruntime (or its providers) refused it
            raise EngineFileError(f"{path}: onnxruntime could not load the model ({type(err).__name__}: {err})")
        problems = graph_mismatches(runner.session, parts.graphs, parts.cache_specs, parts.info.vocab_size,
                                    parts.config.max_seq_len)
        if problems:
            raise EngineFileError(f"{path}: the metadata does not describe the ONNX graph: {'; '.join(problems)}")
    engine = LoadedEngine(
        None,
        parts.cache_specs,
        parts.config,
        parts.info,
        parts.masks,
        device=parts.device,
        dtype=parts.dtype,
        pass_counts=parts.pass_counts,
        runner=runner,
        backend=parts.backend,
        path=path,
        compile_cache_loaded=cache_loaded,
        load_seconds=seconds if parts.backend == "package" else {**seconds, "runtime": time.perf_counter() - began},
    )
    return attach_generation_metadata(engine, meta, path)  # generation defaults and tokenizer, when the file has them
