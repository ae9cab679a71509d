"""The runtime: an :class:`Engine` owns a compiled graph and its static KV cache and runs prefill and decode
(``engine``); decode steps replay CUDA graphs on the GPU (``cuda_graphs``)."""
from duo_compile.runtime.engine import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig"]
