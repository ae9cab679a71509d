"""Shared test fixtures: tiny random-weight Hugging Face models, the Triton interpreter switch, one CPU thread.

TRITON_INTERPRET must be set before anything imports triton (transformers does), so it is set here,
at the top of the first file pytest imports. It only affects Triton kernels launched on CPU tensors. Under the
interpreter, ``skip_repatching`` (tests/interpreter_patch.py) spares it re-patching the language at every helper call.

One intra-op thread (``set_num_threads``, and ``OMP_NUM_THREADS`` unless set, inherited by the processes tests
start): the tests run tiny tensors, where a second OpenMP thread only adds synchronisation, and on a small machine
whose cores are busy it waits for a core at every op (benchmarks/DECISIONS.md#tests-one-thread). Tests that are
about threads set their own count.

Modules whose subject is not the capture opt into ``one_capture_per_model`` (``pytestmark``): ``compile`` then
takes each model's graph from one capture per test process (tests/shared_capture.py).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import duo_compile  # noqa: E402,F401  (first: keeps the checkout's kernels/ from shadowing transformers' kernels)
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.interpreter_patch import skip_repatching
from tests.shared_capture import compile_reuses_captures
from tests.tiny_models import ARCHS, tiny_model  # noqa: E402,F401

torch.set_num_threads(1)

if os.environ["TRITON_INTERPRET"] == "1":
    skip_repatching()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_capture_per_model():
    with compile_reuses_captures():
        yield
