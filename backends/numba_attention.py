"""Numba twins of minillm.attention.flash_forward / flash_backward (dense causal attention).

FlashAttention (Dao et al. 2022) on a CPU: the (T, S) score matrix of a head
is never built; queries go in blocks of ``TILE`` rows, keys in tiles of
``_key_tile(D)`` columns (64-256), and only one such tile of scores per head
exists at any time. The forward keeps, per query, the running max ``m``, the running sum
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
  tile (scale, causal mask, running max, exp, row sum, rescaling,
  ds = p (dp - delta)); ``exp`` is ``numba_math.vexp``, plain arithmetic that
  LLVM vectorises (Numba without SVML would call scalar libm, and NumPy's
  float32 ``exp`` runs scalar on AVX2 CPUs: 1.5-2.3 ns per element);
- the B * H heads are split into one slab per thread, each run by a Python
  thread (``backends/numba_threads.py``: when that pays, measured; it needs
  OpenBLAS's idle workers to sleep soon after a product). Split over 2
  threads, a ``small`` layer's forward + backward took 14.5 ms against 24.0
  on one (each call right after a 2-thread BLAS product).
Tiles wholly above the causal diagonal are never computed, and inside a
diagonal tile the passes stop at each row's last visible key.

Tried and dropped (issue 15, AMD EPYC, 2 cores): the whole head compiled in one
Numba function, heads spread over Numba's threads with ``prange`` and the tile
products as ``np.dot`` (SciPy's BLAS). Alone it took the attention of a
``small`` layer from 15.5 / 25.1 ms (forward / backward, 1 thread) to
12.4 / 17.7 ms on 2; inside a training step, alternating the two twins step by
step in one process, it saved 1-3% at 2 threads and 3-7% at 1 (a busy host).
But its compilation took 21-25 s on a fresh install (``np.dot`` per layout,
the parallel pipeline) against 1.1 s for this file, the first
``minillm train`` of every new user, and it needed SciPy.

Arithmetic runs in the input dtype (float32 or float64; half precision runs
the reference); a tile's row sums (at most ``KEY_TILE_MAX`` terms) accumulate in the
input dtype, the delta row dots in float64.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from backends.numba_math import vexp
from backends.numba_threads import edges, run_blocks, threads

# Query block / key tile. Measured at 1 thread (AMD EPYC, flash fwd + bwd, min of 14
# interleaved runs): (B, H, T, D) = (8, 8, 256, 32): 64 -> 26.4 ms, 128 -> 30.9 ms;
# (4, 12, 256, 64): 64 -> 48.2 ms, 128 -> 62.8 ms. Smaller tiles skip more of the
# causal upper triangle (T=256: 10 of 16 tiles computed instead of 3 of 4) and a
# (64, 64) float32 tile per head (16 KiB) stays in L1/L2; 32 was no better than 64.
TILE = 64
# Key tiles as wide as keeps one head's tile product q k^T (TILE x keys x D
# multiply-adds) at OpenBLAS's single-thread limit, 2^18: above it OpenBLAS
# threads the product itself and wakes its workers, who then compete with the
# head split. D=32 -> 128 keys: fewer, larger calls (fewer GIL hand-offs between
# the split's threads). Measured (AMD EPYC, (8, 8, 256, 32), each call right after
# a 2-thread product; fwd / bwd ms): 64 keys 11.6 / 22.0 on one thread, 7.25 /
# 13.6 split; 128 keys 10.8 / 20.2, 6.36 / 11.6; 256 keys 10.2 / 20.3 on one but
# 21.0 / 23.3 split (products now threaded by OpenBLAS).
KEY_TILE_MAX = 256


def _key_tile(D: int) -> int:
    """Key tile width for head size D: TILE * width * D <= 2^18, between TILE and KEY_TILE_MAX."""
    return max(TILE, min(KEY_TILE_MAX, (1 << 18) // (TILE * D)))

_jit = njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
_jit_sum = njit(cache=True, nogil=True, fastmath={"reassoc"}, error_model="numpy")


class FlashCache(NamedTuple):
    q: np.ndarray          # (B, H, T, D)
    k: np.ndarray          # (B, H, S, D)
    v: np.ndarray          # (B, H, S, D)
    y: np.ndarray          # (B, H, T, D)
    lse: np.ndarray        # (B, H, T)


def _scratch(*shape_max, dtype):
    """A flat buffer for the largest tile of one role; ``_view`` cuts any smaller tile from it."""
    return np.empty(math.prod(shape_max), dtype=dtype)


def _view(flat, *shape):
    """The first prod(shape) items of ``flat`` as a C-contiguous array of ``shape`` (a view).

    The tile loops write every product into such views (``np.matmul(..., out=)``)
    instead of a new array per tile: five fewer allocations per tile pair on the
    threads that run the slabs."""
    return flat[:math.prod(shape)].reshape(shape)


def _tiles(n, size=None):
    """[(start, stop), ...] covering range(n) in steps of ``size`` (default TILE)."""
    size = size or TILE
    return [(a, min(a + size, n)) for a in range(0, n, size)]


# --- forward ---------------------------------------------------------------------------------
@_jit_sum
def _fwd_probs(s, m, l, alpha, scale, first, zero):
    """One tile s (R, bt, bs) of raw scores q k^T, in place -> p = exp(s * scale - m_new).

    Row t of the tile may see its first ``first + t`` keys (``_first``; the rest
    is above the diagonal: p = 0). Updates the running max m (R, bt) to m_new and
    the running sum l to alpha l + rowsum(p), and writes alpha = exp(m_old -
    m_new), the factor that rescales what was summed under the old max.
    """
    R, bt, bs = s.shape
    for r in range(R):
        for t in range(bt):
            n = min(max(first + t, 0), bs)
            mx = m[r, t]
            for j in range(n):
                s[r, t, j] = s[r, t, j] * scale
                if s[r, t, j] > mx:
                    mx = s[r, t, j]
            a = vexp(m[r, t] - mx)                    # m_old = -inf on the first tile: 0
            total = zero                              # <= KEY_TILE_MAX terms: input dtype
            for j in range(n):
                p = vexp(s[r, t, j] - mx)
                s[r, t, j] = p
                total += p
            for j in range(n, bs):
                s[r, t, j] = 0.0
            alpha[r, t] = a
            l[r, t] = a * l[r, t] + total
            m[r, t] = mx


@_jit
def _fwd_accumulate(pv, acc, alpha):
    """acc = alpha acc + p v (pv: this tile's product)."""
    R, bt, D = acc.shape
    for r in range(R):
        for t in range(bt):
            a = alpha[r, t]
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


def _first(t0, s0, off):
    """Keys of the tile starting at key s0 that its first query t0 sees (query t: keys
    <= off + t); query t0 + t sees ``_first + t`` of them, clipped to [0, tile width]."""
    return off + t0 - s0 + 1


# Below this many multiply-adds per product (B * H * T * S * D) the heads stay on
# one thread: the hand-offs (and the GIL between the tile loops' NumPy calls) cost
# more than half the work. Measured (AMD EPYC, 2 threads, fwd + bwd right after a
# 2-thread BLAS product; one thread -> split): 2.1 M (``tiny``) 1.01 -> 1.30 ms,
# 8.4 M 2.58 -> 2.65, 33.6 M 7.02 -> 4.21, 134 M (``small``) 25.9 -> 16.1.
MIN_SPLIT_WORK = 1 << 24


def _slabs(B, H, work):
    """Split the B * H heads into at most ``threads()`` slabs: [(axis, start, stop), ...].

    Heads are independent, so each slab runs on its own thread (``numba_threads``:
    NumPy's matmul and these kernels, compiled ``nogil``, release the GIL). A
    tile's products are too small for BLAS to split them (OpenBLAS runs a product
    below 2^18 multiply-adds on the calling thread), so without this the
    attention runs on one core while the linear layers' products use all.
    ``work``: B * H * T * S * D; below ``MIN_SPLIT_WORK``, one slab.
    """
    n = threads() if work >= MIN_SPLIT_WORK else 1
    axis, size = (0, B) if B >= n or B >= H else (1, H)
    return [(axis, a, b) for a, b in edges(size, n)]


def _part(a, axis, start, stop):
    """Slab ``start:stop`` of ``a`` along ``axis`` (0: batch rows, 1: heads); a view."""
    return a[start:stop] if axis == 0 else a[:, start:stop]


def _run_slabs(fn, S, *arrays):
    """fn(*slab views of ``arrays``) for every slab of heads (``numba_threads.run_blocks``);
    ``arrays[0]`` is (B, H, T, D) and S the key count: together, the work per product."""
    B, H, T, D = arrays[0].shape
    slabs = _slabs(B, H, B * H * T * S * D)
    axis = slabs[0][0]
    run_blocks(lambda a, b: fn(*(_part(x, axis, a, b) for x in arrays)), [sl[1:] for sl in slabs])


def flash_forward(q, k, v):
    """Accelerated minillm.attention.flash_forward — see it for the math."""
    B, H, T, D = q.shape
    y = np.empty((B, H, T, D), dtype=q.dtype)
    lse = np.empty((B, H, T), dtype=q.dtype)
    _run_slabs(_forward_heads, k.shape[2], q, k, v, y, lse)
    return y, FlashCache(q, k, v, y, lse)


def _forward_heads(q, k, v, y, lse):
    """The forward for one slab of heads; writes y (B, H, T, D) and lse (B, H, T)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    off, R, dt = S - T, B * H, q.dtype
    scale = dt.type(1.0 / math.sqrt(D))
    kT = k.transpose(0, 1, 3, 2)                                         # (B, H, D, S) view
    kt = _key_tile(D)
    s_buf, pv_buf = _scratch(B, H, TILE, kt, dtype=dt), _scratch(B, H, TILE, D, dtype=dt)
    for t0, t1 in _tiles(T):
        bt = t1 - t0
        m = np.full((R, bt), -np.inf, dtype=dt)                          # running max
        l = np.zeros((R, bt), dtype=dt)                                  # running sum
        alpha = np.empty((R, bt), dtype=dt)
        acc = np.zeros((R, bt, D), dtype=dt)                             # running output
        for s0, s1 in _tiles(off + t1, kt):                              # tiles some query sees
            s = np.matmul(q[:, :, t0:t1], kT[..., s0:s1],
                          out=_view(s_buf, B, H, bt, s1 - s0))           # (B, H, bt, bs) one tile
            _fwd_probs(s.reshape(R, bt, s1 - s0), m, l, alpha, scale,
                       _first(t0, s0, off), dt.type(0))                  # p, unnormalised
            pv = np.matmul(s, v[:, :, s0:s1], out=_view(pv_buf, B, H, bt, D))
            _fwd_accumulate(pv.reshape(R, bt, D), acc, alpha)
        yb = np.empty((R, bt, D), dtype=dt)
        lb = np.empty((R, bt), dtype=dt)
        _fwd_finish(acc, l, m, yb, lb)
        y[:, :, t0:t1] = yb.reshape(B, H, bt, D)
        lse[:, :, t0:t1] = lb.reshape(B, H, bt)


# --- backward --------------------------------------------------------------------------------
@_jit
def _bwd_probs(s, lse, scale, first):
    """s (R, bt, bs) raw scores, in place -> the forward's probabilities exp(s * scale - lse);
    0 beyond row t's ``first + t`` visible keys."""
    R, bt, bs = s.shape
    for r in range(R):
        for t in range(bt):
            n = min(max(first + t, 0), bs)
            g = lse[r, t]
            for j in range(n):
                s[r, t, j] = vexp(s[r, t, j] * scale - g)
            for j in range(n, bs):
                s[r, t, j] = 0.0


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
    dy = np.ascontiguousarray(dy, dtype=q.dtype)                         # (B, H, T, D)
    dq, dk, dv = (np.empty((B, H, n, D), dtype=q.dtype) for n in (T, S, S))
    for a in (dq, dk, dv):
        a.fill(0)    # touched here, on one thread: np.zeros' fresh pages, first written by both
                     # slabs' threads at once, made a `small` layer's backward 3-4x slower in both
                     # (page faults on one address space; 25-37 instead of 8-10 ms per slab,
                     # in some processes and not others)
    _run_slabs(_backward_heads, S, dy, q, k, v, y, lse, dq, dk, dv)
    return dq, dk, dv


def _backward_heads(dy, q, k, v, y, lse, dq, dk, dv):
    """The backward for one slab of heads; adds into dq, dk, dv (zeros on entry)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    off, R, dt = S - T, B * H, q.dtype
    scale = dt.type(1.0 / math.sqrt(D))
    delta = np.empty((R, T), dtype=dt)
    _row_dot(np.ascontiguousarray(dy).reshape(R, T, D), np.ascontiguousarray(y).reshape(R, T, D), delta)
    lse3 = np.ascontiguousarray(lse).reshape(R, T)
    kT, vT = k.transpose(0, 1, 3, 2), v.transpose(0, 1, 3, 2)           # (B, H, D, S) views
    kt = _key_tile(D)
    p_buf, ds_buf = _scratch(B, H, TILE, kt, dtype=dt), _scratch(B, H, TILE, kt, dtype=dt)
    dq_buf, dk_buf, dv_buf = (_scratch(B, H, n, D, dtype=dt) for n in (TILE, kt, kt))
    for t0, t1 in _tiles(T):
        bt = t1 - t0
        g = dy[:, :, t0:t1]                                              # (B, H, bt, D)
        lse_b = np.ascontiguousarray(lse3[:, t0:t1])
        delta_b = np.ascontiguousarray(delta[:, t0:t1])
        for s0, s1 in _tiles(off + t1, kt):
            bs = s1 - s0
            p = np.matmul(q[:, :, t0:t1], kT[..., s0:s1], out=_view(p_buf, B, H, bt, bs))
            _bwd_probs(p.reshape(R, bt, bs), lse_b, scale, _first(t0, s0, off))
            dv[:, :, s0:s1] += np.matmul(p.transpose(0, 1, 3, 2), g, out=_view(dv_buf, B, H, bs, D))
            ds = np.matmul(g, vT[..., s0:s1], out=_view(ds_buf, B, H, bt, bs))  # dp, then ds in place
            _bwd_ds(p.reshape(R, bt, bs), ds.reshape(R, bt, bs), delta_b, scale)
            dq[:, :, t0:t1] += np.matmul(ds, k[:, :, s0:s1], out=_view(dq_buf, B, H, bt, D))
            dk[:, :, s0:s1] += np.matmul(ds.transpose(0, 1, 3, 2), q[:, :, t0:t1],
                                         out=_view(dk_buf, B, H, bs, D))


KERNELS = {
    "attention.flash_forward": flash_forward,
    "attention.flash_backward": flash_backward,
}
