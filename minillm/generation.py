"""The generation loop: one loop, with or without the KV cache.

    logits = decoder.start(prompts)          # (B, V): the next-token distribution of each row
    repeat max_new_tokens times:
        next = sample(logits)                # sampling.sample_next, one generator per row
        after eos_id a row repeats eos_id; stop when every row has emitted it
        logits = decoder.step(next)

Two decoders feed it. ``CachedDecoder`` prefills the KV cache once and then
runs one token per step (``kv_cache.prefill`` / ``decode_step``);
``FullDecoder`` re-runs the whole sequence every step (the quadratic
baseline the KV cache is measured against). Prompts of different lengths are
right-padded with their ``lengths``; row b's tokens never depend on the other
rows (causal masking, per-row positions, per-row generators).
"""
from __future__ import annotations

import numpy as np

from . import kv_cache, sampling, transformer
from .backend import to_numpy


class CachedDecoder:
    """Prefill once, then one token per row per step over the KV cache."""

    def __init__(self, model, batch_size: int, max_len: int):
        self.model = model
        self.cache = kv_cache.KVCache.for_model(model, batch_size, max_len)

    def start(self, idx, lengths):
        return kv_cache.prefill(self.model, self.cache, idx, lengths)                # (B, V)

    def step(self, tokens):
        return kv_cache.decode_step(self.model, self.cache, tokens)                  # (B, V)


class FullDecoder:
    """Re-run the model over every row's whole sequence for each new token (no cache)."""

    def __init__(self, model, batch_size: int, max_len: int):
        self.model = model
        self.ids = np.zeros((batch_size, max_len), dtype=np.int64)                   # (B, S_max)

    def start(self, idx, lengths):
        self.lengths = lengths.copy()                                                # (B,)
        self.ids[:, :idx.shape[1]] = idx
        return self._last_logits()

    def step(self, tokens):
        self.ids[np.arange(len(tokens)), self.lengths] = tokens
        self.lengths += 1
        return self._last_logits()

    def _last_logits(self):
        model, xp = self.model, self.model.xp
        S = int(self.lengths.max())
        logits, _ = transformer.forward(model.params, model.config,
                                        xp.asarray(self.ids[:, :S]))                 # (B, S, V)
        return logits[xp.arange(len(self.lengths)), xp.asarray(self.lengths - 1)]    # (B, V)


def generate(model, idx, max_new_tokens=50, temperature=1.0, top_k=None, top_p=None,
             seed=0, use_cache=True, eos_id=None, lengths=None):
    """Continue right-padded prompts idx (B, T) -> ids (B, T + n_new).

    ``lengths`` (B,) ints: row b's prompt is idx[b, :lengths[b]] (default: all
    T); its result is out[b, :lengths[b] + n_new] (prompt, then new tokens).
    After ``eos_id`` a row repeats it; generation stops when every row has
    emitted it. ``seed``: see ``sampling.row_rngs`` (one generator per row).
    """
    sampling.check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    idx = to_numpy(model.check_idx(idx, "idx")).astype(np.int64)
    B, T = idx.shape
    lengths = kv_cache.check_lengths(lengths, B, T)
    if int(lengths.max()) + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens={max_new_tokens} "
                         f"exceeds block_size={model.config.block_size}")
    if eos_id is not None:
        model.check_idx(np.array([[eos_id]]), "eos_id")
    rngs = sampling.row_rngs(seed, B)
    out = np.zeros((B, T + max_new_tokens), dtype=np.int64)            # (B, T + new)
    out[:, :T] = idx
    if max_new_tokens == 0:
        return out[:, :T]
    decoder = (CachedDecoder if use_cache else FullDecoder)(model, B, int(lengths.max()) + max_new_tokens)
    logits = decoder.start(idx, lengths)                               # (B, V)
    done = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        nxt = sampling.sample_next(logits, temperature, top_k, top_p, rngs)  # (B,)
        if eos_id is not None:
            nxt = np.where(done, eos_id, nxt)
            done |= nxt == eos_id
        out[np.arange(B), lengths + step] = nxt
        if step == max_new_tokens - 1 or (eos_id is not None and done.all()):
            break
        logits = decoder.step(nxt)
    return out[:, :T + step + 1]


def generate_batch(model, prompts, max_new_tokens=50, temperature=1.0, top_k=None,
                   top_p=None, seed=0, eos_id=None, use_cache=True) -> list[np.ndarray]:
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
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, seed, use_cache,
                   eos_id, lengths)
    n_new = out.shape[1] - idx.shape[1]
    return [trim_eos(out[b, :lengths[b] + n_new], int(lengths[b]), eos_id) for b in range(len(rows))]


def trim_eos(ids: np.ndarray, prompt_len: int, eos_id) -> np.ndarray:
    """ids (N,) cut after the first ``eos_id`` among the new tokens (kept)."""
    if eos_id is None:
        return ids
    hits = np.flatnonzero(ids[prompt_len:] == eos_id)
    return ids if hits.size == 0 else ids[:prompt_len + hits[0] + 1]
