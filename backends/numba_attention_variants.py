"""Numba twins of minillm.sparse_attention's pattern kernels (window, strided, block).

The NumPy reference (``sparse_attention.pattern_attention_forward/backward``)
works in chunks: a query scores the 2c keys of its chunk and the chunk before
(c >= the window) and masks the ones its pattern forbids, so a window of 256
pays for 512 scores and for the mask, softmax and backward passes over all of
them, one NumPy temporary per operator.

Here every query walks only its allowed keys (``_keys``: a list of positions,
at most window + n_global, or window + T / stride for strided), so the work is
exactly the pattern's: O(T w D) for a window of w. One query at a time, fused:

forward   s_j = q_i . k_j / sqrt(D) for j in P(i); m = max s; p_j = exp(s_j - m);
          y_i = sum p_j v_j / sum p_j; lse_i = m + log sum p_j   (the softmax's log-normaliser)
backward  p_j = exp(s_j - lse_i) recomputed (FlashAttention's trade: no (T, w) matrix kept);
          ds_j = p_j (dy_i . v_j - dy_i . y_i) / sqrt(D)   (the softmax backward, since
          sum_j p_j (dy_i . v_j) = dy_i . y_i); dq_i += ds_j k_j, dk_j += ds_j q_i, dv_j += p_j dy_i

The inner loops run over D contiguous floats (a dot product or an axpy), which
LLVM vectorises with ``fastmath`` (reassociated sums). Arithmetic in the input
dtype; exp is scalar libm per score. Single-threaded, like the other twins
(``numba_layers.PARALLEL``). Axis legend as in ``minillm/model.py``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

KERNELS: dict = {}
WINDOW, STRIDED, BLOCK = 0, 1, 2
_KIND = {"window": WINDOW, "strided": STRIDED, "block": BLOCK}
_jit = njit(cache=True, fastmath=True, error_model="numpy")


# --- exp: a float32 exp that vectorises (libm's expf is a scalar call, ~5 ns) ---------------------
# Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, times 2^n
# built from its bits ((n + 127) << 23 in an int32 read as float32). ~1 ulp on float32.
_LOG2E = 1.44269504088896341
_C1, _C2 = 0.693359375, -2.12194440e-4                 # ln 2 = C1 + C2 (C1 exact in float32)
_P0, _P1, _P2 = 1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3
_P3, _P4, _P5 = 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1


@_jit
def _exp_inplace(x, n, bits, fast):
    """x[:n] = exp(x[:n]); fast (float32 input): the polynomial above, vectorised; else libm's."""
    if not fast:
        for t in range(n):
            x[t] = math.exp(x[t])
        return
    two_n = bits.view(np.float32)                      # the same bytes as floats
    for t in range(n):                                 # one branch-free loop: LLVM vectorises it
        v = min(max(x[t], np.float32(-87.3)), np.float32(88.7))
        k = np.floor(v * np.float32(_LOG2E) + np.float32(0.5))
        r = v - k * np.float32(_C1) - k * np.float32(_C2)
        p = ((((np.float32(_P0) * r + np.float32(_P1)) * r + np.float32(_P2)) * r
              + np.float32(_P3)) * r + np.float32(_P4)) * r + np.float32(_P5)
        x[t] = p * r * r + r + np.float32(1.0)
        bits[t] = (np.int32(k) + np.int32(127)) << 23
    for t in range(n):
        x[t] *= two_n[t]


# --- which keys a query sees: at most two runs of positions ------------------------------------
@_jit
def _runs(i, kind, local, stride, block, n_global):
    """Query i's keys as (a0, na, step, lo, nl): na keys a0, a0 + step, ... (block's globals,
    strided's keys i - m stride before the local part), then nl keys lo, lo + 1, ..., i."""
    if kind == BLOCK:
        lo = max(0, (i // block - 1) * block)          # first key of the block before i's
        return 0, min(n_global, lo), 1, lo, i + 1 - lo
    lo = max(0, i - local + 1)                         # the local window (strided: its local part)
    if kind == STRIDED and lo > 0:
        a0 = i % stride                                # i - a0 a multiple of stride
        return a0, (lo - 1 - a0) // stride + 1 if a0 < lo else 0, stride, lo, i + 1 - lo
    return 0, 0, 1, lo, i + 1 - lo


# Keys and values are read transposed, XT (D, T): a key's D numbers are a column, so the
# loops of _dots and _gather run over a query's keys along contiguous rows (slices: LLVM vectorises loops over
# slices, not over offset indices; measured ~3x), never a D-long sum per key. The near run
# (the local window, most of the keys) takes 4 rows of XT per pass, so its output is loaded
# and stored once per 4 products (D % 4 rows go one at a time); the far run is short.
@_jit
def _dots(out, x, XT, a0, na, step, lo, nl, scale):
    """out[t] = scale x . X[key_t] for the query's keys (t < na: the far run, then the near)."""
    far, near = out[:na], out[na:na + nl]
    far[:] = 0
    near[:] = 0
    D = XT.shape[0]
    for c in range(D):
        xc, row = x[c] * scale, XT[c, a0:a0 + na * step:step]
        for t in range(na):
            far[t] += xc * row[t]
    for c in range(0, D - D % 4, 4):
        x0, x1, x2, x3 = x[c] * scale, x[c + 1] * scale, x[c + 2] * scale, x[c + 3] * scale
        r0, r1, r2, r3 = XT[c, lo:lo + nl], XT[c + 1, lo:lo + nl], XT[c + 2, lo:lo + nl], XT[c + 3, lo:lo + nl]
        for t in range(nl):
            near[t] += x0 * r0[t] + x1 * r1[t] + x2 * r2[t] + x3 * r3[t]
    for c in range(D - D % 4, D):
        xc, row = x[c] * scale, XT[c, lo:lo + nl]
        for t in range(nl):
            near[t] += xc * row[t]


@_jit
def _gather(out, w, XT, a0, na, step, lo, nl):
    """out[c] = sum_t w[t] X[key_t, c]: the weighted sum of the keys' rows."""
    w_far, w_near = w[:na], w[na:na + nl]
    D = XT.shape[0]
    for c in range(0, D - D % 4, 4):
        r0, r1, r2, r3 = XT[c, lo:lo + nl], XT[c + 1, lo:lo + nl], XT[c + 2, lo:lo + nl], XT[c + 3, lo:lo + nl]
        s0 = s1 = s2 = s3 = out[c] - out[c]             # 0 in the dtype
        for t in range(nl):
            s0 += w_near[t] * r0[t]
            s1 += w_near[t] * r1[t]
            s2 += w_near[t] * r2[t]
            s3 += w_near[t] * r3[t]
        out[c], out[c + 1], out[c + 2], out[c + 3] = s0, s1, s2, s3
    for c in range(D - D % 4, D):
        row = XT[c, lo:lo + nl]
        total = out[c] - out[c]
        for t in range(nl):
            total += w_near[t] * row[t]
        out[c] = total
    for c in range(D):
        row = XT[c, a0:a0 + na * step:step]
        total = out[c] - out[c]
        for t in range(na):
            total += w_far[t] * row[t]
        out[c] += total


@_jit
def _scatter(X, w, x, a0, na, step, lo, nl):
    """X[key_t] += w[t] x for the query's keys. Here X (T, D) is *not* transposed: each key's
    row is D contiguous numbers updated at once (measured faster than 4 rows of XT per pass,
    which LLVM must assume may overlap)."""
    D = X.shape[1]
    near, w_near = X[lo:lo + nl], w[na:na + nl]
    for t in range(nl):
        wt = w_near[t]
        for c in range(D):
            near[t, c] += wt * x[c]
    for t in range(na):
        wt, j = w[t], a0 + t * step
        for c in range(D):
            X[j, c] += wt * x[c]


@_jit
def _forward(q, k, v, kind, local, stride, block, n_global, scale, fast, y, lse):
    B, H, T, D = q.shape
    s = np.empty(T, q.dtype)                           # one query's scores, then weights
    bits = np.empty(T, np.int32)                       # scratch of _exp_inplace
    for b in range(B):
        for h in range(H):
            KT, VT = np.ascontiguousarray(k[b, h].T), np.ascontiguousarray(v[b, h].T)   # (D, T)
            for i in range(T):
                a0, na, step, lo, nl = _runs(i, kind, local, stride, block, n_global)
                n = na + nl
                _dots(s, q[b, h, i], KT, a0, na, step, lo, nl, scale)   # s_t = q_i . k_t / sqrt(D)
                m = s[0]                               # n >= 1: query i sees itself
                for t in range(1, n):
                    m = max(m, s[t])
                for t in range(n):
                    s[t] -= m
                _exp_inplace(s, n, bits, fast)
                total = 0.0                            # float64 sum
                for t in range(n):
                    total += s[t]
                yi = y[b, h, i]
                _gather(yi, s, VT, a0, na, step, lo, nl)                # sum_t p_t v_t
                inv = 1.0 / total
                for c in range(D):
                    yi[c] *= inv
                lse[b, h, i] = m + math.log(total)


@_jit
def _backward(dy, q, k, v, y, lse, kind, local, stride, block, n_global, scale, fast, dq, dk, dv):
    B, H, T, D = q.shape
    p = np.empty(T, q.dtype)                           # one query's weights p_t
    ds = np.empty(T, q.dtype)                          # and score gradients
    bits = np.empty(T, np.int32)
    one = scale / scale                                # 1 in the input dtype
    for b in range(B):
        for h in range(H):
            KT, VT = np.ascontiguousarray(k[b, h].T), np.ascontiguousarray(v[b, h].T)   # (D, T)
            dkb, dvb = dk[b, h], dv[b, h]
            dkb[:] = 0
            dvb[:] = 0
            for i in range(T):
                a0, na, step, lo, nl = _runs(i, kind, local, stride, block, n_global)
                n = na + nl
                qi, dyi, yi = q[b, h, i], dy[b, h, i], y[b, h, i]
                _dots(p, qi, KT, a0, na, step, lo, nl, scale)
                li = lse[b, h, i]
                for t in range(n):
                    p[t] -= li
                _exp_inplace(p, n, bits, fast)         # p_t = exp(s_t - lse_i): the softmax
                _dots(ds, dyi, VT, a0, na, step, lo, nl, one)       # dy_i . v_t
                delta = yi[0] * dyi[0]                 # dy_i . y_i = sum_t p_t (dy_i . v_t)
                for c in range(1, D):
                    delta += yi[c] * dyi[c]
                for t in range(n):
                    ds[t] = p[t] * (ds[t] - delta) * scale
                _gather(dq[b, h, i], ds, KT, a0, na, step, lo, nl)  # dq_i = sum_t ds_t k_t
                _scatter(dkb, ds, qi, a0, na, step, lo, nl)         # dk_t += ds_t q_i
                _scatter(dvb, p, dyi, a0, na, step, lo, nl)         # dv_t += p_t dy_i


def _ints(pattern):
    """The pattern's settings as ints for the compiled code (kind, local, stride, block, n_global)."""
    if pattern.name not in _KIND:
        raise ValueError(f"pattern {pattern.name!r}: the twin knows {sorted(_KIND)}")
    return (_KIND[pattern.name], int(pattern.local or 1), int(pattern.stride or 1),
            int(pattern.block or 1), int(pattern.n_global or 0))


def _contiguous(*arrays):
    return [np.ascontiguousarray(a) for a in arrays]


def pattern_attention_forward(q, k, v, pattern):
    """Accelerated minillm.sparse_attention.pattern_attention_forward — see it for the math."""
    q, k, v = _contiguous(q, k, v)
    B, H, T, D = q.shape
    y = np.empty_like(q)
    lse = np.empty((B, H, T), dtype=q.dtype)
    _forward(q, k, v, *_ints(pattern), q.dtype.type(1.0 / math.sqrt(D)), q.dtype == np.float32,
             y, lse)
    return y, lse


def pattern_attention_backward(dy, q, k, v, y, lse, pattern):
    """Accelerated minillm.sparse_attention.pattern_attention_backward — see it for the math."""
    dy, q, k, v, y, lse = _contiguous(dy, q, k, v, y, lse)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    _backward(dy, q, k, v, y, lse, *_ints(pattern), q.dtype.type(1.0 / math.sqrt(q.shape[3])),
              q.dtype == np.float32, dq, dk, dv)
    return dq, dk, dv


KERNELS["sparse_attention.pattern_attention_forward"] = pattern_attention_forward
KERNELS["sparse_attention.pattern_attention_backward"] = pattern_attention_backward
