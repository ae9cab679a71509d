"""Triton's interpreter re-patches ``triton.language`` on every call of a ``@triton.jit`` helper from inside a
kernel, although the kernel's launch patched it already and restores it when the launch ends: ``inspect.getmembers``
over the language modules for every helper call of every program, a large part of an interpreted launch.

``skip_repatching`` makes a helper call inside a launch reuse the launch's patching when the helper sees the same
language modules (what the interpreter would patch is then already patched); anything else patches as before.
Launches still patch and restore exactly as Triton does, so what the kernels compute is unchanged
(benchmarks/DECISIONS.md#suite-time).
"""
from __future__ import annotations

import inspect
import threading

_state = threading.local()
_LANGS: dict = {}


def _langs(fn, tl) -> frozenset:
    """The language modules ``_patch_lang`` would patch for ``fn`` (those its module sees), as ids."""
    if fn not in _LANGS:
        _LANGS[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
    return _LANGS[fn]


def skip_repatching() -> bool:
    """Install the shortcut into triton.runtime.interpreter; False (nothing changed) if its internals differ."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    executor = getattr(interpreter, "GridExecutor", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope_class = getattr(interpreter, "_LangPatchScope", None)
    if executor is None or patch_lang is None or scope_class is None or getattr(patch_lang, "_duo_shortcut", False):
        return False
    launch = executor.__call__

    def patched_launch(self, *args, **kwargs):
        outer = getattr(_state, "langs", None)
        _state.langs = None  # the launch's own _patch_lang call patches for real
        try:
            return launch(self, *args, **kwargs)
        finally:
            _state.langs = outer

    def shortcut_patch_lang(fn):
        active = getattr(_state, "langs", None)
        langs = _langs(fn, tl)
        if active is not None and langs <= active:
            return scope_class()  # already patched by the launch, which restores it
        scope = patch_lang(fn)
        _state.langs = langs if active is None else active | langs
        return scope

    shortcut_patch_lang._duo_shortcut = True
    executor.__call__ = patched_launch
    interpreter._patch_lang = shortcut_patch_lang
    return True
