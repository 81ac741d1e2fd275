"""The training loop: batches -> loss and grads -> clip -> AdamW, with eval,
checkpoints and an exact resume; the step has hooks for every technique.

One step (``train_step``), and where a ``TrainHook`` plugs in:

    B = hook.batch_size(step, B)              per-step batch size (adaptive batching)
    x, y = batch of step s                    micro-batches of ``micro_batch_size`` rows,
    loss, grads = hook.loss_and_grads(...)      gradients accumulated (weighted by rows);
                  or model.loss_and_grads       the first hook that returns one supplies the loss
    grads = hook.transform_grads(grads, ...)  in hook order: all-reduce, unscale, ...;
                                              then ``ClipGradNorm`` (grad_clip) unless a hook is one
    if any hook.skip(...): no update          (an fp16 overflow)
    AdamW update of ``model.trainable()``
    hook.after_update(model, ...)             (re-apply pruning masks)

The model's kinds may bring hooks of their own (``seams.LinearKind.train_hooks``:
a pruned layer's mask), which run first. Hooks add numbers to the step's record (it lands in the history) and keep
state through ``state_dict`` / ``load_state_dict``, saved in the checkpoint
(``hooks.safetensors``), so a resumed run with stateful hooks is still exact.

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
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import checkpoint
from .data import get_batch
from .backend import to_numpy
from .optim import AdamW, grad_norm, lr_schedule

from .checks import check_choice, check_float, check_int

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
    micro_batch_size    rows per forward/backward; a larger step batch is split and its
                        gradients accumulated (None: the whole batch at once)
    precision           "fp32", or "fp16" / "bf16": half-precision compute on fp32 master
                        weights (fp16 with a loss scaler), see ``minillm.precision``
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
    micro_batch_size: int | None = None
    precision: str = "fp32"

    def __post_init__(self):
        ints = (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("eval_interval", 0),
                ("eval_batches", 1), ("checkpoint_interval", 0), ("seed", 0))
        for name, lo in ints:
            object.__setattr__(self, name, check_int(name, getattr(self, name), lo))
        for name in ("seq_len", "micro_batch_size"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        check_float("lr", self.lr, 0, lo_open=True)
        if self.min_lr is not None:
            check_float("min_lr", self.min_lr, 0, self.lr)
        check_float("weight_decay", self.weight_decay, 0)
        if self.grad_clip is not None:
            check_float("grad_clip", self.grad_clip, 0)               # 0 disables
        check_float("eps", self.eps, 0, lo_open=True)
        check_choice("precision", self.precision, ("fp32", "fp16", "bf16"))
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


# --- hooks: the seams of the training step ------------------------------------------------
class TrainHook:
    """One technique's part of the training step; override only what it needs.

    ``name`` keys the hook's state in the checkpoint (unique among the hooks of
    a run). ``record`` is the step's history record: a hook may add JSON-able
    numbers to it (and read what earlier hooks wrote, e.g. ``grad_norm``).
    """

    name = "hook"

    def batch_size(self, step: int, batch_size: int) -> int:
        """Rows of the batch of 0-based ``step`` (``batch_size``: what earlier hooks chose)."""
        return batch_size

    def loss_and_grads(self, model, x, y, step: int):
        """``(loss, grads)`` for one (micro-)batch, or None to leave it to the next hook
        (and finally to ``model.loss_and_grads``). grads: ``model.trainable()``'s keys."""
        return None

    def transform_grads(self, grads: dict, step: int, record: dict) -> dict:
        """Return the gradients to use (unscaled, all-reduced, clipped, ...)."""
        return grads

    def skip(self, step: int, record: dict) -> bool:
        """True to skip this step's parameter update (e.g. the gradients overflowed)."""
        return False

    def after_update(self, model, step: int, record: dict) -> None:
        """Runs after the optimizer updated the parameters (e.g. re-apply masks)."""

    def state_dict(self) -> dict:
        """``{key: ndarray}``: what this hook must carry across a checkpoint for an exact resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output (called on resume before the first step)."""


def kind_hooks(model) -> list:
    """The training hooks the model's linear and attention kinds always need."""
    if model is None:
        return []
    from . import seams
    cfg = model.config
    return (list(seams.linear_kind(cfg.linear).train_hooks(model))
            + list(seams.attention_kind(cfg.attention).train_hooks(model)))


class ClipGradNorm(TrainHook):
    """Scale all gradients so their global L2 norm is at most ``max_norm`` (None: only
    measure it); records ``grad_norm`` (before clipping). ``norm`` computes the global
    norm (tensor parallelism passes one that sums over ranks)."""

    name = "clip"

    def __init__(self, max_norm: float | None, norm=grad_norm):
        self.max_norm, self.norm = max_norm or None, norm

    def transform_grads(self, grads, step, record):
        total = self.norm(grads)
        # (an inf/nan norm: nothing to clip; the step is skipped or training diverged)
        if self.max_norm is not None and math.isfinite(total) and total > self.max_norm:
            scale = self.max_norm / total
            for g in grads.values():
                g *= scale
        record["grad_norm"] = float(total)
        return grads


def step_hooks(tcfg: "TrainConfig", hooks=(), model=None) -> list:
    """The run's hooks in order: those the model's kinds need (``seams``' ``train_hooks``),
    the precision's (``tcfg.precision``: fp16/bf16 compute, loss scaling), the given
    ones, then ``ClipGradNorm(tcfg.grad_clip)`` unless one of them clips already.
    Names must be unique (they key saved state)."""
    from .precision import precision_hooks
    hooks = kind_hooks(model) + precision_hooks(tcfg.precision) + list(hooks)
    for h in hooks:
        if not isinstance(h, TrainHook):
            raise ValueError(f"hooks must be TrainHook instances, got {type(h).__name__}")
    if not any(isinstance(h, ClipGradNorm) for h in hooks):
        hooks.append(ClipGradNorm(tcfg.grad_clip))
    names = [h.name for h in hooks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise ValueError(f"hook names {names} must be distinct identifiers (they key the "
                         f"checkpoint's hook state); repeated: {dup}")
    return hooks


def evaluate(model, data, batch_size: int, seq_len: int, n_batches: int, seed: int = 0) -> float:
    """Mean loss over ``n_batches`` batches of ``data`` drawn with ``default_rng(seed)``.

    The same arguments give the same batches, so evaluations at different
    steps (or of different models) are comparable.
    """
    check_int("n_batches", n_batches, 1)
    rng = np.random.default_rng(seed)
    losses = [model.loss(*get_batch(data, batch_size, seq_len, rng)) for _ in range(n_batches)]
    return float(np.mean(losses))


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator that draws the batch of 0-based ``step``: a pure function of (seed, step)."""
    return np.random.default_rng([seed, step])


def train(model, train_data, val_data, tcfg: TrainConfig, out_dir=None, resume: bool = False,
          progress: bool = True, tokenizer=None, log: Callable[[dict], None] | None = None,
          hooks=()) -> TrainResult:
    """Train ``model`` in place on ``train_data`` (1-D int ids) for ``tcfg.steps`` steps.

    ``val_data`` (or None) is evaluated every ``tcfg.eval_interval`` steps and at
    the end. With ``out_dir`` a checkpoint is written every
    ``tcfg.checkpoint_interval`` steps and at the end (plus ``tokenizer.model``
    if ``tokenizer`` is given). ``resume=True`` loads the checkpoint in
    ``out_dir`` and continues from its step exactly: the train config must be
    the saved one except ``steps``, ``eval_*`` and ``checkpoint_interval``
    (a new ``steps`` extends the run; the cosine then spans the new total).
    ``log`` is called with every step's and evaluation's record. ``hooks``:
    ``TrainHook``s that change the step (see the module docstring); their state
    is saved with every checkpoint and restored on resume.
    """
    seq_len = _check_train_args(model, train_data, val_data, tcfg, out_dir, resume)
    hooks = step_hooks(tcfg, hooks, model)
    opt = AdamW(model.trainable(), lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps,
                weight_decay=tcfg.weight_decay)
    history, evals, start = ([], [], 0)
    if resume:
        history, evals, start = _restore(model, opt, tcfg, out_dir, hooks)
    t0 = time.perf_counter()
    with _progress_bar(tcfg.steps, start, progress) as bar:
        for step in range(start, tcfg.steps):
            record = train_step(model, opt, train_data, tcfg, seq_len, step, hooks)
            history.append(record)
            _emit(log, record)
            done, last = step + 1, step + 1 == tcfg.steps
            postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:,.0f}"}
            if val_data is not None and _due(done, tcfg.eval_interval, last):
                evals.append(_evaluate_record(model, val_data, tcfg, seq_len, done))
                _emit(log, evals[-1])
                postfix["val"] = f"{evals[-1]['val_loss']:.4f}"
            if out_dir is not None and _due(done, tcfg.checkpoint_interval, last):
                save_checkpoint(out_dir, model, opt, tcfg, done, history, evals, tokenizer, hooks)
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
    return TrainResult(history, evals, time.perf_counter() - t0, model, start)


def train_step(model, opt: AdamW, train_data, tcfg: TrainConfig, seq_len: int, step: int,
               hooks=None) -> dict:
    """One update (0-based ``step``): batch, loss and grads, hooks, AdamW -> the step's record.

    ``hooks``: the run's hooks in order (``step_hooks``; None: just the clipping of
    ``tcfg.grad_clip``).
    """
    hooks = step_hooks(tcfg, model=model) if hooks is None else hooks
    t0 = time.perf_counter()
    B = tcfg.batch_size
    for h in hooks:
        B = check_int(f"batch size from hook {h.name!r}", h.batch_size(step, B), 1)
    x, y = get_batch(train_data, B, seq_len, batch_rng(tcfg.seed, step))          # (B, T)
    loss, grads = accumulated_loss_and_grads(model, x, y, step, hooks, tcfg.micro_batch_size)
    if not math.isfinite(loss):
        raise RuntimeError(f"loss is {loss} at step {step + 1}: training diverged; "
                           f"try a lower lr (now {tcfg.lr}) or grad_clip")
    lr = tcfg.lr_at(step)
    record = {"step": step + 1, "loss": float(loss), "lr": float(lr), "batch_size": B}
    for h in hooks:
        grads = h.transform_grads(grads, step, record)
        _check_grads(grads, model, f"hook {h.name!r} transform_grads")
    record["skipped"] = any([bool(h.skip(step, record)) for h in hooks])
    if not record["skipped"]:
        opt.step(model.trainable(), grads, lr)
        for h in hooks:
            h.after_update(model, step, record)
    dt = time.perf_counter() - t0
    record["tokens_per_s"] = float(x.size / dt) if dt > 0 else float("inf")
    return record


def accumulated_loss_and_grads(model, x, y, step: int, hooks=(), micro_batch_size=None):
    """Loss and grads of the batch x, y (B, T), in micro-batches of at most
    ``micro_batch_size`` rows whose gradients are summed with weights rows / B
    (equal, up to rounding, to the whole batch at once: the loss is a mean)."""
    B = x.shape[0]
    size = B if micro_batch_size is None else min(micro_batch_size, B)
    loss, grads = 0.0, None
    for r0 in range(0, B, size):
        xm, ym = x[r0:r0 + size], y[r0:r0 + size]
        lm, gm = _loss_and_grads(model, xm, ym, step, hooks)
        w = xm.shape[0] / B
        loss += w * lm
        if grads is None:
            grads = gm if w == 1 else {k: g * g.dtype.type(w) for k, g in gm.items()}
        else:
            for k, g in gm.items():
                grads[k] += g * g.dtype.type(w)
    return loss, grads


def _loss_and_grads(model, x, y, step, hooks):
    """The first hook's loss that answers, else the model's cross-entropy."""
    for h in hooks:
        out = h.loss_and_grads(model, x, y, step)
        if out is not None:
            loss, grads = out
            _check_grads(grads, model, f"hook {h.name!r} loss_and_grads")
            return float(loss), grads
    return model.loss_and_grads(x, y)


def _check_grads(grads, model, who: str) -> None:
    """Gradients must name exactly the trainable parameters, with their shapes."""
    if not isinstance(grads, dict):
        raise ValueError(f"{who} returned {type(grads).__name__}, not a dict of gradients")
    want = model.trainable()
    if set(grads) != set(want):
        raise ValueError(f"{who} returned gradients for the wrong keys: missing "
                         f"{sorted(set(want) - set(grads))[:5]}, unexpected {sorted(set(grads) - set(want))[:5]}")
    bad = [k for k, g in grads.items() if tuple(g.shape) != tuple(want[k].shape)]
    if bad:
        raise ValueError(f"{who} returned gradient {bad[0]!r} of shape {tuple(grads[bad[0]].shape)}; "
                         f"the parameter is {tuple(want[bad[0]].shape)}")


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
                    history: list, evals: list, tokenizer=None, hooks=()) -> None:
    """Write the resumable state after ``step`` updates to ``out_dir`` (atomically)."""
    meta = {"step": step, "train_config": tcfg.to_dict(), "history": history, "evals": evals,
            "rng": {"scheme": "batch of step s ~ numpy default_rng([seed, s])", "seed": tcfg.seed},
            "tokenizer": TOKENIZER_FILE if tokenizer is not None else None,
            "hooks": [h.name for h in hooks]}
    files = {TOKENIZER_FILE: tokenizer.save} if tokenizer is not None else None
    extra = {"optimizer": opt.state_dict()}
    state = hook_state(hooks)
    if state:                                # (safetensors cannot hold an empty file)
        extra["hooks"] = state
    model.save(out_dir, extra=extra, meta=meta, files=files)


def hook_state(hooks) -> dict:
    """``{"<hook name>.<key>": array}`` of every hook's ``state_dict`` (checked)."""
    out = {}
    for h in hooks:
        state = h.state_dict()
        if not isinstance(state, dict) or not all(isinstance(k, str) and hasattr(v, "dtype")
                                                  for k, v in state.items()):
            raise ValueError(f"hook {h.name!r} state_dict() must return {{str: array}}, got {state!r:.80}")
        out.update({f"{h.name}.{k}": np.asarray(to_numpy(v)) for k, v in state.items()})
    return out


def _restore_hooks(hooks, saved: dict, names: list, out_dir) -> None:
    if names != [h.name for h in hooks]:
        raise ValueError(f"checkpoint {str(out_dir)!r} was trained with hooks {names}, not "
                         f"{[h.name for h in hooks]}: it cannot be resumed exactly with others")
    for h in hooks:
        prefix = h.name + "."
        state = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
        want = set(h.state_dict())
        if set(state) != want:
            raise ValueError(f"checkpoint {str(out_dir)!r}: hook {h.name!r} saved state keys "
                             f"{sorted(state)}, it now has {sorted(want)}")
        h.load_state_dict(state)


def _restore(model, opt: AdamW, tcfg: TrainConfig, out_dir, hooks=()) -> tuple[list, list, int]:
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
    xp, params = model.xp, saved.params
    if hasattr(model, "shard_state"):         # a tensor-parallel rank keeps its slices (minillm.parallel)
        params, state = model.shard_state(params, state)
    for name, array in params.items():
        model.params[name][...] = xp.asarray(array)           # in place: keeps the arrays
    opt.load_state_dict(state)
    _restore_hooks(hooks, checkpoint.load_extra(out_dir, "hooks") or {},
                   meta.get("hooks", [h.name for h in hooks]), out_dir)
    step = int(meta["step"])
    updates = sum(not h.get("skipped", False) for h in meta["history"])   # skipped steps made none
    if opt.t != updates or len(meta["history"]) != step:
        raise ValueError(f"checkpoint {str(out_dir)!r} is inconsistent: meta step {step}, "
                         f"{len(meta['history'])} history records, {updates} updates, "
                         f"optimizer step {opt.t}")
    return list(meta["history"]), list(meta["evals"]), step


def _check_same_run(saved: TrainConfig, tcfg: TrainConfig, out_dir) -> None:
    diff = [f"{k}: saved {v!r}, now {getattr(tcfg, k)!r}" for k, v in vars(saved).items()
            if k not in _RESUME_FREE and getattr(tcfg, k) != v]
    if diff:
        raise ValueError(f"cannot resume {str(out_dir)!r} with a different train config "
                         f"({'; '.join(diff)}); only {', '.join(_RESUME_FREE)} may change")


class _CallableModule(types.ModuleType):
    """``mm.train(model, train_ids, val_ids, tcfg, ...)`` calls ``train`` while
    ``minillm.train`` stays this module (``from minillm.train import TrainConfig``)."""

    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
