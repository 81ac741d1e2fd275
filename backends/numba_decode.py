"""Numba twin of minillm.attention.append_attend: the decode step's small, call-bound part.

Profiling a decode step of the ``small`` preset (B=1, one token; cProfile)
shows, besides the projections, (1) the ~15 small NumPy ops per block that
split heads, scatter K/V into the cache, mask, softmax and merge heads, each
costing more in call overhead than in arithmetic. They become one compiled
single-threaded loop here (threads cost more than they save at these
sizes). (A fused LN + LM-head twin was measured no faster than NumPy's
LayerNorm + BLAS product, 234 vs 209 us at B=1, and was dropped.) What remains is the four projections per block: BLAS
matrix-vector products that stream every weight once per token, i.e. bound
by memory bandwidth (``bench/bench_kv_cache.py`` reports how close).
"""
import math

import numpy as np
from numba import njit

KERNELS: dict = {}


@njit(cache=True, fastmath=True)
def _dot(a, b):
    """a . b in the inputs' dtype (float32 stays float32, so it vectorises)."""
    acc = a[0] * 0
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@njit(cache=True, fastmath=True)
def _append_attend(qkv, k_cache, v_cache, pos, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    scale = 1.0 / math.sqrt(D)
    y = np.zeros((B, T, C), dtype=qkv.dtype)
    for b in range(B):
        for t in range(T):                       # store this token's K/V in its slot
            s = pos[b] + t
            for h in range(n_head):
                k_cache[b, h, s, :] = qkv[b, t, C + h * D:C + (h + 1) * D]
                v_cache[b, h, s, :] = qkv[b, t, 2 * C + h * D:2 * C + (h + 1) * D]
        for t in range(T):
            n = pos[b] + t + 1                   # keys this query may see
            p = np.empty(n, dtype=qkv.dtype)
            for h in range(n_head):
                q = qkv[b, t, h * D:(h + 1) * D]
                m = -np.inf
                for s in range(n):               # scores and their running max
                    p[s] = _dot(q, k_cache[b, h, s, :]) * scale
                    m = max(m, p[s])
                total = 0.0
                for s in range(n):               # softmax numerators
                    p[s] = math.exp(p[s] - m)
                    total += p[s]
                out = y[b, t, h * D:(h + 1) * D]
                for s in range(n):               # weighted sum of values, row by row
                    w = p[s] / total
                    for d in range(D):
                        out[d] += w * v_cache[b, h, s, d]
    return y


def append_attend(qkv, k_cache, v_cache, pos, n_head):
    """Accelerated minillm.attention.append_attend — see it for the math."""
    pos = np.asarray(pos, dtype=np.int64)
    if pos.min() < 0 or pos.max() + qkv.shape[1] > k_cache.shape[2]:   # compiled code has no bounds checks
        raise IndexError(f"slots {pos.tolist()} + T={qkv.shape[1]} outside a cache of {k_cache.shape[2]}")
    return _append_attend(qkv, k_cache, v_cache, pos, int(n_head))


KERNELS["attention.append_attend"] = append_attend
