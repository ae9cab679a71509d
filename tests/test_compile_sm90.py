"""Every Triton kernel compiles for the H200 (sm_90) and fits its shared memory: kernels/compile_check.py.

The interpreter tests (test_triton_kernels.py) check what the kernels compute; this checks that the GPU compiler
accepts them at the tile shapes the launchers pick, which CI could not otherwise see without a GPU. It runs in a
fresh process because conftest.py turns the Triton interpreter on for this one.
"""
from __future__ import annotations

import os
import subprocess
import sys


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "duo_compile.kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "FAILED" not in report and ": 0 failure(s)" in report, report
    assert sum(line.startswith("ok ") for line in report.splitlines()) >= 40, report  # 20 kernel cases x 2 formats
