"""Running from a checkout: the repository's ``kernels/`` folder must not shadow the ``kernels`` distribution.

The folder installs as ``duo_compile.kernels``, but Python puts the working directory first on ``sys.path`` when
run from the repository root (``python -m pytest``, ``python -m duo_compile...``), and a script's own folder when
a script runs (``python benchmarks/gpu_check.py`` beside ``benchmarks/kernels.py``). Hugging Face's ``kernels``
distribution, which recent transformers releases import at start-up, would then resolve to the checkout's file
and fail. Importing the distribution once from the rest of ``sys.path`` keeps every later ``import kernels`` on it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_checkout_folder(path: str) -> bool:
    """The repository root or a folder inside it."""
    path = os.path.abspath(path or os.curdir)
    return path == _ROOT or path.startswith(_ROOT + os.sep)


def keep_site_kernels() -> None:
    """Import the installed ``kernels`` distribution if the checkout's folder would shadow it; else do nothing."""
    if "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or not spec.origin.startswith(_ROOT + os.sep):
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not _is_checkout_folder(p)]
    try:
        importlib.import_module("kernels")
    except ImportError:
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved
