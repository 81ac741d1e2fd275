"""The training loop: batches -> loss and grads -> clip -> AdamW, with eval,
checkpoints and an exact resume.

Reproducibility: the batch of step ``s`` is drawn from
``np.random.default_rng([seed, s])``, so no RNG state has to be carried across
steps or saved: a run resumed from the checkpoint of step ``k`` (parameters,
AdamW moments and step count) draws the same batches and sees the same
learning rates as the run that was never stopped, and its losses are equal
bit for bit. Evaluation uses its own fixed batches (``evaluate``), so it never
disturbs training.

A checkpoint is the directory ``out_dir`` (see ``minillm.checkpoint``):
``model.safetensors``, ``config.json``, ``optimizer.safetensors`` (AdamW m, v,
step), ``meta.json`` (step, train config, history, evals) and, when a
tokenizer is given, ``tokenizer.model``; all swapped in at once.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import checkpoint
from .data import get_batch
from .optim import AdamW, clip_grad_norm, grad_norm, lr_schedule

TOKENIZER_FILE = "tokenizer.model"
# Fields that may differ between a run and its resume without changing the losses.
_RESUME_FREE = ("steps", "eval_interval", "eval_batches", "checkpoint_interval")


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's shape is ``GPTConfig``'s business).

    steps               optimizer updates in the whole run
    batch_size          B sequences per step
    seq_len             T tokens per sequence; None -> the model's block_size
    lr, min_lr          peak and final learning rate; min_lr None -> lr / 10
    warmup_steps        linear warmup steps before the cosine decay
    weight_decay        AdamW decoupled decay (2-D matmul weights only)
    grad_clip           max global L2 norm of the gradients; None or 0 -> no clipping
    betas, eps          AdamW moment decay rates and denominator epsilon
    eval_interval       evaluate every this many steps (and after the last); 0 -> only at the end
    eval_batches        batches per evaluation (fixed, so evaluations compare)
    checkpoint_interval save every this many steps (and after the last); 0 -> only at the end
    seed                seeds the batches (step s uses default_rng([seed, s]))
    """

    steps: int = 1000
    batch_size: int = 8
    seq_len: int | None = None
    lr: float = 3e-3
    min_lr: float | None = None
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 0
    seed: int = 0

    def __post_init__(self):
        ints = (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("eval_interval", 0),
                ("eval_batches", 1), ("checkpoint_interval", 0), ("seed", 0))
        for name, lo in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"{name}={value!r} must be an int >= {lo}")
            object.__setattr__(self, name, int(value))
        if self.seq_len is not None and (isinstance(self.seq_len, bool)
                                         or not isinstance(self.seq_len, (int, np.integer))
                                         or self.seq_len < 1):
            raise ValueError(f"seq_len={self.seq_len!r} must be an int >= 1 or None")
        _check_number("lr", self.lr, lambda x: x > 0, "> 0")
        if self.min_lr is not None:
            _check_number("min_lr", self.min_lr, lambda x: 0 <= x <= self.lr, f"in [0, lr={self.lr}]")
        _check_number("weight_decay", self.weight_decay, lambda x: x >= 0, ">= 0")
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, lambda x: x >= 0, ">= 0 (0 disables)")
        _check_number("eps", self.eps, lambda x: x > 0, "> 0")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas={self.betas!r} must be two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step`` (warmup + cosine to min_lr)."""
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        return lr_schedule(step, self.lr, min_lr, self.warmup_steps, self.steps)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict):
            raise ValueError(f"train config must be a JSON object, got {type(d).__name__}")
        if set(d) - known:
            raise ValueError(f"train config has unknown fields {sorted(set(d) - known)}")
        return cls(**{**d, "betas": tuple(d.get("betas", cls.betas))})


def _check_number(name, value, ok, rule) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}={value!r} must be a number {rule}")


@dataclass
class TrainResult:
    """What ``train`` returns.

    history      one dict per step: {step, loss, lr, grad_norm, tokens_per_s}
                 (``step`` counts updates done, 1 .. steps; includes steps before a resume)
    evals        one dict per evaluation: {step, val_loss, val_ppl}
    wall_time_s  seconds spent in this call
    model        the trained model (the object passed in, updated in place)
    start_step   the step this call started from (0, or the resumed checkpoint's)
    """

    history: list[dict]
    evals: list[dict]
    wall_time_s: float
    model: object
    start_step: int = 0

    @property
    def losses(self) -> list[float]:
        """Training loss of every step, in order."""
        return [h["loss"] for h in self.history]

    @property
    def tokens_per_s(self) -> float | None:
        """Median training throughput of the steps this call ran (None if it ran none)."""
        new = [h["tokens_per_s"] for h in self.history[self.start_step:]]
        return float(np.median(new)) if new else None

    @property
    def val_loss(self) -> float | None:
        """The last validation loss, or None if there was no evaluation."""
        return self.evals[-1]["val_loss"] if self.evals else None


def evaluate(model, data, batch_size: int, seq_len: int, n_batches: int, seed: int = 0) -> float:
    """Mean loss over ``n_batches`` batches of ``data`` drawn with ``default_rng(seed)``.

    The same arguments give the same batches, so evaluations at different
    steps (or of different models) are comparable.
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, (int, np.integer)) or n_batches < 1:
        raise ValueError(f"n_batches={n_batches!r} must be an int >= 1")
    rng = np.random.default_rng(seed)
    losses = [model.loss(*get_batch(data, batch_size, seq_len, rng)) for _ in range(n_batches)]
    return float(np.mean(losses))


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator that draws the batch of 0-based ``step``: a pure function of (seed, step)."""
    return np.random.default_rng([seed, step])


def train(model, train_data, val_data, tcfg: TrainConfig, out_dir=None, resume: bool = False,
          progress: bool = True, tokenizer=None, log: Callable[[dict], None] | None = None
          ) -> TrainResult:
    """Train ``model`` in place on ``train_data`` (1-D int ids) for ``tcfg.steps`` steps.

    ``val_data`` (or None) is evaluated every ``tcfg.eval_interval`` steps and at
    the end. With ``out_dir`` a checkpoint is written every
    ``tcfg.checkpoint_interval`` steps and at the end (plus ``tokenizer.model``
    if ``tokenizer`` is given). ``resume=True`` loads the checkpoint in
    ``out_dir`` and continues from its step exactly: the train config must be
    the saved one except ``steps``, ``eval_*`` and ``checkpoint_interval``
    (a new ``steps`` extends the run; the cosine then spans the new total).
    ``log`` is called with every step's and evaluation's record.
    """
    seq_len = _check_train_args(model, train_data, val_data, tcfg, out_dir, resume)
    opt = AdamW(model.params, lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps,
                weight_decay=tcfg.weight_decay)
    history, evals, start = ([], [], 0)
    if resume:
        history, evals, start = _restore(model, opt, tcfg, out_dir)
    t0 = time.perf_counter()
    with _progress_bar(tcfg.steps, start, progress) as bar:
        for step in range(start, tcfg.steps):
            record = train_step(model, opt, train_data, tcfg, seq_len, step)
            history.append(record)
            _emit(log, record)
            done, last = step + 1, step + 1 == tcfg.steps
            postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:,.0f}"}
            if val_data is not None and _due(done, tcfg.eval_interval, last):
                evals.append(_evaluate_record(model, val_data, tcfg, seq_len, done))
                _emit(log, evals[-1])
                postfix["val"] = f"{evals[-1]['val_loss']:.4f}"
            if out_dir is not None and _due(done, tcfg.checkpoint_interval, last):
                save_checkpoint(out_dir, model, opt, tcfg, done, history, evals, tokenizer)
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
    return TrainResult(history, evals, time.perf_counter() - t0, model, start)


def train_step(model, opt: AdamW, train_data, tcfg: TrainConfig, seq_len: int, step: int) -> dict:
    """One update (0-based ``step``): batch, loss and grads, clip, AdamW -> the step's record."""
    t0 = time.perf_counter()
    x, y = get_batch(train_data, tcfg.batch_size, seq_len, batch_rng(tcfg.seed, step))  # (B, T)
    loss, grads = model.loss_and_grads(x, y)
    if not math.isfinite(loss):
        raise RuntimeError(f"loss is {loss} at step {step + 1}: training diverged; "
                           f"try a lower lr (now {tcfg.lr}) or grad_clip")
    if tcfg.grad_clip:
        norm = clip_grad_norm(grads, tcfg.grad_clip)
    else:
        norm = grad_norm(grads)
    lr = tcfg.lr_at(step)
    opt.step(model.params, grads, lr)
    dt = time.perf_counter() - t0
    return {"step": step + 1, "loss": float(loss), "lr": float(lr), "grad_norm": float(norm),
            "tokens_per_s": float(x.size / dt) if dt > 0 else float("inf")}


def _evaluate_record(model, val_data, tcfg: TrainConfig, seq_len: int, step: int) -> dict:
    val_loss = evaluate(model, val_data, tcfg.batch_size, seq_len, tcfg.eval_batches, tcfg.seed)
    return {"step": step, "val_loss": val_loss, "val_ppl": float(math.exp(min(val_loss, 700.0)))}


def _due(done: int, interval: int, last: bool) -> bool:
    """Every ``interval`` steps (0: never) and always after the last one."""
    return last or (interval > 0 and done % interval == 0)


def _emit(log, record: dict) -> None:
    if log is not None:
        log(dict(record))


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train",
                unit="step", dynamic_ncols=True)


def _check_train_args(model, train_data, val_data, tcfg, out_dir, resume) -> int:
    """Validate at the boundary; return the sequence length to use."""
    if not isinstance(tcfg, TrainConfig):
        raise ValueError(f"tcfg must be a TrainConfig, got {type(tcfg).__name__}")
    block = model.config.block_size
    seq_len = block if tcfg.seq_len is None else tcfg.seq_len
    if seq_len > block:
        raise ValueError(f"seq_len={seq_len} must be <= the model's block_size={block}")
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is None and name == "val_data":
            continue
        data = np.asarray(data)
        if data.ndim != 1 or data.dtype.kind not in "iu":
            raise ValueError(f"{name} must be a 1-D integer array, got dtype {data.dtype} "
                             f"shape {data.shape}")
        if len(data) <= seq_len:
            raise ValueError(f"{name} has {len(data)} ids; seq_len={seq_len} needs more than that")
        if data.min() < 0 or data.max() >= model.config.vocab_size:
            raise ValueError(f"{name} has ids outside [0, vocab_size={model.config.vocab_size})")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the checkpoint to continue from)")
    return seq_len


# --- checkpoints ------------------------------------------------------------------
def save_checkpoint(out_dir, model, opt: AdamW, tcfg: TrainConfig, step: int,
                    history: list, evals: list, tokenizer=None) -> None:
    """Write the resumable state after ``step`` updates to ``out_dir`` (atomically)."""
    meta = {"step": step, "train_config": tcfg.to_dict(), "history": history, "evals": evals,
            "rng": {"scheme": "batch of step s ~ numpy default_rng([seed, s])", "seed": tcfg.seed},
            "tokenizer": TOKENIZER_FILE if tokenizer is not None else None}
    files = {TOKENIZER_FILE: tokenizer.save} if tokenizer is not None else None
    model.save(out_dir, extra={"optimizer": opt.state_dict()}, meta=meta, files=files)


def _restore(model, opt: AdamW, tcfg: TrainConfig, out_dir) -> tuple[list, list, int]:
    """Load parameters, optimizer state and history from ``out_dir`` into ``model``/``opt``."""
    out_dir = Path(out_dir)
    saved = checkpoint.load(out_dir)
    if saved.config != model.config:
        raise ValueError(f"checkpoint {str(out_dir)!r} holds a model with config "
                         f"{saved.config}, not the model's {model.config}")
    meta, state = checkpoint.load_meta(out_dir), checkpoint.load_extra(out_dir, "optimizer")
    if meta is None or state is None or "step" not in meta:
        raise ValueError(f"checkpoint {str(out_dir)!r} has no optimizer state or meta.json "
                         f"step: it was not written by train() and cannot be resumed")
    _check_same_run(TrainConfig.from_dict(meta["train_config"]), tcfg, out_dir)
    xp = model.xp
    for name, array in saved.params.items():
        model.params[name][...] = xp.asarray(array)           # in place: keeps the arrays
    opt.load_state_dict(state)
    step = int(meta["step"])
    if opt.t != step:
        raise ValueError(f"checkpoint {str(out_dir)!r} is inconsistent: meta step {step}, "
                         f"optimizer step {opt.t}")
    return list(meta["history"]), list(meta["evals"]), step


def _check_same_run(saved: TrainConfig, tcfg: TrainConfig, out_dir) -> None:
    diff = [f"{k}: saved {v!r}, now {getattr(tcfg, k)!r}" for k, v in vars(saved).items()
            if k not in _RESUME_FREE and getattr(tcfg, k) != v]
    if diff:
        raise ValueError(f"cannot resume {str(out_dir)!r} with a different train config "
                         f"({'; '.join(diff)}); only {', '.join(_RESUME_FREE)} may change")
