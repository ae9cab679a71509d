"""Shared by the reliability tests (properties, long decode, determinism, validation).

Hypothesis profiles, chosen with the environment variable ``DUO_HYPOTHESIS_PROFILE``:

- ``ci`` (default): few, small examples, derandomized (the same examples on every run, so CI never flakes on
  a newly found example); the whole reliability set stays within a few minutes on 2 CPU cores.
- ``long``: many more examples, random each run (failures are saved in ``.hypothesis/`` and replayed first);
  the long-decode tests also decode several times further. Run by hand::

      DUO_HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py tests/test_long_decode.py

The tests run torch on one CPU thread (tests/conftest.py). Bitwise determinism is claimed for a fixed thread
count, which this also pins.
"""
from __future__ import annotations

import os

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


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: the score tolerance the compiler tests use (1e-4)."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
