"""Numba twins of the decode step for half-precision models: minillm.layers.linear_forward
(half weights) and minillm.attention.append_attend (a half KV cache).

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
- ``_gemm_codes``, M = 1 (a decode step): ``out += x[i] * widen(row i)``, row
  after row, so the codes are read in memory order, one sequential stream the
  hardware prefetcher follows (consecutive j are SIMD lanes; ``out`` stays in
  L1). On the bench's 105 M model it streams codes about 1.4x faster than the
  blocked loop below, whose 8 interleaved row streams the prefetcher follows
  worse (``bench/bench_precision.py --parts speed`` times the whole step);
- ``_gemm_codes``, M > 1 (a prefill): a block of R = 8 weight rows at a time;
  each output ``out[m, j]`` is loaded and stored once per block and gets 8
  multiply-adds, and the block's codes stay in cache across the M rows
  (no reduction, so no reordering of sums is needed);
- ``_gemm_codes_t``: the tied head uses ``wte.T`` whose rows (of ``wte``) are
  contiguous: one dot product per output, vectorised across K with partial
  sums (``fastmath`` ``reassoc``: a different summation order, float32 all
  the same).
Used only up to ``_MAX_ROWS`` rows (decode, a short prefill); a larger batch
(training) does what the reference does, where BLAS on the converted weight is
the better deal.

The ends of the step, in compiled loops too. With half activations (a model
from ``model.astype``) the input's codes are widened in one loop, and the
float32 sums are rounded to half and the bias added in another, exactly as the
reference does them (``round(x @ w)``, then ``y += b``: NumPy and ml_dtypes add
two halves in float32 and round): NumPy's float16 casts and adds are scalar
loops, tens of microseconds a call at a 4096-wide output, four calls a layer.
Rounding float32 -> half, ties to even: F16C's ``vcvtps2ph`` (``fptrunc float
to half``) or integer bit operations (``narrow_f16_bits``), and bfloat16's carry
trick (``narrow_bf16``); all checked against NumPy / ml_dtypes. The decode step's attention over a half
KV cache (``append_attend``) is one compiled loop on the codes as well, rounding
where the reference rounds (scores, scaled scores, probabilities, the output); the
reference's version converts the whole cache to float32 twice per layer and token.
"""
from __future__ import annotations

import importlib
import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from llvmlite.binding import get_host_cpu_features
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic

KERNELS: dict = {}
_F16 = np.dtype(np.float16)
_NO_BIAS = np.zeros(1, dtype=np.uint16)
_MAX_ROWS = 64                    # rows up to which streaming the 2-byte codes wins (decode, prefill)
_R = 8                            # weight rows per block in _gemm_codes
_F16_REBIAS = np.float32(2.0 ** 112)
_FAST = {"reassoc", "contract"}   # may reorder sums and fuse multiply-adds; nan / inf stay IEEE
# the float32 twin of linear_forward, when the layers' twins have one (else NumPy's BLAS)
_FLOAT_TWIN = importlib.import_module("backends.numba_layers").KERNELS.get("layers.linear_forward")
# the float32 twin of the decode step's attention (this module's twin handles half caches)
_FLOAT_ATTEND = importlib.import_module("backends.numba_decode").KERNELS["attention.append_attend"]


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


@intrinsic
def _fptrunc_half(typingctx, f):
    """float32 -> its nearest float16 code (uint16) by LLVM's ``fptrunc float to half``
    (F16C's vcvtps2ph: round to nearest even, overflow to inf, subnormals exact)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@njit(cache=True, inline="always")
def narrow_bf16(f):
    """float32 -> its nearest bfloat16 code (round to nearest even; nan stays a quiet nan)."""
    u = np.float32(f).view(np.uint32)
    if f != f:
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, inline="always")
def narrow_f16_f16c(f):
    """float32 -> its nearest float16 code, by the CPU's conversion instruction (F16C only)."""
    return _fptrunc_half(np.float32(f))


@njit(cache=True, inline="always")
def narrow_f16_bits(f):
    """float32 -> its nearest float16 code (ties to even, NumPy's rounding), with integer
    operations (any CPU): re-bias the exponent (127 -> 15) and round the 13 dropped bits;
    below 2^-14, a subnormal code counts units of 2^-24; from 65520 up, inf."""
    u = np.float32(f).view(np.uint32)
    sign = np.uint16((u >> np.uint32(16)) & np.uint32(0x8000))
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):                   # nan: a quiet nan of the same sign
        return np.uint16(sign | np.uint16(0x7E00))
    if a >= np.uint32(0x477FF000):                  # >= 65520 (and inf): inf
        return np.uint16(sign | np.uint16(0x7C00))
    if a >= np.uint32(0x38800000):                  # a normal float16: 2^-14 and up
        a = a - np.uint32(0x38000000)               # exponent 127 -> 15
        return np.uint16(sign | np.uint16((a + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1)))
                                          >> np.uint32(13)))
    x = np.uint32(a).view(np.float32) * np.float32(2.0 ** 24)      # exact: units of 2^-24, < 1024
    units = np.uint32(x)                            # truncated; then round half to even
    rest = x - np.float32(units)
    if rest > np.float32(0.5) or (rest == np.float32(0.5) and units & np.uint32(1)):
        units += np.uint32(1)                       # 1024 units is the smallest normal's code
    return np.uint16(sign | np.uint16(units))


narrow_f16 = narrow_f16_f16c if HAS_F16C else narrow_f16_bits


def narrow_codes(values, fmt):
    """(N,) float32 -> (N,) uint16 codes, rounded to nearest even; ``fmt`` as ``widen_codes``'s."""
    return _NARROW_ALL[fmt](values)


def widen_codes(bits, fmt):
    """(N,) uint16 codes -> (N,) float32; ``fmt`` "bf16", "f16" (the one the kernels use),
    "f16_bits" or "f16c" (the tests check every one of the 65536 codes)."""
    return _WIDEN_ALL[fmt](bits)


def _elementwise(fn, dtype=np.float32):
    @njit                          # a closure over `fn`: compiled per format, not cached
    def elementwise(a):
        out = np.empty(a.shape[0], dtype=dtype)
        for j in range(a.shape[0]):
            out[j] = fn(a[j])
        return out
    return elementwise


_WIDEN_ALL = {"bf16": _elementwise(widen_bf16), "f16": _elementwise(widen_f16),
              "f16_bits": _elementwise(widen_f16_bits), "f16c": _elementwise(widen_f16_f16c)}
_NARROW_ALL = {"bf16": _elementwise(narrow_bf16, np.uint16), "f16": _elementwise(narrow_f16, np.uint16),
               "f16_bits": _elementwise(narrow_f16_bits, np.uint16), "f16c": _elementwise(narrow_f16_f16c, np.uint16)}


@njit(cache=True)
def _widen(h, bf16):
    return widen_bf16(h) if bf16 else widen_f16(h)


@njit(cache=True, fastmath=_FAST)
def _gemm_codes_dtype(x, bits, out, bf16):
    """out (M, N) += x (M, K) float32 @ widen(bits (K, N) uint16), R weight rows at a time
    (one row at a time when M = 1: the codes are then read in one sequential stream)."""
    K, N = bits.shape
    if x.shape[0] == 1:
        for i in range(K):                          # out[0] stays in L1; bits in memory order
            xi = x[0, i]
            for j in range(N):
                out[0, j] += xi * _widen(bits[i, j], bf16)
        return
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


# the ends of a half linear: widen the input's codes, round the float32 sums and add the bias
# as the reference does (``y = round(x @ w)``, then ``y += b`` in half: NumPy and ml_dtypes add
# two halves in float32 and round), one compiled loop each instead of three NumPy passes
@njit(cache=True)
def _widen_x(x_bits, bf16):
    x = np.empty(x_bits.shape, dtype=np.float32)                   # (M, K)
    for m in range(x_bits.shape[0]):
        for i in range(x_bits.shape[1]):
            x[m, i] = _widen(x_bits[m, i], bf16)
    return x


@njit(cache=True, inline="always")
def _round_add_bias(out, b_bits, has_bias, bf16):
    y = np.empty(out.shape, dtype=np.uint16)                        # (M, N) codes
    for m in range(out.shape[0]):
        for j in range(out.shape[1]):
            c = narrow_bf16(out[m, j]) if bf16 else narrow_f16(out[m, j])
            if has_bias:
                s = _widen(c, bf16) + _widen(b_bits[j], bf16)
                c = narrow_bf16(s) if bf16 else narrow_f16(s)
            y[m, j] = c
    return y


@njit(cache=True)
def _round_add_bias_bf16(out, b_bits, has_bias):
    return _round_add_bias(out, b_bits, has_bias, True)


@njit(cache=True)
def _round_add_bias_f16(out, b_bits, has_bias):
    return _round_add_bias(out, b_bits, has_bias, False)


def linear_forward(x, w, b=None):
    """Accelerated minillm.layers.linear_forward — see it for the math."""
    K = x.shape[-1]
    rows = x.size // K if K else 0
    if w.dtype.itemsize != 2:                    # float32 / float64: the layers' twin or BLAS
        if _FLOAT_TWIN is not None:
            return _FLOAT_TWIN(x, w, b)
        y = x @ w
    elif rows > _MAX_ROWS or rows == 0:
        y = (x.astype(np.float32) @ w.astype(np.float32)).astype(x.dtype)
    else:
        bf16 = w.dtype != _F16
        fused = x.dtype == w.dtype and (b is None or b.dtype == w.dtype)
        if fused:                                # half in, half out: codes both ends
            x2 = _widen_x(np.ascontiguousarray(x).reshape(rows, K).view(np.uint16), bf16)
        else:
            x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(rows, K)
        out = np.zeros((rows, w.shape[1]), dtype=np.float32)
        if w.flags.f_contiguous and not w.flags.c_contiguous:     # a transposed view (wte.T)
            (_gemm_codes_t_bf16 if bf16 else _gemm_codes_t_f16)(x2, w.T.view(np.uint16), out)
        else:
            (_gemm_codes_bf16 if bf16 else _gemm_codes_f16)(x2, np.ascontiguousarray(w).view(np.uint16), out)
        shape = x.shape[:-1] + (w.shape[1],)
        if fused:
            b_bits = _NO_BIAS if b is None else np.ascontiguousarray(b).view(np.uint16)
            y = (_round_add_bias_bf16 if bf16 else _round_add_bias_f16)(out, b_bits, b is not None)
            return y.view(x.dtype).reshape(shape), LinearCache(x, w, b is not None)
        y = out.astype(x.dtype).reshape(shape)
    if b is not None:
        y += b
    return y, LinearCache(x, w, b is not None)


linear_forward.accepts_half = True       # the backend runs it for float16 / bfloat16 too
KERNELS["layers.linear_forward"] = linear_forward


# --- the decode step's attention over a half KV cache ----------------------------------------
@njit(cache=True, inline="always")
def _narrow(f, bf16):
    return narrow_bf16(f) if bf16 else narrow_f16(f)


@njit(cache=True, inline="always")
def _round(f, bf16):
    """float32 -> the nearest half, as a float32 (what the reference's astype(half) keeps)."""
    return _widen(_narrow(f, bf16), bf16)


@njit(cache=True, inline="always")
def _append_attend_codes(qkv, k_cache, v_cache, pos, n_head, scale, bf16):
    """The reference's half attention on codes (uint16): float32 sums, rounded to half where
    it rounds (scores, scaled scores, softmax output, the result), so only sum orders differ."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    y = np.empty((B, T, C), dtype=np.uint16)                    # (B, T, C) codes
    q = np.empty(D, dtype=np.float32)
    acc = np.empty(D, dtype=np.float32)
    p = np.empty(k_cache.shape[2], dtype=np.float32)
    for b in range(B):
        for t in range(T):                                      # store the new K/V codes as they are
            s = pos[b] + t
            for h in range(n_head):
                k_cache[b, h, s, :] = qkv[b, t, C + h * D:C + (h + 1) * D]
                v_cache[b, h, s, :] = qkv[b, t, 2 * C + h * D:2 * C + (h + 1) * D]
        for t in range(T):
            n = pos[b] + t + 1                                  # keys this query sees
            for h in range(n_head):
                for d in range(D):
                    q[d] = _widen(qkv[b, t, h * D + d], bf16)
                m = -np.inf
                for s in range(n):                              # scores: q.k rounded, then * scale rounded
                    dot = np.float32(0.0)
                    for d in range(D):
                        dot += q[d] * _widen(k_cache[b, h, s, d], bf16)
                    p[s] = _round(_round(dot, bf16) * scale, bf16)
                    m = max(m, p[s])
                total = np.float32(0.0)
                for s in range(n):                              # softmax in float32
                    p[s] = math.exp(p[s] - m)
                    total += p[s]
                acc[:] = 0.0
                for s in range(n):                              # probabilities rounded, values summed
                    w = _round(p[s] / total, bf16)
                    for d in range(D):
                        acc[d] += w * _widen(v_cache[b, h, s, d], bf16)
                for d in range(D):
                    y[b, t, h * D + d] = _narrow(acc[d], bf16)
    return y


@njit(cache=True, fastmath=_FAST)
def _append_attend_bf16(qkv, k_cache, v_cache, pos, n_head, scale):
    return _append_attend_codes(qkv, k_cache, v_cache, pos, n_head, scale, True)


@njit(cache=True, fastmath=_FAST)
def _append_attend_f16(qkv, k_cache, v_cache, pos, n_head, scale):
    return _append_attend_codes(qkv, k_cache, v_cache, pos, n_head, scale, False)


def append_attend(qkv, k_cache, v_cache, pos, n_head):
    """Accelerated minillm.attention.append_attend — see it for the math."""
    if qkv.dtype.itemsize != 2 or not (qkv.dtype == k_cache.dtype == v_cache.dtype):
        return _FLOAT_ATTEND(qkv, k_cache, v_cache, pos, n_head)
    pos = np.asarray(pos, dtype=np.int64)
    if pos.min() < 0 or pos.max() + qkv.shape[1] > k_cache.shape[2]:   # compiled code has no bounds checks
        raise IndexError(f"slots {pos.tolist()} + T={qkv.shape[1]} outside a cache of {k_cache.shape[2]}")
    D = qkv.shape[2] // 3 // int(n_head)
    scale = np.float32(np.asarray(1.0 / math.sqrt(D), dtype=qkv.dtype))     # the reference's half scale
    bf16 = qkv.dtype != _F16
    y = (_append_attend_bf16 if bf16 else _append_attend_f16)(
        np.ascontiguousarray(qkv).view(np.uint16), k_cache.view(np.uint16), v_cache.view(np.uint16),
        pos, int(n_head), scale)
    return y.view(qkv.dtype)


append_attend.accepts_half = True
KERNELS["attention.append_attend"] = append_attend
