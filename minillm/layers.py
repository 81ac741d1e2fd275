"""Layers as forward/backward pairs of pure functions.

Each ``*_forward`` returns ``(out, cache)``; each ``*_backward`` takes the
upstream gradient and that cache and returns the gradients of its inputs, in
the order the forward took them. Every op keeps its input dtype. Axis legend
(see ``model.py``): B batch, T time, C channels, V vocab; ``...`` any leading axes.

Kernels registered with ``@kernel`` may be replaced by a twin of the same
name in the active backend (see ``minillm.backend``); the code below is the
reference those twins are tested against.

Half precision (float16, bfloat16; ``minillm.precision`` has the full table):
matmuls take half operands, multiply and accumulate in float32 and round the
result back (``matmul``: what tensor cores do; a product of two halves is
exact in float32); LayerNorm statistics, GELU, softmax and the loss are
computed in float32 (``f32``) and rounded back to the input's dtype. For
float32 and float64 inputs both helpers are the identity: nothing changes.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .backend import kernel, xp_of


# --- half precision: where float32 is used -----------------------------------------
def is_half(x) -> bool:
    """float16 or bfloat16 (2-byte floats; bfloat16's NumPy kind is 'V')."""
    return x.dtype.itemsize == 2 and x.dtype.kind in "fV"


def f32(x):
    """``x`` in float32 when it is half precision, else ``x`` itself (no copy)."""
    return x.astype(np.float32) if is_half(x) else x


def matmul(a, b):
    """a @ b; half operands are multiplied and accumulated in float32, then rounded back."""
    if is_half(a):
        return (a.astype(np.float32) @ b.astype(np.float32)).astype(a.dtype)
    return a @ b


# --- embedding -------------------------------------------------------------
class EmbeddingCache(NamedTuple):
    idx: np.ndarray        # (B, T) token ids, kept to scatter the gradient back
    positions: np.ndarray  # (T,) shared positions, or (B, T) one row of positions per sequence
    vocab_size: int
    block_size: int


def embedding_forward(idx, wte, wpe, pos0=0):
    """x[b, t] = wte[idx[b, t]] + wpe[pos0 + t]   -> (B, T, C).

    ``pos0``: the position of the first token, an int (training: 0) or one per
    row (B,) ints (decoding: each row continues from its own length).
    """
    xp = xp_of(wte)
    T = idx.shape[1]
    if isinstance(pos0, (int, np.integer)):
        positions = xp.arange(int(pos0), int(pos0) + T)                  # (T,)
    else:
        positions = xp.asarray(pos0)[:, None] + xp.arange(T)[None, :]   # (B, T)
    x = wte[idx] + wpe[positions]                                      # (B, T, C)
    return x, EmbeddingCache(idx, positions, wte.shape[0], wpe.shape[0])


@kernel("layers.embedding_backward")
def embedding_backward(dx, cache: EmbeddingCache):
    """-> (dwte (V, C), dwpe (T_max, C)); rows never looked up get zero."""
    xp = xp_of(dx)
    C = dx.shape[-1]
    dx32 = f32(dx)                                                     # sums in float32 for halves
    dwte = xp.zeros((cache.vocab_size, C), dtype=dx32.dtype)
    # a token id can repeat in the batch: scatter-*add*, not assign
    xp.add.at(dwte, cache.idx.reshape(-1), dx32.reshape(-1, C))
    dwpe = xp.zeros((cache.block_size, C), dtype=dx32.dtype)
    if cache.positions.ndim == 1:                                      # shared by all rows: distinct
        dwpe[cache.positions] = dx32.sum(axis=0)                       # (T, C)
    else:
        xp.add.at(dwpe, cache.positions.reshape(-1), dx32.reshape(-1, C))
    return dwte.astype(dx.dtype, copy=False), dwpe.astype(dx.dtype, copy=False)


# --- linear (GPT-2 "Conv1D" layout: w is (in, out), y = x @ w + b) ---------
class LinearCache(NamedTuple):
    x: np.ndarray          # (..., Cin) the input, needed for dw
    w: np.ndarray          # (Cin, Cout) needed for dx
    has_bias: bool


@kernel("layers.linear_forward")
def linear_forward(x, w, b=None):
    """y = x @ w + b   (..., Cin) -> (..., Cout)."""
    y = matmul(x, w)
    if b is not None:
        y += b
    return y, LinearCache(x, w, b is not None)


@kernel("layers.linear_backward")
def linear_backward(dy, cache: LinearCache):
    """-> (dx (..., Cin), dw (Cin, Cout), db (Cout,) or None)."""
    x, w, has_bias = cache
    dx = matmul(dy, w.T)                                    # (..., Cin)
    x2 = x.reshape(-1, x.shape[-1])                         # (N, Cin)
    dy2 = dy.reshape(-1, dy.shape[-1])                      # (N, Cout)
    dw = matmul(x2.T, dy2)                                  # (Cin, Cout)
    db = f32(dy2).sum(axis=0).astype(dy.dtype, copy=False) if has_bias else None   # (Cout,)
    return dx, dw, db


# --- layer norm (Ba, Kiros & Hinton 2016) ------------------------------------
class LayerNormCache(NamedTuple):
    xhat: np.ndarray       # (..., C) normalised input; x itself is not needed
    rstd: np.ndarray       # (..., 1) 1 / sqrt(var + eps)
    w: np.ndarray          # (C,)


@kernel("layers.layernorm_forward")
def layernorm_forward(x, w, b, eps: float = 1e-5):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis (statistics in float32
    or wider; xhat and rstd are kept at that precision)."""
    xs = f32(x)
    mean = xs.mean(axis=-1, keepdims=True)                  # (..., 1)
    xc = xs - mean                                          # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)            # (..., 1) biased, as GPT-2
    rstd = 1.0 / np.sqrt(var + eps)                         # (..., 1)
    xhat = xc * rstd                                        # (..., C)
    y = xhat * f32(w) + f32(b)
    return y.astype(x.dtype, copy=False), LayerNormCache(xhat, rstd, w)


@kernel("layers.layernorm_backward")
def layernorm_backward(dy, cache: LayerNormCache):
    """-> (dx, dw, db). dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w."""
    xhat, rstd, w = cache
    C, dtype, dy = dy.shape[-1], dy.dtype, f32(dy)
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)             # (C,)
    db = dy.reshape(-1, C).sum(axis=0)                      # (C,)
    g = dy * f32(w)                                         # (..., C)
    dx = (g - g.mean(axis=-1, keepdims=True)
          - xhat * (g * xhat).mean(axis=-1, keepdims=True)) * rstd
    return tuple(a.astype(dtype, copy=False) for a in (dx, dw, db))


# --- GELU, tanh approximation (Hendrycks & Gimpel 2016, eq. as in GPT-2) -----
_GELU_S = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@kernel("layers.gelu_forward")
def gelu_forward(x):
    """y = 0.5 x (1 + tanh(s (x + a x^3))); cache = x (tanh is recomputed)."""
    u = f32(x)
    y = 0.5 * u * (1.0 + np.tanh(_GELU_S * (u + _GELU_A * u * u * u)))
    return y.astype(x.dtype, copy=False), x


@kernel("layers.gelu_backward")
def gelu_backward(dy, x):
    """dy * d/dx gelu(x) = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 a x^2))."""
    u = f32(x)
    v = _GELU_S * (u + _GELU_A * u * u * u)
    t = np.tanh(v)
    # 1 - t^2 = sech^2(v) = 4 e / (1 + e)^2 with e = exp(-2|v|) <= 1: written as
    # 1 - t * t it cancels in float32 once t rounds near -1 (30% off at x = -5, 0 below -5.3)
    e = np.exp(-2.0 * np.abs(v))
    sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
    dgelu = 0.5 * (1.0 + t) + 0.5 * u * sech2 * _GELU_S * (1.0 + 3.0 * _GELU_A * u * u)
    return (f32(dy) * dgelu).astype(dy.dtype, copy=False)


# --- softmax over the last axis ----------------------------------------------
@kernel("layers.softmax_forward")
def softmax_forward(x):
    """y = exp(x - max x) / sum exp(x - max x); -inf entries give exactly 0."""
    z = f32(x)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    y = (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype, copy=False)
    return y, y


@kernel("layers.softmax_backward")
def softmax_backward(dy, y):
    """dx = y * (dy - sum(dy * y)) (the Jacobian diag(y) - y y^T applied to dy)."""
    g, p = f32(dy), f32(y)
    return (p * (g - (g * p).sum(axis=-1, keepdims=True))).astype(dy.dtype, copy=False)


# --- cross-entropy from logits, mean over positions -----------------------
class CrossEntropyCache(NamedTuple):
    probs: np.ndarray      # (N, V) softmax of the logits
    targets: np.ndarray    # (N,) int


@kernel("layers.cross_entropy_forward")
def cross_entropy_forward(logits, targets):
    """loss = mean_n -log softmax(logits_n)[targets_n]; logits (..., V), targets (...)."""
    V = logits.shape[-1]
    z = f32(logits).reshape(-1, V)                          # (N, V) the loss is float32 or wider
    t = targets.reshape(-1)                                 # (N,)
    z = z - z.max(axis=-1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=-1))              # (N,)
    rows = xp_of(z).arange(z.shape[0])                      # (N,)
    picked = z[rows, t]                                     # (N,)
    loss = (logsumexp - picked).mean()
    probs = np.exp(z - logsumexp[:, None])                  # (N, V)
    return loss, CrossEntropyCache(probs, t)


@kernel("layers.cross_entropy_backward")
def cross_entropy_backward(dloss, cache: CrossEntropyCache, shape):
    """dlogits = dloss * (softmax - onehot(target)) / N, reshaped to ``shape``."""
    probs, t = cache
    N = probs.shape[0]
    xp = xp_of(probs)
    scale = xp.asarray(dloss / N, dtype=probs.dtype)        # a NumPy-scalar dloss must not promote
    dz = probs * scale                                      # (N, V)
    dz[xp.arange(N), t] -= scale
    return dz.reshape(shape)
