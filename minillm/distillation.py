"""Knowledge distillation: a small student learns the teacher's whole next-token
distribution, not just the one token the corpus wrote.

What it changes against the baseline: only the loss. Training is the ordinary
loop (``minillm.train.train``); a ``DistillHook`` replaces the cross-entropy
of a step by the distillation loss, through the loss seam
(``GPT.forward_train`` -> logits, ``GPT.backward(dlogits)`` -> grads). The
teacher runs forward only (no cache, no gradients); checkpoints, evaluation
and the exact resume come from ``train`` unchanged.

The loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network"), for student logits z_s and teacher logits z_t (..., V), targets y,
p_T(z) = softmax(z / T), means over the N positions:

    kind="forward":  alpha * T^2 * KL(p_T(z_t) || p_T(z_s)) + (1 - alpha) * CE(z_s, y)
    kind="reverse":  alpha * T^2 * KL(p_T(z_s) || p_T(z_t)) + (1 - alpha) * CE(z_s, y)

Why T^2: d KL / d z_s scales as 1/T (the logits are divided by T), and the
soft targets' differences shrink as 1/T again for large T, so the soft term's
gradient falls as 1/T^2 (Hinton et al., sec. 2); T^2 keeps its weight
against the hard term when T changes. The gradients (per position, / N):

    forward:  T * (p_s - p_t)                                (like CE's p - onehot)
    reverse:  T * p_s * (r - sum_v p_s r),  r = log p_s - log p_t

Forward KL makes the student cover every mode of the teacher; reverse KL
(Gu et al. 2023, "MiniLLM: Knowledge Distillation of Large Language Models")
makes it seek the modes and ignore the teacher's long tail, which generative
students are said to prefer.

Cost per student step: one teacher forward (2 * teacher params * B * T flops,
more than the student's whole step when the teacher is larger) and two more
softmaxes over (B, T, V). The alternative is to run the teacher once and keep
its top-k logits per position (``precompute_topk``): B * T * k values and ids
instead of B * T * V, at the price of a truncated (renormalised) teacher
distribution; only the forward KL is finite then (the teacher gives the rest
probability 0).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

import numpy as np

from . import layers
from .backend import to_numpy, xp_of
from .checks import check_choice, check_float, check_int
from .train import TrainConfig, TrainHook, batch_rng, train
from .tour import Row, TourContext, technique

KINDS = ("forward", "reverse")


# --- the loss: a forward/backward pair --------------------------------------------------
class KDCache(NamedTuple):
    """What ``kd_loss_backward`` needs. Kept: the student's softmax at T and the teacher's
    (forward) or the log-ratio r (reverse), (N, V), and the hard-target cache; nothing
    is recomputed. The soft arrays are None when alpha == 0."""
    p_s: np.ndarray              # (N, V) softmax(z_s / T)
    p_t: np.ndarray              # (N, V) softmax(z_t / T) (forward kind; else None)
    r: np.ndarray                # (N, V) log p_s - log p_t (reverse kind; else None)
    ce: layers.CrossEntropyCache | None   # hard targets' cache (None when alpha == 1)
    kl: object                   # the KL term (0-d), kept for logging only
    temperature: float
    alpha: float
    kind: str
    shape: tuple                 # the student logits' shape (..., V)
    dtype: np.dtype              # the student logits' dtype


def log_softmax(z, temperature: float = 1.0):
    """log softmax(z / T) over the last axis, computed stably (max subtracted)."""
    s = z / z.dtype.type(temperature)
    s = s - s.max(axis=-1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def kd_loss_forward(student_logits, teacher_logits, targets, temperature: float = 2.0,
                    alpha: float = 0.5, kind: str = "forward"):
    """The distillation loss (module docstring) -> (loss: 0-d array, KDCache).

    student_logits, teacher_logits (..., V) float; targets (...) int (may be None when
    alpha == 1). Teacher logits may be -inf (a truncated teacher, ``dense_logits``) for
    kind="forward": 0 * log 0 counts as 0. With alpha == 0 the teacher is not read.
    """
    T, alpha = _check_loss_args(student_logits, teacher_logits, targets, temperature, alpha, kind)
    V = student_logits.shape[-1]
    zs = layers.f32(student_logits).reshape(-1, V)                 # (N, V) float32 or wider
    N = zs.shape[0]
    loss, ps, pt, r, kl = 0.0, None, None, None, 0.0
    if alpha > 0:
        zt = layers.f32(teacher_logits).reshape(-1, V).astype(zs.dtype, copy=False)   # (N, V)
        ls, lt = log_softmax(zs, T), log_softmax(zt, T)            # (N, V) each
        ps, pt = np.exp(ls), np.exp(lt)                            # (N, V) each
        if kind == "forward":                                      # sum_v p_t (log p_t - log p_s)
            with np.errstate(invalid="ignore"):                    # 0 * -inf where p_t = 0
                kl = xp_of(zs).where(pt > 0, pt * (lt - ls), 0).sum() / N
        else:                                                      # sum_v p_s (log p_s - log p_t)
            r, pt = ls - lt, None                                  # (N, V)
            kl = (ps * r).sum() / N
        loss = alpha * T * T * kl
    ce = None
    if alpha < 1:
        ce_loss, ce = layers.cross_entropy_forward(zs, targets.reshape(-1))
        loss = loss + (1 - alpha) * ce_loss
    return loss, KDCache(ps, pt, r, ce, kl, T, alpha, kind, tuple(student_logits.shape),
                         student_logits.dtype)


def kd_loss_backward(dloss, cache: KDCache):
    """d loss / d student_logits (the student logits' shape and dtype)."""
    ps, pt, r, ce, _, T, alpha, kind, shape, dtype = cache
    dz = None
    if alpha > 0:
        scale = ps.dtype.type(float(dloss) * alpha * T / ps.shape[0])   # alpha T^2 * (1/T) / N
        if kind == "forward":
            dz = (ps - pt) * scale                                 # (N, V)
        else:
            dz = ps * (r - (ps * r).sum(axis=-1, keepdims=True)) * scale   # (N, V)
    if ce is not None:
        dce = layers.cross_entropy_backward(float(dloss) * (1 - alpha), ce,
                                            (ce.probs.shape[0], shape[-1]))   # (N, V)
        dz = dce if dz is None else dz + dce
    return dz.reshape(shape).astype(dtype, copy=False)


def _check_loss_args(student_logits, teacher_logits, targets, temperature, alpha, kind):
    T = check_float("temperature", temperature, 0, lo_open=True)
    alpha = check_float("alpha", alpha, 0, 1)
    check_choice("kind", kind, KINDS)
    for name, z in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not hasattr(z, "shape") or getattr(z, "dtype", np.dtype(int)).kind != "f" or z.ndim < 1:
            raise ValueError(f"{name} must be a float array (..., V), got {type(z).__name__} "
                             f"{getattr(z, 'dtype', '')}")
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise ValueError(f"student_logits shape {tuple(student_logits.shape)} must equal "
                         f"teacher_logits shape {tuple(teacher_logits.shape)} (same positions "
                         f"and vocabulary)")
    if not bool(np.isfinite(student_logits).all()):
        raise ValueError("student_logits must be finite")
    if bool(np.isnan(teacher_logits).any()) or bool((teacher_logits == np.inf).any()):
        raise ValueError("teacher_logits must not hold NaN or +inf")
    if kind == "reverse" and not bool(np.isfinite(teacher_logits).all()):
        raise ValueError("teacher_logits hold -inf (a truncated teacher): KL(student || teacher) "
                         "is infinite there; use kind='forward'")
    if alpha < 1:
        _check_targets(targets, student_logits.shape)
    return T, alpha


def _check_targets(targets, shape) -> None:
    if targets is None or not hasattr(targets, "dtype") or targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be an integer array of shape {tuple(shape[:-1])} when "
                         f"alpha < 1, got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal the logits' "
                         f"positions {tuple(shape[:-1])}")
    if int(targets.min()) < 0 or int(targets.max()) >= shape[-1]:
        raise ValueError(f"targets hold ids outside [0, V={shape[-1]})")


# --- a truncated teacher: its top-k logits, computed once ----------------------------------
class TopK(NamedTuple):
    """The teacher's k largest logits per position and their ids."""
    values: np.ndarray           # (..., k) float32
    indices: np.ndarray          # (..., k) int32


def topk_logits(logits, k: int) -> TopK:
    """The k largest logits of each position (..., V) -> TopK (..., k); order within k is free."""
    V = logits.shape[-1]
    k = check_int("k", k, 1, V)
    xp = xp_of(logits)
    idx = xp.argpartition(logits, V - k, axis=-1)[..., V - k:]            # (..., k)
    return TopK(xp.take_along_axis(logits, idx, axis=-1), idx.astype(np.int32))


def dense_logits(top: TopK, vocab_size: int):
    """TopK (..., k) -> logits (..., V) with -inf outside the kept ids (softmax renormalises)."""
    values, idx = top
    xp = xp_of(values)
    out = xp.full(tuple(values.shape[:-1]) + (vocab_size,), -np.inf, dtype=values.dtype)
    xp.put_along_axis(out, idx.astype(np.int64), values, axis=-1)         # (..., V)
    return out


def precompute_topk(teacher, train_ids, tcfg: TrainConfig, k: int, seq_len: int) -> TopK:
    """The teacher's top-k logits for the batches of every step of ``tcfg`` (drawn as
    ``train`` draws them) -> TopK (steps, B, T, k), on the host (float32 values, int32 ids)."""
    from .data import get_batch
    values, ids = [], []
    for step in range(tcfg.steps):
        x, _ = get_batch(train_ids, tcfg.batch_size, seq_len, batch_rng(tcfg.seed, step))
        top = topk_logits(teacher.forward(x), k)                           # (B, T, k)
        values.append(to_numpy(top.values).astype(np.float32))
        ids.append(to_numpy(top.indices))
    return TopK(np.stack(values), np.stack(ids))                           # (S, B, T, k)


# --- the training hook --------------------------------------------------------------------
class DistillHook(TrainHook):
    """The step's loss becomes ``kd_loss`` against ``teacher``'s logits (or a precomputed
    ``TopK`` table of the run's batches). Its state is its settings, so a resume with
    other settings is refused. Records ``kd_kl`` (the KL term, before alpha T^2) per step."""

    name = "distill"

    def __init__(self, teacher, temperature: float = 2.0, alpha: float = 0.5,
                 kind: str = "forward", table: TopK | None = None):
        self.teacher, self.table = teacher, table
        self.temperature = check_float("temperature", temperature, 0, lo_open=True)
        self.alpha = check_float("alpha", alpha, 0, 1)
        self.kind = check_choice("kind", kind, KINDS)
        if table is not None and kind != "forward":
            raise ValueError(f"kind={kind!r} with a top-k teacher: only kind='forward' is finite")
        self._rows, self._step, self._kl = 0, None, []

    def teacher_logits(self, model, x, step: int):
        """(B, T, V) logits of the teacher for this (micro-)batch (rows follow in order)."""
        if self._step != step:
            self._step, self._rows = step, 0
        r0, self._rows = self._rows, self._rows + x.shape[0]
        if self.table is None:
            return self.teacher.forward(x)
        xp = model.xp
        top = TopK(xp.asarray(self.table.values[step, r0:self._rows]),
                   xp.asarray(self.table.indices[step, r0:self._rows]))
        return dense_logits(top, model.config.vocab_size)

    def loss_and_grads(self, model, x, y, step):
        zt = self.teacher_logits(model, x, step) if self.alpha > 0 else None   # (B, T, V)
        zs, cache = model.forward_train(x)                                     # (B, T, V)
        y = model.check_idx(y, "targets")
        loss, kc = kd_loss_forward(zs, zs if zt is None else zt, y, self.temperature,
                                   self.alpha, self.kind)
        self._kl.append((x.shape[0], float(kc.kl)))
        return float(loss), model.backward(kd_loss_backward(1.0, kc), cache)

    def transform_grads(self, grads, step, record):
        rows = sum(n for n, _ in self._kl)
        record["kd_kl"] = sum(n * v for n, v in self._kl) / max(rows, 1)
        self._kl = []
        return grads

    def state_dict(self) -> dict:
        top_k = 0 if self.table is None else self.table.values.shape[-1]
        return {"temperature": np.array([self.temperature]), "alpha": np.array([self.alpha]),
                "kind": np.array([KINDS.index(self.kind)]), "top_k": np.array([top_k])}

    def load_state_dict(self, state: dict) -> None:
        saved = settings_of(state)
        now = settings_of(self.state_dict())
        if saved != now:
            raise ValueError(f"the checkpoint was distilled with {saved}; this run asks for "
                             f"{now}: resume with the same settings")


def settings_of(state: dict) -> dict:
    """A DistillHook state (saved in a checkpoint) as readable settings."""
    s = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in state.items()}
    return {"temperature": s["temperature"], "alpha": s["alpha"],
            "kind": KINDS[int(s["kind"])], "top_k": int(s["top_k"]) or None}


# --- the public call -----------------------------------------------------------------------
def distill(teacher, student_config, steps: int = 300, temperature: float = 2.0,
            alpha: float = 0.5, kind: str = "forward", seed: int = 0, **kwargs):
    """Train a student GPT of ``student_config`` on the teacher's soft targets -> the student.

    The run is ``distill_run``'s (see it for the keyword arguments: data, train
    config, top-k teacher, checkpoints); this returns only the trained student.
    """
    return distill_run(teacher, student_config, steps, temperature, alpha, kind, seed,
                       **kwargs).model


def distill_run(teacher, student_config, steps: int = 300, temperature: float = 2.0,
                alpha: float = 0.5, kind: str = "forward", seed: int = 0, *, tokenizer=None,
                train_ids=None, val_ids=None, train_config: TrainConfig | None = None,
                top_k: int | None = None, out_dir=None, resume: bool = False,
                progress: bool = False, log=None):
    """``distill``, returning ``minillm.train.TrainResult`` (history, evals, the student).

    Data: ``train_ids`` (and ``val_ids``), else the embedded corpus encoded with
    ``tokenizer`` (the teacher's; 90/10 split), else raw bytes if the teacher's
    vocabulary is 256; a given ``tokenizer`` is saved with the checkpoints. The student
    starts from ``GPT(student_config, seed)`` on the teacher's device; batches come
    from ``seed``. ``train_config`` sets the rest of the run (its ``steps`` and
    ``seed`` are replaced by these); by default B=8, T=min(128, block sizes), lr 3e-3,
    an evaluation every steps/10. ``top_k``: precompute the teacher's top-k logits for
    every step once and train from them (forward KL only). ``out_dir``/``resume``/
    ``progress``/``log``: as ``minillm.train.train`` (a resume needs the same KD
    settings). ``alpha=0`` trains on labels alone (the teacher is not run): the
    scratch baseline, equal to ``train`` without hooks.
    """
    check_float("temperature", temperature, 0, lo_open=True)        # fail before any work
    check_float("alpha", alpha, 0, 1)
    check_choice("kind", kind, KINDS)
    student = _make_student(teacher, student_config, seed)
    train_ids, val_ids = _data(teacher, tokenizer, train_ids, val_ids)
    tcfg = _train_config(train_config, steps, seed, teacher.config, student_config)
    table = None
    if top_k is not None:
        check_int("top_k", top_k, 1, teacher.config.vocab_size)
        if kind != "forward":
            raise ValueError(f"kind={kind!r} with top_k={top_k}: a truncated teacher gives the "
                             f"other ids probability 0, so only kind='forward' is finite")
        table = precompute_topk(teacher, train_ids, tcfg, top_k, tcfg.seq_len)
    hook = DistillHook(teacher, temperature, alpha, kind, table)
    return train(student, train_ids, val_ids, tcfg, out_dir=out_dir, resume=resume,
                 progress=progress, tokenizer=tokenizer, log=log, hooks=[hook])


def _make_student(teacher, student_config, seed):
    from .config import GPTConfig
    from .model import GPT
    if not isinstance(teacher, GPT):
        raise ValueError(f"teacher must be a minillm.GPT, got {type(teacher).__name__}")
    if not isinstance(student_config, GPTConfig):
        raise ValueError(f"student_config must be a GPTConfig, got {type(student_config).__name__}")
    if student_config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student_config.vocab_size={student_config.vocab_size} must equal the "
                         f"teacher's vocab_size={teacher.config.vocab_size}: distillation matches "
                         f"distributions over the same tokens (same tokenizer)")
    check_int("seed", seed, 0)
    xp = teacher.xp
    host = GPT(student_config, seed=seed)
    if xp is np:
        return host
    return GPT(student_config, params={k: xp.asarray(v) for k, v in host.params.items()})


def _data(teacher, tokenizer, train_ids, val_ids):
    """(train_ids, val_ids or None): given, or the corpus in the teacher's tokens."""
    from . import data
    V = teacher.config.vocab_size
    if tokenizer is not None and (getattr(tokenizer, "vocab_size", None) is None
                                  or tokenizer.vocab_size > V):
        raise ValueError(f"tokenizer (vocab_size={getattr(tokenizer, 'vocab_size', None)}) is not "
                         f"the teacher's: its ids must fit the teacher's vocab_size={V}")
    if train_ids is None:
        text = data.load_corpus()
        if tokenizer is not None:
            ids = data.encode_corpus(tokenizer, text)
        elif V == 256:                                       # byte-level: ids are the bytes
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        else:
            raise ValueError(f"tokenizer=None: the teacher's vocab_size={V} needs its tokenizer "
                             f"(tokenizer=...) or train_ids=...")
        train_ids, val_ids = data.split(ids, 0.1)
    for name, ids in (("train_ids", train_ids), ("val_ids", val_ids)):
        if ids is not None and (np.asarray(ids).size == 0 or int(np.max(ids)) >= V):
            raise ValueError(f"{name} must be non-empty ids < the teacher's vocab_size={V}")
    return np.asarray(train_ids), None if val_ids is None else np.asarray(val_ids)


def _train_config(train_config, steps, seed, tc, sc) -> TrainConfig:
    steps = check_int("steps", steps, 1)
    block = min(tc.block_size, sc.block_size)
    if train_config is None:
        train_config = TrainConfig(steps=steps, batch_size=8, seq_len=min(128, block), lr=3e-3,
                                   warmup_steps=min(20, steps // 10),
                                   eval_interval=max(1, steps // 10), eval_batches=4, seed=seed)
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    tcfg = dataclasses.replace(train_config, steps=steps, seed=seed,
                               seq_len=train_config.seq_len or block)
    if tcfg.seq_len > tc.block_size:
        raise ValueError(f"seq_len={tcfg.seq_len} must be <= the teacher's block_size="
                         f"{tc.block_size} (the teacher reads the student's sequences)")
    return tcfg


def student_config_for(teacher_config, **overrides):
    """The house student: a third of the layers (at least 1), half the width and heads."""
    c = teacher_config
    kw = dict(n_layer=max(1, c.n_layer // 3), n_head=max(1, c.n_head // 2),
              n_embd=max(8, c.n_embd // 2))
    return dataclasses.replace(c, **{**kw, **overrides})


def bits_per_byte(val_loss: float, bytes_per_token: float) -> float:
    """Validation loss (nats per token) as bits per byte, comparable across tokenizers."""
    return val_loss / math.log(2) / bytes_per_token


# --- the tour row ----------------------------------------------------------------------
@technique("distillation", order=5)
def distillation_row(ctx: TourContext) -> list[Row]:
    """A student (a third of the layers, half the width) distilled from the baseline
    (forward KL, T=2, alpha=0.5) and the same student trained on labels alone, same
    steps and batches, within the row's time budget."""
    teacher = ctx.model
    scfg = student_config_for(teacher.config)
    tcfg = TrainConfig(steps=1, batch_size=4 if ctx.quick else 8,
                       seq_len=min(128, teacher.config.block_size), lr=3e-3, warmup_steps=0,
                       eval_interval=0, eval_batches=1, seed=ctx.seed)
    steps = _steps_for_budget(ctx, teacher, scfg, tcfg)
    speeds = {}

    def build(alpha):
        def run(budget_s):
            rec = []
            model = distill(teacher, scfg, steps, 2.0, alpha, "forward", ctx.seed,
                            train_ids=ctx.train_ids, train_config=tcfg, log=rec.append)
            speeds[alpha] = float(np.median([r["tokens_per_s"] for r in rec[1:] or rec]))
            return model
        return run
    settings = {"student": scfg.to_dict(), "train": tcfg.to_dict(), "steps": steps,
                "temperature": 2.0, "kind": "forward"}
    rows = []
    for name, alpha in (("distillation", 0.5), ("distillation_scratch", 0.0)):
        model = ctx.cached_model(name, {**settings, "alpha": alpha}, build(alpha),
                                 budget_s=ctx.budget_s / 2)
        rows.append((name, alpha, model))
    ppl = {name: ctx.val_ppl(m) for name, _, m in rows}
    out = []
    for name, alpha, model in rows:
        other = ppl["distillation_scratch" if alpha else "distillation"]
        what = (f"student L={scfg.n_layer} H={scfg.n_head} C={scfg.n_embd}, {steps} steps of "
                f"B={tcfg.batch_size}xT={tcfg.seq_len}; " +
                (f"KD from the baseline (forward KL, T=2, alpha=0.5); scratch ppl {other:.1f}"
                 if alpha else f"labels only (no teacher); KD ppl {other:.1f}"))
        out.append(Row(name, model.num_params(), model.nbytes(), ppl[name], speeds.get(alpha),
                       ctx.decode_tok_s(model, use_cache=False), what,
                       {"steps": steps, "alpha": alpha, "kd_over_scratch_ppl":
                        ppl["distillation"] / ppl["distillation_scratch"]}))
    return out


def _steps_for_budget(ctx, teacher, scfg, tcfg) -> int:
    """KD + scratch steps that fit the row's budget, from one timed step of each."""
    from .data import get_batch
    x, y = get_batch(ctx.train_ids, tcfg.batch_size, tcfg.seq_len, batch_rng(0, 0))
    student, hook = _make_student(teacher, scfg, 0), DistillHook(teacher, 2.0, 0.5)
    t0 = time.perf_counter()
    hook.loss_and_grads(student, x, y, 0)
    student.loss_and_grads(x, y)
    t2 = time.perf_counter()
    per_step = 1.3 * (t2 - t0) + 0.01       # a KD and a scratch step, + optimizer, evaluation
    return max(2, min(300, int(0.8 * ctx.budget_s / per_step)))
