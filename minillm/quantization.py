"""Quantization: the blocks' linear weights held as 8- or 4-bit integers plus float scales.

What it changes against the baseline: each of the four linear layers of every
block (``seams.LINEAR_ROLES``) stores its weight W (in, out) as small integers
q and float scales s, W ~ q * s, and multiplies without ever building a float
copy of W. The embeddings (``wte``, ``wpe``, hence the tied LM head), the
LayerNorms and the biases stay float. ``quantize(model, scheme)`` returns a
new ``GPT`` whose config names the scheme's linear *kind* (``minillm.seams``);
the float model is left untouched. Four schemes:

    w8        q = clip(round(W / s_j), -127, 127),  s_j = max_i |W[i, j]| / 127
              (symmetric, one scale per output column j; Jacob et al. 2018)
              y = (x @ q) * s + b                      x stays float
    w8a8      w8's weights, and each row of x (a token) quantized on the fly,
              s_x = max |x_row| / 127, x_q = round(x / s_x):
              y = (x_q @ q)_int32 * s_x * s + b        (integer products, int32 sums)
    llm.int8  w8a8, except the input features (columns of x) holding any
              |x| > 6.0 in the current input: those go through a float matmul
              with the matching rows of W dequantized (Dettmers et al. 2022,
              "LLM.int8()", sec. 3.2, threshold 6.0)
    w4g64     q in [-7, 7] per group of 64 consecutive input rows of a column,
              s[g, j] = max_{i in g} |W[i, j]| / 7; two 4-bit codes per byte
              (llama.cpp's Q4_0 groups, symmetric; Frantar et al. 2023, "GPTQ")

Bytes per weight (what decoding streams; scales included):

    float32 4      w8 1 + 4/K_in per column      w4g64 1/2 + 4/64 = 0.5625

so at batch 1, where a decode step reads every weight once and is bound by
memory bandwidth, int8 weights read 1/4 of the bytes and int4 ~1/7. Rounding
moves each weight by at most s/2; the price is a small loss in accuracy.

The matmuls are named kernels (``@kernel("quantization.*")``): readable NumPy
here, compiled twins in ``backends/numba_quant.py``. The reference processes
``CHUNK_ROWS`` outputs at a time, so at most a block of W is ever a float
array; the twins read the bytes directly. The codes are stored transposed,
(out, in), so that all of one output's weights are contiguous (a batch-1
kernel computes each output as one dot product); ``dims`` still reports (in, out).

Training: the integer weights and their scales are frozen (not in
``GPT.trainable()``); the kinds' backward passes return dx through the
dequantized weight and the bias gradients, so ``forward_train`` / ``backward``
and ``train`` work (biases, LayerNorms and embeddings train). For w8a8 and
llm.int8 the rounding of x is passed straight through (d round(x)/dx := 1,
Bengio et al. 2013), i.e. their dx is w8's.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from . import seams
from .backend import current, kernel, xp_of
from .layers import matmul
from .tour import Row, TourContext, technique

INT8_MAX = 127           # symmetric int8: codes in [-127, 127] (-128 unused, so -q is a code)
INT4_MAX = 7             # symmetric int4: codes in [-7, 7], stored as q + 8 in a nibble
GROUP = 64               # w4g64: input rows sharing one scale
OUTLIER_THRESHOLD = 6.0  # llm.int8: |x| above this sends a feature to the float path
CHUNK_ROWS = 256         # the reference dequantizes at most this many outputs at once

# public scheme name -> linear kind name (kind names are identifiers)
SCHEMES = {"w8": "w8", "w8a8": "w8a8", "llm.int8": "llm_int8", "w4g64": "w4g64"}


# --- quantizers ----------------------------------------------------------------------
def absmax_scale(w, qmax: int, axis=None):
    """s = max |w| / qmax over ``axis`` (keepdims); the scale maps the largest |w| to qmax."""
    xp = xp_of(w)
    return xp.abs(w).max(axis=axis, keepdims=True) / qmax


def round_to_codes(w, s, qmax: int):
    """q = clip(round(w / s), -qmax, qmax) as int8; a zero scale (an all-zero slice) gives q = 0."""
    xp = xp_of(w)
    safe = xp.where(s > 0, s, 1)
    return xp.clip(xp.round(w / safe), -qmax, qmax).astype(np.int8)


def quantize_int8(w, per_channel: bool = True):
    """w (in, out) float -> (q (in, out) int8, s): s (out,) per output column, or () per tensor."""
    s = absmax_scale(w, INT8_MAX, axis=0 if per_channel else None)            # (1, out) or (1, 1)
    q = round_to_codes(w, s, INT8_MAX)                                        # (in, out)
    return q, (s[0] if per_channel else s.reshape(()))


def dequantize_int8(q, s, dtype=np.float32):
    """q * s in ``dtype``: the weight the int8 codes stand for."""
    return q.astype(dtype) * s


def pack_int4(q):
    """q (out, in) int8 codes in [-7, 7], ``in % GROUP == 0`` -> (out, in / 2) uint8.

    Within each group of 64 inputs, byte p (0 <= p < 32) holds inputs p (low
    nibble) and 32 + p (high nibble), each as q + 8 in [1, 15] (llama.cpp's
    Q4_0 order): a kernel multiplies the low nibbles of a group by 32
    consecutive activations and the high nibbles by the next 32."""
    n_out, n_in = q.shape
    u = (q + 8).astype(np.uint8).reshape(n_out, n_in // GROUP, 2, GROUP // 2)   # (out, G, 2, 32)
    packed = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n_out, n_in // 2)         # (out, in/2)
    return xp_of(q).ascontiguousarray(packed)


@kernel("quantization.unpack_int4")
def unpack_int4(packed):
    """packed (out, in/2) uint8 -> q (out, in) int8: the inverse of ``pack_int4``."""
    xp = xp_of(packed)
    n_out, P = packed.shape
    b = packed.reshape(n_out, P // (GROUP // 2), 1, GROUP // 2)                  # (out, G, 1, 32)
    q = xp.concatenate([(b & 15).astype(np.int8) - 8,                           # inputs 0..31 of a group
                        (b >> 4).astype(np.int8) - 8], axis=2)                  # inputs 32..63
    return q.reshape(n_out, 2 * P)                                              # (out, in)


def quantize_int4(w):
    """w (in, out) float, ``in % 64 == 0`` -> (q (in, out) int8 in [-7, 7], s (in/64, out))."""
    n_in, n_out = w.shape
    if n_in % GROUP:
        raise ValueError(f"w has {n_in} input rows, not divisible by the group size {GROUP}")
    g = w.reshape(n_in // GROUP, GROUP, n_out)                                # (G, 64, out)
    s = absmax_scale(g, INT4_MAX, axis=1)                                     # (G, 1, out)
    return round_to_codes(g, s, INT4_MAX).reshape(n_in, n_out), s[:, 0]


def dequantize_int4(packed, s, dtype=np.float32):
    """Stored rows (out, in) of W^T from packed codes (out, in/2) and scales (out, in/64)."""
    xp = xp_of(packed)
    return unpack_int4(packed).astype(dtype) * xp.repeat(s, GROUP, axis=1)     # (out, in)


def quantize_rows(x):
    """x (M, K) float -> (x_q (M, K) int8, s_x (M, 1)): symmetric per-row (per-token) int8."""
    s = absmax_scale(x, INT8_MAX, axis=-1)                                    # (M, 1)
    return round_to_codes(x, s, INT8_MAX), s


def outlier_columns(x, threshold: float = OUTLIER_THRESHOLD):
    """(K,) bool: input features of x (M, K) where any |x| > threshold (LLM.int8's outliers)."""
    xp = xp_of(x)
    return (xp.abs(x) > threshold).any(axis=0)


# --- the kernels: integer weights times activations ------------------------------------------
# Weights are stored transposed, (out, in): row j holds everything output j needs, so a
# batch-1 kernel computes each output as one contiguous dot product.
@kernel("quantization.w8_matmul")
def w8_matmul(x, q, s):
    """y = x @ (q^T * s) = (x @ q^T) * s: x (M, K) float, q (N, K) int8, s (N,) -> (M, N).

    The scale is per output, so it factors out of the sum over inputs. The
    reference converts CHUNK_ROWS rows of q at a time to x's dtype for BLAS."""
    xp = xp_of(x)
    N = q.shape[0]
    y = xp.empty((x.shape[0], N), dtype=x.dtype)                              # (M, N)
    for j0 in range(0, N, CHUNK_ROWS):
        j1 = min(N, j0 + CHUNK_ROWS)
        y[:, j0:j1] = matmul(x, q[j0:j1].astype(x.dtype).T) * s[j0:j1]
    return y


@kernel("quantization.int8_matmul")
def int8_matmul(xq, q):
    """acc = xq @ q^T with int32 sums: xq (M, K) int8, q (N, K) int8 -> (M, N) int32.

    Computed through float64 BLAS, exactly: every product is an integer with
    |a b| <= 127^2, and every partial sum of K of them stays below 2^53 (K < 5e11),
    so float64 holds each one without rounding (NumPy's own integer matmul is
    ~30x slower). The twin accumulates in int32 as the hardware would."""
    xp = xp_of(xq)
    N = q.shape[0]
    acc = xp.empty((xq.shape[0], N), dtype=np.int32)                          # (M, N)
    x64 = xq.astype(np.float64)
    for j0 in range(0, N, CHUNK_ROWS):
        j1 = min(N, j0 + CHUNK_ROWS)
        acc[:, j0:j1] = (x64 @ q[j0:j1].astype(np.float64).T).astype(np.int32)
    return acc


@kernel("quantization.w4_matmul")
def w4_matmul(x, packed, s):
    """y = x @ W: x (M, K), packed (N, K/2) uint8 (``pack_int4``), s (N, K/64) -> (M, N),
    W[i, j] = q[j, i] * s[j, i // 64]. The reference dequantizes CHUNK_ROWS outputs at a time."""
    xp = xp_of(x)
    N = packed.shape[0]
    y = xp.empty((x.shape[0], N), dtype=x.dtype)                              # (M, N)
    for j0 in range(0, N, CHUNK_ROWS):
        j1 = min(N, j0 + CHUNK_ROWS)
        y[:, j0:j1] = matmul(x, dequantize_int4(packed[j0:j1], s[j0:j1], x.dtype).T)
    return y


# --- the linear kinds ----------------------------------------------------------------------
class QuantLinearCache(NamedTuple):
    lead: tuple            # x's leading axes; x itself is not kept (the weights do not train)
    lp: dict               # the layer's parameters: dx = dy @ W^T dequantizes W block by block


class Int8Linear(seams.LinearKind):
    """w8: int8 codes + a float scale per output + the float bias.

    Parameters below a layer's prefix: ``qweight`` (out, in) int8 (W's codes,
    transposed: the layout the kernels stream), ``scale`` (out,) and ``bias``
    (out,) in the model dtype. ``dims`` still reports (in, out). Only the
    bias trains."""

    name = "w8"
    suffixes = ("qweight", "scale", "bias")
    trainable = ("bias",)

    def specs(self, n_in, n_out, dtype):
        dtype = np.dtype(dtype)
        return {"qweight": ((n_out, n_in), np.dtype(np.int8)), "scale": ((n_out,), dtype),
                "bias": ((n_out,), dtype)}

    def dims(self, lp):
        n_out, n_in = lp["qweight"].shape
        return n_in, n_out

    def from_dense(self, w, b):
        xp = xp_of(w)
        q, s = quantize_int8(w)                                                    # (in, out), (out,)
        return {"qweight": xp.ascontiguousarray(q.T), "scale": s.astype(w.dtype), "bias": b.copy()}

    def check_layer(self, name: str | None, n_in: int) -> None:
        """ValueError if layer ``name`` (None: unnamed) with ``n_in`` in-features cannot take this kind."""

    def weight_block(self, lp, j0: int, j1: int, dtype):
        """Outputs j0:j1 of the dequantized weight, stored layout: W[:, j0:j1]^T (j1 - j0, in)."""
        return dequantize_int8(lp["qweight"][j0:j1], lp["scale"][j0:j1, None], dtype)

    def matmul(self, lp, x, name: str):
        """x (M, in) -> x @ W (M, out)."""
        return w8_matmul(x, lp["qweight"], lp["scale"])

    def forward(self, lp, x, name):
        n_in, n_out = self.dims(lp)
        if x.shape[-1] != n_in:
            raise ValueError(f"layer {name}: input has {x.shape[-1]} features, the layer takes {n_in}")
        y = self.matmul(lp, x.reshape(-1, n_in), name) + lp["bias"]             # (M, out)
        return y.reshape(x.shape[:-1] + (n_out,)), QuantLinearCache(x.shape[:-1], lp)

    def backward(self, dy, cache):
        xp = xp_of(dy)
        lead, lp = cache
        n_in, n_out = self.dims(lp)
        dy2 = dy.reshape(-1, n_out)                                                # (M, out)
        dx = xp.zeros((dy2.shape[0], n_in), dtype=dy.dtype)                        # (M, in)
        for j0 in range(0, n_out, CHUNK_ROWS):                                     # dx = dy @ W^T
            j1 = min(n_out, j0 + CHUNK_ROWS)
            dx += matmul(dy2[:, j0:j1], self.weight_block(lp, j0, j1, dy.dtype))
        db = dy2.astype(np.float32).sum(axis=0).astype(dy.dtype) if dy.dtype.itemsize == 2 \
            else dy2.sum(axis=0)
        return dx.reshape(lead + (n_in,)), {"bias": db}


class Int8ActLinear(Int8Linear):
    """w8a8: w8's parameters; each input row is quantized to int8 on the fly."""

    name = "w8a8"

    def matmul(self, lp, x, name):
        xq, sx = quantize_rows(x)                                                  # (M, in), (M, 1)
        acc = int8_matmul(xq, lp["qweight"])                                       # (M, out) int32
        return acc.astype(x.dtype) * sx * lp["scale"]


class LLMInt8Linear(Int8ActLinear):
    """llm.int8: w8a8 for the regular features, float for the outlier ones (|x| > 6)."""

    name = "llm_int8"
    threshold = OUTLIER_THRESHOLD

    def matmul(self, lp, x, name):
        xp = xp_of(x)
        cols = xp.flatnonzero(outlier_columns(x, self.threshold))                  # (n_outliers,)
        if cols.shape[0] == 0:
            return super().matmul(lp, x, name)
        regular = x.copy()
        regular[:, cols] = 0                                                       # outliers leave the int8 path
        y = super().matmul(lp, regular, name)                                      # (M, out)
        w_out = dequantize_int8(lp["qweight"][:, cols], lp["scale"][:, None], x.dtype)  # (out, n_outliers)
        return y + matmul(x[:, cols], w_out.T)


class Int4GroupLinear(Int8Linear):
    """w4g64: packed int4 codes (out, in/2) uint8 (``pack_int4``) + scales (out, in/64)
    + the float bias."""

    name = "w4g64"

    def specs(self, n_in, n_out, dtype):
        self.check_layer(None, n_in)
        dtype = np.dtype(dtype)
        return {"qweight": ((n_out, n_in // 2), np.dtype(np.uint8)),
                "scale": ((n_out, n_in // GROUP), dtype), "bias": ((n_out,), dtype)}

    def dims(self, lp):
        n_out, P = lp["qweight"].shape
        return 2 * P, n_out

    def from_dense(self, w, b):
        self.check_layer(None, w.shape[0])
        xp = xp_of(w)
        q, s = quantize_int4(w)                                                    # (in, out), (G, out)
        return {"qweight": pack_int4(q.T), "scale": xp.ascontiguousarray(s.T).astype(w.dtype),
                "bias": b.copy()}

    def check_layer(self, name, n_in):
        if n_in % GROUP:
            raise ValueError(f"{'a layer' if name is None else 'layer ' + name} has {n_in} in-features, "
                             f"not divisible by the int4 group size {GROUP}; {self.name} does not "
                             f"pad: use 'w8' for this model")

    def weight_block(self, lp, j0, j1, dtype):
        return dequantize_int4(lp["qweight"][j0:j1], lp["scale"][j0:j1], dtype)

    def matmul(self, lp, x, name):
        return w4_matmul(x, lp["qweight"], lp["scale"])

    def forward(self, lp, x, name):
        self.check_layer(name, self.dims(lp)[0])
        return super().forward(lp, x, name)


for _kind in (Int8Linear(), Int8ActLinear(), LLMInt8Linear(), Int4GroupLinear()):
    seams.register_linear(_kind)


# --- models -----------------------------------------------------------------------------------
def _linear_names(config) -> list[str]:
    return [f"h.{i}.{role}" for i in range(config.n_layer) for role in seams.LINEAR_ROLES]


def quantize(model, scheme: str):
    """A new GPT whose blocks' linear weights are quantized by ``scheme``: "w8", "w8a8",
    "llm.int8" or "w4g64" (see the module docstring). ``model`` (a float GPT with dense
    linears) is not changed; the new model shares no array with it."""
    from .model import GPT
    if not isinstance(model, GPT):
        raise ValueError(f"model must be a minillm GPT, got {type(model).__name__}")
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is unknown; choose one of {list(SCHEMES)}")
    if model.config.linear != "dense":
        raise ValueError(f"model is already quantized (linear kind {model.config.linear!r}); "
                         f"quantize its float model instead")
    kind = seams.linear_kind(SCHEMES[scheme])
    names = _linear_names(model.config)
    for name in names:                           # every layer is checked before any is converted
        kind.check_layer(name, model.params[name + ".weight"].shape[0])
    params = {k: v.copy() for k, v in model.params.items()
              if k.rsplit(".", 1)[0] not in set(names)}
    for name in names:
        w, b = model.params[name + ".weight"], model.params[name + ".bias"]
        for suffix, a in kind.from_dense(w, b).items():
            params[f"{name}.{suffix}"] = a
    return GPT(dataclasses.replace(model.config, linear=kind.name), params=params)


def _quant_kind(model):
    kind = seams.linear_kind(model.config.linear)
    if not isinstance(kind, Int8Linear):
        raise ValueError(f"model has linear kind {model.config.linear!r}, not a quantized one "
                         f"({sorted(SCHEMES.values())})")
    return kind


def dequantize(model):
    """The float GPT (dense linears) whose weights are q * s of quantized ``model``."""
    from .model import GPT
    kind = _quant_kind(model)
    names = _linear_names(model.config)
    params = {k: v.copy() for k, v in model.params.items() if k.rsplit(".", 1)[0] not in set(names)}
    for name in names:
        lp = seams.layer_params(model.params, name, kind)
        block = kind.weight_block(lp, 0, kind.dims(lp)[1], model.config.np_dtype)   # (out, in)
        params[name + ".weight"] = xp_of(block).ascontiguousarray(block.T)            # (in, out)
        params[name + ".bias"] = lp["bias"].copy()
    return GPT(dataclasses.replace(model.config, linear="dense"), params=params)


def linear_nbytes(model, bias: bool = False) -> int:
    """Bytes the blocks' linear layers hold: weights (codes + scales for a quantized
    model), and the biases when ``bias``."""
    names = set(_linear_names(model.config))
    return int(sum(v.nbytes for k, v in model.params.items()
                   if k.rsplit(".", 1)[0] in names and (bias or not k.endswith(".bias"))))


def inject_outlier(model, channel: int = 0, factor: float = 20.0, layers=None):
    """A float copy of ``model`` computing the same function, whose MLP inputs carry an
    outlier feature: ln_2's weight and bias of ``channel`` times ``factor``, row ``channel``
    of mlp.c_fc's weight divided by it (in blocks ``layers``, default all). The
    product is unchanged, so only a quantizer sees the difference (Dettmers et al. 2022)."""
    from .checks import check_float, check_int
    from .model import GPT
    if not isinstance(model, GPT) or model.config.linear != "dense":
        raise ValueError("model must be a float minillm GPT (dense linears)")
    channel = check_int("channel", channel, 0, model.config.n_embd - 1)
    factor = check_float("factor", factor, 0, lo_open=True)
    layers = range(model.config.n_layer) if layers is None else \
        [check_int("layers[i]", i, 0, model.config.n_layer - 1) for i in layers]
    p = {k: v.copy() for k, v in model.params.items()}
    for i in layers:
        h = f"h.{i}."
        p[h + "ln_2.weight"][channel] *= factor
        p[h + "ln_2.bias"][channel] *= factor
        p[h + "mlp.c_fc.weight"][channel] /= factor
    return GPT(model.config, params=p)


# --- the tour row ----------------------------------------------------------------------------
@technique("quantization", order=3)
def quantization_rows(ctx: TourContext) -> list[Row]:
    """One row per scheme: the baseline quantized (no training), its bytes, validation
    perplexity and cached greedy decode speed; the float model's cached decode speed
    (measured here) is in the notes, since the baseline row decodes without a cache."""
    fp_bytes = linear_nbytes(ctx.model)
    fp_tok_s = ctx.decode_tok_s(use_cache=True)
    rows = []
    for scheme in SCHEMES:
        try:
            qm = quantize(ctx.model, scheme)
        except ValueError as exc:          # w4g64 on a model narrower than a group (--quick)
            rows.append(Row(f"quantization {scheme}", None, None, None, None, None,
                            f"skipped: {exc}", {"scheme": scheme, "skipped": True}))
            continue
        ppl = ctx.val_ppl(qm)
        tok_s = ctx.decode_tok_s(qm, use_cache=True)
        lin = linear_nbytes(qm)
        rows.append(Row(f"quantization {scheme}", qm.num_params(), qm.nbytes(), ppl, None, tok_s,
                        f"{scheme}: linear weights {lin / fp_bytes:.3f}x of float32 (scales "
                        f"included); cached decode {tok_s:.0f} tok/s vs float32 cached "
                        f"{fp_tok_s:.0f} ({tok_s / fp_tok_s:.2f}x); no retraining",
                        {"scheme": scheme, "linear_bytes": lin, "linear_bytes_fp32": fp_bytes,
                         "fp32_cached_tok_s": fp_tok_s, "backend": current()}))
    return rows
