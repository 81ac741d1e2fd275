"""Numba twins of minillm.quantization's kernels: the weights are read as bytes, never
converted into a float copy.

Batch-1 decoding multiplies one activation row by every weight once, so its
speed is the speed of streaming the weights from memory: int8 codes are 1/4 of
float32's bytes, packed int4 codes 1/8 (+ 1/16 for the scales). The codes are
stored (out, in), so each output is one contiguous dot product that LLVM
vectorises (int8 -> float32 or int32 lanes); outputs are independent, so
``prange`` spreads them over threads (``PARALLEL``; the bench measures 1 and 2).
A layout (in, out) with a row-at-a-time update of all outputs measured 2x
slower here (577 vs 274 us for 1024 x 4096, 1 thread), and an int4 loop that
multiplies interleaved nibbles by x[2p], x[2p + 1] 3.6x slower than the
grouped order of ``pack_int4`` (contiguous halves of each group of 64).

With many activation rows (prefill, training, evaluation) these loops would
lose to a blocked BLAS product, so above ``ROWS_MAX`` rows the twins convert a
block of weights at a time and call BLAS, as the reference does (integer
products exactly, in float64: see ``minillm.quantization.int8_matmul``).
This package never imports ``minillm``.
"""
import numpy as np
from numba import njit, prange

KERNELS: dict = {}

ROWS_MAX = 8         # up to this many activation rows the compiled loops run, above it BLAS
CHUNK = 256          # outputs converted at a time on the BLAS path
GROUP = 64           # int4 group size (minillm.quantization.GROUP; the packing depends on it)
PARALLEL = True      # prange over outputs


# --- w8: float rows x int8 codes --------------------------------------------------------
@njit(cache=True, fastmath=True, parallel=PARALLEL)
def _w8_rows(x, q, s):
    M, K = x.shape
    N = q.shape[0]
    y = np.empty((M, N), dtype=x.dtype)
    for j in prange(N):
        row = q[j]
        for m in range(M):
            xm = x[m]
            acc = xm[0] * np.float32(0)
            for i in range(K):
                acc += xm[i] * np.float32(row[i])
            y[m, j] = acc * s[j]
    return y


@njit(cache=True, parallel=PARALLEL)
def _dequant8(q, s, out):
    """out[j, i] = q[j, i] * s[j] for a block of outputs (the BLAS path's weights)."""
    for j in prange(q.shape[0]):
        for i in range(q.shape[1]):
            out[j, i] = q[j, i] * s[j]


def w8_matmul(x, q, s):
    """Accelerated minillm.quantization.w8_matmul — see it for the math."""
    if x.shape[0] > ROWS_MAX:
        y = np.empty((x.shape[0], q.shape[0]), dtype=x.dtype)
        w = np.empty((min(CHUNK, q.shape[0]), q.shape[1]), dtype=x.dtype)   # one block, reused
        for j0 in range(0, q.shape[0], CHUNK):
            n = min(CHUNK, q.shape[0] - j0)
            _dequant8(q[j0:j0 + n], s[j0:j0 + n].astype(x.dtype), w[:n])
            y[:, j0:j0 + n] = x @ w[:n].T
        return y
    return _w8_rows(np.ascontiguousarray(x), np.ascontiguousarray(q), np.ascontiguousarray(s))


# --- w8a8: int8 rows x int8 codes, int32 sums -----------------------------------------------
@njit(cache=True, parallel=PARALLEL)
def _int8_rows(xq, q):
    M, K = xq.shape
    N = q.shape[0]
    acc = np.empty((M, N), dtype=np.int32)
    for j in prange(N):
        row = q[j]
        for m in range(M):
            xm = xq[m]
            a = np.int32(0)
            for i in range(K):
                a += np.int32(xm[i]) * np.int32(row[i])
            acc[m, j] = a
    return acc


def int8_matmul(xq, q):
    """Accelerated minillm.quantization.int8_matmul — see it for the math."""
    if xq.shape[0] > ROWS_MAX:
        acc = np.empty((xq.shape[0], q.shape[0]), dtype=np.int32)
        x64 = xq.astype(np.float64)
        w = np.empty((min(CHUNK, q.shape[0]), q.shape[1]), dtype=np.float64)
        ones = np.ones(min(CHUNK, q.shape[0]), dtype=np.float64)
        for j0 in range(0, q.shape[0], CHUNK):
            n = min(CHUNK, q.shape[0] - j0)
            _dequant8(q[j0:j0 + n], ones[:n], w[:n])
            acc[:, j0:j0 + n] = (x64 @ w[:n].T).astype(np.int32)
        return acc
    return _int8_rows(np.ascontiguousarray(xq), np.ascontiguousarray(q))


# --- w4g64: float rows x packed int4 codes, one scale per group of 64 inputs -----------------
@njit(cache=True, fastmath=True, parallel=PARALLEL)
def _w4_rows(x, packed, s):
    M, K = x.shape
    N = packed.shape[0]
    G = K // GROUP
    half = GROUP // 2
    # codes are stored as q + 8: sum x (q + 8) s - 8 s sum x, the second sum once per group
    xsum = np.empty((M, G), dtype=x.dtype)
    for m in range(M):
        for g in range(G):
            xsum[m, g] = 8 * x[m, g * GROUP:(g + 1) * GROUP].sum()
    y = np.empty((M, N), dtype=x.dtype)
    for j in prange(N):
        row = packed[j]
        for m in range(M):
            xm = x[m]
            total = xm[0] * np.float32(0)
            for g in range(G):
                base = g * GROUP
                part = xm[0] * np.float32(0)
                for p in range(half):            # byte p: input p (low nibble), half + p (high)
                    b = np.int16(row[g * half + p])
                    part += (xm[base + p] * np.float32(b & np.int16(15))
                             + xm[base + half + p] * np.float32(b >> np.int16(4)))
                total += (part - xsum[m, g]) * s[j, g]
            y[m, j] = total
    return y


@njit(cache=True, parallel=PARALLEL)
def _dequant4(packed, s, out):
    """out[j, i] = q[j, i] * s[j, i // 64] for a block of outputs (the BLAS path's weights)."""
    half = GROUP // 2
    for j in prange(packed.shape[0]):
        for g in range(s.shape[1]):
            sg = s[j, g]
            for p in range(half):
                b = np.int32(packed[j, g * half + p])
                out[j, g * GROUP + p] = ((b & 15) - 8) * sg
                out[j, g * GROUP + half + p] = ((b >> 4) - 8) * sg


@njit(cache=True)
def _unpack(packed):
    N, P = packed.shape
    half = GROUP // 2
    q = np.empty((N, 2 * P), dtype=np.int8)
    for j in range(N):
        for p in range(P):
            b = packed[j, p]
            i = (p // half) * GROUP + p % half
            q[j, i] = np.int8(b & 15) - 8
            q[j, i + half] = np.int8(b >> 4) - 8
    return q


def unpack_int4(packed):
    """Accelerated minillm.quantization.unpack_int4 — see it for the math."""
    return _unpack(np.ascontiguousarray(packed))


def w4_matmul(x, packed, s):
    """Accelerated minillm.quantization.w4_matmul — see it for the math."""
    if x.shape[0] > ROWS_MAX:
        N, K = packed.shape[0], 2 * packed.shape[1]
        y = np.empty((x.shape[0], N), dtype=x.dtype)
        w = np.empty((min(CHUNK, N), K), dtype=x.dtype)
        for j0 in range(0, N, CHUNK):
            n = min(CHUNK, N - j0)
            _dequant4(packed[j0:j0 + n], s[j0:j0 + n].astype(x.dtype), w[:n])
            y[:, j0:j0 + n] = x @ w[:n].T
        return y
    return _w4_rows(np.ascontiguousarray(x), np.ascontiguousarray(packed), np.ascontiguousarray(s))


KERNELS["quantization.w8_matmul"] = w8_matmul
KERNELS["quantization.int8_matmul"] = int8_matmul
KERNELS["quantization.w4_matmul"] = w4_matmul
KERNELS["quantization.unpack_int4"] = unpack_int4
