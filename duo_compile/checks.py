"""Argument checks shared by the public entry points.

Integer arguments (sizes, lengths, counts, seeds) are checked in many places: engine, masks, identification,
oracle. They all go through :func:`check_int` so that there is one rule for what counts as an integer and one
wording for the error, and a user gets the same message whichever function they called.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

__all__ = ["check_int"]


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as a Python int if it is an integer >= ``minimum``, else raise ValueError naming it.

    An integer is anything ``operator.index`` accepts (Python ints, numpy integers, one-element integer
    tensors), except booleans (``True``, ``np.bool_``, bool tensors), which are rejected although Python
    treats ``True`` as 1. Floats are rejected even when integral (``2.0``).
    """
    message = f"{name} must be an integer >= {minimum}, got {value!r}"
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(message)
    try:
        as_int = operator.index(value)
    except TypeError:
        raise ValueError(message) from None
    if as_int < minimum:
        raise ValueError(message)
    return as_int
