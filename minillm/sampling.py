"""Choosing the next token from logits (the loop that calls this is ``generation.py``).

- temperature 0: greedy (argmax);
- temperature t > 0: sample from softmax(logits / t);
- top-k (Fan et al. 2018): keep the k largest logits;
- top-p / nucleus (Holtzman et al. 2020): keep the smallest set of most likely
  ids whose probability mass reaches p.

All randomness comes from explicit generators: one per batch row
(``row_rngs``), so a row's tokens never depend on the other rows in its batch.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy
from .checks import check_float, check_optional_int


def check_sampling_args(temperature, top_k, top_p, max_new_tokens=None):
    """Raise ValueError naming the bad argument."""
    check_float("temperature", temperature, 0)     # 0 is greedy
    check_optional_int("top_k", top_k, 1)
    if top_p is not None:
        check_float("top_p", top_p, 0, 1, lo_open=True)
    check_optional_int("max_new_tokens", max_new_tokens, 0)


def filter_logits(logits: np.ndarray, top_k=None, top_p=None) -> np.ndarray:
    """logits (B, V) float64 -> same, with ids outside top-k / top-p set to -inf."""
    logits = logits.copy()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]   # (B, 1)
        logits[logits < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")                # (B, V) most likely first
        probs = _softmax(np.take_along_axis(logits, order, axis=-1))
        before = np.cumsum(probs, axis=-1) - probs                         # mass of strictly more likely ids
        drop_sorted = before >= top_p                                      # the set already reached p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits[drop] = -np.inf
    return logits


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def row_rngs(seed, batch_size: int) -> list:
    """One generator per row: ``default_rng([seed, b])`` for an int ``seed``;
    ``default_rng(seed[b])`` for a list of B seeds; fresh entropy for None.

    So row b of a batch seeded ``s`` equals that prompt alone seeded ``[[s, b]]``.
    """
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise ValueError(f"seed is a list of {len(seed)} seeds; the batch has {batch_size} rows")
        return [np.random.default_rng(s) for s in seed]
    if seed is None:
        return [np.random.default_rng() for _ in range(batch_size)]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0, a list of per-row seeds, or None")
    return [np.random.default_rng([int(seed), b]) for b in range(batch_size)]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, rng=None) -> np.ndarray:
    """logits (B, V) -> next ids (B,) int64.

    ``rng``: one Generator for the batch, or a list of B Generators (one draw each).
    """
    logits = to_numpy(logits).astype(np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = _softmax(logits)                                               # (B, V)
    rng = rng if rng is not None else np.random.default_rng()
    if isinstance(rng, (list, tuple)):
        u = np.array([[r.random()] for r in rng])                          # (B, 1) one draw per row
    else:
        u = rng.random((probs.shape[0], 1))                                # inverse-CDF sampling
    ids = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
    return np.minimum(ids, probs.shape[-1] - 1)
