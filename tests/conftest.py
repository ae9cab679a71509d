"""Shared test fixtures: tiny random-weight Hugging Face models and the Triton interpreter switch.

TRITON_INTERPRET must be set before anything imports triton (transformers does), so it is set here,
at the top of the first file pytest imports. It only affects Triton kernels launched on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import duo_compile  # noqa: E402,F401  (first: keeps the checkout's kernels/ from shadowing transformers' kernels)
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import ARCHS, tiny_model  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
