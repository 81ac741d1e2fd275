"""Numba twins of minillm.sparse_attention's pattern kernels (window, strided, block).

The NumPy reference (``sparse_attention.pattern_attention_forward/backward``)
works in chunks: a query scores the 2c keys of its chunk and the chunk before
(c >= the window) and masks the ones its pattern forbids, so a window of 256
pays for 512 scores and for the mask, softmax and backward passes over all of
them, one NumPy temporary per operator.

Here the queries go four at a time (a *quad*, rows i0 .. i0 + 3). A query's keys
are at most two runs of positions (``_runs``): the near run lo .. i (the window;
block's own block and the one before; strided's local part), and a short far run
(block's n_global first positions, strided's i - m stride). The four near runs
overlap almost entirely, so the quad scores the union L .. i0 + 3 (w + 3 keys
for a window of w) as one (4, n) tile and zeroes, after the exp, the entries a
row's pattern forbids; the far runs go row by row. The work is the pattern's,
O(T w D) for a window of w, plus 3 / w. Per quad, fused:

forward   S = Q K_band^T / sqrt(D) (4, n); m_r = max S_r; P = exp(S - m) on each row's
          allowed keys, 0 elsewhere; y_r = P_r V_band / sum P_r;
          lse_r = m_r + log sum P_r   (the softmax's log-normaliser)
backward  P = exp(S - lse) recomputed (FlashAttention's trade: no (T, w) matrix kept);
          dS = P * (dY V_band^T - delta) / sqrt(D), delta_r = dy_r . y_r   (the softmax
          backward, since sum_j p_j (dy . v_j) = dy . y); dQ = dS K_band,
          dK_band += dS^T Q, dV_band += P^T dY

Every product is one of two small-times-band loops over the band's positions t
(``_mac``: a (4, 4) block of coefficients times 4 rows of the band, each loaded
element serving 4 multiply-adds; ``_dotrows``: 16 dot products along t at once),
with keys, values and their gradients stored transposed, (D, T), so the loops
over t read contiguous rows, which LLVM vectorises (``fastmath``: reassociated
sums). Arithmetic in the input dtype; exp: a vectorised polynomial for float32
(``_exp_inplace``), libm's for float64. Single-threaded, like the other twins
(``numba_layers.PARALLEL``). Axis legend as in ``minillm/model.py``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

KERNELS: dict = {}
WINDOW, STRIDED, BLOCK = 0, 1, 2
_KIND = {"window": WINDOW, "strided": STRIDED, "block": BLOCK}
R = 4                                                  # queries per quad
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


# --- the band products: a small matrix against rows of the band, along positions t ---------------
@_jit
def _mac(out, o0, m, x, x0, n):
    """out[a, o0 + t] += sum_b m[a, b] x[b, x0 + t] for t < n: m (A, Bm) small, x and out bands.
    4 x 4 blocks of m: per t, 4 loads of x and 4 loads + stores of out for 16 multiply-adds."""
    A, Bm = m.shape
    Bq = Bm - Bm % 4
    for a in range(0, A - A % 4, 4):
        u0, u1, u2, u3 = out[a, o0:o0 + n], out[a + 1, o0:o0 + n], out[a + 2, o0:o0 + n], out[a + 3, o0:o0 + n]
        for b in range(0, Bq, 4):
            v0, v1, v2, v3 = x[b, x0:x0 + n], x[b + 1, x0:x0 + n], x[b + 2, x0:x0 + n], x[b + 3, x0:x0 + n]
            m00, m01, m02, m03 = m[a, b], m[a, b + 1], m[a, b + 2], m[a, b + 3]
            m10, m11, m12, m13 = m[a + 1, b], m[a + 1, b + 1], m[a + 1, b + 2], m[a + 1, b + 3]
            m20, m21, m22, m23 = m[a + 2, b], m[a + 2, b + 1], m[a + 2, b + 2], m[a + 2, b + 3]
            m30, m31, m32, m33 = m[a + 3, b], m[a + 3, b + 1], m[a + 3, b + 2], m[a + 3, b + 3]
            for t in range(n):
                y0, y1, y2, y3 = v0[t], v1[t], v2[t], v3[t]
                u0[t] += m00 * y0 + m01 * y1 + m02 * y2 + m03 * y3
                u1[t] += m10 * y0 + m11 * y1 + m12 * y2 + m13 * y3
                u2[t] += m20 * y0 + m21 * y1 + m22 * y2 + m23 * y3
                u3[t] += m30 * y0 + m31 * y1 + m32 * y2 + m33 * y3
        for b in range(Bq, Bm):                        # Bm % 4 rows of x, one at a time
            v = x[b, x0:x0 + n]
            c0, c1, c2, c3 = m[a, b], m[a + 1, b], m[a + 2, b], m[a + 3, b]
            for t in range(n):
                y = v[t]
                u0[t] += c0 * y
                u1[t] += c1 * y
                u2[t] += c2 * y
                u3[t] += c3 * y
    for a in range(A - A % 4, A):                      # A % 4 rows of out, one at a time
        u = out[a, o0:o0 + n]
        for b in range(Bm):
            v, c = x[b, x0:x0 + n], m[a, b]
            for t in range(n):
                u[t] += c * v[t]


@_jit
def _dotrows(out, w, x, x0, n):
    """out[a, c] = sum_{t < n} w[a, t] x[c, x0 + t] for a < 4: four rows of weights against every
    row of the band (4 rows of x at a time, 16 sums along t)."""
    C = x.shape[0]
    w0, w1, w2, w3 = w[0, :n], w[1, :n], w[2, :n], w[3, :n]
    for c in range(0, C - C % 4, 4):
        v0, v1, v2, v3 = x[c, x0:x0 + n], x[c + 1, x0:x0 + n], x[c + 2, x0:x0 + n], x[c + 3, x0:x0 + n]
        z = out[0, 0] - out[0, 0]                      # 0 in the dtype
        s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = z
        s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = z
        for t in range(n):
            a0, a1, a2, a3 = w0[t], w1[t], w2[t], w3[t]
            y0, y1, y2, y3 = v0[t], v1[t], v2[t], v3[t]
            s00 += a0 * y0
            s01 += a0 * y1
            s02 += a0 * y2
            s03 += a0 * y3
            s10 += a1 * y0
            s11 += a1 * y1
            s12 += a1 * y2
            s13 += a1 * y3
            s20 += a2 * y0
            s21 += a2 * y1
            s22 += a2 * y2
            s23 += a2 * y3
            s30 += a3 * y0
            s31 += a3 * y1
            s32 += a3 * y2
            s33 += a3 * y3
        out[0, c], out[0, c + 1], out[0, c + 2], out[0, c + 3] = s00, s01, s02, s03
        out[1, c], out[1, c + 1], out[1, c + 2], out[1, c + 3] = s10, s11, s12, s13
        out[2, c], out[2, c + 1], out[2, c + 2], out[2, c + 3] = s20, s21, s22, s23
        out[3, c], out[3, c + 1], out[3, c + 2], out[3, c + 3] = s30, s31, s32, s33
    for c in range(C - C % 4, C):
        v = x[c, x0:x0 + n]
        z = out[0, 0] - out[0, 0]
        s0 = s1 = s2 = s3 = z
        for t in range(n):
            y = v[t]
            s0 += w0[t] * y
            s1 += w1[t] * y
            s2 += w2[t] * y
            s3 += w3[t] * y
        out[0, c], out[1, c], out[2, c], out[3, c] = s0, s1, s2, s3


# --- the far run of one query: a few keys a0, a0 + step, ... far apart, so read and written as
# rows of X (T, D) (a key's D numbers contiguous), not as columns of the transposed band ----------
@_jit
def _far_dots(out, x, X, a0, na, step):
    """out[t] = x . X[a0 + t step] for t < na."""
    for t in range(na):
        row = X[a0 + t * step]
        total = out[t] - out[t]
        for c in range(X.shape[1]):
            total += x[c] * row[c]
        out[t] = total


@_jit
def _far_gather(out, w, X, a0, na, step):
    """out += sum_t w[t] X[a0 + t step]."""
    for t in range(na):
        row, wt = X[a0 + t * step], w[t]
        for c in range(X.shape[1]):
            out[c] += wt * row[c]


@_jit
def _far_scatter(X, w, x, a0, na, step):
    """X[a0 + t step] += w[t] x for t < na."""
    for t in range(na):
        row, wt = X[a0 + t * step], w[t]
        for c in range(X.shape[1]):
            row[c] += wt * x[c]


# --- one quad's softmax rows ---------------------------------------------------------------------
@_jit
def _quad_runs(runs, i0, L, kind, local, stride, block, n_global):
    """runs[r] = (a0, na, step, s_lo, s_hi) of query i0 + r: its far run and its near keys as
    columns s_lo .. s_hi - 1 of the quad's tile (which starts at position L)."""
    for r in range(R):
        a0, na, step, lo, nl = _runs(i0 + r, kind, local, stride, block, n_global)
        runs[r, 0], runs[r, 1], runs[r, 2], runs[r, 3], runs[r, 4] = a0, na, step, lo - L, lo - L + nl


@_jit
def _exp_row(row, far, s_lo, s_hi, shift, bits, fast):
    """A row of the tile and its far scores: exp(x - shift) on the allowed columns
    (s_lo .. s_hi - 1 of row, all of far), 0 on the others of row."""
    row[:s_lo] = 0
    row[s_hi:] = 0
    near = row[s_lo:s_hi]
    for t in range(s_hi - s_lo):
        near[t] -= shift
    _exp_inplace(near, s_hi - s_lo, bits, fast)
    if far.shape[0] > 0:
        for t in range(far.shape[0]):
            far[t] -= shift
        _exp_inplace(far, far.shape[0], bits, fast)


@_jit
def _softmax_row(row, far, s_lo, s_hi, bits, fast):
    """One query's scores (row: the tile's, allowed on columns s_lo .. s_hi - 1; far: all
    allowed) -> exp(x - m) in place, m their max (0 where forbidden); returns (sum, m)."""
    near = row[s_lo:s_hi]
    m = near[0]                                        # query i sees itself: s_hi > s_lo
    for t in range(s_hi - s_lo):
        m = max(m, near[t])
    for t in range(far.shape[0]):
        m = max(m, far[t])
    _exp_row(row, far, s_lo, s_hi, m, bits, fast)
    total = 0.0                                        # float64 sum
    for t in range(s_hi - s_lo):
        total += near[t]
    for t in range(far.shape[0]):
        total += far[t]
    return total, m


@_jit
def _transposed(x, S):
    """x (T, D) -> (D, S) with x.T in its first T columns (S >= T: the row length, see _row_length)."""
    T, D = x.shape
    out = np.empty((D, S), x.dtype)
    for c in range(D):
        for t in range(T):
            out[c, t] = x[t, c]
    return out


@_jit
def _first_key(i0, kind, local, stride, block, n_global):
    """L: the first near key of query i0, the quad's first (lo is nondecreasing in i)."""
    return _runs(i0, kind, local, stride, block, n_global)[3]


@_jit
def _forward(q, k, v, kind, local, stride, block, n_global, scale, fast, S, y, lse):
    B, H, T, D = q.shape                               # T: a multiple of R (padded)
    s, f = np.empty((R, T), q.dtype), np.empty((R, T), q.dtype)   # the quad's tile, far scores
    bits = np.empty(T, np.int32)                       # scratch of _exp_inplace
    qs, totals = np.empty((R, D), q.dtype), np.empty(R)          # totals: float64 sums
    runs = np.empty((R, 5), np.int64)
    for b in range(B):
        for h in range(H):
            KT, VT = _transposed(k[b, h], S), _transposed(v[b, h], S)    # (D, S)
            for i0 in range(0, T, R):
                L = _first_key(i0, kind, local, stride, block, n_global)
                n = i0 + R - L                         # the tile: keys L .. i0 + 3
                _quad_runs(runs, i0, L, kind, local, stride, block, n_global)
                for r in range(R):
                    for c in range(D):
                        qs[r, c] = q[b, h, i0 + r, c] * scale
                for r in range(R):
                    s[r, :n] = 0
                _mac(s, 0, qs, KT, L, n)                       # S = Q K_band^T / sqrt(D)
                for r in range(R):
                    a0, na, step = runs[r, 0], runs[r, 1], runs[r, 2]
                    if na > 0:
                        _far_dots(f[r], qs[r], k[b, h], a0, na, step)
                    totals[r], m = _softmax_row(s[r, :n], f[r, :na], runs[r, 3], runs[r, 4], bits, fast)
                    lse[b, h, i0 + r] = m + math.log(totals[r])
                _dotrows(y[b, h, i0:i0 + R], s, VT, L, n)     # P V_band, not yet normalised
                for r in range(R):
                    yi = y[b, h, i0 + r]
                    if runs[r, 1] > 0:
                        _far_gather(yi, f[r], v[b, h], runs[r, 0], runs[r, 1], runs[r, 2])
                    inv = 1.0 / totals[r]              # the softmax's denominator
                    for c in range(D):
                        yi[c] *= inv


@_jit
def _backward(dy, q, k, v, y, lse, kind, local, stride, block, n_global, scale, fast, S, dq, dk, dv):
    B, H, T, D = q.shape                               # T: a multiple of R (padded)
    p, ds = np.empty((R, T), q.dtype), np.empty((R, T), q.dtype)   # the quad's P and dP, then dS
    fp, fd = np.empty((R, T), q.dtype), np.empty((R, T), q.dtype)  # the same for the far runs
    bits = np.empty(T, np.int32)
    qs, qt, dyt = np.empty((R, D), q.dtype), np.empty((D, R), q.dtype), np.empty((D, R), q.dtype)
    runs = np.empty((R, 5), np.int64)
    delta = np.empty(R, q.dtype)
    for b in range(B):
        for h in range(H):
            KT, VT = _transposed(k[b, h], S), _transposed(v[b, h], S)    # (D, S)
            dKT, dVT = np.zeros((D, S), q.dtype), np.zeros((D, S), q.dtype)   # the bands' part
            dkb, dvb = dk[b, h], dv[b, h]                 # (T, D): the far runs' part, then all
            dkb[:] = 0
            dvb[:] = 0
            for i0 in range(0, T, R):
                L = _first_key(i0, kind, local, stride, block, n_global)
                n = i0 + R - L
                _quad_runs(runs, i0, L, kind, local, stride, block, n_global)
                for r in range(R):
                    d = scale - scale                  # 0 in the dtype
                    for c in range(D):
                        qs[r, c] = q[b, h, i0 + r, c] * scale
                        qt[c, r] = q[b, h, i0 + r, c]
                        dyt[c, r] = dy[b, h, i0 + r, c]
                        d += dy[b, h, i0 + r, c] * y[b, h, i0 + r, c]
                    delta[r] = d                       # dy_i . y_i = sum_t p_t (dy_i . v_t)
                # pass 1: P = exp(S - lse) and dP = dY V^T on the tile and the far runs
                for r in range(R):
                    p[r, :n] = 0
                    ds[r, :n] = 0
                _mac(p, 0, qs, KT, L, n)
                _mac(ds, 0, dy[b, h, i0:i0 + R], VT, L, n)
                for r in range(R):
                    a0, na, step, s_lo, s_hi = runs[r, 0], runs[r, 1], runs[r, 2], runs[r, 3], runs[r, 4]
                    if na > 0:
                        _far_dots(fp[r], qs[r], k[b, h], a0, na, step)
                        _far_dots(fd[r], dy[b, h, i0 + r], v[b, h], a0, na, step)
                    _exp_row(p[r, :n], fp[r, :na], s_lo, s_hi, lse[b, h, i0 + r], bits, fast)
                # pass 2: dS = P (dP - delta) / sqrt(D); forbidden entries have P = 0
                for r in range(R):
                    dr, pr, sub = ds[r, :n], p[r, :n], delta[r]
                    for t in range(n):
                        dr[t] = pr[t] * (dr[t] - sub) * scale
                    fdr, fpr = fd[r], fp[r]
                    for t in range(runs[r, 1]):
                        fdr[t] = fpr[t] * (fdr[t] - sub) * scale
                # pass 3: dQ = dS K_band, dK_band += dS^T Q, dV_band += P^T dY
                _dotrows(dq[b, h, i0:i0 + R], ds, KT, L, n)
                _mac(dKT, L, qt, ds, 0, n)
                _mac(dVT, L, dyt, p, 0, n)
                for r in range(R):
                    a0, na, step = runs[r, 0], runs[r, 1], runs[r, 2]
                    if na == 0:
                        continue
                    _far_gather(dq[b, h, i0 + r], fd[r], k[b, h], a0, na, step)
                    _far_scatter(dkb, fd[r], q[b, h, i0 + r], a0, na, step)
                    _far_scatter(dvb, fp[r], dy[b, h, i0 + r], a0, na, step)
            dkb += dKT[:, :T].T
            dvb += dVT[:, :T].T


def _row_length(T: int, itemsize: int) -> int:
    """S >= T for the transposed (D, S) keys and values: rows 4 KiB + 1088 bytes apart (mod 4 KiB),
    so the 4 rows a loop of _mac reads and writes are not 4 KiB apart, which stalls loads behind
    stores they only seem to depend on ("4K aliasing"; ~1.2-1.5x on _mac's gradient loop in a
    micro-benchmark at T = 8192)."""
    return (-(-(T * itemsize - 1088) // 4096) * 4096 + 1088) // itemsize


def _ints(pattern):
    """The pattern's settings as ints for the compiled code (kind, local, stride, block, n_global)."""
    if pattern.name not in _KIND:
        raise ValueError(f"pattern {pattern.name!r}: the twin knows {sorted(_KIND)}")
    return (_KIND[pattern.name], int(pattern.local or 1), int(pattern.stride or 1),
            int(pattern.block or 1), int(pattern.n_global or 0))


def _padded(*arrays):
    """Contiguous copies with T rounded up to a multiple of R by zero rows: the last quad's
    extra queries see zero q, dy (so they add nothing to dk, dv) and are dropped."""
    T = arrays[0].shape[2]
    Tp = -(-T // R) * R
    out = []
    for a in arrays:
        if Tp == T:
            out.append(np.ascontiguousarray(a))
            continue
        z = np.zeros(a.shape[:2] + (Tp,) + a.shape[3:], a.dtype)
        z[:, :, :T] = a
        out.append(z)
    return out


def _cut(T, *arrays):
    """The first T rows of each (the padding dropped)."""
    return tuple(a if a.shape[2] == T else np.ascontiguousarray(a[:, :, :T]) for a in arrays)


def pattern_attention_forward(q, k, v, pattern):
    """Accelerated minillm.sparse_attention.pattern_attention_forward — see it for the math."""
    B, H, T, D = q.shape
    q, k, v = _padded(q, k, v)
    y = np.empty_like(q)
    lse = np.empty(q.shape[:3], dtype=q.dtype)
    _forward(q, k, v, *_ints(pattern), q.dtype.type(1.0 / math.sqrt(D)), q.dtype == np.float32,
             _row_length(q.shape[2], q.itemsize), y, lse)
    return _cut(T, y, lse)


def pattern_attention_backward(dy, q, k, v, y, lse, pattern):
    """Accelerated minillm.sparse_attention.pattern_attention_backward — see it for the math."""
    T = q.shape[2]
    dy, q, k, v, y, lse = _padded(dy, q, k, v, y, lse)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    _backward(dy, q, k, v, y, lse, *_ints(pattern), q.dtype.type(1.0 / math.sqrt(q.shape[3])),
              q.dtype == np.float32, _row_length(q.shape[2], q.itemsize), dq, dk, dv)
    return _cut(T, dq, dk, dv)


KERNELS["sparse_attention.pattern_attention_forward"] = pattern_attention_forward
KERNELS["sparse_attention.pattern_attention_backward"] = pattern_attention_backward
