"""GPT: the parameters of a GPT-2 and what you do with them.

The math lives in ``transformer.py`` (embedding, blocks, tied head, forward
and backward over a parameter dict); this class holds the parameters, checks
inputs at the boundary, and offers the public API: ``forward``,
``forward_train`` / ``backward`` (llm.c's split: any loss on the logits),
``loss_and_grads`` built on them, ``generate`` (``generation.py``), files.

Axis legend (used in every shape comment of the package):
    B batch · T query length · S key/cache length · C n_embd · H heads ·
    D head dim (C / H) · V vocab · L layers

Parameter names are GPT-2's checkpoint names without the ``transformer.``
prefix. The config's linear and attention *kinds* (``minillm.seams``) decide
how the blocks' linear layers are stored and how attention runs; each block's
head count and MLP width are read from its parameter shapes.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import generation, layers, seams, transformer
from .backend import to_numpy, xp_for, xp_of
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
    kind = seams.linear_kind(config.linear)
    if kind.name != "dense":                 # the same init, stored the kind's way
        for i in range(L):
            for role in seams.LINEAR_ROLES:
                name = f"h.{i}.{role}"
                for suffix, a in kind.from_dense(p.pop(name + ".weight"), p.pop(name + ".bias")).items():
                    p[f"{name}.{suffix}"] = a
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
        """numpy or cupy (or a registered device's module): the owner of the parameters."""
        return xp_of(self.params["wte.weight"])

    def to(self, backend_name: str) -> "GPT":
        """Move every parameter to the array module of ``backend_name`` (in place)."""
        xp = xp_for(backend_name)
        self.params = {k: (xp.asarray(v) if xp is not np else to_numpy(v))
                       for k, v in self.params.items()}
        return self

    def astype(self, dtype) -> "GPT":
        """A copy with the float parameters stored in ``dtype``: "float32", "float64",
        "float16" or "bfloat16" (``ml_dtypes``); integer parameters a linear kind holds
        (int8 codes, masks) are kept. The config's dtype follows, so the copy computes
        in that precision (half: see ``minillm.precision``)."""
        from .config import _DTYPES
        name = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype), "name", dtype) \
            if _is_dtype_like(dtype) else dtype
        if name not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} must be a float dtype, one of {list(_DTYPES)}")
        config = dataclasses.replace(self.config, dtype=name)
        old, new = self.config.np_dtype, config.np_dtype
        params = {k: (v.astype(new) if v.dtype == old else v) for k, v in self.params.items()}
        return GPT(config, params=params)

    def num_params(self) -> int:
        """Parameter count (tied head counted once; every stored entry counts, int8 too)."""
        return int(sum(v.size for v in self.params.values()))

    def nbytes(self) -> int:
        """Bytes held by the parameters, counted from the arrays themselves."""
        return int(sum(v.nbytes for v in self.params.values()))

    # --- the layout -------------------------------------------------------------
    def block_dims(self, i: int) -> seams.BlockDims:
        """(n_head, d_mlp) of block ``i``, read from its parameter shapes."""
        return seams.block_dims(self.params, i, self.config)

    def trainable(self) -> dict:
        """``{name: array}`` of the parameters that get gradients (what an optimizer updates).

        Every parameter for the dense kind; a linear kind may hold frozen ones
        (int8 codes, masks) that ``backward`` does not differentiate.
        """
        kind = seams.linear_kind(self.config.linear)
        frozen = {f"h.{i}.{role}.{s}" for i in range(self.config.n_layer)
                  for role in seams.LINEAR_ROLES for s in kind.suffixes if s not in kind.trainable}
        return {k: v for k, v in self.params.items() if k not in frozen}

    # --- forward / backward -------------------------------------------------
    def check_idx(self, idx, name: str = "idx", pos0: int = 0):
        """Validate token ids (B, T) and return them as an int array on the model's device."""
        return check_tokens(idx, self.config, name=name, pos0=pos0, xp=self.xp)

    def forward(self, idx):
        """Logits (B, T, V) for token ids ``idx`` (B, T)."""
        logits, _ = transformer.forward(self.params, self.config, self.check_idx(idx))
        return logits

    __call__ = forward

    def forward_train(self, idx):
        """-> (logits (B, T, V), cache): the forward pass that keeps what ``backward`` needs."""
        return transformer.forward(self.params, self.config, self.check_idx(idx))

    def backward(self, dlogits, cache) -> dict:
        """d loss / d logits (B, T, V) -> grads: the trainable parameters' names, shapes, dtypes."""
        logits_shape = cache.head.head.x.shape[:-1] + (self.config.vocab_size,)
        if tuple(dlogits.shape) != logits_shape:
            raise ValueError(f"dlogits has shape {tuple(dlogits.shape)}; the forward pass made "
                             f"logits of shape {logits_shape}")
        if dlogits.dtype != self.config.np_dtype:
            raise ValueError(f"dlogits has dtype {dlogits.dtype}; the model computes in {self.config.dtype}")
        return transformer.backward(self.params, self.config, dlogits, cache)

    def loss(self, idx, targets) -> float:
        """Mean cross-entropy of next-token prediction (no gradients)."""
        idx, targets = self._check_pair(idx, targets)
        logits, _ = transformer.forward(self.params, self.config, idx)
        loss, _ = layers.cross_entropy_forward(logits, targets)
        return float(loss)

    def loss_and_grads(self, idx, targets):
        """-> (loss: float, grads: dict with the trainable parameters' keys, shapes, dtypes)."""
        idx, targets = self._check_pair(idx, targets)
        logits, cache = self.forward_train(idx)                                       # (B, T, V)
        loss, ce = layers.cross_entropy_forward(logits, targets)
        dlogits = layers.cross_entropy_backward(1.0, ce, logits.shape)                # (B, T, V)
        return float(loss), self.backward(dlogits.astype(logits.dtype, copy=False), cache)

    def _check_pair(self, idx, targets):
        idx, targets = self.check_idx(idx), self.check_idx(targets, "targets")
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {targets.shape} must equal idx shape {idx.shape}")
        return idx, targets

    # --- generation ----------------------------------------------------------
    def generate(self, idx, max_new_tokens: int = 50, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = 0, use_cache: bool = True, eos_id: int | None = None):
        """Continue ``idx`` (B, T) by ``max_new_tokens`` sampled ids -> (B, T + new).

        temperature 0 is greedy; ``top_k`` keeps the k most likely ids; ``top_p``
        keeps the smallest set whose probability reaches p. ``use_cache`` decodes
        with the KV cache (``minillm.kv_cache``); False re-runs the whole prefix
        each step (the quadratic baseline). See ``minillm.generation``.
        """
        return generation.generate(self, idx, max_new_tokens=max_new_tokens,
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
        cfg = self.config
        dims = {self.block_dims(i) for i in range(cfg.n_layer)}
        if (cfg.attention, cfg.linear) != ("dense", "dense") or dims != {(cfg.n_head, 4 * cfg.n_embd)}:
            raise ValueError(f"GPT2LMHeadModel holds dense attention, dense float linears and equal "
                             f"blocks (H={cfg.n_head}, 4C={4 * cfg.n_embd}); this model has "
                             f"attention={cfg.attention!r}, linear={cfg.linear!r}, block dims "
                             f"{sorted(dims)}: save it with model.save instead")
        checkpoint.save_hf(path, self)

    def __repr__(self) -> str:
        c = self.config
        return (f"GPT(V={c.vocab_size}, T={c.block_size}, L={c.n_layer}, H={c.n_head}, "
                f"C={c.n_embd}, dtype={c.dtype}, params={self.num_params():,})")


def _is_dtype_like(x) -> bool:
    try:
        np.dtype(x)
        return True
    except TypeError:
        return False


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
    """Every expected name present with its shape and dtype; nothing extra.

    Block dims (heads, MLP width) are read from the parameters themselves
    (``seams.expected_specs``), so a model with per-layer shapes passes.
    """
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of arrays, got {type(params).__name__}")
    expected = seams.expected_specs(params, config)
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"params do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, (shape, dtype) in expected.items():
        a = params[name]
        if tuple(a.shape) != shape:
            raise ValueError(f"param {name!r} has shape {tuple(a.shape)}, config needs {shape}")
        if a.dtype != dtype:
            raise ValueError(f"param {name!r} has dtype {a.dtype}, config needs {dtype}")
