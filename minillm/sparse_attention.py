"""Sparse attention: each query attends to a fixed set of earlier keys (window, strided, block).

What it changes against the baseline: dense causal attention (``attention.py``)
scores every query against every earlier key, T (T + 1) / 2 scores per head,
so its time and memory grow as O(T^2). A sparse pattern keeps, for query i,
only the keys j <= i in a set P(i) whose size does not grow with T:

    window   j > i - window                       (Beltagy et al. 2020, "Longformer", the sliding
                                                   window; Jiang et al. 2023, "Mistral 7B", its rolling cache)
    strided  i - j < window  or  (i - j) mod stride == 0
                                                  (Child et al. 2019, "Sparse Transformers", the two
                                                   heads' patterns merged; window unset = stride)
    block    j // block >= i // block - 1  or  j < n_global
                                                  (causal block-local + global tokens, after BigBird,
                                                   Zaheer et al. 2020, and Longformer's global attention)

and the softmax runs over P(i) only:

    y_i = sum_{j in P(i)} softmax_j(q_i . k_j / sqrt(D)) v_j

which is dense attention with the pattern's mask (``masked_attention_forward``,
the reference the tests compare with, forward and backward).

The kernels never build the (T, T) matrix. Queries are cut into chunks of c
positions (c >= the local width; c = block for block): the queries of a chunk
score the keys of their own chunk and of the chunk before, (B, H, T/c, c, 2c)
scores = 2 B H T c entries. Allowed keys further back are extra score
columns: block's n_global first positions (the same columns for every query),
strided's i - s, i - 2s, ... (attention along each residue class mod s: T/s
columns). One softmax runs over all the columns of a query; each allowed key
sits in exactly one column (``_Local`` owns the two chunks, the others only
what lies before them), so nothing is counted twice. Cost per layer, D + 1
flops-ish per score for the scores and the weighted sum:

    window, block    O(B H T (2c + n_global) D)    time and memory linear in T
    strided          O(B H T (2c + T / stride) D)  still quadratic, divided by stride

The forward keeps y and lse_i = log sum_j exp(s_ij) per query (O(T), not the
(T, K) softmax); the backward rebuilds att = exp(s - lse) from the scores
(FlashAttention's trade: one more product instead of a stored matrix). These
two kernels (``pattern_attention_forward/backward``) have a Numba twin
(``backends/numba_attention_variants.py``) that takes four queries at a time
against the band of keys they share, fused: about the pattern's work (a window's
four queries score w + 3 keys each), no 2c-wide chunks, no mask arrays.

Decoding (``AttentionKind.step``): window keeps a *ring buffer* of ``window``
slots per layer (slot = position mod window, Mistral's rolling cache), so its
cache bytes are 2 B H window D itemsize at any position. strided and block
keep the dense cache (all K and V, ``seams.DenseAttention``'s layout) and mask
it with their pattern: a strided query needs keys arbitrarily far back; block
reads only the slots its pattern allows (O(block) per decoded token). Batches of
right-padded prompts: the step gets n_valid = each row's real tokens
(``seams.AttentionKind.takes_n_valid``), so padding never enters the ring.
Axis legend as in ``model.py``; K: score columns of a query.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import seams
from .attention import key_mask, merge_heads, merge_qkv, split_heads, split_qkv
from .backend import kernel, xp_of
from .checks import check_int
from .layers import matmul, softmax_backward, softmax_forward
from .tour import Row, TourContext, technique

PATTERN_FIELDS = ("window", "stride", "block", "n_global")
MIN_CHUNK = 16          # smallest query chunk: tiny windows would make tiny matmuls


# --- the patterns ---------------------------------------------------------------------------
class Pattern(NamedTuple):
    """Which keys a query sees: ``allows(i, j)`` on broadcastable int arrays of positions."""
    name: str                      # "window" | "strided" | "block" | "dense"
    window: int | None = None      # window: its width; strided: the local width (None: stride)
    stride: int | None = None
    block: int | None = None
    n_global: int = 0

    @property
    def local(self) -> int | None:
        """Width of the local part (keys i - local < j <= i are always seen); None: dense."""
        if self.name == "strided":
            return self.window if self.window is not None else self.stride
        return {"window": self.window, "block": self.block}.get(self.name)

    def allows(self, i, j):
        """bool array: query position i may attend to key position j (causal included)."""
        i, j = np.asarray(i), np.asarray(j)
        causal = (j <= i) & (j >= 0)
        if self.name == "window":
            return causal & (j > i - self.window)
        if self.name == "strided":
            return causal & ((i - j < self.local) | ((i - j) % self.stride == 0))
        if self.name == "block":
            return causal & ((j // self.block >= i // self.block - 1) | (j < self.n_global))
        return causal

    def mask(self, T: int, S: int | None = None) -> np.ndarray:
        """(T, S) bool: the pattern for the last T of S positions as queries (S = T: training)."""
        S = T if S is None else S
        return self.allows(np.arange(S - T, S)[:, None], np.arange(S)[None, :])

    def chunk(self, T: int) -> int:
        """Query chunk size c: block for block; else >= the local width (and <= T)."""
        if self.name == "block":
            return min(self.block, T)
        return max(1, min(max(self.local, MIN_CHUNK), T))


def pattern_of(config) -> Pattern:
    """The config's pattern (attention kind and its settings)."""
    return Pattern(config.attention, config.window, config.stride, config.block, config.n_global or 0)


# --- the masked dense reference: O(T^2), for checks ---------------------------------------------
class MaskedCache(NamedTuple):
    q: np.ndarray          # (B, H, T, D)
    k: np.ndarray          # (B, H, T, D)
    v: np.ndarray          # (B, H, T, D)
    att: np.ndarray        # (B, H, T, T) the softmax; masked entries are exactly 0


def masked_attention_forward(q, k, v, mask):
    """Dense attention restricted by ``mask`` (T, T) bool -> (y (B, H, T, D), cache)."""
    xp = xp_of(q)
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[3]))
    scores = matmul(q, k.transpose(0, 1, 3, 2)) * scale                   # (B, H, T, T)
    scores = xp.where(xp.asarray(mask), scores, -xp.inf).astype(q.dtype)
    att, _ = softmax_forward(scores)                                      # (B, H, T, T)
    return matmul(att, v), MaskedCache(q, k, v, att)                      # (B, H, T, D)


def masked_attention_backward(dy, cache: MaskedCache):
    """-> (dq, dk, dv); the dense backward, where masked entries have att = 0."""
    q, k, v, att = cache
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[3]))
    datt = matmul(dy, v.transpose(0, 1, 3, 2))                            # (B, H, T, T)
    dv = matmul(att.transpose(0, 1, 3, 2), dy)                            # (B, H, T, D)
    ds = softmax_backward(datt, att) * scale                              # (B, H, T, T)
    return matmul(ds, k), matmul(ds.transpose(0, 1, 3, 2), q), dv


# --- column groups: which key each score column of a query holds ------------------------------
# Each group maps per-query weights w (B, H, T, K) and per-position arrays x (B, H, T, X):
#   scores(a, b)  out[i, col] = a[i] . b[key(i, col)]                    (B, H, T, K)
#   gather(w, x)  out[i]      = sum_col w[i, col] x[key(i, col)]          (B, H, T, X)
#   scatter(w, x) out[j]      = sum_{i, col: key(i, col) = j} w[i, col] x[i]  (B, H, T, X)
# so y = gather(att, v), datt = scores(dy, v), dv = scatter(att, dy), dq = gather(ds, k),
# dk = scatter(ds, q): the dense formulas, column by column.
def _pad_rows(x, n: int):
    """(B, H, T, X) -> (B, H, n, X) with zero rows after T."""
    xp = xp_of(x)
    B, H, T, X = x.shape
    return x if n == T else xp.concatenate([x, xp.zeros((B, H, n - T, X), x.dtype)], axis=2)


class _Local:
    """Columns 0 .. 2c - 1: the keys of the query's chunk and of the chunk before."""

    def __init__(self, c: int, T: int):
        self.c, self.T, self.n = c, T, -(-T // c)
        self.width = 2 * c

    def positions(self):
        i = np.arange(self.T)
        return (i // self.c - 1)[:, None] * self.c + np.arange(2 * self.c)[None, :]   # (T, 2c)

    def _chunks(self, x):                              # (B, H, T, X) -> (B, H, n, c, X)
        B, H, _, X = x.shape
        return _pad_rows(x, self.n * self.c).reshape(B, H, self.n, self.c, X)

    def _pairs(self, x):                               # -> (B, H, n, 2c, X): previous chunk, own chunk
        xp, xc = xp_of(x), self._chunks(x)
        prev = xp.concatenate([xp.zeros_like(xc[:, :, :1]), xc[:, :, :-1]], axis=2)
        return xp.concatenate([prev, xc], axis=3)

    def _rows(self, xc):                               # (B, H, n, c, X) -> (B, H, T, X)
        B, H, n, c, X = xc.shape
        return xc.reshape(B, H, n * c, X)[:, :, :self.T]

    def scores(self, a, b):
        return self._rows(matmul(self._chunks(a), self._pairs(b).transpose(0, 1, 2, 4, 3)))

    def gather(self, w, x):
        return self._rows(matmul(self._chunks(w), self._pairs(x)))

    def scatter(self, w, x):
        dxx = matmul(self._chunks(w).transpose(0, 1, 2, 4, 3), self._chunks(x))   # (B, H, n, 2c, X)
        c = self.c
        d = dxx[:, :, :, c:].copy()                                  # each chunk as its own
        d[:, :, :-1] += dxx[:, :, 1:, :c]                            # ... and as the next one's previous
        return self._rows(d)


class _Global:
    """Columns for the first g positions (block's global tokens), the same for every query."""

    def __init__(self, g: int, T: int):
        self.g, self.T, self.width = g, T, g

    def positions(self):
        return np.broadcast_to(np.arange(self.g)[None, :], (self.T, self.g))           # (T, g)

    def scores(self, a, b):
        return matmul(a, b[:, :, :self.g].transpose(0, 1, 3, 2))

    def gather(self, w, x):
        return matmul(w, x[:, :, :self.g])

    def scatter(self, w, x):
        xp = xp_of(x)
        head = matmul(w.transpose(0, 1, 3, 2), x)                                        # (B, H, g, X)
        B, H, T, X = x.shape
        return xp.concatenate([head, xp.zeros((B, H, T - self.g, X), x.dtype)], axis=2)


class _Residue:
    """Columns r = 0 .. R - 1 for keys r s + (i mod s): causal attention along each residue class."""

    def __init__(self, s: int, T: int):
        self.s, self.T, self.R = s, T, -(-T // s)
        self.width = self.R

    def positions(self):
        i = np.arange(self.T)
        return np.arange(self.R)[None, :] * self.s + (i % self.s)[:, None]              # (T, R)

    def _by_class(self, x):                            # (B, H, T, X) -> (B, H, s, R, X)
        B, H, _, X = x.shape
        return _pad_rows(x, self.R * self.s).reshape(B, H, self.R, self.s, X).transpose(0, 1, 3, 2, 4)

    def _rows(self, x):                                # (B, H, s, R, X) -> (B, H, T, X)
        B, H, s, R, X = x.shape
        return x.transpose(0, 1, 3, 2, 4).reshape(B, H, R * s, X)[:, :, :self.T]

    def scores(self, a, b):
        return self._rows(matmul(self._by_class(a), self._by_class(b).transpose(0, 1, 2, 4, 3)))

    def gather(self, w, x):
        return self._rows(matmul(self._by_class(w), self._by_class(x)))

    def scatter(self, w, x):
        return self._rows(matmul(self._by_class(w).transpose(0, 1, 2, 4, 3), self._by_class(x)))


def column_groups(pattern: Pattern, T: int) -> tuple[list, np.ndarray]:
    """The column groups of ``pattern`` for T positions and their mask (T, K) bool."""
    c = pattern.chunk(T)
    groups = [_Local(c, T)]
    if pattern.name == "block" and pattern.n_global > 0:
        groups.append(_Global(min(pattern.n_global, T), T))
    if pattern.name == "strided" and T > c:
        groups.append(_Residue(pattern.stride, T))
    i = np.arange(T)[:, None]
    before_local = (i // c - 1) * c                                   # (T, 1) first key _Local holds
    masks = []
    for g in groups:
        j = g.positions()
        owned = True if isinstance(g, _Local) else j < before_local   # no key in two columns
        masks.append(pattern.allows(i, j) & owned)
    keep = [m.any() for m in masks]                                   # drop groups with nothing to see
    groups = [g for g, k in zip(groups, keep) if k]
    return groups, np.concatenate([m for m, k in zip(masks, keep) if k], axis=1)


# --- the chunked kernel: O(T c) ---------------------------------------------------------------------
class SparseCache(NamedTuple):
    q: np.ndarray          # (B, H, T, D) kept; the scores are recomputed in the backward
    k: np.ndarray
    v: np.ndarray
    y: np.ndarray          # (B, H, T, D) the output
    lse: np.ndarray        # (B, H, T) log sum_j exp(score_j) per query: the softmax in O(T)
    pattern: Pattern


def _split(x, groups):
    """(B, H, T, K) -> one (B, H, T, K_g) view per column group."""
    out, start = [], 0
    for g in groups:
        out.append(x[..., start:start + g.width])
        start += g.width
    return out


def _masked_scores(q, k, pattern: Pattern):
    """-> (groups, scores (B, H, T, K)): q . k / sqrt(D) for every column, -inf where masked."""
    xp = xp_of(q)
    groups, mask = column_groups(pattern, q.shape[2])                 # mask (T, K)
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[3]))
    scores = xp.concatenate([g.scores(q, k) for g in groups], axis=-1) * scale   # (B, H, T, K)
    return groups, xp.where(xp.asarray(mask), scores, -xp.inf).astype(q.dtype)


def score_columns(pattern: Pattern, T: int) -> int:
    """K: the score columns per query the chunked kernel computes for T positions."""
    return int(column_groups(pattern, T)[1].shape[1])


@kernel("sparse_attention.pattern_attention_forward")
def pattern_attention_forward(q, k, v, pattern: Pattern):
    """Causal attention with ``pattern``, chunked: q, k, v (B, H, T, D) -> (y (B, H, T, D),
    lse (B, H, T)). lse = m + log sum_j exp(s_j - m) (m = max_j s_j, so exp never overflows)
    is all the backward needs to rebuild the softmax: att_j = exp(s_j - lse)."""
    xp = xp_of(q)
    groups, scores = _masked_scores(q, k, pattern)                    # (B, H, T, K)
    m = scores.max(axis=-1, keepdims=True)                            # finite: i sees itself
    e = xp.exp(scores - m)                                            # masked: exp(-inf) = 0
    total = e.sum(axis=-1, keepdims=True)
    att = e / total                                                   # (B, H, T, K) softmax
    y = sum(g.gather(a, v) for g, a in zip(groups, _split(att, groups)))         # (B, H, T, D)
    return y, (m + xp.log(total))[..., 0]


@kernel("sparse_attention.pattern_attention_backward")
def pattern_attention_backward(dy, q, k, v, y, lse, pattern: Pattern):
    """-> (dq, dk, dv): the dense backward (``masked_attention_backward``) column group by
    group, on the softmax rebuilt from the scores and lse."""
    xp = xp_of(dy)
    groups, scores = _masked_scores(q, k, pattern)
    att = xp.exp(scores - lse[..., None]).astype(q.dtype)             # (B, H, T, K); masked = 0
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[3]))
    atts = _split(att, groups)
    datt = xp.concatenate([g.scores(dy, v) for g in groups], axis=-1)            # (B, H, T, K)
    dv = sum(g.scatter(a, dy) for g, a in zip(groups, atts))                     # (B, H, T, D)
    ds = _split(softmax_backward(datt, att) * scale, groups)                      # masked: att = 0
    dq = sum(g.gather(d, k) for g, d in zip(groups, ds))
    dk = sum(g.scatter(d, q) for g, d in zip(groups, ds))
    return dq, dk, dv


def sparse_attention_forward(q, k, v, pattern: Pattern):
    """Causal attention with ``pattern``: q, k, v (B, H, T, D) -> (y (B, H, T, D), cache).
    Runs the backend's twin of ``pattern_attention_forward`` if it has one (Numba: fused loops
    over four queries' shared band of allowed keys, ``backends/numba_attention_variants.py``)."""
    y, lse = pattern_attention_forward(q, k, v, pattern)
    return y, SparseCache(q, k, v, y, lse, pattern)


def sparse_attention_backward(dy, cache: SparseCache):
    """-> (dq, dk, dv) of ``sparse_attention_forward``."""
    return pattern_attention_backward(dy, *cache)


# --- decoding --------------------------------------------------------------------------------------
def attend(q, k, v, mask):
    """Softmax attention of q (B, H, T, D) over k, v (B, H, S, D) where ``mask`` (B, T, S) -> (B, H, T, D)."""
    xp = xp_of(q)
    scores = matmul(q, k.transpose(0, 1, 3, 2)) * q.dtype.type(1.0 / math.sqrt(q.shape[3]))
    scores = xp.where(xp.asarray(mask)[:, None], scores, -xp.inf).astype(q.dtype)   # (B, H, T, S)
    att, _ = softmax_forward(scores)
    return matmul(att, v)


def append_attend_pattern(qkv, k_cache, v_cache, pos, n_head: int, pattern: Pattern):
    """The dense cache's step (``attention.append_attend``) with the pattern's mask -> y (B, T, C).

    block: only the slots a query can see are read, the first n_global and those from the
    earliest query's block-before on, so a decode step costs O(block + n_global), not
    O(position); strided reads every slot (its keys reach back to the start)."""
    xp = xp_of(qkv)
    q, k, v = split_qkv(qkv, n_head)
    B, T = qkv.shape[:2]
    pos = np.asarray(pos)
    rows, slots = xp.arange(B)[:, None], xp.asarray(pos[:, None] + np.arange(T)[None, :])   # (B, T)
    k_cache[rows, :, slots] = k.transpose(0, 2, 1, 3)                  # (B, T, H, D) into the slots
    v_cache[rows, :, slots] = v.transpose(0, 2, 1, 3)
    S = int(pos.max()) + T
    qpos = pos[:, None] + np.arange(T)[None, :]                        # (B, T)
    kpos = np.arange(S)                                                # the slots read
    if pattern.name == "block":
        lo = max(0, (int(pos.min()) // pattern.block - 1) * pattern.block)
        kpos = np.concatenate([np.arange(min(pattern.n_global, lo)), np.arange(lo, S)])
    mask = key_mask(pos, T, S)[:, :, kpos] & pattern.allows(qpos[:, :, None], kpos[None, None, :])
    if kpos.shape[0] == S:
        return merge_heads(attend(q, k_cache[:, :, :S], v_cache[:, :, :S], mask))
    ki = xp.asarray(kpos)
    return merge_heads(attend(q, k_cache[:, :, ki], v_cache[:, :, ki], mask))


def ring_positions(pos, W: int) -> np.ndarray:
    """(B, W): the position slot s holds just before writing at pos[b] (slot = position mod W);
    negative: never written since the row started."""
    p = np.asarray(pos)[:, None]
    return p - 1 - (p - 1 - np.arange(W)[None, :]) % W


def check_ring_pos(pos, filled, W: int) -> None:
    """A ring step may start a row (pos 0), continue it, or redo its last token (an inactive
    row's dummy step, when the caller gives no n_valid); going further back needs positions
    the ring has overwritten."""
    pos = np.asarray(pos)
    bad = (pos != 0) & ((pos > filled) | ((pos < filled - 1) & (filled > W)))
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(
            f"pos={int(pos[b])} for row {b}, whose ring buffer of {W} slots holds positions up to "
            f"{int(filled[b]) - 1}: a window-attention cache cannot go back further than one token "
            f"(right-padded prompts must pass n_valid=lengths, as kv_cache.prefill does)")


def valid_counts(n_valid, B: int, T: int) -> np.ndarray:
    """n_valid (B,) ints in [0, T] (None: all T tokens of every row are real)."""
    if n_valid is None:
        return np.full(B, T, dtype=np.int64)
    n_valid = np.asarray(n_valid)
    if n_valid.shape != (B,) or n_valid.dtype.kind not in "iu" or n_valid.min() < 0 \
            or n_valid.max() > T:
        raise ValueError(f"n_valid must be {B} ints in [0, T={T}], got {n_valid!r}")
    return n_valid.astype(np.int64)


def ring_step(qkv, k_ring, v_ring, filled, pos, n_head: int, window: int, n_valid=None):
    """T new tokens per row at positions pos[b] ..: attend over the ring (the last W positions)
    and the new tokens, then write row b's last min(n_valid[b], W) real tokens into their slots
    (padding after them never enters the ring) -> y (B, T, C)."""
    xp = xp_of(qkv)
    q, k, v = split_qkv(qkv, n_head)                                     # (B, H, T, D)
    B, T, W = qkv.shape[0], qkv.shape[1], k_ring.shape[2]
    pos = np.asarray(pos)
    n_valid = valid_counts(n_valid, B, T)
    check_ring_pos(pos, filled, W)
    qpos = pos[:, None] + np.arange(T)[None, :]                        # (B, T)
    kpos = np.concatenate([ring_positions(pos, W), qpos], axis=1)      # (B, W + T)
    pattern = Pattern("window", window)
    mask = pattern.allows(qpos[:, :, None], kpos[:, None, :])          # (B, T, W + T)
    y = attend(q, xp.concatenate([k_ring, k], axis=2), xp.concatenate([v_ring, v], axis=2), mask)
    for b in range(B):                                                 # older new tokens fall out
        n, end = min(int(n_valid[b]), W), int(n_valid[b])
        slots = xp.asarray(qpos[b, end - n:end] % W)
        k_ring[b, :, slots] = k[b, :, end - n:end].transpose(1, 0, 2)  # (n, H, D) into the slots
        v_ring[b, :, slots] = v[b, :, end - n:end].transpose(1, 0, 2)
    filled[:] = pos + n_valid
    return merge_heads(y)                                              # (B, T, C)


# --- the kinds -------------------------------------------------------------------------------------
def check_pattern_config(config, kind: str, required: tuple, optional: tuple = ()) -> None:
    """ValueError unless the config sets ``required``, maybe ``optional``, and nothing else
    of ``PATTERN_FIELDS`` (window/stride/block >= 1, n_global >= 0)."""
    for field in PATTERN_FIELDS:
        value = getattr(config, field, None)
        if field in required and value is None:
            raise ValueError(f"attention={kind!r} needs {field}=N (an int >= 1); got {field}=None")
        if value is None:
            continue
        if field not in required + optional:
            raise ValueError(f"{field}={value!r} is not used by attention={kind!r} (it uses "
                             f"{list(required + optional) or 'no pattern setting'}); leave it unset")
        check_int(field, value, 0 if field == "n_global" else 1)


class SparseAttention(seams.AttentionKind):
    """A sparse pattern: chunked forward/backward; decoding over the dense cache, masked."""

    required: tuple = ()
    optional: tuple = ()

    def check_config(self, config):
        check_pattern_config(config, self.name, self.required, self.optional)

    def forward(self, qkv, n_head, config):
        y, cache = sparse_attention_forward(*split_qkv(qkv, n_head), pattern_of(config))
        return merge_heads(y), (cache, n_head)                          # (B, T, C)

    def backward(self, dy, cache):
        cache, n_head = cache
        return merge_qkv(*sparse_attention_backward(split_heads(dy, n_head), cache))

    def init_state(self, config, batch_size, max_len, n_head, xp=np):
        shape = (batch_size, n_head, max_len, config.head_size)             # (B, H, S_max, D) as dense
        return xp.zeros(shape, dtype=config.np_dtype), xp.zeros(shape, dtype=config.np_dtype)

    def step(self, qkv, state, pos, n_head, config):
        return append_attend_pattern(qkv, *state, pos, n_head, pattern_of(config))


class WindowAttention(SparseAttention):
    """Sliding window: the last ``window`` positions. Decode state per layer: a ring buffer
    K, V (B, H, W, D) with W = min(window, max_len) slots (slot = position mod W), and the
    positions written so far per row (B,) on the host: 2 B H W D itemsize + 8 B bytes."""

    name = "window"
    required = ("window",)
    takes_n_valid = True

    def init_state(self, config, batch_size, max_len, n_head, xp=np):
        shape = (batch_size, n_head, min(config.window, max_len), config.head_size)   # (B, H, W, D)
        return (xp.zeros(shape, dtype=config.np_dtype), xp.zeros(shape, dtype=config.np_dtype),
                np.zeros(batch_size, dtype=np.int64))

    def step(self, qkv, state, pos, n_head, config, n_valid=None):
        return ring_step(qkv, *state, pos, n_head, config.window, n_valid)


class StridedAttention(SparseAttention):
    """Child et al.'s strided pattern; ``window`` (default: stride) is the local width."""

    name = "strided"
    required = ("stride",)
    optional = ("window",)


class BlockAttention(SparseAttention):
    """Causal block-local (own block and the one before) + the first ``n_global`` positions."""

    name = "block"
    required = ("block",)
    optional = ("n_global",)


for _kind in (WindowAttention(), StridedAttention(), BlockAttention()):
    seams.register_attention(_kind)


# --- the tour row ----------------------------------------------------------------------------------
@technique("sparse_attention", order=6)
def sparse_attention_rows(ctx: TourContext) -> list[Row]:
    """The baseline's weights run with each sparse pattern (no retraining: the kinds have no
    parameters of their own), so the perplexity shows what the pattern alone costs."""
    T = ctx.model.config.block_size
    settings = [dict(attention="window", window=max(1, T // 4)),
                dict(attention="strided", stride=max(1, int(math.sqrt(T)))),
                dict(attention="block", block=max(1, T // 8), n_global=4)]
    return [variant_row(ctx, s) for s in settings]


def variant_row(ctx: TourContext, settings: dict) -> Row:
    """One tour row: the baseline's weights with another attention kind (``settings``: the
    config fields), its perplexity, cached decode speed and decode-state bytes."""
    import dataclasses

    from .kv_cache import KVCache
    from .model import GPT
    base = ctx.model
    model = GPT(dataclasses.replace(base.config, **settings), params=base.params)
    name = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "attention")
    name = f"{settings['attention']}({name})" if name else settings["attention"]
    length = min(ctx.prompt_ids().shape[1] + ctx.decode_tokens, base.config.block_size)
    state, dense = (KVCache.for_model(m, 1, length).nbytes for m in (model, base))
    tok_s = ctx.decode_tok_s(model, use_cache=True)
    return Row(name, model.num_params(), model.nbytes(), ctx.val_ppl(model), None, tok_s,
               f"baseline weights, not retrained (a kind has no parameters); decode state "
               f"{state / 1e3:.1f} kB vs dense KV {dense / 1e3:.1f} kB at S={length}",
               {"settings": settings, "state_bytes": state, "dense_cache_bytes": dense,
                "cache_len": length})
