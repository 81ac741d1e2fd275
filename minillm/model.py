"""GPT-2, in NumPy, with an explicit backward pass.

Axis legend (used in every shape comment of the package):
    B batch · T query length · S key/cache length · C n_embd · H heads ·
    D head dim (C / H) · V vocab · L layers

Forward (Radford et al. 2019, "GPT-2": pre-LayerNorm, tanh-GELU, learned
positions, LM head tied to the token embedding):

    x = wte[idx] + wpe[:T]                                  (B, T, C)
    for each of L blocks:
        x = x + c_proj(attention(c_attn(ln_1(x))))
        x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
    logits = ln_f(x) @ wte^T                                 (B, T, V)

The backward pass visits the same steps in exact reverse order. Parameter
names are GPT-2's checkpoint names without the ``transformer.`` prefix.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import attention as attn
from . import layers
from .backend import to_numpy, xp_of, xp_for
from .config import GPTConfig


def init_params(config: GPTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm gains;
    residual projections (attn.c_proj, mlp.c_proj) scaled by 1/sqrt(2 L) (GPT-2 paper, sec. 2.3)."""
    rng = np.random.default_rng(seed)
    V, T, L, C = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    dtype = config.np_dtype
    std, proj_std = 0.02, 0.02 / np.sqrt(2 * L)

    def normal(shape, s):
        return (rng.standard_normal(shape) * s).astype(dtype)

    p = {"wte.weight": normal((V, C), std), "wpe.weight": normal((T, C), std)}
    for i in range(L):
        h = f"h.{i}."
        p[h + "ln_1.weight"], p[h + "ln_1.bias"] = np.ones(C, dtype), np.zeros(C, dtype)
        p[h + "attn.c_attn.weight"] = normal((C, 3 * C), std)
        p[h + "attn.c_attn.bias"] = np.zeros(3 * C, dtype)
        p[h + "attn.c_proj.weight"] = normal((C, C), proj_std)
        p[h + "attn.c_proj.bias"] = np.zeros(C, dtype)
        p[h + "ln_2.weight"], p[h + "ln_2.bias"] = np.ones(C, dtype), np.zeros(C, dtype)
        p[h + "mlp.c_fc.weight"] = normal((C, 4 * C), std)
        p[h + "mlp.c_fc.bias"] = np.zeros(4 * C, dtype)
        p[h + "mlp.c_proj.weight"] = normal((4 * C, C), proj_std)
        p[h + "mlp.c_proj.bias"] = np.zeros(C, dtype)
    p["ln_f.weight"], p["ln_f.bias"] = np.ones(C, dtype), np.zeros(C, dtype)
    return p


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter (what a checkpoint must contain)."""
    V, T, C = config.vocab_size, config.block_size, config.n_embd
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for i in range(config.n_layer):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes["ln_f.weight"], shapes["ln_f.bias"] = (C,), (C,)
    return shapes


class BlockCache(NamedTuple):
    ln_1: layers.LayerNormCache
    c_attn: layers.LinearCache
    attn: attn.SelfAttentionCache
    attn_proj: layers.LinearCache
    ln_2: layers.LayerNormCache
    c_fc: layers.LinearCache
    gelu: np.ndarray
    mlp_proj: layers.LinearCache


def block_forward(x, p: dict, i: int, config: GPTConfig,
                  attention=attn.self_attention_forward):
    """One transformer block: x (B, T, C) -> (B, T, C).

    ``attention(qkv (B, T, 3C), n_head) -> (y (B, T, C), cache)`` is the one step a
    technique may swap in (the KV cache's attention over its stored keys, later
    sparse or linear attention); everything else in the block stays as it is.
    """
    h, eps = f"h.{i}.", config.ln_eps
    a, ln_1 = layers.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
    qkv, c_attn = layers.linear_forward(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # (B, T, 3C)
    a, at = attention(qkv, config.n_head)                                            # (B, T, C)
    a, attn_proj = layers.linear_forward(a, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
    x = x + a                                                                       # residual 1
    m, ln_2 = layers.layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
    m, c_fc = layers.linear_forward(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])  # (B, T, 4C)
    m, gelu = layers.gelu_forward(m)                                                # (B, T, 4C)
    m, mlp_proj = layers.linear_forward(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
    x = x + m                                                                       # residual 2
    return x, BlockCache(ln_1, c_attn, at, attn_proj, ln_2, c_fc, gelu, mlp_proj)


def block_backward(dx, cache: BlockCache, i: int, grads: dict):
    """Reverse of ``block_forward``; writes this block's parameter grads into ``grads``."""
    h = f"h.{i}."
    # residual 2: dx flows both around and through the MLP
    dm, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = layers.linear_backward(dx, cache.mlp_proj)
    dm = layers.gelu_backward(dm, cache.gelu)
    dm, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = layers.linear_backward(dm, cache.c_fc)
    dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layers.layernorm_backward(dm, cache.ln_2)
    dx = dx + dm
    # residual 1: the same through attention
    da, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = layers.linear_backward(dx, cache.attn_proj)
    dqkv = attn.self_attention_backward(da, cache.attn)                             # (B, T, 3C)
    da, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = layers.linear_backward(dqkv, cache.c_attn)
    da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layers.layernorm_backward(da, cache.ln_1)
    return dx + da


class GPT:
    """A GPT-2 model whose parameters are a plain dict of arrays (see ``params``)."""

    def __init__(self, config: GPTConfig, seed: int = 0, params: dict | None = None):
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.params = init_params(config, seed) if params is None else params
        if params is not None:
            check_params(params, config)

    # --- where the arrays live ----------------------------------------------
    @property
    def xp(self):
        """numpy or cupy: the module that owns the parameters."""
        return xp_of(self.params["wte.weight"])

    def to(self, backend_name: str) -> "GPT":
        """Move every parameter to the array module of ``backend_name`` (in place)."""
        xp = xp_for(backend_name)
        self.params = {k: (xp.asarray(v) if xp is not np else to_numpy(v))
                       for k, v in self.params.items()}
        return self

    def num_params(self) -> int:
        """Parameter count (tied head counted once)."""
        return int(sum(v.size for v in self.params.values()))

    def nbytes(self) -> int:
        """Bytes of all weights."""
        return int(sum(v.nbytes for v in self.params.values()))

    # --- forward / backward -------------------------------------------------
    def check_idx(self, idx, name: str = "idx", pos0: int = 0):
        """Validate token ids (B, T) and return them as an int array on the model's device."""
        return check_tokens(idx, self.config, name=name, pos0=pos0, xp=self.xp)

    def _forward(self, idx):
        """-> logits (B, T, V) and everything the backward pass needs."""
        p, cfg = self.params, self.config
        x, emb = layers.embedding_forward(idx, p["wte.weight"], p["wpe.weight"])   # (B, T, C)
        blocks = []
        for i in range(cfg.n_layer):
            x, cache = block_forward(x, p, i, cfg)
            blocks.append(cache)
        x, ln_f = layers.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], cfg.ln_eps)
        logits, head = layers.linear_forward(x, p["wte.weight"].T)                 # (B, T, V) tied head
        return logits, (emb, blocks, ln_f, head)

    def forward(self, idx):
        """Logits (B, T, V) for token ids ``idx`` (B, T)."""
        logits, _ = self._forward(self.check_idx(idx))
        return logits

    __call__ = forward

    def loss(self, idx, targets) -> float:
        """Mean cross-entropy of next-token prediction (no gradients)."""
        idx, targets = self.check_idx(idx), self.check_idx(targets, "targets")
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {targets.shape} must equal idx shape {idx.shape}")
        logits, _ = self._forward(idx)
        loss, _ = layers.cross_entropy_forward(logits, targets)
        return float(loss)

    def loss_and_grads(self, idx, targets):
        """-> (loss: float, grads: dict with the same keys, shapes, dtypes as params)."""
        idx, targets = self.check_idx(idx), self.check_idx(targets, "targets")
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {targets.shape} must equal idx shape {idx.shape}")
        logits, (emb, blocks, ln_f, head) = self._forward(idx)
        loss, ce = layers.cross_entropy_forward(logits, targets)
        # backward, in exact reverse order of _forward
        grads: dict = {}
        dlogits = layers.cross_entropy_backward(1.0, ce, logits.shape)             # (B, T, V)
        dx, dwte_head, _ = layers.linear_backward(dlogits, head)                   # dwte_head (C, V)
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = layers.layernorm_backward(dx, ln_f)
        for i in reversed(range(self.config.n_layer)):
            dx = block_backward(dx, blocks[i], i, grads)
        dwte, grads["wpe.weight"] = layers.embedding_backward(dx, emb)
        grads["wte.weight"] = dwte + dwte_head.T                                   # tied: both uses add up
        return float(loss), {k: grads[k] for k in self.params}

    # --- generation ----------------------------------------------------------
    def generate(self, idx, max_new_tokens: int = 50, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = 0, use_cache: bool = True, eos_id: int | None = None):
        """Continue ``idx`` (B, T) by ``max_new_tokens`` sampled ids -> (B, T + new).

        temperature 0 is greedy; ``top_k`` keeps the k most likely ids; ``top_p``
        keeps the smallest set whose probability reaches p. ``use_cache`` decodes
        with the KV cache (``minillm.kv_cache``); False re-runs the whole prefix
        each step (the quadratic baseline).
        """
        from . import sampling
        return sampling.generate(self, idx, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=seed, use_cache=use_cache, eos_id=eos_id)

    # --- files -----------------------------------------------------------------
    def save(self, path, **extra) -> None:
        """Write ``path/model.safetensors`` + ``path/config.json`` atomically.

        Keyword arguments are passed to ``checkpoint.save`` (optimizer state, step, ...).
        """
        from . import checkpoint
        checkpoint.save(path, self, **extra)

    @classmethod
    def load(cls, path) -> "GPT":
        """Load a directory written by ``save``; names, shapes and dtypes are checked."""
        from . import checkpoint
        return checkpoint.load(path)

    @classmethod
    def from_hf(cls, path) -> "GPT":
        """Load a Hugging Face ``GPT2LMHeadModel`` directory (config.json + model.safetensors)."""
        from . import checkpoint
        return checkpoint.load_hf(path)

    def save_hf(self, path) -> None:
        """Write a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` loads."""
        from . import checkpoint
        checkpoint.save_hf(path, self)

    def __repr__(self) -> str:
        c = self.config
        return (f"GPT(V={c.vocab_size}, T={c.block_size}, L={c.n_layer}, H={c.n_head}, "
                f"C={c.n_embd}, dtype={c.dtype}, params={self.num_params():,})")


def check_tokens(idx, config: GPTConfig, name: str = "idx", pos0: int = 0, xp=np):
    """Token ids must be a 2-D integer array (B, T), 0 <= id < V, pos0 + T <= block_size."""
    if isinstance(idx, (list, tuple)):
        idx = np.asarray(idx)
    if not hasattr(idx, "dtype") or not hasattr(idx, "shape"):
        raise ValueError(f"{name} must be an integer array of shape (B, T), got {type(idx).__name__}")
    if idx.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype, got {idx.dtype}")
    if idx.ndim != 2:
        raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(idx.shape)}")
    B, T = idx.shape
    if B < 1 or T < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(idx.shape)}")
    if pos0 + T > config.block_size:
        raise ValueError(f"{name} has length {pos0 + T} > block_size={config.block_size}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains token id {bad}, outside [0, vocab_size={config.vocab_size})")
    return xp.asarray(idx)


def check_params(params: dict, config: GPTConfig) -> None:
    """Every expected name present with its shape and the config's dtype; nothing extra."""
    expected = param_shapes(config)
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"params do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        a = params[name]
        if tuple(a.shape) != shape:
            raise ValueError(f"param {name!r} has shape {tuple(a.shape)}, config needs {shape}")
        if a.dtype != config.np_dtype:
            raise ValueError(f"param {name!r} has dtype {a.dtype}, config needs {config.dtype}")
