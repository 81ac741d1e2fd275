"""Numba twin of minillm.optim.adamw_update: the AdamW update as one pass.

The reference runs nine NumPy operations per parameter, each a full pass over
the array (and four temporaries); the twin reads p, g, m, v once and writes
p, m, v once. Same operations in the same order, with the constants rounded
to the parameter's dtype first as NumPy does with Python floats, so float32
and float64 results equal the reference's bit for bit (tests/test_optim.py).
A strided view is updated through a contiguous copy; half precision takes the
reference (the dispatcher's rule for twins without ``accepts_half``).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, error_model="numpy")
def _update(p, g, m, v, b1, c1, b2, c2, bc1, bc2, lr, eps, keep, decay):
    """Every step for one flat parameter; g in p's dtype."""
    for i in range(p.shape[0]):
        gi = g[i]
        m[i] = m[i] * b1 + c1 * gi
        v[i] = v[i] * b2 + c2 * (gi * gi)
        pi = p[i]
        if decay:
            pi = pi * keep
        p[i] = pi - lr * (m[i] / bc1) / (np.sqrt(v[i] / bc2) + eps)


@njit(cache=True, error_model="numpy")
def _update_terms(p, gm, gv, m, v, b1, b2, bc1, bc2, lr, eps, keep, decay):
    """The same with g in another dtype: gm = (1 - b1) g and gv = (1 - b2) g^2 come
    precomputed in g's dtype, as the reference's NumPy expressions round them."""
    for i in range(p.shape[0]):
        m[i] = m[i] * b1 + gm[i]
        v[i] = v[i] * b2 + gv[i]
        pi = p[i]
        if decay:
            pi = pi * keep
        p[i] = pi - lr * (m[i] / bc1) / (np.sqrt(v[i] / bc2) + eps)


def adamw_update(p, g, m, v, lr, b1, b2, bc1, bc2, eps, wd):
    """Accelerated minillm.optim.adamw_update — see it for the math."""
    state = [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in (p, m, v)]
    flat_p, flat_m, flat_v = (a.reshape(-1) for a in state)
    c = p.dtype.type
    common = (c(bc1), c(bc2), c(lr), c(eps), c(1 - lr * wd), bool(wd))
    if g.dtype == p.dtype:
        _update(flat_p, np.ascontiguousarray(g).reshape(-1), flat_m, flat_v,
                c(b1), c(1 - b1), c(b2), c(1 - b2), *common)
    else:
        gm = np.ascontiguousarray((1 - b1) * g).reshape(-1)
        gv = np.ascontiguousarray((1 - b2) * (g * g)).reshape(-1)
        _update_terms(flat_p, gm, gv, flat_m, flat_v, c(b1), c(b2), *common)
    for a, flat in zip((p, m, v), state):
        if flat is not a:                                       # a strided view: write back
            a[...] = flat


KERNELS = {
    "optim.adamw_update": adamw_update,
}
