"""Argument checks shared by every public boundary: one message shape everywhere.

Each check raises ``ValueError("<name>=<value> must be <rule>")`` and returns the
value normalised (a NumPy integer becomes an ``int``). Booleans are never
accepted as numbers (``True`` is an ``int`` in Python, but never a batch size).
"""
from __future__ import annotations

import math

import numpy as np


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi] (either bound optional) -> int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be an int{_bounds(lo, hi)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}={value!r} must be an int{_bounds(lo, hi)}")
    return int(value)


def check_optional_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int | None:
    """None, or ``check_int``."""
    return None if value is None else check_int(name, value, lo, hi)


def check_float(name: str, value, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (not a bool) in [lo, hi]; ``lo_open``/``hi_open`` exclude the bound."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) \
        and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rule = "" if lo is None and hi is None else \
            f" in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{name}={value!r} must be a finite number{rule}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    """One of ``choices`` (shown sorted in the message)."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {sorted(choices)}")
    return value


def _bounds(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""
