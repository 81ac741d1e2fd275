"""GPT-2 as functions of a parameter dict: embedding, blocks, tied head; forward and backward.

Axis legend as in ``model.py`` (B T S C H D V L), plus F: a block's MLP width (4C).

Forward (Radford et al. 2019, "GPT-2": pre-LayerNorm, tanh-GELU, learned
positions, LM head tied to the token embedding):

    x = wte[idx] + wpe[:T]                                  (B, T, C)
    for each of L blocks:
        x = x + c_proj(attention(c_attn(ln_1(x))))
        x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
    logits = ln_f(x) @ wte^T                                 (B, T, V)

The backward pass visits the same steps in exact reverse order. The linear
layers and the attention are the config's *kinds* (``minillm.seams``): the
block below is written once, and a technique swaps a kind, never the block.
A block's head count and MLP width come from its parameters
(``seams.block_dims``), so blocks may differ. ``GPT`` (``model.py``) holds
the parameters; the KV cache (``kv_cache.py``) reuses ``block_forward`` with
its own attention step.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import layers, seams


# --- one linear layer, whatever its kind ----------------------------------------------
def linear_forward(p: dict, name: str, x, config):
    """Linear layer ``name`` (e.g. "h.0.attn.c_attn") of the config's kind: x -> (y, cache)."""
    kind = seams.linear_kind(config.linear)
    return kind.forward(seams.layer_params(p, name, kind), x, name)


def linear_backward(dy, cache, name: str, config, grads: dict):
    """Reverse of ``linear_forward``: writes the layer's grads into ``grads``; -> dx."""
    dx, dparams = seams.linear_kind(config.linear).backward(dy, cache)
    for suffix, g in dparams.items():
        grads[f"{name}.{suffix}"] = g
    return dx


# --- one transformer block -------------------------------------------------------------
class BlockCache(NamedTuple):
    ln_1: layers.LayerNormCache
    c_attn: object                 # the linear kind's cache (dense: layers.LinearCache)
    attn: object                   # the attention kind's cache
    attn_proj: object
    ln_2: layers.LayerNormCache
    c_fc: object
    gelu: np.ndarray               # the GELU input (its tanh is recomputed)
    mlp_proj: object


def block_forward(x, p: dict, i: int, config, attention=None):
    """One transformer block: x (B, T, C) -> (x (B, T, C), cache).

    ``attention(qkv (B, T, 3 H D), n_head) -> (y (B, T, H D), cache)`` replaces the
    config's attention kind for this call (the KV cache passes a step that reads
    and extends its stored keys); everything else in the block stays as it is.
    """
    h, eps = f"h.{i}.", config.ln_eps
    n_head = seams.block_dims(p, i, config).n_head
    if attention is None:
        kind = seams.attention_kind(config.attention)
        attention = lambda qkv, n: kind.forward(qkv, n, config)      # noqa: E731
    a, ln_1 = layers.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
    qkv, c_attn = linear_forward(p, h + "attn.c_attn", a, config)                 # (B, T, 3HD)
    a, at = attention(qkv, n_head)                                                # (B, T, HD)
    a, attn_proj = linear_forward(p, h + "attn.c_proj", a, config)                # (B, T, C)
    x = x + a                                                                     # residual 1
    m, ln_2 = layers.layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
    m, c_fc = linear_forward(p, h + "mlp.c_fc", m, config)                        # (B, T, F)
    m, gelu = layers.gelu_forward(m)                                              # (B, T, F)
    m, mlp_proj = linear_forward(p, h + "mlp.c_proj", m, config)                  # (B, T, C)
    x = x + m                                                                     # residual 2
    return x, BlockCache(ln_1, c_attn, at, attn_proj, ln_2, c_fc, gelu, mlp_proj)


def block_backward(dx, cache: BlockCache, i: int, config, grads: dict):
    """Reverse of ``block_forward``; writes this block's parameter grads into ``grads``."""
    h = f"h.{i}."
    # residual 2: dx flows both around and through the MLP
    dm = linear_backward(dx, cache.mlp_proj, h + "mlp.c_proj", config, grads)
    dm = layers.gelu_backward(dm, cache.gelu)
    dm = linear_backward(dm, cache.c_fc, h + "mlp.c_fc", config, grads)
    dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layers.layernorm_backward(dm, cache.ln_2)
    dx = dx + dm
    # residual 1: the same through attention
    da = linear_backward(dx, cache.attn_proj, h + "attn.c_proj", config, grads)
    dqkv = seams.attention_kind(config.attention).backward(da, cache.attn)         # (B, T, 3HD)
    da = linear_backward(dqkv, cache.c_attn, h + "attn.c_attn", config, grads)
    da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layers.layernorm_backward(da, cache.ln_1)
    return dx + da


# --- the tied head: ln_f, then logits = x @ wte^T ----------------------------------------
class HeadCache(NamedTuple):
    ln_f: layers.LayerNormCache
    head: layers.LinearCache       # x after ln_f and wte^T (a view, no copy)


def head_forward(x, p: dict, config):
    """x (..., C) -> logits (..., V); the same for training, prefill and decode."""
    x, ln_f = layers.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], config.ln_eps)
    logits, head = layers.linear_forward(x, p["wte.weight"].T)                    # (..., V) tied
    return logits, HeadCache(ln_f, head)


def head_backward(dlogits, cache: HeadCache, grads: dict):
    """Reverse of ``head_forward``; writes ln_f's grads and returns (dx, dwte from the head)."""
    dx, dwte_t, _ = layers.linear_backward(dlogits, cache.head)                    # dwte_t (C, V)
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = layers.layernorm_backward(dx, cache.ln_f)
    return dx, dwte_t.T


# --- the whole model --------------------------------------------------------------------
class ForwardCache(NamedTuple):
    emb: layers.EmbeddingCache
    blocks: list                   # one BlockCache per layer
    head: HeadCache


def forward(p: dict, config, idx):
    """idx (B, T) ints -> (logits (B, T, V), everything the backward pass needs)."""
    x, emb = layers.embedding_forward(idx, p["wte.weight"], p["wpe.weight"])     # (B, T, C)
    blocks = []
    for i in range(config.n_layer):
        x, cache = block_forward(x, p, i, config)
        blocks.append(cache)
    logits, head = head_forward(x, p, config)                                     # (B, T, V)
    return logits, ForwardCache(emb, blocks, head)


def backward(p: dict, config, dlogits, cache: ForwardCache) -> dict:
    """dlogits (B, T, V) -> grads of the trainable parameters, in ``p``'s order."""
    grads: dict = {}
    dx, dwte_head = head_backward(dlogits, cache.head, grads)
    for i in reversed(range(config.n_layer)):
        dx = block_backward(dx, cache.blocks[i], i, config, grads)
    dwte, grads["wpe.weight"] = layers.embedding_backward(dx, cache.emb)
    grads["wte.weight"] = dwte + dwte_head                                         # tied: both uses add up
    return {k: grads[k] for k in p if k in grads}
