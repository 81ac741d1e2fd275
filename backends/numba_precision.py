"""Numba twin of minillm.layers.linear_forward for half-precision weights (decode).

A batch-1 decode step is bound by the bytes of weights it streams (see
``bench/bench_kv_cache.py``). NumPy has no float16 BLAS, so the reference
``layers.matmul`` converts the whole weight to float32 first: it reads 2 bytes,
writes 4 and reads 4 again per weight. This twin reads each row of the
weight's 2-byte codes once, widens it to float32 in a small buffer (still in
L1 cache) and multiply-adds it into every output row, so a weight costs 2
bytes of memory traffic. Products accumulate in float32 and the result is
rounded to the input's dtype, as the reference does.

Widening without a float16 type (Numba has none on the CPU):
- bfloat16 is the top half of a float32: ``bits << 16``;
- float16 (1 sign, 5 exponent, 10 mantissa bits): move exponent and mantissa
  into float32's positions (``<< 13``) and multiply by 2^112, which re-biases
  the exponent (15 -> 127) and turns subnormals into the right normals; inf and
  nan (exponent 31) get float32's all-ones exponent; the sign goes back on top.

Used only for a few rows (decode); a larger batch (training, prefill) does
what the reference does, where BLAS on the converted weight is the better deal.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

KERNELS: dict = {}
_MAX_ROWS = 64                    # rows up to which streaming the 2-byte codes wins (decode, prefill)
_F16_REBIAS = np.float32(2.0 ** 112)


class LinearCache(NamedTuple):
    x: np.ndarray          # (..., Cin)
    w: np.ndarray          # (Cin, Cout)
    has_bias: bool


@njit(cache=True, error_model="numpy")
def _widen_f16(bits, out_u32, out_f32):
    """float16 codes (N,) uint16 -> out_f32 (N,) float32 (out_u32 is the same memory).
    Three branch-free passes, each a simple loop that LLVM vectorises."""
    for j in range(bits.shape[0]):
        out_u32[j] = np.uint32(bits[j] & 0x7FFF) << 13
    for j in range(bits.shape[0]):
        out_f32[j] *= _F16_REBIAS
    for j in range(bits.shape[0]):
        h = np.uint32(bits[j])
        special = np.uint32((h & 0x7C00) == 0x7C00)              # inf / nan: all-ones exponent
        out_u32[j] |= ((h & 0x8000) << 16) | (special * np.uint32(0x7F800000))


@njit(cache=True, error_model="numpy")
def _gemm_codes(x, bits, bf16, out):
    """out (M, N) += x (M, K) float32 @ widen(bits (K, N) uint16)."""
    K, N = bits.shape
    buf = np.empty(N, dtype=np.uint32)
    row = buf.view(np.float32)
    for i in range(K):
        if bf16:
            for j in range(N):
                buf[j] = np.uint32(bits[i, j]) << 16
        else:
            _widen_f16(bits[i], buf, row)
        for m in range(x.shape[0]):
            xi = x[m, i]
            for j in range(N):
                out[m, j] += xi * row[j]


@njit(cache=True, error_model="numpy")
def _gemm_codes_t(x, bits_t, bf16, out):
    """out (M, N) = x (M, K) float32 @ widen(bits_t (N, K) uint16).T: one dot per output
    (the tied head's weight wte (V, C) is used transposed: its rows are contiguous)."""
    N, K = bits_t.shape
    buf = np.empty(K, dtype=np.uint32)
    row = buf.view(np.float32)
    for j in range(N):
        if bf16:
            for i in range(K):
                buf[i] = np.uint32(bits_t[j, i]) << 16
        else:
            _widen_f16(bits_t[j], buf, row)
        for m in range(x.shape[0]):
            acc = np.float32(0.0)
            for i in range(K):
                acc += x[m, i] * row[i]
            out[m, j] = acc


def linear_forward(x, w, b=None):
    """Accelerated minillm.layers.linear_forward — see it for the math."""
    rows = int(np.prod(x.shape[:-1]))
    if w.dtype.itemsize != 2:                    # float32 / float64: the reference's product
        y = x @ w
    elif rows > _MAX_ROWS:
        y = (x.astype(np.float32) @ w.astype(np.float32)).astype(x.dtype)
    else:
        out = np.zeros((rows, w.shape[1]), dtype=np.float32)
        x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(rows, -1)
        bf16 = w.dtype.name == "bfloat16"
        if w.flags.f_contiguous and not w.flags.c_contiguous:     # a transposed view (wte.T)
            _gemm_codes_t(x2, w.T.view(np.uint16), bf16, out)
        else:
            _gemm_codes(x2, np.ascontiguousarray(w).view(np.uint16), bf16, out)
        y = out.astype(x.dtype).reshape(x.shape[:-1] + (w.shape[1],))
    if b is not None:
        y += b
    return y, LinearCache(x, w, b is not None)


linear_forward.accepts_half = True       # the backend runs it for float16 / bfloat16 too
KERNELS["layers.linear_forward"] = linear_forward
