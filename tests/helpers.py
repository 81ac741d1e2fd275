"""Shared test helpers: the one ``assert_close`` and float64 central differences.

Import as ``from tests.helpers import assert_close, TOLERANCES, numerical_grads``.
"""
from __future__ import annotations

import numpy as np

from minillm.backend import to_numpy

# (rtol, atol) per dtype: |got - ref| <= atol + rtol * |ref| elementwise.
# float64 is tight (reference-vs-twin and model-vs-model agree to ~1e-15 up to
# summation order); float32 is looser (7 significant digits, sums of ~1e3 terms).
TOLERANCES = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-4, 1e-6),
    "float16": (1e-2, 1e-3),
}

# Central differences (f(x+h) - f(x-h)) / 2h in float64 with h = 1e-6 have a
# truncation error ~h^2 f''' and a rounding error ~1e-16 |f| / h, i.e. ~1e-10.
FD_STEP = 1e-6
FD_TOL = {"rtol": 1e-6, "atol": 1e-8}


def _tolerance(dtype, got, ref):
    """Tolerance of ``dtype``, else of the less precise of got/ref (floats only)."""
    if dtype is None:
        floats = [a.dtype for a in (got, ref) if a.dtype.kind == "f"]
        dtype = min(floats, key=lambda d: d.itemsize) if floats else np.dtype("float64")
    dtype = np.dtype(dtype).name
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {dtype}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[dtype]


def assert_close(name, got, ref, dtype=None, *, rtol=None, atol=None):
    """Assert ``got`` ~= ``ref`` within the per-dtype tolerance (or explicit rtol/atol).

    On failure, the message gives the max abs error, the max rel error, and the
    first bad index with both values there. Arrays may live on any backend.
    """
    got = np.asarray(to_numpy(got))
    ref = np.asarray(to_numpy(ref))
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference shape {ref.shape}"
    t_rtol, t_atol = _tolerance(dtype, got, ref)
    rtol = t_rtol if rtol is None else rtol
    atol = t_atol if atol is None else atol
    g, r = got.astype(np.float64), ref.astype(np.float64)
    same_inf = np.isinf(g) & np.isinf(r) & (np.sign(g) == np.sign(r))  # -inf == -inf is fine
    with np.errstate(invalid="ignore"):                                 # inf - inf
        err = np.where(same_inf, 0.0, np.abs(g - r))
    err = np.where(np.isnan(g) | np.isnan(r), np.inf, err)             # NaN never matches
    bad = err > atol + rtol * np.where(same_inf, 0.0, np.abs(r))
    if not bad.any():
        return
    rel = err / np.maximum(np.abs(r), np.finfo(np.float64).tiny)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {bad.size} entries differ "
        f"(rtol={rtol:g}, atol={atol:g}); max abs err {err.max():.3e}, "
        f"max rel err {rel.max():.3e}; first bad index {first}: "
        f"got {g[first]!r}, ref {r[first]!r}")


def numerical_grads(f, x: np.ndarray, positions=None, h: float = FD_STEP) -> np.ndarray:
    """Central differences of the scalar ``f()`` w.r.t. entries of ``x`` (changed in place
    and restored). ``positions``: flat indices to probe (default all) -> (len(positions),)."""
    assert x.dtype == np.float64, "central differences need float64"
    positions = range(x.size) if positions is None else positions
    out = []
    for j in positions:
        j = np.unravel_index(j, x.shape)
        old = x[j]
        x[j] = old + h
        plus = float(f())
        x[j] = old - h
        minus = float(f())
        x[j] = old
        out.append((plus - minus) / (2 * h))
    return np.array(out)


def check_grads(name, f, inputs, grads, rng=None, max_entries=None):
    """Compare analytic ``grads`` with central differences of ``f()`` w.r.t. each input.

    ``inputs`` and ``grads`` align; a None grad is skipped. With ``max_entries``,
    a random subset of that many entries per input is probed (needs ``rng``).
    """
    assert len(inputs) == len(grads)
    for i, (x, g) in enumerate(zip(inputs, grads)):
        if g is None:
            continue
        assert g.shape == x.shape, f"{name}: grad {i} has shape {g.shape}, input {x.shape}"
        if max_entries is None or x.size <= max_entries:
            pos = np.arange(x.size)
        else:
            pos = rng.choice(x.size, size=max_entries, replace=False)
        num = numerical_grads(f, x, pos)
        assert_close(f"{name} grad of input {i}", np.asarray(g).reshape(-1)[pos], num, **FD_TOL)
