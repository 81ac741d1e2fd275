"""Numba twins of minillm.attention.flash_forward / flash_backward (dense causal attention).

FlashAttention (Dao et al. 2022) on a CPU: the (T, S) score matrix of a head
is never built; queries go in blocks of ``TILE`` rows, keys in tiles of
``TILE`` columns, and only one (TILE, TILE) tile of scores per head exists at
any time. The forward keeps, per query, the running max ``m``, the running sum
``l`` of exp(score - m) and the running output; a tile that raises the max
rescales them by exp(m_old - m_new) (the online softmax). The backward
recomputes each tile of probabilities from the saved log-sum-exp instead of
reading a stored (T, S) matrix: memory O(T) per head instead of O(T S).

How the work is split on a CPU:
- heads are independent, so each of the B * H heads runs whole (all its tiles)
  on one thread of Numba's pool (``prange``): one compiled call per layer and
  pass, no Python between tiles, and the attention uses every core the user
  gave Numba (``NUMBA_NUM_THREADS``) instead of one. Results do not depend on
  the thread count: a head is computed the same way on any thread;
- the five tile products (q k^T, p v; and in the backward q k^T again, p^T dy,
  dy v^T, ds k, ds^T q) are BLAS calls (``np.dot`` on 2-D tiles, which Numba
  hands to SciPy's BLAS);
- everything between two products is a fused loop over the tile's rows
  (scale, causal mask, running max, exp, row sum, rescaling,
  ds = p (dp - delta)); ``exp`` is ``numba_math.vexp``, plain arithmetic that
  LLVM vectorises (Numba without SVML would call scalar libm, and NumPy's
  float32 ``exp`` runs scalar on AVX2 CPUs: 1.5-2.3 ns per element).
Tiles wholly above the causal diagonal are never computed, and inside a
diagonal tile the passes stop at each row's last visible key.

Measured (AMD EPYC, 2 cores, ``small``'s (8, 8, 256, 32), forward / backward
ms, Numba on 1 -> 2 threads in one process): 15.5 -> 12.4 / 25.1 -> 17.7; at 1
thread as fast as the previous twin, which looped over tiles in Python with
NumPy's batched ``matmul`` and ran on one core (a Python-thread head split of
it was slower: the GIL changed hands between every small call).

Arithmetic runs in the input dtype (float32 or float64; half precision runs
the reference); a tile's row sums (at most ``TILE`` terms) accumulate in the
input dtype, the delta row dots in float64.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from backends.numba_math import vexp

# Query block / key tile. Measured at 1 thread (AMD EPYC, flash fwd + bwd, min of 14
# interleaved runs): (B, H, T, D) = (8, 8, 256, 32): 64 -> 26.4 ms, 128 -> 30.9 ms;
# (4, 12, 256, 64): 64 -> 48.2 ms, 128 -> 62.8 ms. Smaller tiles skip more of the
# causal upper triangle (T=256: 10 of 16 tiles computed instead of 3 of 4) and a
# (64, 64) float32 tile per head (16 KiB) stays in L1/L2; 32 was no better than 64.
TILE = 64

_par = njit(cache=True, parallel=True, nogil=True, fastmath={"reassoc"}, error_model="numpy")
_jit = njit(cache=True, nogil=True, fastmath={"reassoc"}, error_model="numpy")


class FlashCache(NamedTuple):
    q: np.ndarray          # (B, H, T, D) C-contiguous copies of the inputs (the reference's values)
    k: np.ndarray          # (B, H, S, D)
    v: np.ndarray          # (B, H, S, D)
    y: np.ndarray          # (B, H, T, D)
    lse: np.ndarray        # (B, H, T)


def threads() -> int:
    """Threads the heads are spread over: Numba's setting (``NUMBA_NUM_THREADS``)."""
    return numba.get_num_threads()


@_jit
def _visible(off, t, s0, bs):
    """Keys of the tile starting at s0 (width bs) that query t sees (query t: keys <= off + t)."""
    return min(max(off + t - s0 + 1, 0), bs)


# --- forward ---------------------------------------------------------------------------------
@_jit
def _fwd_probs(s, m, l, alpha, scale, off, t0, s0):
    """One tile s (bt, bs) of raw scores q k^T, in place -> p = exp(s * scale - m_new).

    Keys above the diagonal get p = 0. Updates the running max m (bt,) to m_new
    and the running sum l to alpha l + rowsum(p), and writes alpha = exp(m_old
    - m_new), the factor that rescales what was summed under the old max.
    """
    bt, bs = s.shape
    for t in range(bt):
        n = _visible(off, t0 + t, s0, bs)
        mx = m[t]
        for j in range(n):
            s[t, j] = s[t, j] * scale
            if s[t, j] > mx:
                mx = s[t, j]
        a = vexp(m[t] - mx)                           # m_old = -inf on the first tile: 0
        total = l[t] * 0                              # this tile's <= TILE terms: input dtype
        for j in range(n):
            p = vexp(s[t, j] - mx)
            s[t, j] = p
            total += p
        for j in range(n, bs):
            s[t, j] = 0
        alpha[t] = a
        l[t] = a * l[t] + total
        m[t] = mx


@_par
def _forward_heads(q, k, v, y, lse, scale, off, tile):
    """q (R, T, D), k, v (R, S, D) -> writes y (R, T, D) and lse (R, T); one head per task."""
    R, T, D = q.shape
    S = k.shape[1]
    for r in prange(R):
        for t0 in range(0, T, tile):
            t1 = min(t0 + tile, T)
            bt = t1 - t0
            m = np.full(bt, -np.inf, q.dtype)                    # running max
            l = np.zeros(bt, q.dtype)                            # running sum
            alpha = np.empty(bt, q.dtype)
            acc = np.zeros((bt, D), q.dtype)                     # running output
            for s0 in range(0, min(off + t1, S), tile):          # tiles some query here sees
                s1 = min(s0 + tile, S)
                s = np.dot(q[r, t0:t1], k[r, s0:s1].T)           # (bt, bs) one tile of scores
                _fwd_probs(s, m, l, alpha, scale, off, t0, s0)   # p, unnormalised
                pv = np.dot(s, v[r, s0:s1])                      # (bt, D)
                for t in range(bt):
                    for d in range(D):
                        acc[t, d] = alpha[t] * acc[t, d] + pv[t, d]
            for t in range(bt):
                inv = 1 / l[t]
                for d in range(D):
                    y[r, t0 + t, d] = acc[t, d] * inv
                lse[r, t0 + t] = m[t] + math.log(l[t])


def flash_forward(q, k, v):
    """Accelerated minillm.attention.flash_forward — see it for the math."""
    B, H, T, D = q.shape
    S = k.shape[2]
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))           # (B, H, *, D) each
    y = np.empty((B, H, T, D), dtype=q.dtype)
    lse = np.empty((B, H, T), dtype=q.dtype)
    _forward_heads(q.reshape(B * H, T, D), k.reshape(B * H, S, D), v.reshape(B * H, S, D),
                   y.reshape(B * H, T, D), lse.reshape(B * H, T), q.dtype.type(1.0 / math.sqrt(D)),
                   S - T, TILE)
    return y, FlashCache(q, k, v, y, lse)


# --- backward --------------------------------------------------------------------------------
@_jit
def _bwd_probs(p, lse, scale, off, t0, s0):
    """p (bt, bs) raw scores, in place -> the forward's probabilities exp(p * scale - lse);
    0 above the diagonal."""
    bt, bs = p.shape
    for t in range(bt):
        n = _visible(off, t0 + t, s0, bs)
        g = lse[t0 + t]
        for j in range(n):
            p[t, j] = vexp(p[t, j] * scale - g)
        for j in range(n, bs):
            p[t, j] = 0


@_jit
def _bwd_ds(p, dp, delta, scale, t0):
    """dp (bt, bs), in place -> ds = p (dp - delta) * scale (0 where p = 0)."""
    bt, bs = p.shape
    for t in range(bt):
        c = delta[t0 + t]
        for j in range(bs):
            dp[t, j] = p[t, j] * (dp[t, j] - c) * scale


@_jit
def _row_dots(a, b, out):
    """out[t] = sum_d a[t, d] b[t, d] (delta = rowsum(dy * y)), float64 sums."""
    for t in range(a.shape[0]):
        s = 0.0
        for d in range(a.shape[1]):
            s += a[t, d] * b[t, d]
        out[t] = s


@_jit
def _add_into(dst, src):
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[i, j] += src[i, j]


@_par
def _backward_heads(dy, q, k, v, y, lse, dq, dk, dv, scale, off, tile):
    """Writes dq (R, T, D) and adds into dk, dv (R, S, D; zeros on entry); one head per task."""
    R, T, D = q.shape
    S = k.shape[1]
    for r in prange(R):
        delta = np.empty(T, q.dtype)
        _row_dots(dy[r], y[r], delta)
        for t0 in range(0, T, tile):
            t1 = min(t0 + tile, T)
            g, qb = dy[r, t0:t1], q[r, t0:t1]                    # (bt, D) each
            dqb = np.zeros((t1 - t0, D), q.dtype)
            for s0 in range(0, min(off + t1, S), tile):
                s1 = min(s0 + tile, S)
                p = np.dot(qb, k[r, s0:s1].T)                    # (bt, bs) scores again
                _bwd_probs(p, lse[r], scale, off, t0, s0)
                _add_into(dv[r, s0:s1], np.dot(p.T, g))          # (bs, D)
                ds = np.dot(g, v[r, s0:s1].T)                    # dp, then ds in place
                _bwd_ds(p, ds, delta, scale, t0)
                dqb += np.dot(ds, k[r, s0:s1])                   # (bt, D)
                _add_into(dk[r, s0:s1], np.dot(ds.T, qb))        # (bs, D)
            dq[r, t0:t1] = dqb


def flash_backward(dy, cache):
    """Accelerated minillm.attention.flash_backward — see it for the math."""
    q, k, v, y, lse = (np.ascontiguousarray(a) for a in cache)
    B, H, T, D = q.shape
    S, R = k.shape[2], B * H
    dy = np.ascontiguousarray(dy, dtype=q.dtype)                         # (B, H, T, D)
    dq = np.empty((B, H, T, D), dtype=q.dtype)
    dk = np.zeros((B, H, S, D), dtype=q.dtype)
    dv = np.zeros((B, H, S, D), dtype=q.dtype)
    _backward_heads(dy.reshape(R, T, D), q.reshape(R, T, D), k.reshape(R, S, D), v.reshape(R, S, D),
                    y.reshape(R, T, D), lse.reshape(R, T), dq.reshape(R, T, D), dk.reshape(R, S, D),
                    dv.reshape(R, S, D), q.dtype.type(1.0 / math.sqrt(D)), S - T, TILE)
    return dq, dk, dv


KERNELS = {
    "attention.flash_forward": flash_forward,
    "attention.flash_backward": flash_backward,
}
