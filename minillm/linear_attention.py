"""Linear attention: a feature map in place of the softmax, so attention becomes an RNN.

What it changes against the baseline (Katharopoulos et al. 2020, "Transformers
are RNNs", eq. 2-5 and 16-20): softmax attention weighs value j by
exp(q_i . k_j / sqrt(D)), a kernel that does not factor, so every pair (i, j)
is computed: O(T^2). Replace it by a kernel that does factor,
sim(q, k) = phi(q) . phi(k) with phi(x) = elu(x) + 1 > 0 (elementwise), and
the sums over keys can be taken *before* the query arrives:

    y_i = sum_{j<=i} (phi(q_i) . phi(k_j)) v_j / sum_{j<=i} phi(q_i) . phi(k_j)
        = phi(q_i)^T S_i / phi(q_i) . z_i,   S_i = sum_{j<=i} phi(k_j) v_j^T  (D, D)
                                            z_i = sum_{j<=i} phi(k_j)         (D,)

- parallel form (training, ``linear_attention_forward``): the prefix sums S_i
  in chunks of L positions (``causal_linear``): inside a chunk the (L, L)
  masked products, across chunks a cumulative sum of per-chunk D x D sums:
  O(T (L + D) D) time, O(T L + T/L D^2) memory, linear in T;
- recurrent form (decoding, ``LinearAttention.step``): S and z *are* the
  state, S += phi(k) v^T, z += phi(k) per token: O(H D^2) time and
  H D (D + 1) floats per layer and row, whatever the position.

No 1/sqrt(D) scale (phi's positivity, not a temperature, keeps the weights
apart), no mask matrix (the prefix sum is the causality). Values get a
column of ones, V1 = [v, 1], so one pass gives numerator and denominator.
The backward pass is three more passes of the same chunked kernel, two of them
running backward in time (``anticausal_linear``). Axis legend as in ``model.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import seams
from .attention import merge_heads, merge_qkv, split_heads, split_qkv
from .backend import xp_of
from .layers import matmul
from .sparse_attention import check_pattern_config, valid_counts, variant_row
from .tour import Row, TourContext, technique

CHUNK = 64            # L: positions per chunk of the parallel form


# --- the feature map phi(x) = elu(x) + 1 -------------------------------------------------------
def feature_map(x):
    """phi(x) = x + 1 for x > 0, exp(x) for x <= 0 (elu + 1: positive, smooth at 0)."""
    xp = xp_of(x)
    return xp.where(x > 0, x + 1, xp.exp(xp.minimum(x, 0))).astype(x.dtype, copy=False)


def feature_map_backward(dphi, x):
    """d phi / dx = 1 for x > 0, exp(x) for x <= 0."""
    xp = xp_of(x)
    return (dphi * xp.where(x > 0, 1, xp.exp(xp.minimum(x, 0)))).astype(dphi.dtype, copy=False)


# --- the chunked prefix sum: out_i = sum_{j<=i} (a_i . b_j) c_j ---------------------------------
def causal_linear(a, b, c, chunk: int = CHUNK):
    """a, b (B, H, T, E), c (B, H, T, F) -> (B, H, T, F): out_i = a_i^T sum_{j<=i} b_j c_j^T."""
    xp = xp_of(a)
    B, H, T, E = a.shape
    F = c.shape[-1]
    L = max(1, min(chunk, T))
    n = -(-T // L)

    def chunks(x):                                                     # (B, H, T, X) -> (B, H, n, L, X)
        pad = xp.zeros((B, H, n * L - T, x.shape[-1]), x.dtype)
        return xp.concatenate([x, pad], axis=2).reshape(B, H, n, L, x.shape[-1])

    ac, bc, cc = chunks(a), chunks(b), chunks(c)
    # inside a chunk: the masked (L, L) products, as softmax-free attention
    within = matmul(ac, bc.transpose(0, 1, 2, 4, 3))                   # (B, H, n, L, L)
    within = xp.where(xp.asarray(np.tril(np.ones((L, L), dtype=bool))), within, 0).astype(a.dtype)
    out = matmul(within, cc)                                           # (B, H, n, L, F)
    # across chunks: state before chunk m = sum of the earlier chunks' b^T c
    sums = matmul(bc.transpose(0, 1, 2, 4, 3), cc)                     # (B, H, n, E, F)
    before = xp.concatenate([xp.zeros_like(sums[:, :, :1]),
                             xp.cumsum(sums, axis=2)[:, :, :-1]], axis=2).astype(a.dtype)
    out = out + matmul(ac, before)                                     # (B, H, n, L, F)
    return out.reshape(B, H, n * L, F)[:, :, :T]


def anticausal_linear(a, b, c, chunk: int = CHUNK):
    """out_i = sum_{j>=i} (a_i . b_j) c_j: ``causal_linear`` on time reversed."""
    flip = lambda x: x[:, :, ::-1]                                    # noqa: E731
    return flip(causal_linear(flip(a), flip(b), flip(c), chunk))


# --- the attention pair ------------------------------------------------------------------------------
class LinearCache(NamedTuple):
    q: np.ndarray          # (B, H, T, D) before phi (phi and phi' are recomputed)
    k: np.ndarray          # (B, H, T, D)
    v: np.ndarray          # (B, H, T, D)
    num: np.ndarray        # (B, H, T, D + 1) numerators and, last column, denominators


def _with_ones(v):
    """V1 = [v, 1]: (B, H, T, D) -> (B, H, T, D + 1)."""
    xp = xp_of(v)
    return xp.concatenate([v, xp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def linear_attention_forward(q, k, v, chunk: int = CHUNK):
    """The parallel form: q, k, v (B, H, T, D) -> (y (B, H, T, D), cache)."""
    num = causal_linear(feature_map(q), feature_map(k), _with_ones(v), chunk)   # (B, H, T, D + 1)
    return num[..., :-1] / num[..., -1:], LinearCache(q, k, v, num)


def linear_attention_backward(dy, cache: LinearCache, chunk: int = CHUNK):
    """-> (dq, dk, dv). With N = causal(Q, K, V1), y = N[:D] / N[D]:
    dN = [dy / den, -(dy . y) / den]; dQ_i = sum_{j<=i} (dN_i . V1_j) K_j;
    dK_j = sum_{i>=j} (V1_j . dN_i) Q_i; dV1_j = sum_{i>=j} (K_j . Q_i) dN_i."""
    xp = xp_of(dy)
    q, k, v, num = cache
    den = num[..., -1:]                                                # (B, H, T, 1)
    y = num[..., :-1] / den
    dnum = xp.concatenate([dy / den, -(dy * y).sum(axis=-1, keepdims=True) / den], axis=-1)
    Q, K, V1 = feature_map(q), feature_map(k), _with_ones(v)
    dQ = causal_linear(dnum, V1, K, chunk)                             # (B, H, T, D)
    dK = anticausal_linear(V1, dnum, Q, chunk)
    dV1 = anticausal_linear(K, Q, dnum, chunk)                         # (B, H, T, D + 1)
    return feature_map_backward(dQ, q), feature_map_backward(dK, k), dV1[..., :-1]


def linear_attention_recurrent(q, k, v):
    """The recurrent form, one position at a time (a loop: the RNN of the paper's eq. 18-20);
    for checks and the chapter. -> y (B, H, T, D)."""
    xp = xp_of(q)
    Q, K, V1 = feature_map(q), feature_map(k), _with_ones(v)
    S = xp.zeros(q.shape[:2] + (q.shape[3], q.shape[3] + 1), q.dtype)  # (B, H, D, D + 1): [S, z]
    ys = []
    for t in range(q.shape[2]):
        S = S + K[:, :, t, :, None] * V1[:, :, t, None, :]              # += phi(k_t) [v_t, 1]^T
        n = matmul(Q[:, :, t, None], S)[:, :, 0]                       # (B, H, D + 1)
        ys.append(n[..., :-1] / n[..., -1:])
    return xp.stack(ys, axis=2)


# --- decoding: the recurrent state ------------------------------------------------------------------
def recurrent_step(qkv, S, k_last, v_last, filled, pos, n_head: int, n_valid=None):
    """T new tokens per row at positions pos[b] ..: -> y (B, T, C); updates the state in place.

    State (batch row first): S (B, H, D, D + 1) = sum phi(k_j) [v_j, 1]^T over the committed
    positions, and the last real token's phi(k) (B, H, D) and [v, 1] (B, H, D + 1), committed
    only when the next position arrives, so a step that redoes the last token (an inactive
    row's dummy token, when the caller gives no n_valid) replaces it instead of adding it
    twice; ``filled`` (B,) host ints: positions seen. pos = 0 starts the row afresh.
    n_valid (B,): only row b's first n_valid[b] tokens are real; the padding after them never
    enters S, and a row with n_valid 0 keeps its state as it was.
    """
    xp = xp_of(qkv)
    q, k, v = split_qkv(qkv, n_head)                                   # (B, H, T, D)
    B, T = qkv.shape[:2]
    pos = np.asarray(pos)
    n_valid = valid_counts(n_valid, B, T)
    bad = (pos != 0) & ((pos > filled) | (pos < filled - 1))
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(f"pos={int(pos[b])} for row {b}, whose recurrent state has seen "
                         f"{int(filled[b])} positions: linear attention can continue a row, redo its "
                         f"last token or restart at 0, not go further back (right-padded prompts "
                         f"must pass n_valid=lengths, as kv_cache.prefill does)")
    col = lambda a: xp.asarray(a.astype(S.dtype))[:, None, None, None]   # noqa: E731  (B,) -> (B, 1, 1, 1)
    commit = (pos == filled) & (pos > 0)                               # the pending token is history
    before = col(pos > 0) * (S + col(commit) * (k_last[..., :, None] * v_last[..., None, :]))
    Q, K, V1 = feature_map(q), feature_map(k), _with_ones(v)
    num = causal_linear(Q, K, V1) + matmul(Q, before)                  # (B, H, T, D + 1)
    # the new state: the real tokens but the last one added, the last one pending
    add = xp.asarray((np.arange(T)[None, :] < n_valid[:, None] - 1).astype(S.dtype))   # (B, T)
    Kw = K * add[:, None, :, None]
    real = n_valid > 0
    S[...] = xp.where(col(real), before + matmul(Kw.transpose(0, 1, 3, 2), V1), S)
    last = xp.asarray(np.maximum(n_valid - 1, 0))
    rows = xp.arange(B)
    k_last[...] = xp.where(col(real)[..., 0], K[rows, :, last], k_last)
    v_last[...] = xp.where(col(real)[..., 0], V1[rows, :, last], v_last)
    filled[:] = np.where(real, pos + n_valid, filled)
    return merge_heads(num[..., :-1] / num[..., -1:])                  # (B, T, C)


class LinearAttention(seams.AttentionKind):
    """elu + 1 linear attention: chunked parallel form for training, recurrent state for decoding
    (H D (D + 1) + H (2 D + 1) floats per layer and row, independent of the position)."""

    name = "linear"
    takes_n_valid = True

    def check_config(self, config):
        check_pattern_config(config, self.name, ())

    def forward(self, qkv, n_head, config):
        y, cache = linear_attention_forward(*split_qkv(qkv, n_head))
        return merge_heads(y), (cache, n_head)                         # (B, T, C)

    def backward(self, dy, cache):
        cache, n_head = cache
        return merge_qkv(*linear_attention_backward(split_heads(dy, n_head), cache))

    def init_state(self, config, batch_size, max_len, n_head, xp=np):
        B, H, D, dt = batch_size, n_head, config.head_size, config.np_dtype
        return (xp.zeros((B, H, D, D + 1), dtype=dt), xp.zeros((B, H, D), dtype=dt),
                xp.zeros((B, H, D + 1), dtype=dt), np.zeros(B, dtype=np.int64))

    def step(self, qkv, state, pos, n_head, config, n_valid=None):
        return recurrent_step(qkv, *state, pos, n_head, n_valid)


seams.register_attention(LinearAttention())


# --- the tour row ----------------------------------------------------------------------------------
@technique("linear_attention", order=6)
def linear_attention_row(ctx: TourContext) -> Row:
    """The baseline's weights with linear attention (not retrained: the kernel differs from the
    softmax it was trained with, so this shows the cost of swapping without training)."""
    return variant_row(ctx, dict(attention="linear"))
