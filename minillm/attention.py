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
from .layers import matmul, softmax_backward, softmax_forward


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


def split_heads(x, n_head: int):
    """(B, T, C) -> (B, H, T, D)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, C)."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


class SelfAttentionCache(NamedTuple):
    sdpa: SDPACache
    n_head: int


def split_qkv(qkv, n_head: int):
    """qkv (B, T, 3C) from c_attn -> q, k, v, each (B, H, T, D)."""
    C = qkv.shape[-1] // 3
    return tuple(split_heads(qkv[..., j * C:(j + 1) * C], n_head) for j in range(3))


def merge_qkv(dq, dk, dv):
    """3 x (B, H, T, D) -> (B, T, 3C): the reverse of ``split_qkv`` (for dqkv)."""
    return xp_of(dq).concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


def self_attention_forward(qkv, n_head: int):
    """qkv (B, T, 3C) from c_attn -> y (B, T, C), before c_proj."""
    y, sdpa = sdpa_forward(*split_qkv(qkv, n_head))                   # (B, H, T, D)
    return merge_heads(y), SelfAttentionCache(sdpa, n_head)           # (B, T, C)


def self_attention_backward(dy, cache: SelfAttentionCache):
    """dy (B, T, C) -> dqkv (B, T, 3C)."""
    return merge_qkv(*sdpa_backward(split_heads(dy, cache.n_head), cache.sdpa))


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
