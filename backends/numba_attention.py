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
- the five tile products (q k^T, p v; and in the backward q k^T again, p^T dy,
  dy v^T, ds k, ds^T q) are BLAS calls through NumPy's batched ``matmul``,
  one call per tile pair for all B * H heads at once (a Python loop over
  tiles, not over heads: a handful of calls per tile pair);
- everything between two products is one fused Numba pass per row of the
  tile (scale, causal mask, running max, rescaling, ds = p (dp - delta));
- ``exp`` over a tile is NumPy's vectorised ufunc, in place: Numba without
  SVML would call scalar libm, slower and rounding differently.
Tiles wholly above the causal diagonal are never computed, and inside a
diagonal tile the passes stop at each row's last visible key.

Arithmetic runs in the input dtype (float32 or float64; half precision runs
the reference); row sums accumulate in float64, as in ``numba_layers``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

TILE = 128     # query block / key tile; a (128, 128) float32 tile of a head is 64 KiB (fits L2)

_jit = njit(cache=True, fastmath=False, error_model="numpy")
_jit_sum = njit(cache=True, fastmath={"reassoc"}, error_model="numpy")


class FlashCache(NamedTuple):
    q: np.ndarray          # (B, H, T, D)
    k: np.ndarray          # (B, H, S, D)
    v: np.ndarray          # (B, H, S, D)
    y: np.ndarray          # (B, H, T, D)
    lse: np.ndarray        # (B, H, T)


def _tiles(n):
    """[(start, stop), ...] covering range(n) in steps of TILE."""
    return [(a, min(a + TILE, n)) for a in range(0, n, TILE)]


# --- forward ---------------------------------------------------------------------------------
@_jit
def _fwd_scores(s, m, alpha, scale, first):
    """One tile s (R, bt, bs) of raw scores q k^T, in place -> s * scale - m_new.

    ``first[t]`` = number of leading keys row t of the tile may see (the rest is
    above the diagonal: set to -inf, so exp gives 0). Updates the running max
    m (R, bt) to m_new and writes alpha = exp(m_old - m_new), the factor that
    rescales what was summed under the old max.
    """
    R, bt, bs = s.shape
    for r in range(R):
        for t in range(bt):
            n = first[t]
            mx = m[r, t]
            for j in range(n):
                s[r, t, j] = s[r, t, j] * scale
                if s[r, t, j] > mx:
                    mx = s[r, t, j]
            for j in range(n):
                s[r, t, j] = s[r, t, j] - mx
            for j in range(n, bs):
                s[r, t, j] = -np.inf
            alpha[r, t] = math.exp(m[r, t] - mx)      # m_old = -inf on the first tile: 0
            m[r, t] = mx


@_jit_sum
def _fwd_accumulate(p, pv, acc, l, alpha):
    """l = alpha l + rowsum(p); acc = alpha acc + p v (pv: this tile's product)."""
    R, bt, bs = p.shape
    D = acc.shape[2]
    for r in range(R):
        for t in range(bt):
            s = 0.0
            for j in range(bs):
                s += p[r, t, j]
            a = alpha[r, t]
            l[r, t] = a * l[r, t] + s
            for d in range(D):
                acc[r, t, d] = a * acc[r, t, d] + pv[r, t, d]


@_jit
def _fwd_finish(acc, l, m, y, lse):
    """y = acc / l, lse = m + log(l), for one query block (R, bt, D)."""
    R, bt, D = acc.shape
    for r in range(R):
        for t in range(bt):
            inv = 1.0 / l[r, t]
            for d in range(D):
                y[r, t, d] = acc[r, t, d] * inv
            lse[r, t] = m[r, t] + math.log(l[r, t])


def _visible(t0, t1, s0, s1, off):
    """(t1 - t0,) int64: keys of tile s0:s1 that each query t0..t1-1 sees (query t: s <= off + t)."""
    return np.clip(off + np.arange(t0, t1) - s0 + 1, 0, s1 - s0).astype(np.int64)


def flash_forward(q, k, v):
    """Accelerated minillm.attention.flash_forward — see it for the math."""
    B, H, T, D = q.shape
    S = k.shape[2]
    off, R, dt = S - T, B * H, q.dtype
    scale = dt.type(1.0 / math.sqrt(D))
    kT = k.transpose(0, 1, 3, 2)                                         # (B, H, D, S) view
    y = np.empty((B, H, T, D), dtype=dt)
    lse = np.empty((B, H, T), dtype=dt)
    for t0, t1 in _tiles(T):
        bt = t1 - t0
        m = np.full((R, bt), -np.inf, dtype=dt)                          # running max
        l = np.zeros((R, bt), dtype=dt)                                  # running sum
        alpha = np.empty((R, bt), dtype=dt)
        acc = np.zeros((R, bt, D), dtype=dt)                             # running output
        for s0, s1 in _tiles(off + t1):                                  # tiles some query sees
            s = np.matmul(q[:, :, t0:t1], kT[..., s0:s1])                # (B, H, bt, bs) one tile
            s3 = s.reshape(R, bt, s1 - s0)
            _fwd_scores(s3, m, alpha, scale, _visible(t0, t1, s0, s1, off))
            np.exp(s, out=s)                                             # p, unnormalised
            pv = np.matmul(s, v[:, :, s0:s1]).reshape(R, bt, D)          # (R, bt, D)
            _fwd_accumulate(s3, pv, acc, l, alpha)
        yb = np.empty((R, bt, D), dtype=dt)
        lb = np.empty((R, bt), dtype=dt)
        _fwd_finish(acc, l, m, yb, lb)
        y[:, :, t0:t1] = yb.reshape(B, H, bt, D)
        lse[:, :, t0:t1] = lb.reshape(B, H, bt)
    return y, FlashCache(q, k, v, y, lse)


# --- backward --------------------------------------------------------------------------------
@_jit
def _bwd_logits(s, lse, scale, first):
    """s (R, bt, bs) raw scores, in place -> s * scale - lse (exp gives the probabilities);
    -inf beyond each row's ``first[t]`` visible keys."""
    R, bt, bs = s.shape
    for r in range(R):
        for t in range(bt):
            n = first[t]
            g = lse[r, t]
            for j in range(n):
                s[r, t, j] = s[r, t, j] * scale - g
            for j in range(n, bs):
                s[r, t, j] = -np.inf


@_jit
def _bwd_ds(p, dp, delta, scale):
    """dp (R, bt, bs), in place -> ds = p (dp - delta) * scale (0 where p = 0)."""
    R, bt, bs = p.shape
    for r in range(R):
        for t in range(bt):
            c = delta[r, t]
            for j in range(bs):
                dp[r, t, j] = p[r, t, j] * (dp[r, t, j] - c) * scale


@_jit_sum
def _row_dot(a, b, out):
    """out[r, t] = sum_d a[r, t, d] b[r, t, d] (delta = rowsum(dy * y)), float64 sums."""
    R, T, D = a.shape
    for r in range(R):
        for t in range(T):
            s = 0.0
            for d in range(D):
                s += a[r, t, d] * b[r, t, d]
            out[r, t] = s


def flash_backward(dy, cache):
    """Accelerated minillm.attention.flash_backward — see it for the math."""
    q, k, v, y, lse = cache
    B, H, T, D = q.shape
    S = k.shape[2]
    off, R, dt = S - T, B * H, q.dtype
    scale = dt.type(1.0 / math.sqrt(D))
    dy = np.ascontiguousarray(dy, dtype=dt)                              # (B, H, T, D)
    delta = np.empty((R, T), dtype=dt)
    _row_dot(dy.reshape(R, T, D), np.ascontiguousarray(y).reshape(R, T, D), delta)
    lse3 = np.ascontiguousarray(lse).reshape(R, T)
    kT, vT = k.transpose(0, 1, 3, 2), v.transpose(0, 1, 3, 2)           # (B, H, D, S) views
    dq = np.zeros((B, H, T, D), dtype=dt)
    dk = np.zeros((B, H, S, D), dtype=dt)
    dv = np.zeros((B, H, S, D), dtype=dt)
    for t0, t1 in _tiles(T):
        bt = t1 - t0
        g = dy[:, :, t0:t1]                                              # (B, H, bt, D)
        lse_b = np.ascontiguousarray(lse3[:, t0:t1])
        delta_b = np.ascontiguousarray(delta[:, t0:t1])
        for s0, s1 in _tiles(off + t1):
            bs = s1 - s0
            p = np.matmul(q[:, :, t0:t1], kT[..., s0:s1])                # (B, H, bt, bs)
            _bwd_logits(p.reshape(R, bt, bs), lse_b, scale, _visible(t0, t1, s0, s1, off))
            np.exp(p, out=p)                                             # the forward's probabilities
            dv[:, :, s0:s1] += np.matmul(p.transpose(0, 1, 3, 2), g)
            ds = np.matmul(g, vT[..., s0:s1])                            # dp, then ds in place
            _bwd_ds(p.reshape(R, bt, bs), ds.reshape(R, bt, bs), delta_b, scale)
            dq[:, :, t0:t1] += np.matmul(ds, k[:, :, s0:s1])
            dk[:, :, s0:s1] += np.matmul(ds.transpose(0, 1, 3, 2), q[:, :, t0:t1])
    return dq, dk, dv


KERNELS = {
    "attention.flash_forward": flash_forward,
    "attention.flash_backward": flash_backward,
}
