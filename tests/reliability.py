"""Shared by the reliability tests (properties, long decode, determinism, validation).

Hypothesis profiles, chosen with the environment variable ``DUO_HYPOTHESIS_PROFILE``:

- ``ci`` (default): few, small examples, derandomized (the same examples on every run, so CI never flakes on
  a newly found example); the whole reliability set stays within a few minutes on 2 CPU cores.
- ``long``: many more examples, random each run (failures are saved in ``.hypothesis/`` and replayed first);
  the long-decode tests also decode several times further. Run by hand::

      DUO_HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py tests/test_long_decode.py

The tests run torch on one CPU thread (``one_thread``): the tiny models' ops are far too small to gain from
threads, and on a busy 2-core machine two threads spin against each other (10x slower decode). Bitwise
determinism is claimed for a fixed thread count, which this also pins.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

PROFILE_ENV = "DUO_HYPOTHESIS_PROFILE"
PROFILES = ("ci", "long")
PROFILE = os.environ.get(PROFILE_ENV, "ci")
if PROFILE not in PROFILES:
    raise ValueError(f"{PROFILE_ENV}={PROFILE!r}: must be one of {PROFILES}")
LONG = PROFILE == "long"


def examples(ci: int, long: int) -> settings:
    """Hypothesis settings for one test: ``ci`` examples by default, ``long`` under the long profile."""
    return settings(
        max_examples=long if LONG else ci,
        deadline=None,
        derandomize=not LONG,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def scale(ci: int, long: int) -> int:
    """A size (e.g. decode steps) that grows under the long profile."""
    return long if LONG else ci


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch thread, then restore the previous count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: the score tolerance the compiler tests use (1e-4)."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
