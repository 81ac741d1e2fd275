"""KV cache: decode one token per step instead of re-running the whole prefix.

What it changes against the baseline: ``GPT.forward`` recomputes keys and
values of every earlier position at each generated token, so producing N
tokens costs O(N^2) token-passes. Keys and values of a position never change
once computed (attention is causal), so we keep them: a *prefill* runs the
prompt once and stores its K/V; each *decode step* runs only the new token,
appends its K/V and attends over the stored ones (Pope et al. 2022,
"Efficiently Scaling Transformer Inference", sec. 2; the "past_key_values" of
GPT-2 implementations).

The cache holds one *decode state* per layer, made by the config's attention
kind (``seams.AttentionKind.init_state``). For dense attention that is K and V
of shape (B, H_i, S_max, D) in the model's dtype, preallocated once, so

    bytes = 2 * B * S_max * D * itemsize * sum_i H_i     (= 2 L B H S_max D itemsize)

(H_i: the heads of layer i, fewer after head pruning). Other kinds keep
other states (a ring buffer, a recurrent state); the code here only runs
blocks and counts lengths.

Batches of prompts of different lengths are *right-padded*: row b's token t
sits at cache slot t = its position, and ``lengths[b]`` counts its filled
slots. In the prefill, causal masking already hides the padding after a
prompt from that prompt's tokens; in a decode step, row b writes its new K/V
at slot ``lengths[b]`` and a key mask ``s <= lengths[b]`` hides the rest. Each
row therefore computes exactly what it would alone (up to float rounding).

Rows come and go (continuous batching): ``cache.rows(sl)`` is a view of some
rows that shares memory, so ``prefill(model, cache.rows(slice(r, r + 1)), ids)``
admits a new prompt into row r while the others keep their state;
``cache.free(r)`` releases it; ``decode_step(..., active=mask)`` advances only
the active rows (the others compute on a dummy token and keep their length).
The generation loop itself is ``generation.generate``. Axis legend as in
``model.py``.
"""
from __future__ import annotations

import numpy as np

from . import seams, transformer
from .backend import current, to_numpy
from .checks import check_int
from .layers import embedding_forward
from .tour import Row, TourContext, technique


class KVCache:
    """One decode state per layer (made by the attention kind) and a fill length per row.

    layers   L tuples of arrays with the batch row first (dense: K, V (B, H_i, S_max, D))
    lengths  (B,) int64 on the host: slots filled so far in each row (= next position)
    """

    def __init__(self, config, batch_size: int, max_len: int | None = None, xp=np,
                 n_heads: list[int] | None = None):
        max_len = config.block_size if max_len is None else max_len
        batch_size = check_int("batch_size", batch_size, 1)
        max_len = check_int("max_len", max_len, 1, config.block_size)
        n_heads = [config.n_head] * config.n_layer if n_heads is None else list(n_heads)
        if len(n_heads) != config.n_layer:
            raise ValueError(f"n_heads has {len(n_heads)} entries; the model has {config.n_layer} layers")
        kind = seams.attention_kind(config.attention)
        self.layers = [kind.init_state(config, batch_size, max_len, h, xp) for h in n_heads]
        self.lengths = np.zeros(batch_size, dtype=np.int64)              # (B,)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> "KVCache":
        """A cache in ``model``'s dtype, on its device, with each layer's own head count."""
        n_heads = [model.block_dims(i).n_head for i in range(model.config.n_layer)]
        return cls(model.config, batch_size, max_len, xp=model.xp, n_heads=n_heads)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's state (dense: 2 * B * S_max * D * itemsize * sum H_i)."""
        return int(sum(a.nbytes for state in self.layers for a in state))

    def reset(self) -> None:
        """Forget every row (the memory stays allocated)."""
        self.lengths[:] = 0

    def free(self, rows) -> None:
        """Forget some rows (an int, a slice or a bool mask): they can be admitted again."""
        self.lengths[rows] = 0

    def rows(self, rows: slice) -> "KVCache":
        """A view of the rows ``rows`` (a slice): same memory, so writes land in this cache."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"rows={rows!r} must be a slice with step 1 (a view, not a copy)")
        view = object.__new__(KVCache)
        view.layers = [tuple(a[rows] for a in state) for state in self.layers]
        view.lengths = self.lengths[rows]                                 # a view as well
        view.max_len = self.max_len
        if view.batch_size == 0:
            raise ValueError(f"rows={rows!r} selects no row of a cache of {self.batch_size}")
        return view


# --- running blocks over the cache ---------------------------------------------------------
def _run(model, cache: KVCache, idx, pos, n_valid=None):
    """Embed idx (B, T) at positions pos[b] + t, run every block over the cache -> (B, T, C).
    n_valid (B,): row b's real tokens among the T (passed to kinds that take it,
    ``seams.AttentionKind.takes_n_valid``: their state must not see the padding)."""
    p, cfg, xp = model.params, model.config, model.xp
    kind = seams.attention_kind(cfg.attention)
    extra = {"n_valid": n_valid} if n_valid is not None and kind.takes_n_valid else {}
    x, _ = embedding_forward(xp.asarray(idx), p["wte.weight"], p["wpe.weight"], pos)   # (B, T, C)
    for i in range(cfg.n_layer):
        state = cache.layers[i]
        # the block itself, with its attention step reading and extending layer i's state
        step = lambda qkv, n_head: (kind.step(qkv, state, pos, n_head, cfg, **extra), None)  # noqa: E731
        x, _ = transformer.block_forward(x, p, i, cfg, attention=step)
    return x


def _logits(model, x):
    logits, _ = transformer.head_forward(x, model.params, model.config)            # (B, V)
    return logits


# --- prefill and decode -----------------------------------------------------------------
def prefill(model, cache: KVCache, idx, lengths=None):
    """Run right-padded prompts idx (B, T) once, filling the cache -> logits (B, V).

    Row b's prompt is idx[b, :lengths[b]] (default: all T); the logits are those
    at its last prompt token, i.e. the distribution of its first new token.
    ``cache`` may be a view of some rows (``KVCache.rows``): the others are untouched.
    """
    idx = to_numpy(model.check_idx(idx, "idx")).astype(np.int64)
    B, T = idx.shape
    lengths = check_lengths(lengths, B, T)
    if cache.batch_size != B or cache.max_len < T:
        raise ValueError(f"cache holds B={cache.batch_size}, S_max={cache.max_len}; "
                         f"prompts need B={B}, T={T}")
    cache.lengths[:] = 0
    x = _run(model, cache, idx, cache.lengths, n_valid=lengths)        # (B, T, C)
    cache.lengths[:] = lengths
    last = model.xp.asarray(lengths - 1)
    return _logits(model, x[model.xp.arange(B), last])                 # (B, V)


def decode_step(model, cache: KVCache, tokens, active=None):
    """Append one token per row (tokens (B,) int) and return the next logits (B, V).

    ``active`` (B,) bool: rows that advance (default all). An inactive row (a
    freed slot, a finished request) computes on its token but keeps its length,
    so whatever it wrote is overwritten when the row is used again.
    """
    tokens = np.asarray(to_numpy(tokens)).reshape(-1).astype(np.int64)  # (B,)
    if tokens.shape[0] != cache.batch_size:
        raise ValueError(f"tokens has {tokens.shape[0]} rows, the cache has {cache.batch_size}")
    active = np.ones(cache.batch_size, dtype=bool) if active is None else np.asarray(active)
    if active.shape != (cache.batch_size,) or active.dtype != bool:
        raise ValueError(f"active must be {cache.batch_size} bools (one per row), got {active!r}")
    if int(cache.lengths.max()) >= cache.max_len:
        raise ValueError(f"the cache is full: a row holds {int(cache.lengths.max())} of "
                         f"max_len={cache.max_len} slots")
    model.check_idx(tokens[:, None], "tokens")
    x = _run(model, cache, tokens[:, None], cache.lengths, n_valid=active.astype(np.int64))
    cache.lengths += active
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


# --- the tour row ----------------------------------------------------------------
@technique("kv_cache", order=2)
def kv_cache_row(ctx: TourContext) -> Row:
    """KV cache: the baseline's weights and math (same perplexity), decoded with a
    prefill + one-token steps instead of re-running the prefix; decode tokens/s
    with the cache next to the baseline's without it, and the cache's bytes."""
    model = ctx.model
    cached = ctx.decode_tok_s(use_cache=True)
    plain = ctx.baseline.decode_tok_s if ctx.baseline else ctx.decode_tok_s(use_cache=False)
    length = ctx.prompt_ids().shape[1] + ctx.decode_tokens
    cache_bytes = KVCache.for_model(model, 1, min(length, model.config.block_size)).nbytes
    ppl = ctx.baseline.val_ppl if ctx.baseline else ctx.val_ppl()
    return Row("kv_cache", model.num_params(), model.nbytes(), ppl, None, cached,
               f"greedy decode of {ctx.decode_tokens} tokens: {cached:.0f} tok/s cached vs "
               f"{plain:.0f} uncached ({cached / plain:.1f}x); cache {cache_bytes / 1e6:.2f} MB "
               f"(2*L*B*H*S*D*{model.config.np_dtype.itemsize}, B=1, S={length}); "
               f"perplexity unchanged (same weights and math)",
               {"cache_bytes": cache_bytes, "cache_len": length, "uncached_tok_s": plain,
                "cached_over_uncached": cached / plain, "backend": current()})
