"""Mixed precision: fp16 or bf16 compute with fp32 master weights, and a loss scaler.

What it changes against the baseline: the forward and backward passes run on
a *compute copy* of the weights in half precision, while the optimizer keeps
float32 *master* weights and moments (Micikevicius et al. 2018, "Mixed
Precision Training", sec. 3). fp16 has 5 exponent bits: gradients below
2^-24 flush to zero, so the loss is multiplied by a scale before the backward
pass and the gradients divided by it after (sec. 3.2); a scale too large
overflows to inf, and then the step is skipped and the scale halved (the
dynamic scaling of PyTorch's ``GradScaler``). bf16 keeps float32's 8 exponent
bits (7 mantissa bits): no scaling is needed (Kalamkar et al. 2019).

Where each precision is used (the code keeps to this table):

| what | fp32 run | fp16 / bf16 run |
|---|---|---|
| master weights, AdamW moments, the update | fp32 | fp32 |
| weights the forward/backward reads | fp32 | a half copy, made each step |
| matmul operands | fp32 | half |
| matmul products and their sums | fp32 | fp32, the result rounded to half (``layers.matmul``) |
| activations between layers | fp32 | half |
| LayerNorm statistics, GELU, softmax | fp32 | fp32, the output rounded to half (``layers.f32``) |
| the loss (cross-entropy) | fp32 | fp32 |
| the gradient flowing back | fp32 | half, times the loss scale (fp16) |
| parameter gradients the optimizer sees | fp32 | half -> fp32, divided by the scale |

Cost formula (bytes, P parameters): fp32 training holds 4P weights + 4P
gradients + 8P moments; mixed precision adds the 2P half copy and its 2P
gradients, and halves the activations. Inference with ``model.astype("float16")``
holds 2P: a batch-1 decode step streams half the bytes, if the matmul reads the
2-byte codes itself (the ``numba`` backend's twins, ``backends/numba_precision.py``,
widen each code in a register and run the attention over the half KV cache in one
loop; NumPy's reference widens the whole matrix first).

``train(..., tcfg)`` with ``TrainConfig(precision="fp16" | "bf16")`` adds the
``MixedPrecision`` hook (``minillm.train``'s step seams): its loss runs the
half copy, its gradient transform unscales and finds overflows, its skip
drops the update of an overflowed step, and its state (the scaler) is saved
in the checkpoint, so a resume is exact.
"""
from __future__ import annotations

import math

import numpy as np

from . import layers
from .backend import current, xp_of
from .checks import check_choice, check_float, check_int
from .tour import Row, TourContext, technique
from .train import TrainHook

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class LossScaler:
    """Dynamic loss scaling, PyTorch ``torch.amp.GradScaler``'s rule.

    ``scale`` multiplies the loss (so the gradients) before the backward pass.
    ``update(found_inf)`` after each step: an overflow multiplies the scale by
    ``backoff_factor`` (the step is skipped) and restarts the count;
    ``growth_interval`` clean steps in a row multiply it by ``growth_factor``.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = check_float("init_scale", init_scale, 0, lo_open=True)
        self.growth_factor = check_float("growth_factor", growth_factor, 1, lo_open=True)
        self.backoff_factor = check_float("backoff_factor", backoff_factor, 0, 1,
                                          lo_open=True, hi_open=True)
        self.growth_interval = check_int("growth_interval", growth_interval, 1)
        self.clean_steps = 0                     # clean steps since the last change

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow; grow after ``growth_interval`` clean steps."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": np.array([self.scale], dtype=np.float64),
                "clean_steps": np.array([self.clean_steps], dtype=np.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"][0])
        self.clean_steps = int(state["clean_steps"][0])

    def __repr__(self) -> str:
        return f"LossScaler(scale={self.scale:g}, clean_steps={self.clean_steps})"


class MixedPrecision(TrainHook):
    """The training step in ``dtype`` ("float16" or "bfloat16") on fp32 master weights.

    ``scaler``: a ``LossScaler`` (fp16's default) or None (bf16's: no scaling).
    Records ``loss_scale`` and ``found_inf`` in each step's history.
    """

    name = "precision"

    def __init__(self, dtype: str = "float16", scaler: LossScaler | None = None):
        self.dtype = check_choice("dtype", dtype, ("float16", "bfloat16"))
        self.scaler = scaler
        self.found_inf = False

    @property
    def scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def loss_and_grads(self, model, x, y, step):
        """Forward and backward on the half copy; the loss in fp32, the gradients
        returned in fp32 but still multiplied by the scale (``transform_grads`` divides)."""
        half = model.astype(self.dtype)                                  # the compute copy
        with np.errstate(over="ignore", invalid="ignore"):               # overflows are found
            logits, cache = half.forward_train(x)                        # (B, T, V) half
            loss, ce = layers.cross_entropy_forward(logits, half.check_idx(y, "targets"))  # fp32
            dlogits = layers.cross_entropy_backward(self.scale, ce, logits.shape)
            grads = half.backward(dlogits.astype(logits.dtype), cache)   # half, scaled
        return float(loss), {k: g.astype(np.float32) for k, g in grads.items()}

    def transform_grads(self, grads, step, record):
        """Divide by the scale; an inf or nan anywhere marks the step as overflowed
        and the scaler backs off (or grows after enough clean steps)."""
        self.found_inf = not all(bool(xp_of(g).isfinite(g).all()) for g in grads.values())
        record["loss_scale"] = self.scale
        record["found_inf"] = self.found_inf
        if self.scaler is None and self.found_inf:
            raise RuntimeError(f"non-finite {self.dtype} gradients at step {step + 1} "
                               f"(no loss scaling in {self.dtype}): training diverged")
        inv = np.float32(1.0 / self.scale)
        for g in grads.values():
            g *= inv
        if self.scaler is not None:
            self.scaler.update(self.found_inf)
        return grads

    def skip(self, step, record):
        return self.found_inf

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state):
        if self.scaler is not None:
            self.scaler.load_state_dict(state)


def precision_hooks(precision: str) -> list:
    """The hooks a ``TrainConfig.precision`` needs: none for fp32."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp32":
        return []
    scaler = LossScaler() if precision == "fp16" else None
    return [MixedPrecision(PRECISIONS[precision], scaler)]


def fp16_flush_share(grads: dict) -> float:
    """Share of nonzero gradient entries that become 0 when rounded to fp16 (|g| < 2^-25)."""
    nonzero = flushed = 0
    for g in grads.values():
        g = np.asarray(g, dtype=np.float64)
        nz = g != 0
        nonzero += int(nz.sum())
        flushed += int((nz & (g.astype(np.float16) == 0)).sum())
    return flushed / max(nonzero, 1)


def log2_histogram(grads: dict, bins=None):
    """(counts, edges) of log2|g| over every nonzero gradient entry (the paper's fig. 3);
    entries beyond the edges count in the end bins, so every nonzero entry is counted."""
    values = np.concatenate([np.abs(np.asarray(g, dtype=np.float64)).reshape(-1)
                             for g in grads.values()])
    values = values[values > 0]
    bins = np.arange(-60, 11) if bins is None else np.asarray(bins)
    return np.histogram(np.clip(np.log2(values), bins[0], bins[-1]), bins=bins)


FP16_MIN_SUBNORMAL = math.ldexp(1.0, -24)    # below half of this, a value rounds to 0 in fp16


# --- the tour row ----------------------------------------------------------------------------
@technique("mixed_precision", order=7)
def mixed_precision_rows(ctx: TourContext) -> list[Row]:
    """The baseline with its weights in fp16 and in bf16 (``model.astype``, no training):
    bytes, validation perplexity and cached greedy decode speed against float32's.
    Mixed-precision *training* is in ``bench/bench_precision.py`` (on the CPU it emulates
    half compute and is slower; its win is on a GPU)."""
    fp_tok_s = ctx.decode_tok_s(use_cache=True)
    rows = []
    for prec in ("fp16", "bf16"):
        half = ctx.model.astype(PRECISIONS[prec])
        tok_s = ctx.decode_tok_s(half, use_cache=True)
        rows.append(Row(f"mixed_precision {prec} weights", half.num_params(), half.nbytes(),
                        ctx.val_ppl(half), None, tok_s,
                        f"{PRECISIONS[prec]} weights, float32 accumulation; cached decode {tok_s:.0f} "
                        f"tok/s vs float32 cached {fp_tok_s:.0f} ({tok_s / fp_tok_s:.2f}x); no retraining",
                        {"precision": prec, "fp32_cached_tok_s": fp_tok_s, "backend": current()}))
    return rows
