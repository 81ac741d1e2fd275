"""Causal self-attention, dense, as a forward/backward pair (Vaswani et al. 2017, eq. 1).

    scores = q k^T / sqrt(D)            (B, H, T, S)
    att    = softmax(scores + causal mask)
    y      = att v                      (B, H, T, D)

Queries are the *last* T of the S key positions (T == S in training; T < S
when decoding with a KV cache), so query t may see keys 0 .. S - T + t.

Decoding (``append_attend``, the dense kind's step, ``seams.DenseAttention``)
writes the new tokens' K and V into one layer's cache and attends over the
filled slots, with a per-row mask since rows of a batch have their own lengths.
Axis legend as in ``model.py``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .backend import kernel, xp_of
from .layers import f32, matmul, softmax_backward, softmax_forward


def causal_mask(T: int, S: int, xp=np):
    """(T, S) bool, True where query t may attend to key s (s <= S - T + t)."""
    return xp.arange(S)[None, :] <= (S - T) + xp.arange(T)[:, None]


class SDPACache(NamedTuple):
    q: np.ndarray          # (B, H, T, D)
    k: np.ndarray          # (B, H, S, D)
    v: np.ndarray          # (B, H, S, D)
    att: np.ndarray        # (B, H, T, S) the softmax output; scores are not kept


@kernel("attention.sdpa_forward")
def sdpa_forward(q, k, v):
    """Causal scaled dot-product attention -> (y (B, H, T, D), cache)."""
    xp = xp_of(q)
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    scale = q.dtype.type(1.0 / math.sqrt(D))                          # in q's dtype: bfloat16 stays
    scores = matmul(q, k.transpose(0, 1, 3, 2)) * scale               # (B, H, T, S)
    scores = xp.where(causal_mask(T, S, xp), scores, -xp.inf).astype(q.dtype)
    att, _ = softmax_forward(scores)                                  # (B, H, T, S)
    y = matmul(att, v)                                                # (B, H, T, D)
    return y, SDPACache(q, k, v, att)


@kernel("attention.sdpa_backward")
def sdpa_backward(dy, cache: SDPACache):
    """-> (dq, dk, dv); reverse of: scores = q k^T/sqrt(D), att = softmax, y = att v."""
    q, k, v, att = cache
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[3]))
    datt = matmul(dy, v.transpose(0, 1, 3, 2))                        # (B, H, T, S)
    dv = matmul(att.transpose(0, 1, 3, 2), dy)                        # (B, H, S, D)
    dscores = softmax_backward(datt, att) * scale                     # (B, H, T, S) masked entries: att = 0
    dq = matmul(dscores, k)                                           # (B, H, T, D)
    dk = matmul(dscores.transpose(0, 1, 3, 2), q)                     # (B, H, S, D)
    return dq, dk, dv


# --- the same attention, one tile of scores at a time (FlashAttention, Dao et al. 2022) ------
FLASH_TILE = 64     # queries per block and keys per tile: a tile of scores is (64, 64) per head


class FlashCache(NamedTuple):
    q: np.ndarray          # (B, H, T, D)
    k: np.ndarray          # (B, H, S, D)
    v: np.ndarray          # (B, H, S, D)
    y: np.ndarray          # (B, H, T, D) the output (the backward needs rowsum(dy * y))
    lse: np.ndarray        # (B, H, T) log-sum-exp of each query's scaled, masked scores


def _tile_scores(q, k, t0, t1, s0, s1, scale, xp):
    """Scores of queries t0:t1 against keys s0:s1, scaled, -inf where causality hides a
    key -> (B, H, t1 - t0, s1 - s0). Queries are the last T of the S positions."""
    T, S = q.shape[2], k.shape[2]
    s = matmul(q[:, :, t0:t1], k[:, :, s0:s1].transpose(0, 1, 3, 2)) * scale
    seen = xp.arange(s0, s1)[None, :] <= (S - T) + xp.arange(t0, t1)[:, None]   # (t1-t0, s1-s0)
    return xp.where(seen, s, -xp.inf)


@kernel("attention.flash_forward")
def flash_forward(q, k, v):
    """Causal attention equal to ``sdpa_forward``'s, without the (T, S) matrix -> (y, cache).

    Online softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022,
    Algorithm 1): for a block of queries, walk the key tiles left to right
    keeping, per query, the running max ``m`` of its scores, the running sum
    ``l`` of exp(score - m) and the running output ``acc`` = sum exp(score - m) v.
    When a tile raises the max to m', what was summed so far is rescaled by
    exp(m - m'), so at the end acc / l is exactly softmax(scores) v. Only one
    (FLASH_TILE, FLASH_TILE) tile of scores per head exists at any time; the
    cache keeps the output and each query's log-sum-exp m + log l (T numbers,
    not T * S), from which the backward recomputes the probabilities.
    Half inputs compute in float32 (``f32``) and round the output back.
    """
    xp = xp_of(q)
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    qs, ks, vs = f32(q), f32(k), f32(v)
    scale = qs.dtype.type(1.0 / math.sqrt(D))
    y = xp.empty(qs.shape, dtype=qs.dtype)                            # (B, H, T, D)
    lse = xp.empty(qs.shape[:3], dtype=qs.dtype)                      # (B, H, T)
    for t0 in range(0, T, FLASH_TILE):
        t1 = min(t0 + FLASH_TILE, T)
        m = xp.full(qs.shape[:2] + (t1 - t0, 1), -xp.inf, dtype=qs.dtype)   # running max
        l = xp.zeros(m.shape, dtype=qs.dtype)                              # running sum
        acc = xp.zeros(qs.shape[:2] + (t1 - t0, D), dtype=qs.dtype)         # running output
        for s0 in range(0, S - T + t1, FLASH_TILE):                   # tiles some query here sees
            s1 = min(s0 + FLASH_TILE, S)
            s = _tile_scores(qs, ks, t0, t1, s0, s1, scale, xp)      # (B, H, bt, bs)
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))     # finite: key 0 is always seen
            p = xp.exp(s - m_new)                                     # masked keys: exp(-inf) = 0
            alpha = xp.exp(m - m_new)                                 # rescales the old sums
            l = alpha * l + p.sum(axis=-1, keepdims=True)
            acc = alpha * acc + matmul(p, vs[:, :, s0:s1])
            m = m_new
        y[:, :, t0:t1] = acc / l
        lse[:, :, t0:t1] = (m + xp.log(l))[..., 0]
    y = y.astype(q.dtype, copy=False)
    return y, FlashCache(q, k, v, y, lse)


@kernel("attention.flash_backward")
def flash_backward(dy, cache: FlashCache):
    """-> (dq, dk, dv), equal to ``sdpa_backward``'s, recomputing each tile of probabilities.

    FlashAttention-2's backward (Dao 2023, Algorithm 2): per tile,
    p = exp(score - lse) are the forward's probabilities again; then
    dv += p^T dy, dp = dy v^T, ds = p (dp - delta) with delta = rowsum(dy * y)
    (= rowsum(p * dp), the softmax backward's subtracted term, read off the
    output), dq += ds k / sqrt(D), dk += ds^T q / sqrt(D).
    """
    xp = xp_of(dy)
    q, k, v, y, lse = (f32(a) for a in cache)
    g = f32(dy)
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    scale = q.dtype.type(1.0 / math.sqrt(D))
    delta = (g * y).sum(axis=-1, keepdims=True)                       # (B, H, T, 1)
    dq, dk, dv = xp.zeros(q.shape, q.dtype), xp.zeros(k.shape, q.dtype), xp.zeros(v.shape, q.dtype)
    for t0 in range(0, T, FLASH_TILE):
        t1 = min(t0 + FLASH_TILE, T)
        for s0 in range(0, S - T + t1, FLASH_TILE):
            s1 = min(s0 + FLASH_TILE, S)
            p = xp.exp(_tile_scores(q, k, t0, t1, s0, s1, scale, xp) - lse[:, :, t0:t1, None])
            dv[:, :, s0:s1] += matmul(p.transpose(0, 1, 3, 2), g[:, :, t0:t1])
            dp = matmul(g[:, :, t0:t1], v[:, :, s0:s1].transpose(0, 1, 3, 2))
            ds = p * (dp - delta[:, :, t0:t1]) * scale                 # masked: p = 0
            dq[:, :, t0:t1] += matmul(ds, k[:, :, s0:s1])
            dk[:, :, s0:s1] += matmul(ds.transpose(0, 1, 3, 2), q[:, :, t0:t1])
    return tuple(a.astype(dy.dtype, copy=False) for a in (dq, dk, dv))


def split_heads(x, n_head: int):
    """(B, T, C) -> (B, H, T, D)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, C)."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


class SelfAttentionCache(NamedTuple):
    sdpa: FlashCache       # the attention pair's cache (flash_forward)
    n_head: int


def split_qkv(qkv, n_head: int):
    """qkv (B, T, 3C) from c_attn -> q, k, v, each (B, H, T, D)."""
    C = qkv.shape[-1] // 3
    return tuple(split_heads(qkv[..., j * C:(j + 1) * C], n_head) for j in range(3))


def merge_qkv(dq, dk, dv):
    """3 x (B, H, T, D) -> (B, T, 3C): the reverse of ``split_qkv`` (for dqkv).

    One copy of each into its place (concatenating three ``merge_heads`` copies
    would copy every gradient twice).
    """
    B, H, T, D = dq.shape
    out = xp_of(dq).empty((B, T, 3, H, D), dtype=dq.dtype)              # (B, T, 3C) once reshaped
    for j, g in enumerate((dq, dk, dv)):
        out[:, :, j] = g.transpose(0, 2, 1, 3)                           # (B, T, H, D)
    return out.reshape(B, T, 3 * H * D)


def self_attention_forward(qkv, n_head: int):
    """qkv (B, T, 3C) from c_attn -> y (B, T, C), before c_proj.

    Runs the tiled ``flash_forward`` (equal to ``sdpa_forward``, tested so): the
    training step keeps T numbers per head for the backward instead of T * T.
    """
    y, sdpa = flash_forward(*split_qkv(qkv, n_head))                  # (B, H, T, D)
    return merge_heads(y), SelfAttentionCache(sdpa, n_head)           # (B, T, C)


def self_attention_backward(dy, cache: SelfAttentionCache):
    """dy (B, T, C) -> dqkv (B, T, 3C)."""
    return merge_qkv(*flash_backward(split_heads(dy, cache.n_head), cache.sdpa))


# --- decoding: new queries over stored keys and values (the KV cache's attention) -----
def key_mask(pos, T: int, S: int, xp=np):
    """(B, T, S) bool: query t of row b (at position pos[b] + t) sees keys s <= pos[b] + t."""
    qpos = xp.asarray(pos)[:, None] + xp.arange(T)[None, :]           # (B, T)
    return xp.arange(S)[None, None, :] <= qpos[:, :, None]              # (B, T, S)


def attend(q, k, v, pos):
    """Masked attention of T new queries per row over S stored keys -> (B, H, T, D).

    q (B, H, T, D) at positions pos[b] .. pos[b] + T - 1; k, v (B, H, S, D) the
    cache's first S slots. The math of ``sdpa_forward`` with a per-row causal
    mask in place of the one shared mask (rows of a batch have their own lengths).
    """
    xp = xp_of(q)
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    scores = matmul(q, k.transpose(0, 1, 3, 2)) * q.dtype.type(1.0 / math.sqrt(D))  # (B, H, T, S)
    mask = key_mask(pos, T, S, xp)[:, None]                            # (B, 1, T, S)
    scores = xp.where(mask, scores, -xp.inf).astype(q.dtype)
    att, _ = softmax_forward(scores)                                   # (B, H, T, S)
    return matmul(att, v)                                              # (B, H, T, D)


@kernel("attention.append_attend")
def append_attend(qkv, k_cache, v_cache, pos, n_head: int):
    """Store T new tokens' K/V in one layer's cache and attend over it -> y (B, T, C).

    qkv (B, T, 3C) from c_attn for positions pos[b] .. pos[b] + T - 1 (pos (B,)
    int, on the host); k_cache, v_cache (B, H, S_max, D), written in place at those slots.
    """
    xp = xp_of(qkv)
    B, T = qkv.shape[0], qkv.shape[1]
    q, k, v = split_qkv(qkv, n_head)                                   # 3 x (B, H, T, D)
    rows = xp.arange(B)[:, None]                                       # (B, 1)
    slots = xp.asarray(pos)[:, None] + xp.arange(T)[None, :]           # (B, T)
    k_cache[rows, :, slots] = k.transpose(0, 2, 1, 3)                  # (B, T, H, D) into the slots
    v_cache[rows, :, slots] = v.transpose(0, 2, 1, 3)
    S = int(pos.max()) + T                                             # keys any row can see
    y = attend(q, k_cache[:, :, :S], v_cache[:, :, :S], pos)           # (B, H, T, D)
    return merge_heads(y)                                              # (B, T, C)
