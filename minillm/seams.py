"""The seams: where a technique plugs into the baseline without copying it.

Every technique is one module that *composes* the baseline: it never copies
``transformer.block_forward``/``block_backward``, the training step or the
generation loop. These are the places it may plug in:

| seam | where | what a technique supplies |
|---|---|---|
| linear layers | ``LinearKind`` here, ``GPTConfig.linear`` | how a layer stores its weight (int8 + scales, a mask, a shard) and its forward/backward pair |
| attention | ``AttentionKind`` here, ``GPTConfig.attention`` | a forward/backward pair for training and the uncached forward, and its own decode state + step (a KV cache, a ring buffer, a recurrent state) |
| per-layer shapes | ``block_dims`` here | nothing: heads and MLP width of block i are read from its parameter shapes, so pruned layers may differ |
| the loss | ``GPT.forward_train`` / ``GPT.backward`` | any loss on the logits (distillation) |
| the training step | ``train.TrainHook`` | per-step batch size, the loss, gradient transforms (unscale, all-reduce, clip), skipping a step, post-update work (masks), extra checkpoint state |
| decoding | ``kv_cache.KVCache`` | rows that are admitted (``rows``/``prefill``) and freed (``free``) while the others continue |
| kernels | ``backend.kernel`` | a compiled twin of a named reference function (``backends/``) |
| the tour | ``tour.technique`` | one row function in the technique's own module |

A *kind* is registered under a name, and the config names the kind, so a
saved model comes back with it (``config.json`` holds ``attention`` and
``linear``). Kinds a later module defines are listed in ``LAZY_KINDS`` and
imported on first use, so ``GPTConfig(attention="window")`` works without
importing the technique first.

Parameter layout of a linear layer ``name`` (e.g. ``"h.0.attn.c_attn"``): its
kind owns the parameters ``name + "." + suffix`` for each of its suffixes
(dense: ``weight`` (in, out) and ``bias`` (out,)). The four linear layers of
block i are the ``LINEAR_ROLES``; their sizes fix the block's dims:

    c_attn: C -> 3 H_i D     attn.c_proj: H_i D -> C     (D = config.head_size)
    c_fc:   C -> F_i         mlp.c_proj:  F_i -> C
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

import numpy as np

from . import attention as attn
from . import layers

LINEAR_ROLES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# --- linear layers ------------------------------------------------------------------------
class LinearKind:
    """How one linear layer ``y = x W + b`` stores its parameters and runs.

    Subclass it and register an instance with ``register_linear``. ``W`` is
    always *described* in GPT-2's (in, out) layout; how it is stored is the
    kind's business.
    """

    name = "?"
    suffixes: tuple[str, ...] = ()        # parameter names below the layer's prefix
    trainable: tuple[str, ...] = ()       # the suffixes that get gradients

    def specs(self, n_in: int, n_out: int, dtype) -> dict[str, tuple[tuple, np.dtype]]:
        """suffix -> (shape, dtype) of a layer mapping n_in -> n_out in model dtype ``dtype``."""
        raise NotImplementedError

    def dims(self, lp: dict) -> tuple[int, int]:
        """(n_in, n_out) read from the layer's parameters ``lp`` (suffix -> array)."""
        raise NotImplementedError

    def from_dense(self, w, b) -> dict:
        """The layer's parameters for a dense weight w (in, out) and bias b (out,)."""
        raise NotImplementedError

    def forward(self, lp: dict, x, name: str):
        """x (..., n_in) -> (y (..., n_out), cache). ``name`` is the layer's, e.g.
        "h.0.attn.c_proj" (tensor parallelism splits c_attn/c_fc by columns and
        the c_projs by rows)."""
        raise NotImplementedError

    def backward(self, dy, cache):
        """-> (dx (..., n_in), {suffix: gradient} for the ``trainable`` suffixes)."""
        raise NotImplementedError

    def train_hooks(self, model) -> list:
        """``train.TrainHook``s that training a model of this kind always needs (e.g.
        re-applying a pruning mask after each update); ``train`` runs them first."""
        return []

    def __repr__(self) -> str:
        return f"<linear kind {self.name!r}>"


class DenseLinear(LinearKind):
    """The baseline: a float weight (in, out) and bias (out,), ``layers.linear_*``."""

    name = "dense"
    suffixes = trainable = ("weight", "bias")

    def specs(self, n_in, n_out, dtype):
        return {"weight": ((n_in, n_out), np.dtype(dtype)), "bias": ((n_out,), np.dtype(dtype))}

    def dims(self, lp):
        return tuple(lp["weight"].shape)

    def from_dense(self, w, b):
        return {"weight": w, "bias": b}

    def forward(self, lp, x, name):
        return layers.linear_forward(x, lp["weight"], lp["bias"])

    def backward(self, dy, cache):
        dx, dw, db = layers.linear_backward(dy, cache)
        return dx, {"weight": dw, "bias": db}


# --- attention ------------------------------------------------------------------------------
class AttentionKind:
    """Causal self-attention as a forward/backward pair plus its decode state.

    ``forward(qkv, n_head, config)``: qkv (B, T, 3 H D) from c_attn -> (y (B, T, H D), cache)
    ``backward(dy, cache)``: dy (B, T, H D) -> dqkv (B, T, 3 H D)
    ``init_state(config, batch_size, max_len, n_head, xp)``: one layer's decode
        state, a tuple of arrays whose first axis is the batch row (so a slice
        of rows is a view that shares memory: ``KVCache.rows``)
    ``step(qkv, state, pos, n_head, config)``: T new tokens per row at positions
        pos[b] .. pos[b] + T - 1 (pos (B,) host ints) -> y (B, T, H D); updates
        ``state`` in place. Prefill is a step with pos = 0 and T = prompt length.
        A kind with ``takes_n_valid = True`` also gets ``n_valid=`` (B,) host ints:
        only row b's first n_valid[b] tokens are real (the rest is right padding, or
        a row sitting out a decode step: 0), and only those may enter its state. A
        kind whose state is slotted by position (dense) need not: padding lands in
        slots the key mask hides and the next real token overwrites.
    ``check_config(config)``: raise ValueError for settings the kind cannot use.
    ``train_hooks(model)``: training hooks this kind always needs (default none).
    """

    name = "?"
    takes_n_valid = False          # True: ``step`` accepts n_valid= (see above)

    def check_config(self, config) -> None:
        pass

    def forward(self, qkv, n_head: int, config):
        raise NotImplementedError

    def backward(self, dy, cache):
        raise NotImplementedError

    def init_state(self, config, batch_size: int, max_len: int, n_head: int, xp=np) -> tuple:
        raise NotImplementedError

    def step(self, qkv, state: tuple, pos, n_head: int, config):
        raise NotImplementedError

    def train_hooks(self, model) -> list:
        """``train.TrainHook``s that training with this kind always needs (default none)."""
        return []

    def __repr__(self) -> str:
        return f"<attention kind {self.name!r}>"


class DenseAttention(AttentionKind):
    """The baseline: every query sees every earlier key; decoding keeps all K and V.

    Decode state per layer: K and V of shape (B, H, S_max, D), i.e.
    2 * B * H * S_max * D * itemsize bytes (Pope et al. 2022, sec. 2).
    """

    name = "dense"

    def check_config(self, config):
        for field in ("window", "stride", "block", "n_global"):     # the sparse kinds' settings
            if getattr(config, field, None) is not None:
                raise ValueError(f"{field}={getattr(config, field)!r} is not used by attention='dense'; "
                                 f"leave it unset (None) or choose a kind that uses it "
                                 f"(minillm.sparse_attention)")

    def forward(self, qkv, n_head, config):
        return attn.self_attention_forward(qkv, n_head)

    def backward(self, dy, cache):
        return attn.self_attention_backward(dy, cache)

    def init_state(self, config, batch_size, max_len, n_head, xp=np):
        shape = (batch_size, n_head, max_len, config.head_size)             # (B, H, S_max, D)
        return xp.zeros(shape, dtype=config.np_dtype), xp.zeros(shape, dtype=config.np_dtype)

    def step(self, qkv, state, pos, n_head, config):
        k, v = state
        return attn.append_attend(qkv, k, v, pos, n_head)                    # (B, T, H D)


# --- the registries ---------------------------------------------------------------------------
_LINEAR: dict[str, LinearKind] = {"dense": DenseLinear()}
_ATTENTION: dict[str, AttentionKind] = {"dense": DenseAttention()}
# kind name -> module that registers it when imported (technique modules add a line here)
LAZY_KINDS: dict[str, dict[str, str]] = {
    "attention": {
        "window": "minillm.sparse_attention",
        "strided": "minillm.sparse_attention",
        "block": "minillm.sparse_attention",
        "linear": "minillm.linear_attention",
    },
    "linear": {
        "w8": "minillm.quantization",
        "w8a8": "minillm.quantization",
        "llm_int8": "minillm.quantization",
        "w4g64": "minillm.quantization",
        "sparse": "minillm.pruning",
        "tensor_parallel": "minillm.parallel",
    },
}


def register_linear(kind: LinearKind) -> LinearKind:
    """Make ``kind`` available as ``GPTConfig(linear=kind.name)``."""
    return _register(_LINEAR, "linear", kind, LinearKind)


def register_attention(kind: AttentionKind) -> AttentionKind:
    """Make ``kind`` available as ``GPTConfig(attention=kind.name)``."""
    return _register(_ATTENTION, "attention", kind, AttentionKind)


def _register(table, what, kind, base):
    if not isinstance(kind, base):
        raise ValueError(f"a {what} kind must be a {base.__name__} instance, got {type(kind).__name__}")
    name = kind.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{what} kind name={name!r} must be an identifier")
    if name in table and type(table[name]) is not type(kind):
        raise ValueError(f"{what} kind {name!r} is registered twice")
    table[name] = kind
    return kind


def linear_kind(name: str) -> LinearKind:
    """The registered linear kind ``name`` (ValueError listing the known ones)."""
    return _lookup(_LINEAR, "linear", name)


def attention_kind(name: str) -> AttentionKind:
    """The registered attention kind ``name`` (ValueError listing the known ones)."""
    return _lookup(_ATTENTION, "attention", name)


def _lookup(table, what, name):
    if not isinstance(name, str):
        raise ValueError(f"{what}={name!r} must be a kind name (a string); known: {known_kinds(what)}")
    if name not in table and name in LAZY_KINDS[what]:
        importlib.import_module(LAZY_KINDS[what][name])
    if name not in table:
        known = sorted(set(table) | set(LAZY_KINDS[what]))
        raise ValueError(f"{what}={name!r} is not a registered {what} kind; known: {known}")
    return table[name]


def known_kinds(what: str) -> list[str]:
    """Names of the attention or linear kinds that can be used (registered or lazy)."""
    table = {"attention": _ATTENTION, "linear": _LINEAR}[what]
    return sorted(set(table) | set(LAZY_KINDS[what]))


# --- per-layer shapes -----------------------------------------------------------------------
class BlockDims(NamedTuple):
    n_head: int            # H_i: heads of this block (head size D is the config's)
    d_mlp: int             # F_i: hidden width of this block's MLP


def layer_params(p: dict, name: str, kind: LinearKind) -> dict:
    """suffix -> array of linear layer ``name`` (e.g. "h.0.attn.c_attn")."""
    return {s: p[f"{name}.{s}"] for s in kind.suffixes}


def block_dims(p: dict, i: int, config) -> BlockDims:
    """Heads and MLP width of block ``i``, read from its c_attn and c_fc parameters."""
    kind = linear_kind(config.linear)
    _, qkv_out = kind.dims(layer_params(p, f"h.{i}.attn.c_attn", kind))
    _, d_mlp = kind.dims(layer_params(p, f"h.{i}.mlp.c_fc", kind))
    return BlockDims(qkv_out // (3 * config.head_size), d_mlp)


def expected_specs(p: dict, config) -> dict[str, tuple[tuple, np.dtype]]:
    """name -> (shape, dtype) every parameter must have, block dims read from ``p``.

    Raises ValueError naming the first parameter that is missing or whose shape
    fits no block layout (e.g. a c_attn output that is not 3 * heads * head_size).
    """
    C, dtype = config.n_embd, config.np_dtype
    kind = linear_kind(config.linear)
    specs = {"wte.weight": ((config.vocab_size, C), dtype), "wpe.weight": ((config.block_size, C), dtype),
             "ln_f.weight": ((C,), dtype), "ln_f.bias": ((C,), dtype)}
    for i in range(config.n_layer):
        h = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            specs[h + ln + ".weight"] = specs[h + ln + ".bias"] = ((C,), dtype)
        missing = [f"{h}{r}.{s}" for r in ("attn.c_attn", "mlp.c_fc") for s in kind.suffixes
                   if f"{h}{r}.{s}" not in p]
        if missing:
            raise ValueError(f"params lack {missing} (linear kind {kind.name!r} stores "
                             f"{list(kind.suffixes)} per layer)")
        n_head, d_mlp = _checked_dims(p, i, config, kind)
        HD = n_head * config.head_size
        for role, (n_in, n_out) in (("attn.c_attn", (C, 3 * HD)), ("attn.c_proj", (HD, C)),
                                    ("mlp.c_fc", (C, d_mlp)), ("mlp.c_proj", (d_mlp, C))):
            for suffix, spec in kind.specs(n_in, n_out, dtype).items():
                specs[f"{h}{role}.{suffix}"] = spec
    return specs


def _checked_dims(p, i, config, kind) -> BlockDims:
    C, D = config.n_embd, config.head_size
    h = f"h.{i}."
    n_in, qkv_out = kind.dims(layer_params(p, h + "attn.c_attn", kind))
    if n_in != C or qkv_out < 3 * D or qkv_out % (3 * D):
        raise ValueError(f"param {h}attn.c_attn has a shape that maps {n_in} -> {qkv_out}; it must map "
                         f"n_embd={C} -> 3 * n_heads * head_size (head_size={D}, n_heads >= 1)")
    n_in, d_mlp = kind.dims(layer_params(p, h + "mlp.c_fc", kind))
    if n_in != C or d_mlp < 1:
        raise ValueError(f"param {h}mlp.c_fc has a shape that maps {n_in} -> {d_mlp}; it must map n_embd={C} -> "
                         f"a hidden width >= 1")
    return BlockDims(qkv_out // (3 * D), d_mlp)
