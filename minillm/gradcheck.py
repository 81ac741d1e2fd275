"""Gradient checks by float64 central differences, and the one ``assert_close``.

Every backward pass in minillm is checked the same way (tests and chapters
both call this module): take a random upstream gradient ``dout`` and the
scalar ``f = sum(forward(...) * dout)``. Its gradient with respect to any
input is exactly what the backward pass returns for that ``dout``, and the
central difference

    (f(x + h e_j) - f(x - h e_j)) / 2h          (h = 1e-6, float64)

estimates the same number independently: truncation error ~h^2 f''' and
rounding error ~1e-16 |f| / h, i.e. ~1e-10, far below the tolerance.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy

# (rtol, atol) per dtype: |got - ref| <= atol + rtol * |ref| elementwise.
# float64 is tight (reference-vs-twin and model-vs-model agree to ~1e-15 up to
# summation order); float32 is looser (7 significant digits, sums of ~1e3 terms).
TOLERANCES = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-4, 1e-6),
    "float16": (1e-2, 1e-3),
}
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


def assert_close(name, got, ref, dtype=None, *, rtol=None, atol=None) -> None:
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
    if x.dtype != np.float64:
        raise ValueError(f"central differences need float64 inputs, got {x.dtype}")
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


def check_grads(name, f, inputs, grads, rng=None, max_entries=None, **tol) -> None:
    """Compare analytic ``grads`` with central differences of ``f()`` w.r.t. each input.

    ``inputs`` and ``grads`` align (a None grad is skipped); ``f`` reads the
    inputs, which are perturbed in place. With ``max_entries``, a random subset
    of that many entries per input is probed (needs ``rng``). ``tol``: rtol/atol
    (default ``FD_TOL``).
    """
    if len(inputs) != len(grads):
        raise ValueError(f"{name}: {len(inputs)} inputs but {len(grads)} grads")
    for i, (x, g) in enumerate(zip(inputs, grads)):
        if g is None:
            continue
        assert g.shape == x.shape, f"{name}: grad {i} has shape {g.shape}, input {x.shape}"
        if max_entries is None or x.size <= max_entries:
            pos = np.arange(x.size)
        else:
            pos = rng.choice(x.size, size=max_entries, replace=False)
        num = numerical_grads(f, x, pos)
        assert_close(f"{name} grad of input {i}", np.asarray(g).reshape(-1)[pos], num,
                     **(tol or FD_TOL))


def check_model_grads(model, idx, targets, rng, max_entries: int = 6, names=None, **tol) -> dict:
    """Check ``model.loss_and_grads`` against central differences of ``model.loss``.

    The model must be float64. Probes ``max_entries`` random entries of every
    trainable parameter (or of ``names``); returns the analytic grads.
    """
    if model.config.dtype != "float64":
        raise ValueError(f"check_model_grads needs a float64 model, got {model.config.dtype}")
    _, grads = model.loss_and_grads(idx, targets)
    names = sorted(grads) if names is None else list(names)
    check_grads("model", lambda: model.loss(idx, targets), [model.params[n] for n in names],
                [grads[n] for n in names], rng=rng, max_entries=max_entries, **tol)
    return grads
