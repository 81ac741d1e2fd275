"""Numba twin of minillm.layers.linear_forward for half-precision weights (decode).

A batch-1 decode step is bound by the bytes of weights it streams (see
``bench/bench_kv_cache.py``). NumPy has no float16 BLAS, so the reference
``layers.matmul`` converts the whole weight to float32 first: it reads 2 bytes,
writes 4 and reads 4 again per weight, slower than the float32 model it was
meant to beat. This twin reads each weight's 2-byte code once and widens it to
float32 *in a register*, right before the multiply-add: a weight costs 2 bytes
of memory traffic, half of float32's. Products accumulate in float32 and the
result is rounded to the input's dtype, as the reference does.

Widening a float16 code, in a register:
- with F16C (x86 CPUs since 2012, and this machine): LLVM's own ``fpext half to
  float``, which compiles to ``vcvtph2ps``, 8 codes per instruction; Numba
  has no float16 type, so a two-line ``@intrinsic`` emits that instruction;
- without it, integer bit operations that LLVM also turns into SIMD code:
  move exponent and mantissa into float32's positions (``<< 13``) and
  multiply by 2^112, which re-biases the exponent (15 -> 127) and turns
  subnormals into the right normals; a result >= 2^16 had the all-ones
  exponent (inf / nan), so it gets float32's all-ones exponent; the sign goes
  back on top (``widen_f16_bits``; both are checked on all 65536 codes).
bfloat16 is the top half of a float32: ``bits << 16``, read as a float32.

The loops (x is (M, K) float32 with M small, the weight's codes (K, N)):
- ``_gemm_codes``: a block of R = 8 weight rows at a time; each output
  ``out[m, j]`` is loaded and stored once per block and gets 8 multiply-adds,
  so the loop's memory traffic is the codes themselves (consecutive j are
  SIMD lanes; no reduction, so no reordering of sums is needed);
- ``_gemm_codes_t``: the tied head uses ``wte.T`` whose rows (of ``wte``) are
  contiguous: one dot product per output, vectorised across K with partial
  sums (``fastmath`` ``reassoc``: a different summation order, float32 all
  the same).
Used only up to ``_MAX_ROWS`` rows (decode, a short prefill); a larger batch
(training) does what the reference does, where BLAS on the converted weight is
the better deal.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from llvmlite.binding import get_host_cpu_features
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic

KERNELS: dict = {}
_MAX_ROWS = 64                    # rows up to which streaming the 2-byte codes wins (decode, prefill)
_R = 8                            # weight rows per block in _gemm_codes
_F16_REBIAS = np.float32(2.0 ** 112)
_FAST = {"reassoc", "contract"}   # may reorder sums and fuse multiply-adds; nan / inf stay IEEE
# the float32 twin of linear_forward, when the layers' twins have one (else NumPy's BLAS)
_FLOAT_TWIN = importlib.import_module("backends.numba_layers").KERNELS.get("layers.linear_forward")


class LinearCache(NamedTuple):
    x: np.ndarray          # (..., Cin)
    w: np.ndarray          # (Cin, Cout)
    has_bias: bool


@njit(cache=True, inline="always")
def widen_bf16(h):
    """One bfloat16 code (uint16) -> its float32 value: the code is float32's top half."""
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


@njit(cache=True, inline="always")
def widen_f16_bits(h):
    """One float16 code (uint16) -> its float32 value, exactly (subnormals, inf, nan too),
    with integer operations only (any CPU)."""
    u = np.uint32(h)
    # exponent + mantissa at float32's places; times 2^112 re-biases 15 -> 127
    magnitude = np.uint32((u & np.uint32(0x7FFF)) << np.uint32(13)).view(np.float32) * _F16_REBIAS
    b = np.float32(magnitude).view(np.uint32)
    if magnitude >= np.float32(65536.0):            # exponent 31 (inf / nan): all ones in float32
        b = b | np.uint32(0x7F800000)               # (a select, not a branch, in the SIMD loop)
    return np.uint32(b | ((u & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


@intrinsic
def _fpext_half(typingctx, h):
    """uint16 float16 code -> float32 by LLVM's ``fpext half to float`` (F16C's vcvtph2ps)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@njit(cache=True, inline="always")
def widen_f16_f16c(h):
    """One float16 code (uint16) -> its float32 value, by the CPU's conversion instruction."""
    return _fpext_half(h)


# F16C only when Numba compiles for this host (a generic target would call a missing helper)
HAS_F16C = bool(get_host_cpu_features().get("f16c", False)) and config.CPU_NAME in (None, "host")
widen_f16 = widen_f16_f16c if HAS_F16C else widen_f16_bits


def widen_codes(bits, fmt):
    """(N,) uint16 codes -> (N,) float32; ``fmt`` "bf16", "f16" (the one the kernels use),
    "f16_bits" or "f16c" (the tests check every one of the 65536 codes)."""
    return _WIDEN_ALL[fmt](bits)


def _widen_all(widen):
    @njit                          # a closure over `widen`: compiled per format, not cached
    def widen_all(bits):
        out = np.empty(bits.shape[0], dtype=np.float32)
        for j in range(bits.shape[0]):
            out[j] = widen(bits[j])
        return out
    return widen_all


_WIDEN_ALL = {"bf16": _widen_all(widen_bf16), "f16": _widen_all(widen_f16),
              "f16_bits": _widen_all(widen_f16_bits), "f16c": _widen_all(widen_f16_f16c)}


@njit(cache=True)
def _widen(h, bf16):
    return widen_bf16(h) if bf16 else widen_f16(h)


@njit(cache=True, fastmath=_FAST)
def _gemm_codes_dtype(x, bits, out, bf16):
    """out (M, N) += x (M, K) float32 @ widen(bits (K, N) uint16), R weight rows at a time."""
    K, N = bits.shape
    K_blocks = K - K % _R
    for i0 in range(0, K_blocks, _R):
        for m in range(x.shape[0]):                 # the block's codes stay in cache across m
            for j in range(N):
                acc = out[m, j]
                for r in range(_R):                 # unrolled: R is a compile-time constant
                    acc += x[m, i0 + r] * _widen(bits[i0 + r, j], bf16)
                out[m, j] = acc
    for i in range(K_blocks, K):                    # the last K % R rows
        for m in range(x.shape[0]):
            for j in range(N):
                out[m, j] += x[m, i] * _widen(bits[i, j], bf16)


@njit(cache=True, fastmath=_FAST)
def _gemm_codes_t_dtype(x, bits_t, out, bf16):
    """out (M, N) = x (M, K) float32 @ widen(bits_t (N, K) uint16).T: one dot per output."""
    N, K = bits_t.shape
    for j in range(N):
        for m in range(x.shape[0]):
            acc = np.float32(0.0)
            for i in range(K):
                acc += x[m, i] * _widen(bits_t[j, i], bf16)
            out[m, j] = acc


# one compiled loop per format: `bf16` a literal constant, so the branch in _widen folds away
@njit(cache=True)
def _gemm_codes_bf16(x, bits, out):
    _gemm_codes_dtype(x, bits, out, True)


@njit(cache=True)
def _gemm_codes_f16(x, bits, out):
    _gemm_codes_dtype(x, bits, out, False)


@njit(cache=True)
def _gemm_codes_t_bf16(x, bits_t, out):
    _gemm_codes_t_dtype(x, bits_t, out, True)


@njit(cache=True)
def _gemm_codes_t_f16(x, bits_t, out):
    _gemm_codes_t_dtype(x, bits_t, out, False)


def linear_forward(x, w, b=None):
    """Accelerated minillm.layers.linear_forward — see it for the math."""
    rows = int(np.prod(x.shape[:-1]))
    if w.dtype.itemsize != 2:                    # float32 / float64: the layers' twin or BLAS
        if _FLOAT_TWIN is not None:
            return _FLOAT_TWIN(x, w, b)
        y = x @ w
    elif rows > _MAX_ROWS:
        y = (x.astype(np.float32) @ w.astype(np.float32)).astype(x.dtype)
    else:
        out = np.zeros((rows, w.shape[1]), dtype=np.float32)
        x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(rows, -1)
        bf16 = w.dtype.name == "bfloat16"
        if w.flags.f_contiguous and not w.flags.c_contiguous:     # a transposed view (wte.T)
            (_gemm_codes_t_bf16 if bf16 else _gemm_codes_t_f16)(x2, w.T.view(np.uint16), out)
        else:
            (_gemm_codes_bf16 if bf16 else _gemm_codes_f16)(x2, np.ascontiguousarray(w).view(np.uint16), out)
        y = out.astype(x.dtype).reshape(x.shape[:-1] + (w.shape[1],))
    if b is not None:
        y += b
    return y, LinearCache(x, w, b is not None)


linear_forward.accepts_half = True       # the backend runs it for float16 / bfloat16 too
KERNELS["layers.linear_forward"] = linear_forward
