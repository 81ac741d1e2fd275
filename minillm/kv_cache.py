"""KV cache: decode one token per step instead of re-running the whole prefix.

What it changes against the baseline: ``GPT.forward`` recomputes keys and
values of every earlier position at each generated token, so producing N
tokens costs O(N^2) token-passes. Keys and values of a position never change
once computed (attention is causal), so we keep them: a *prefill* runs the
prompt once and stores its K/V; each *decode step* runs only the new token,
appends its K/V and attends over the stored ones (Pope et al. 2022,
"Efficiently Scaling Transformer Inference", sec. 2; the "past_key_values" of
GPT-2 implementations).

The cache, per layer, holds K and V of shape (B, H, S_max, D) in the model's
dtype, preallocated once, so its size is exactly

    bytes = 2 * L * B * H * S_max * D * itemsize

Batches of prompts of different lengths are *right-padded*: row b's token t
sits at cache slot t = its position, and ``lengths[b]`` counts its filled
slots. In the prefill, causal masking already hides the padding after a
prompt from that prompt's tokens; in a decode step, row b writes its new K/V
at slot ``lengths[b]`` and a key mask ``s <= lengths[b]`` hides the rest. Each
row therefore computes exactly what it would alone (up to float rounding).

Sampling draws from one generator per row (see ``sampling.row_rngs``), so a
row's tokens do not depend on the other rows in its batch either.
Axis legend as in ``model.py``.
"""
from __future__ import annotations

import math

import numpy as np

from . import attention as attn
from . import layers
from . import sampling
from .backend import kernel, to_numpy, xp_of
from .model import block_forward


class KVCache:
    """Preallocated keys and values of every layer and a fill length per row.

    k, v     (L, B, H, S_max, D)  the model's dtype, on the model's device
    lengths  (B,) int64           slots filled so far in each row (= next position)
    """

    def __init__(self, config, batch_size: int, max_len: int | None = None, xp=np):
        max_len = config.block_size if max_len is None else max_len
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        if not isinstance(max_len, (int, np.integer)) or not 1 <= max_len <= config.block_size:
            raise ValueError(f"max_len={max_len!r} must be an int in [1, block_size={config.block_size}]")
        L, H, D = config.n_layer, config.n_head, config.head_size
        shape = (L, int(batch_size), H, int(max_len), D)
        self.k = xp.zeros(shape, dtype=config.np_dtype)                   # (L, B, H, S_max, D)
        self.v = xp.zeros(shape, dtype=config.np_dtype)                   # (L, B, H, S_max, D)
        self.lengths = np.zeros(int(batch_size), dtype=np.int64)          # (B,)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> "KVCache":
        """A cache in ``model``'s dtype and on its device."""
        return cls(model.config, batch_size, max_len, xp=model.xp)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held: 2 * L * B * H * S_max * D * itemsize."""
        return int(self.k.nbytes + self.v.nbytes)

    def reset(self) -> None:
        """Forget every row (the memory stays allocated)."""
        self.lengths[:] = 0


# --- the attention of new tokens over the cache ---------------------------------
def key_mask(pos, T: int, S: int, xp=np):
    """(B, T, S) bool: query t of row b (at position pos[b] + t) sees keys s <= pos[b] + t."""
    qpos = xp.asarray(pos)[:, None] + xp.arange(T)[None, :]           # (B, T)
    return xp.arange(S)[None, None, :] <= qpos[:, :, None]              # (B, T, S)


def attend(q, k, v, pos):
    """Masked attention of T new queries per row over S cached keys -> (B, H, T, D).

    q (B, H, T, D) at positions pos[b] .. pos[b] + T - 1; k, v (B, H, S, D) the
    cache's first S slots. The math of ``attention.sdpa_forward`` with a
    per-row causal mask in place of the one shared mask.
    """
    xp = xp_of(q)
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(D))      # (B, H, T, S)
    mask = key_mask(pos, T, S, xp)[:, None]                            # (B, 1, T, S)
    scores = xp.where(mask, scores, -xp.inf).astype(q.dtype)
    att, _ = layers.softmax_forward(scores)                            # (B, H, T, S)
    return att @ v                                                     # (B, H, T, D)


@kernel("kv_cache.append_attend")
def append_attend(qkv, k_cache, v_cache, pos, n_head: int):
    """Store T new tokens' K/V in one layer's cache and attend over it -> y (B, T, C).

    qkv (B, T, 3C) from c_attn for positions pos[b] .. pos[b] + T - 1 (pos (B,)
    int); k_cache, v_cache (B, H, S_max, D), written in place at those slots.
    """
    xp = xp_of(qkv)
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = (attn.split_heads(qkv[..., j * C:(j + 1) * C], n_head) for j in range(3))  # 3 x (B, H, T, D)
    rows = xp.arange(B)[:, None]                                       # (B, 1)
    slots = xp.asarray(pos)[:, None] + xp.arange(T)[None, :]           # (B, T)
    k_cache[rows, :, slots] = k.transpose(0, 2, 1, 3)                  # (B, T, H, D) into the slots
    v_cache[rows, :, slots] = v.transpose(0, 2, 1, 3)
    S = int(pos.max()) + T                                             # keys any row can see
    y = attend(q, k_cache[:, :, :S], v_cache[:, :, :S], pos)           # (B, H, T, D)
    return attn.merge_heads(y)                                         # (B, T, C)


# --- one block, reading and extending the cache -----------------------------------
def block_step(x, p: dict, i: int, config, cache: KVCache, pos):
    """Block ``i`` over T new tokens per row at positions pos[b] + t: x (B, T, C) -> (B, T, C).

    ``model.block_forward`` itself, with its attention step swapped for one that
    reads and extends layer i of the cache instead of seeing only this call's tokens.
    """
    def attend_cached(qkv, n_head):
        return append_attend(qkv, cache.k[i], cache.v[i], pos, n_head), None   # (B, T, C)

    x, _ = block_forward(x, p, i, config, attention=attend_cached)
    return x


@kernel("kv_cache.head")
def head(x, ln_w, ln_b, wte, eps: float):
    """ln_f then the tied LM head for one position per row: x (B, C) -> logits (B, V)."""
    x, _ = layers.layernorm_forward(x, ln_w, ln_b, eps)                # (B, C)
    return x @ wte.T                                                   # (B, V) tied head


def _run(model, cache: KVCache, idx, pos):
    """Embed idx (B, T) at positions pos[b] + t, run every block -> hidden (B, T, C)."""
    p, T = model.params, idx.shape[1]
    xp = model.xp
    positions = pos[:, None] + np.arange(T)[None, :]                   # (B, T)
    x = p["wte.weight"][xp.asarray(idx)] + p["wpe.weight"][xp.asarray(positions)]  # (B, T, C)
    for i in range(model.config.n_layer):
        x = block_step(x, p, i, model.config, cache, pos)
    return x


def _logits(model, x):
    p = model.params
    return head(x, p["ln_f.weight"], p["ln_f.bias"], p["wte.weight"], model.config.ln_eps)


# --- prefill and decode -----------------------------------------------------------------
def prefill(model, cache: KVCache, idx, lengths=None):
    """Run right-padded prompts idx (B, T) once, filling the cache -> logits (B, V).

    Row b's prompt is idx[b, :lengths[b]] (default: all T); the logits are those
    at its last prompt token, i.e. the distribution of its first new token.
    """
    idx = to_numpy(model.check_idx(idx, "idx")).astype(np.int64)
    B, T = idx.shape
    lengths = check_lengths(lengths, B, T)
    if cache.batch_size != B or cache.max_len < T:
        raise ValueError(f"cache holds B={cache.batch_size}, S_max={cache.max_len}; "
                         f"prompts need B={B}, T={T}")
    cache.lengths[:] = 0
    x = _run(model, cache, idx, cache.lengths)                         # (B, T, C)
    cache.lengths[:] = lengths
    last = model.xp.asarray(lengths - 1)
    return _logits(model, x[model.xp.arange(B), last])                 # (B, V)


def decode_step(model, cache: KVCache, tokens):
    """Append one token per row (tokens (B,) int) and return the next logits (B, V)."""
    tokens = np.asarray(to_numpy(tokens)).reshape(-1).astype(np.int64)  # (B,)
    if tokens.shape[0] != cache.batch_size:
        raise ValueError(f"tokens has {tokens.shape[0]} rows, the cache has {cache.batch_size}")
    if int(cache.lengths.max()) >= cache.max_len:
        raise ValueError(f"the cache is full: a row holds {int(cache.lengths.max())} of "
                         f"max_len={cache.max_len} slots")
    model.check_idx(tokens[:, None], "tokens")
    x = _run(model, cache, tokens[:, None], cache.lengths)             # (B, 1, C)
    cache.lengths += 1
    return _logits(model, x[:, 0])                                     # (B, V)


def check_lengths(lengths, B: int, T: int) -> np.ndarray:
    """Prompt lengths (B,) with 1 <= lengths[b] <= T (default: all T)."""
    if lengths is None:
        return np.full(B, T, dtype=np.int64)
    lengths = np.asarray(lengths)
    if lengths.shape != (B,) or lengths.dtype.kind not in "iu":
        raise ValueError(f"lengths must be {B} ints (one per row), got {lengths!r}")
    if lengths.min() < 1 or lengths.max() > T:
        raise ValueError(f"lengths={lengths.tolist()} must lie in [1, T={T}] (no empty prompt)")
    return lengths.astype(np.int64)


# --- generation ---------------------------------------------------------------------------
def generate(model, idx, max_new_tokens=50, temperature=1.0, top_k=None, top_p=None,
             seed=0, eos_id=None, lengths=None):
    """Prefill once, then one decode step per new token -> ids (B, T + n_new).

    ``idx`` holds right-padded prompts of ``lengths`` (default: all T); row b's
    result is out[b, :lengths[b] + n_new] (prompt, then new tokens). After
    ``eos_id`` a row repeats it; generation stops when every row has emitted it.
    ``seed``: see ``sampling.row_rngs`` (one generator per row).
    """
    sampling.check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    idx = to_numpy(model.check_idx(idx, "idx")).astype(np.int64)
    B, T = idx.shape
    lengths = check_lengths(lengths, B, T)
    if int(lengths.max()) + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens={max_new_tokens} "
                         f"exceeds block_size={model.config.block_size}")
    rngs = sampling.row_rngs(seed, B)
    out = np.zeros((B, T + max_new_tokens), dtype=np.int64)            # (B, T + new)
    out[:, :T] = idx
    if max_new_tokens == 0:
        return out[:, :T]
    cache = KVCache.for_model(model, B, int(lengths.max()) + max_new_tokens)
    logits = prefill(model, cache, idx, lengths)                       # (B, V)
    done = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        nxt = sampling.sample_next(logits, temperature, top_k, top_p, rngs)  # (B,)
        if eos_id is not None:
            nxt = np.where(done, eos_id, nxt)
            done |= nxt == eos_id
        out[np.arange(B), lengths + step] = nxt
        if step == max_new_tokens - 1 or (eos_id is not None and done.all()):
            break
        logits = decode_step(model, cache, nxt)
    return out[:, :T + step + 1]


def generate_batch(model, prompts, max_new_tokens=50, temperature=1.0, top_k=None,
                   top_p=None, seed=0, eos_id=None) -> list[np.ndarray]:
    """Prompts of different lengths (a list of 1-D id arrays), decoded as one batch.

    Returns one 1-D array per prompt: the prompt, then its new tokens, ending at
    its first ``eos_id`` (inclusive) or after ``max_new_tokens``. Row b equals
    ``generate(model, prompts[b][None], ..., seed=[row_seed_b])`` where
    ``row_seed_b`` is ``seed[b]`` if ``seed`` is a list, else ``[seed, b]``.
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of 1-D id arrays, got {type(prompts).__name__}")
    rows = [np.asarray(p).reshape(-1) for p in prompts]
    lengths = np.array([r.shape[0] for r in rows], dtype=np.int64)
    if lengths.min() < 1:
        raise ValueError(f"prompt {int(lengths.argmin())} is empty; every prompt needs >= 1 token")
    idx = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)   # (B, T) right-padded
    for b, r in enumerate(rows):
        idx[b, :r.shape[0]] = r
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, seed, eos_id, lengths)
    n_new = out.shape[1] - idx.shape[1]
    return [trim_eos(out[b, :lengths[b] + n_new], int(lengths[b]), eos_id) for b in range(len(rows))]


def trim_eos(ids: np.ndarray, prompt_len: int, eos_id) -> np.ndarray:
    """ids (N,) cut after the first ``eos_id`` among the new tokens (kept)."""
    if eos_id is None:
        return ids
    hits = np.flatnonzero(ids[prompt_len:] == eos_id)
    return ids if hits.size == 0 else ids[:prompt_len + hits[0] + 1]
