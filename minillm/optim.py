"""AdamW, the learning-rate schedule and gradient clipping.

AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
Algorithm 2), per parameter p with gradient g at step t = 1, 2, ...:

    p <- p - lr * wd * p                    decoupled decay (not added to g)
    m <- b1 * m + (1 - b1) * g              first moment
    v <- b2 * v + (1 - b2) * g^2            second moment
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

This is what ``torch.optim.AdamW`` computes (tests check one step against it).
Which parameters decay is the rule in ``decays``. Arrays are updated in place,
so the same code runs on NumPy and CuPy arrays (``xp_of``).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import kernel, to_numpy, xp_of
from .checks import check_float, check_int

# Parameters that are looked up, not multiplied: never decayed.
EMBEDDINGS = ("wte.weight", "wpe.weight")


def decays(name: str, array) -> bool:
    """Weight decay applies to 2-D matmul weights only.

    Biases and LayerNorm gains/shifts (1-D) and the embeddings ``wte``/``wpe``
    are not decayed: shrinking them toward zero is no regulariser, it moves
    their fixed point (the GPT-2 / nanoGPT convention, minus embeddings).
    """
    return array.ndim == 2 and name not in EMBEDDINGS


class AdamW:
    """AdamW over a dict of parameters ``{name: array}``.

    ``step(params, grads, lr)`` updates ``params`` in place. State: the moments
    ``m`` and ``v`` (same names, shapes, dtypes and device as the parameters)
    and ``t``, the number of steps taken.
    """

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1):
        _check_hparams(lr, betas, eps, weight_decay)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.m = {k: xp_of(p).zeros_like(p) for k, p in params.items()}
        self.v = {k: xp_of(p).zeros_like(p) for k, p in params.items()}
        self.t = 0

    def step(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """One AdamW update of every parameter in ``params`` (in place)."""
        if set(grads) != set(self.m) or set(params) != set(self.m):
            raise ValueError(f"params/grads names must equal the optimizer's "
                             f"({len(self.m)} names); got {len(params)} params, {len(grads)} grads")
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.t += 1
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t        # bias corrections
        for name, p in params.items():
            wd = self.weight_decay if decays(name, p) else 0.0
            adamw_update(p, grads[name], self.m[name], self.v[name],
                         lr, b1, b2, bc1, bc2, self.eps, wd)

    # --- state for checkpoints ----------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat ``{"m.<name>": array, "v.<name>": array, "step": int64 (1,)}`` (NumPy)."""
        state = {f"m.{k}": to_numpy(a) for k, a in self.m.items()}
        state.update({f"v.{k}": to_numpy(a) for k, a in self.v.items()})
        state["step"] = np.array([self.t], dtype=np.int64)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output; names, shapes and dtypes must match."""
        expected = {f"{s}.{k}": a for s, d in (("m", self.m), ("v", self.v)) for k, a in d.items()}
        missing = sorted(set(expected) - set(state) | ({"step"} - set(state)))
        unexpected = sorted(set(state) - set(expected) - {"step"})
        if missing or unexpected:
            raise ValueError(f"optimizer state does not match the parameters: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, ref in expected.items():
            got = state[key]
            if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
                raise ValueError(f"optimizer state {key!r} is {got.dtype}{tuple(got.shape)}, "
                                 f"parameters need {ref.dtype}{tuple(ref.shape)}")
        step = np.asarray(to_numpy(state["step"])).reshape(-1)
        if step.size != 1 or step.dtype.kind not in "iu" or step[0] < 0:
            raise ValueError(f"optimizer state 'step' must be one int >= 0, got {step!r}")
        for key, ref in expected.items():
            ref[...] = xp_of(ref).asarray(state[key])        # into the existing arrays
        self.t = int(step[0])


@kernel("optim.adamw_update")
def adamw_update(p, g, m, v, lr, b1, b2, bc1, bc2, eps, wd) -> None:
    """One AdamW update of one parameter, in place (the equations at the top).

    p, g, m, v: the parameter, its gradient and its two moments, one shape and
    dtype; bc1 = 1 - b1^t and bc2 = 1 - b2^t, the bias corrections; wd: the
    weight decay of this parameter (0: not decayed). Writes p, m and v.
    """
    xp = xp_of(p)
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * (g * g)
    if wd:
        p *= 1 - lr * wd                                      # decoupled: before the Adam step
    p -= lr * (m / bc1) / (xp.sqrt(v / bc2) + eps)


def _check_hparams(lr, betas, eps, weight_decay) -> None:
    check_float("lr", lr, 0)
    if len(tuple(betas)) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas={betas!r} must be two numbers in [0, 1)")
    check_float("eps", eps, 0, lo_open=True)
    check_float("weight_decay", weight_decay, 0)


def lr_schedule(step: int, max_lr: float, min_lr: float, warmup_steps: int,
                total_steps: int) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then cosine decay.

    Steps ``0 .. warmup_steps - 1`` ramp linearly up to ``max_lr`` (step
    ``warmup_steps - 1`` is the first at ``max_lr``); then a half cosine
    (Loshchilov & Hutter 2017, SGDR) falls from ``max_lr`` at ``warmup_steps``
    to ``min_lr`` at ``total_steps``, and stays at ``min_lr`` afterwards.
    """
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"min_lr={min_lr!r} and max_lr={max_lr!r} must satisfy 0 <= min_lr <= max_lr")
    for name, value, lo in (("step", step, 0), ("warmup_steps", warmup_steps, 0),
                            ("total_steps", total_steps, 1)):
        check_int(name, value, lo)
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)   # in [0, 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def grad_norm(grads: dict) -> float:
    """Global L2 norm of all gradients together (float64 sum of squares)."""
    return math.sqrt(sum(float(xp_of(g).sum(g.astype(np.float64) ** 2)) for g in grads.values()))


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all ``grads`` in place so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping (what training logs). Gradients already
    within the bound are left untouched.
    """
    check_float("max_norm", max_norm, 0, lo_open=True)
    total = grad_norm(grads)
    if total > max_norm:
        scale = max_norm / total
        for g in grads.values():
            g *= scale
    return total
