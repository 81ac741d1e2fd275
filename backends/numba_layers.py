"""Numba twins of minillm.layers / minillm.attention kernels.

Each twin takes the reference's arguments and returns the same structure;
caches are NamedTuples with the reference's field names and order (declared
here, because ``backends`` never imports ``minillm``), so the model reads them
by attribute exactly as it reads the reference ones.

Where the time goes and how the twins win (``bench/profile_step.py``):
- the linear layers (two thirds of a ``small`` step) stay BLAS, as one 2-D
  product over all rows instead of one per leading index;
- one fused pass per row instead of one NumPy temporary per operator (GELU,
  LayerNorm, softmax, cross-entropy); loops are ``prange`` over rows, serial
  unless ``PARALLEL`` (see there);
- causal attention: the matrix products stay BLAS (NumPy ``@``) but skip the
  blocks wholly above the diagonal (64-row query/key blocks: ~40% fewer flops
  at T=256); the scale, mask and softmax (and their backward) run fused over
  the lower triangle only.
- ``exp`` (softmax, cross-entropy) and GELU's tanh, written as a sigmoid, are
  ``numba_math``'s plain-arithmetic versions inside the fused passes: Numba
  without SVML would call scalar libm, and NumPy's float32 ``exp`` / ``tanh``
  ran scalar on AVX2 CPUs too (AMD EPYC: GELU 8 -> 3 ms per ``small`` layer).

Arithmetic runs in the input dtype (constants are passed in that dtype), so a
float32 twin rounds like the float32 reference and float64 stays float64; sums
over a row accumulate in float64. Leading axes are flattened: ``(..., C)``
becomes ``(N, C)`` inside. ``error_model="numpy"`` drops Python's
division-by-zero check, which would stop LLVM from vectorising the loops.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from backends.numba_math import vexp, vsigmoid

# Serial by default: OpenBLAS keeps its threads spinning for a while after each
# product, and a Numba pool (OpenMP layer here) started right after competes
# with them for the 2 cores; on the shared machine the parallel variant was
# erratic (tiny: slower, small: inconclusive); measured again (issue 15, AMD EPYC,
# ``small`` step, OpenBLAS and Numba on 2 threads, 3 interleaved rounds): 1877 ms
# median with True vs 978 ms with False; and with OpenMP's threads sleeping
# (OMP_WAIT_POLICY=PASSIVE, numba_backend) and the one-pass GELU / cross-entropy,
# per-round medians 1310-1734 ms with True vs 1160-1345 ms with False (3 rounds,
# a busy host), 860-884 vs 729-807 ms on a quiet one (also with OpenBLAS's workers
# sleeping at once, OPENBLAS_THREAD_TIMEOUT=4, True stayed slower). The twins gain
# by fusing passes; the cores go to BLAS. With OpenBLAS's workers sleeping soon
# (2^20 cycles, ``numba_threads``), alone after a 2-thread product, Numba's pool
# took LayerNorm from 0.25 to 0.52 ms, left GELU as it was and cross-entropy's
# forward from 20 to 13 ms; row blocks on Python threads (``numba_threads``)
# inside a ``small`` step: cross-entropy forward 10.9 -> 6.9 ms, but its backward
# 4.3 -> 7.3, AdamW 5.0 -> 5.9 (memory-bound), the step 573 -> 619 ms. Flip to
# True to compare on another machine (editing this file invalidates Numba's
# on-disk cache, so no stale code runs).
PARALLEL = False
_jit = njit(cache=True, parallel=PARALLEL, fastmath=False, error_model="numpy")
# Row sums may be reordered (``reassoc`` only: no change to NaN/inf handling) so
# they vectorise; they accumulate in float64 anyway.
_jit_sum = njit(cache=True, parallel=PARALLEL, fastmath={"reassoc"}, error_model="numpy")
# Loops with nothing to split (one row, a scatter with repeated targets): never parallel.
_jit_serial = njit(cache=True, fastmath={"reassoc"}, error_model="numpy")
_GELU_S = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715
_CHUNKS = 16   # row blocks for column sums when PARALLEL (fixed: results do not depend on threads)


class LinearCache(NamedTuple):
    x: np.ndarray          # (..., Cin)
    w: np.ndarray          # (Cin, Cout)
    has_bias: bool


class LayerNormCache(NamedTuple):
    xhat: np.ndarray       # (..., C)
    rstd: np.ndarray       # (..., 1)
    w: np.ndarray          # (C,)


class CrossEntropyCache(NamedTuple):
    probs: np.ndarray      # (N, V)
    targets: np.ndarray    # (N,)


class SDPACache(NamedTuple):
    q: np.ndarray          # (B, H, T, D)
    k: np.ndarray          # (B, H, S, D)
    v: np.ndarray          # (B, H, S, D)
    att: np.ndarray        # (B, H, T, S)


def _flat(x, dtype=None):
    """Any shape -> C-contiguous 1-D view or copy."""
    return np.ascontiguousarray(x, dtype=dtype).reshape(-1)        # (N,)


def _rows(x, dtype=None):
    """(..., C) -> C-contiguous (N, C) view or copy."""
    return np.ascontiguousarray(x, dtype=dtype).reshape(-1, x.shape[-1])  # (N, C)


def _chunk_bounds(n, chunks):
    """Edges of ``chunks`` near-equal blocks of ``n`` rows -> (chunks + 1,) int64."""
    return np.linspace(0, n, chunks + 1).astype(np.int64)


# --- linear: one 2-D product over all rows ---------------------------------------
# NumPy's ``matmul`` of a (B, T, Cin) array with a (Cin, Cout) matrix runs one BLAS
# call per leading index (B calls of (T, Cin) @ (Cin, Cout)); flattened to
# (B T, Cin) it is a single, larger call, which BLAS blocks better (issue 15, 1
# thread: 10-13% on the backward's dx for ``small`` on an Intel Xeon; 2-6% per
# product on ``small`` and ``wide`` shapes on an AMD EPYC). The bias is added in
# place on the product, no temporary. Half precision keeps the reference
# (``accepts_half`` is not set; ``numba_precision`` owns the half forward).
def linear_forward(x, w, b=None):
    """Accelerated minillm.layers.linear_forward — see it for the math."""
    x2 = x.reshape(-1, x.shape[-1])                                 # (N, Cin) view if it can be
    y = np.matmul(x2, w)                                            # (N, Cout) one BLAS call
    if b is not None:
        y += b
    return y.reshape(x.shape[:-1] + (w.shape[1],)), LinearCache(x, w, b is not None)


def linear_backward(dy, cache):
    """Accelerated minillm.layers.linear_backward — see it for the math."""
    x, w, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                              # (N, Cout)
    x2 = x.reshape(-1, x.shape[-1])                                 # (N, Cin)
    dx = np.matmul(dy2, w.T)                                        # (N, Cin) one BLAS call
    if w.flags.f_contiguous and not w.flags.c_contiguous:           # w = a transposed array
        dw = np.matmul(dy2.T, x2).T                                 # (Cin, Cout) in w's layout
    else:                                                           # (the tied head: dwte then adds
        dw = np.matmul(x2.T, dy2)                                   # up without a transposing pass)
    db = dy2.sum(axis=0) if has_bias else None                      # (Cout,)
    return dx.reshape(x.shape), dw, db


# --- GELU: one fused pass each way, tanh written as a sigmoid ----------------------
# 0.5 (1 + tanh(u)) = sigmoid(2u), so gelu(x) = x sigmoid(2u) with u = s (x + a x^3),
# and since 1 - tanh(u)^2 = 4 sigmoid(2u) (1 - sigmoid(2u)):
#     gelu'(x) = g + 2 x g (1 - g) s (1 + 3 a x^2),   g = sigmoid(2u).
# The same function as the reference's tanh form, within float32 rounding, and
# without its 1 + tanh(u) cancellation for large negative x. ``vsigmoid`` is plain
# arithmetic (``numba_math``), so each pass is one vectorised loop: NumPy's
# float32 tanh ran scalar on AVX2 CPUs (AMD EPYC: 11.8 ms per 2 Mi elements;
# the old three-pass twin with it took ~8 ms per ``small`` layer each way).
#
# Not done: fusing c_fc's bias add into these passes (and its bias gradient into
# the backward). Measured with a Numba prototype it saved under 1% of a ``small``
# step, and it would need the linear seam to hand back the product without its bias.
@_jit
def _gelu_fwd(x, y, s2, a):
    """y = x sigmoid(2 s (x + a x^3)); ``s2`` = 2 s."""
    for i in prange(x.shape[0]):
        xi = x[i]
        y[i] = xi * vsigmoid(s2 * (xi + a * xi * xi * xi))


@_jit
def _gelu_bwd(dy, x, dx, s2, a, three_a, one):
    """dx = dy gelu'(x); ``s2`` = 2 s, so 2 x g (1 - g) s = x g (1 - g) s2."""
    for i in prange(x.shape[0]):
        xi = x[i]
        g = vsigmoid(s2 * (xi + a * xi * xi * xi))
        dx[i] = dy[i] * (g + xi * g * (one - g) * s2 * (one + three_a * xi * xi))


def gelu_forward(x):
    """Accelerated minillm.layers.gelu_forward — see it for the math."""
    x1 = _flat(x)                                                   # (N,)
    c = x1.dtype.type
    y = np.empty_like(x1)
    _gelu_fwd(x1, y, c(2.0 * _GELU_S), c(_GELU_A))
    return y.reshape(x.shape), x


def gelu_backward(dy, x):
    """Accelerated minillm.layers.gelu_backward — see it for the math."""
    x1 = _flat(x)                                                   # (N,)
    c = x1.dtype.type
    dx = np.empty_like(x1)
    _gelu_bwd(_flat(dy, x1.dtype), x1, dx, c(2.0 * _GELU_S), c(_GELU_A), c(3.0 * _GELU_A), c(1.0))
    return dx.reshape(x.shape)


# --- embedding backward: scatter-add rows in one compiled loop --------------------
# The reference's ``np.add.at`` is NumPy's slow path for repeated indices
# (8-20 ms per ``small`` step for dwte); this is the same sums in the same order.
@_jit_serial
def _scatter_add_rows(out, rows, x):
    """out[rows[i]] += x[i] for i = 0, 1, ... in order (a row id may repeat)."""
    for i in range(rows.shape[0]):
        r = rows[i]
        for c in range(x.shape[1]):
            out[r, c] += x[i, c]


def _check_rows(rows, n, what):
    if rows.size and (rows.min() < -n or rows.max() >= n):
        raise IndexError(f"{what} has ids outside [0, {n}): min {rows.min()}, max {rows.max()}")


def embedding_backward(dx, cache):
    """Accelerated minillm.layers.embedding_backward — see it for the math."""
    x2 = _rows(dx)                                                  # (N, C)
    C = x2.shape[1]
    idx = np.ascontiguousarray(cache.idx).reshape(-1)               # (N,)
    _check_rows(idx, cache.vocab_size, "idx")
    dwte = np.zeros((cache.vocab_size, C), dtype=dx.dtype)          # (V, C)
    _scatter_add_rows(dwte, idx, x2)
    dwpe = np.zeros((cache.block_size, C), dtype=dx.dtype)          # (T_max, C)
    if cache.positions.ndim == 1:                                   # shared by all rows: distinct
        dwpe[cache.positions] = dx.sum(axis=0)                      # (T, C)
    else:
        pos = np.ascontiguousarray(cache.positions).reshape(-1)
        _check_rows(pos, cache.block_size, "positions")
        _scatter_add_rows(dwpe, pos, x2)
    return dwte, dwpe


# --- LayerNorm -------------------------------------------------------------------
@_jit_sum
def _ln_fwd(x, w, b, eps, y, xhat, rstd):
    N, C = x.shape
    for i in prange(N):
        m = 0.0
        for c in range(C):
            m += x[i, c]
        m /= C
        v = 0.0
        for c in range(C):
            d = x[i, c] - m
            v += d * d
        r = 1.0 / math.sqrt(v / C + eps)
        rstd[i, 0] = r
        for c in range(C):
            xhat[i, c] = (x[i, c] - m) * r
            y[i, c] = xhat[i, c] * w[c] + b[c]


@_jit_sum
def _ln_bwd(dy, xhat, rstd, w, dx, dw_part, db_part, edges):
    N, C = dy.shape
    for k in prange(edges.shape[0] - 1):
        for i in range(edges[k], edges[k + 1]):
            mg, mgx = 0.0, 0.0
            for c in range(C):
                g = dy[i, c] * w[c]
                mg += g
                mgx += g * xhat[i, c]
                dw_part[k, c] += dy[i, c] * xhat[i, c]
                db_part[k, c] += dy[i, c]
            mg /= C
            mgx /= C
            r = rstd[i, 0]
            for c in range(C):
                dx[i, c] = (dy[i, c] * w[c] - mg - xhat[i, c] * mgx) * r


def layernorm_forward(x, w, b, eps: float = 1e-5):
    """Accelerated minillm.layers.layernorm_forward — see it for the math."""
    x2 = _rows(x)                                                   # (N, C)
    y, xhat = np.empty_like(x2), np.empty_like(x2)                  # (N, C)
    rstd = np.empty((x2.shape[0], 1), dtype=x2.dtype)              # (N, 1)
    _ln_fwd(x2, _flat(w, x2.dtype), _flat(b, x2.dtype), float(eps), y, xhat, rstd)
    lead = x.shape[:-1]
    return y.reshape(x.shape), LayerNormCache(xhat.reshape(x.shape), rstd.reshape(lead + (1,)), w)


def layernorm_backward(dy, cache):
    """Accelerated minillm.layers.layernorm_backward — see it for the math."""
    xhat, rstd, w = cache
    xh2 = _rows(xhat)                                               # (N, C)
    N, C = xh2.shape
    dx = np.empty_like(xh2)                                         # (N, C)
    # column sums in the input dtype, row after row, as NumPy's sum(axis=0) does;
    # in parallel each row block keeps its own partial sums
    chunks = _CHUNKS if PARALLEL else 1
    dw_part = np.zeros((chunks, C), dtype=xh2.dtype)               # (chunks, C)
    db_part = np.zeros((chunks, C), dtype=xh2.dtype)
    _ln_bwd(_rows(dy, xh2.dtype), xh2, _rows(rstd), _flat(w, xh2.dtype), dx,
            dw_part, db_part, _chunk_bounds(N, chunks))
    return dx.reshape(xhat.shape), dw_part.sum(axis=0), db_part.sum(axis=0)


# --- softmax over the last axis: row max by NumPy, then exp and normalise fused ------
_SUM_BLOCK = 256    # exp sums: blocks of 256 terms in the input dtype (one vectorised loop), added in float64


@_jit_serial
def _exp_sum(src, dst, shift, zero):
    """dst = exp(src - shift) for one row -> the sum of dst, in float64 across blocks.

    Each block is a slice walked from 0: written as ``range(c0, min(c0 + 256, n))``
    over the whole row, LLVM left the loop scalar (2.0 ns per element on
    ``small``'s (2048, 4096) logits against 0.39 ns this way, AMD EPYC).
    """
    total = 0.0
    for c0 in range(0, src.shape[0], _SUM_BLOCK):
        s = src[c0:c0 + _SUM_BLOCK]
        d = dst[c0:c0 + _SUM_BLOCK]
        part = zero
        for c in range(s.shape[0]):
            p = vexp(s[c] - shift)
            d[c] = p
            part += p
        total += part
    return total


@_jit_sum
def _softmax_rows(x, mx, e, zero):
    """e = exp(x - mx) / rowsum per row (x, e: (N, C); mx: (N,) row maxima)."""
    N, C = x.shape
    for i in prange(N):
        inv = e.dtype.type(1.0 / _exp_sum(x[i], e[i], mx[i], zero))  # one division per row
        for c in range(C):
            e[i, c] = e[i, c] * inv


@_jit_sum
def _softmax_bwd(dy, y, dx):
    N, C = y.shape
    for i in prange(N):
        s = 0.0
        for c in range(C):
            s += dy[i, c] * y[i, c]
        for c in range(C):
            dx[i, c] = y[i, c] * (dy[i, c] - s)


def softmax_forward(x):
    """Accelerated minillm.layers.softmax_forward — see it for the math."""
    x2 = _rows(x)                                                   # (N, C)
    e = np.empty_like(x2)
    mx = x2.max(axis=-1)                                            # (N,) NaN propagates as in the reference
    _softmax_rows(x2, mx, e, x2.dtype.type(0))
    y = e.reshape(x.shape)
    return y, y


def softmax_backward(dy, y):
    """Accelerated minillm.layers.softmax_backward — see it for the math."""
    y2 = _rows(y)                                                   # (N, C)
    dx = np.empty_like(y2)
    _softmax_bwd(_rows(dy, y2.dtype), y2, dx)
    return dx.reshape(y.shape)


# --- cross-entropy: row max by NumPy, then exp, sums, loss and normalise fused -------
@_jit_sum
def _ce_rows(z, mx, t, probs, row_loss, zero):
    """probs = softmax(z) per row, row_loss = log-sum-exp - (z[t] - mx), in one pass over z
    (mx: (N,) row maxima, so exp never overflows)."""
    N, V = z.shape
    for i in prange(N):
        s = _exp_sum(z[i], probs[i], mx[i], zero)
        row_loss[i] = math.log(s) - (z[i, t[i]] - mx[i])
        inv = probs.dtype.type(1.0 / s)                             # one division per row
        for c in range(V):
            probs[i, c] = probs[i, c] * inv


@_jit
def _ce_bwd(probs, t, g, dz):
    N, V = probs.shape
    for i in prange(N):
        for c in range(V):
            dz[i, c] = probs[i, c] * g
        dz[i, t[i]] -= g


def cross_entropy_forward(logits, targets):
    """Accelerated minillm.layers.cross_entropy_forward — see it for the math."""
    z = _rows(logits)                                               # (N, V)
    t = np.ascontiguousarray(targets).reshape(-1)                   # (N,)
    _check_rows(t, z.shape[1], "targets")
    probs = np.empty_like(z)                                        # (N, V)
    mx = z.max(axis=-1)                                             # (N,) NaN propagates as in the reference
    row_loss = np.empty(z.shape[0])                                 # (N,) float64
    _ce_rows(z, mx, t, probs, row_loss, z.dtype.type(0))
    return z.dtype.type(row_loss.mean()), CrossEntropyCache(probs, t)


def cross_entropy_backward(dloss, cache, shape):
    """Accelerated minillm.layers.cross_entropy_backward — see it for the math."""
    probs, t = cache
    dz = np.empty_like(probs)                                       # (N, V)
    _ce_bwd(probs, np.ascontiguousarray(t), probs.dtype.type(dloss / probs.shape[0]), dz)
    return dz.reshape(shape)


# --- causal attention: BLAS products, fused masked softmax on the lower triangle ----
@_jit
def _causal_shift(sc, scale, offset):
    """sc (R, T, S): scale, then subtract each row's max over keys s <= offset + t; -inf above."""
    R, T, S = sc.shape
    for r in prange(R):
        for t in range(T):
            n = min(offset + t + 1, S)
            mx = sc[r, t, 0] * scale
            for s in range(n):
                sc[r, t, s] = sc[r, t, s] * scale
                if sc[r, t, s] > mx:
                    mx = sc[r, t, s]
            for s in range(n):
                sc[r, t, s] = sc[r, t, s] - mx
            for s in range(n, S):
                sc[r, t, s] = -np.inf


@_jit_sum
def _causal_normalize(e, offset):
    """e (R, T, S): divide each row's kept entries by their sum; 0 above the diagonal."""
    R, T, S = e.shape
    for r in prange(R):
        for t in range(T):
            n = min(offset + t + 1, S)
            s = 0.0
            for j in range(n):
                s += e[r, t, j]
            for j in range(n):
                e[r, t, j] = e[r, t, j] / s
            for j in range(n, S):
                e[r, t, j] = 0.0


@_jit_sum
def _causal_softmax_bwd(datt, att, scale, offset):
    """In place: datt <- att * (datt - sum(datt * att)) * scale; 0 above the diagonal."""
    R, T, S = att.shape
    for r in prange(R):
        for t in range(T):
            n = min(offset + t + 1, S)
            s = 0.0
            for j in range(n):
                s += datt[r, t, j] * att[r, t, j]
            for j in range(n):
                datt[r, t, j] = att[r, t, j] * (datt[r, t, j] - s) * scale
            for j in range(n, S):
                datt[r, t, j] = 0.0


_BLOCK = 64   # query/key block: products skip blocks wholly above the diagonal


def _blocks(n):
    """[(start, stop), ...] covering range(n) in steps of ``_BLOCK``."""
    return [(a, min(a + _BLOCK, n)) for a in range(0, n, _BLOCK)]


def sdpa_forward(q, k, v):
    """Accelerated minillm.attention.sdpa_forward — see it for the math."""
    B, H, T, D = q.shape
    S = k.shape[2]
    off = S - T                                                     # query t sees keys <= off + t
    att = np.empty((B, H, T, S), dtype=q.dtype)                     # (B, H, T, S)
    kT = k.transpose(0, 1, 3, 2)                                    # (B, H, D, S)
    for t0, t1 in _blocks(T):                                       # scores: lower blocks only
        att[:, :, t0:t1, :off + t1] = q[:, :, t0:t1] @ kT[..., :off + t1]
    sc = att.reshape(B * H, T, S)                                   # (BH, T, S) view
    _causal_shift(sc, q.dtype.type(1.0 / math.sqrt(D)), off)       # scale, - row max, -inf above
    for t0, t1 in _blocks(T):
        blk = att[:, :, t0:t1, :off + t1]
        np.exp(blk, out=blk)
    _causal_normalize(sc, off)
    y = np.empty((B, H, T, D), dtype=q.dtype)                       # (B, H, T, D)
    for t0, t1 in _blocks(T):
        y[:, :, t0:t1] = att[:, :, t0:t1, :off + t1] @ v[:, :, :off + t1]
    return y, SDPACache(q, k, v, att)


def sdpa_backward(dy, cache):
    """Accelerated minillm.attention.sdpa_backward — see it for the math."""
    q, k, v, att = cache
    B, H, T, D = q.shape
    S = k.shape[2]
    off = S - T
    att = np.ascontiguousarray(att)
    ds = np.empty((B, H, T, S), dtype=q.dtype)                      # datt, then dscores in place
    vT = v.transpose(0, 1, 3, 2)                                    # (B, H, D, S)
    for t0, t1 in _blocks(T):
        ds[:, :, t0:t1, :off + t1] = dy[:, :, t0:t1] @ vT[..., :off + t1]
    _causal_softmax_bwd(ds.reshape(B * H, T, S), att.reshape(B * H, T, S),
                        q.dtype.type(1.0 / math.sqrt(D)), off)
    dq = np.empty((B, H, T, D), dtype=q.dtype)                      # (B, H, T, D)
    for t0, t1 in _blocks(T):
        dq[:, :, t0:t1] = ds[:, :, t0:t1, :off + t1] @ k[:, :, :off + t1]
    dk = np.empty((B, H, S, D), dtype=q.dtype)                      # (B, H, S, D)
    dv = np.empty((B, H, S, D), dtype=q.dtype)
    for s0, s1 in _blocks(S):                                       # key block: queries t >= s0 - off
        t0 = max(s0 - off, 0)
        dv[:, :, s0:s1] = att[:, :, t0:, s0:s1].transpose(0, 1, 3, 2) @ dy[:, :, t0:]
        dk[:, :, s0:s1] = ds[:, :, t0:, s0:s1].transpose(0, 1, 3, 2) @ q[:, :, t0:]
    return dq, dk, dv


KERNELS = {
    "layers.embedding_backward": embedding_backward,
    "layers.linear_forward": linear_forward,
    "layers.linear_backward": linear_backward,
    "layers.gelu_forward": gelu_forward,
    "layers.gelu_backward": gelu_backward,
    "layers.layernorm_forward": layernorm_forward,
    "layers.layernorm_backward": layernorm_backward,
    "layers.softmax_forward": softmax_forward,
    "layers.softmax_backward": softmax_backward,
    "layers.cross_entropy_forward": cross_entropy_forward,
    "layers.cross_entropy_backward": cross_entropy_backward,
    "attention.sdpa_forward": sdpa_forward,
    "attention.sdpa_backward": sdpa_backward,
}
