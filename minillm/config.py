"""GPTConfig: the model's shape, validated once, frozen, with named presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from .checks import check_int

_DTYPES = ("float32", "float64", "float16", "bfloat16")


def np_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name; "bfloat16" is ``ml_dtypes.bfloat16`` (NumPy has none)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 style model.

    vocab_size  V   number of token ids (the tied LM head has V outputs)
    block_size  T   longest sequence the learned positions cover
    n_layer     L   transformer blocks
    n_head      H   attention heads; head size D = n_embd // n_head
    n_embd      C   width of the residual stream
    dtype           "float32" (default), "float64" (for gradient checks), or a half
                    precision, "float16" / "bfloat16" (see ``minillm.precision``)
    ln_eps          LayerNorm epsilon (GPT-2 uses 1e-5)
    attention       the attention kind ("dense": GPT-2's); see ``minillm.seams``
    linear          the linear-layer kind of the blocks ("dense": float weights)
    window, stride, block, n_global
                    pattern settings of the sparse attention kinds (None: unset);
                    each kind's ``check_config`` says which it uses
                    (``minillm.sparse_attention``)

    The config is the model's *default* shape: a block's head count and MLP
    width are read from its parameters (``seams.block_dims``), so a model whose
    heads or neurons were removed keeps this config.
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dtype: str = "float32"
    ln_eps: float = 1e-5
    attention: str = "dense"
    linear: str = "dense"
    window: int | None = None
    stride: int | None = None
    block: int | None = None
    n_global: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {_DTYPES}")
        if not (isinstance(self.ln_eps, (int, float)) and 0 < self.ln_eps < 1):
            raise ValueError(f"ln_eps={self.ln_eps!r} must be a float in (0, 1)")
        object.__setattr__(self, "ln_eps", float(self.ln_eps))   # np.float64 would promote float32
        from . import seams
        seams.linear_kind(self.linear)
        seams.attention_kind(self.attention).check_config(self)

    @property
    def head_size(self) -> int:
        """D = C / H."""
        return self.n_embd // self.n_head

    @property
    def np_dtype(self) -> np.dtype:
        return np_dtype(self.dtype)

    def num_params(self) -> int:
        """Parameter count (the tied LM head is counted once)."""
        V, T, L, C = self.vocab_size, self.block_size, self.n_layer, self.n_embd
        per_layer = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C \
            + (C * 4 * C + 4 * C) + (4 * C * C + C)
        return V * C + T * C + L * per_layer + 2 * C

    # --- presets -----------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named configuration; keyword arguments override its fields.

        ``tiny``  V=256  T=64  L=2 H=4 C=64    (~0.1 M params; tests, chapters)
        ``small`` V=4096 T=256 L=6 H=8 C=256   (~5.9 M params; the tour, benches)
        ``gpt2``  V=50257 T=1024 L=12 H=12 C=768 (GPT-2 124M's shape)
        """
        if name not in PRESETS:
            raise ValueError(f"preset name={name!r} is unknown; presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # --- serialisation -----------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; known: {sorted(fields)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS = {
    "tiny": GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "small": GPTConfig(vocab_size=4096, block_size=256, n_layer=6, n_head=8, n_embd=256),
    "gpt2": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}
