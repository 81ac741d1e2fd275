"""minillm.train: the loop learns, evaluates, checkpoints and resumes exactly."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import minillm as mm
import minillm.optim
from minillm import checkpoint, data
from minillm.train import (TrainConfig, TrainHook, TrainResult, accumulated_loss_and_grads,
                           batch_rng, evaluate, train)
from tests.helpers import assert_close

CFG = mm.GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def corpus_ids():
    """The first 100k bytes of the embedded corpus as byte ids, split 90/10."""
    text = data.load_corpus()[:100_000]
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)   # (N,)
    return data.split(ids, 0.1)


class ByteTokenizer:
    """Stand-in tokenizer with the BPETokenizer file interface."""

    vocab_size = 256

    def save(self, path):
        with open(path, "w") as f:
            f.write("bytes\n")


def short(**kw) -> TrainConfig:
    base = dict(steps=8, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2,
                eval_interval=4, eval_batches=2, seed=3)
    return TrainConfig(**(base | kw))


# --- learning ----------------------------------------------------------------------
def test_loss_decreases(corpus_ids):
    """60 steps take the val loss more than half way from the init (~ln V) to the
    unigram entropy of the training bytes (the best context-free guess)."""
    tr, va = corpus_ids
    counts = np.bincount(tr, minlength=256) / len(tr)
    unigram = float(-(counts[counts > 0] * np.log(counts[counts > 0])).sum())
    model = mm.GPT(CFG, seed=0)
    before = evaluate(model, va, 8, 32, 4, seed=0)
    tcfg = TrainConfig(steps=60, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=5,
                       eval_interval=20, eval_batches=4, seed=0)
    res = train(model, tr, va, tcfg, progress=False)
    assert res.model is model and isinstance(res, TrainResult)
    assert [h["step"] for h in res.history] == list(range(1, 61))
    assert [e["step"] for e in res.evals] == [20, 40, 60]
    after = res.evals[-1]["val_loss"]
    assert after < before
    assert after < (before + unigram) / 2, (before, after, unigram)
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10])
    for e in res.evals:
        assert math.isclose(e["val_ppl"], math.exp(e["val_loss"]))
    assert all(h["tokens_per_s"] > 0 and h["grad_norm"] > 0 for h in res.history)
    assert [h["lr"] for h in res.history] == [tcfg.lr_at(s) for s in range(60)]


def test_evaluate_is_deterministic(corpus_ids):
    _, va = corpus_ids
    model = mm.GPT(CFG, seed=0)
    a = evaluate(model, va, 4, 16, 3, seed=5)
    assert a == evaluate(model, va, 4, 16, 3, seed=5)
    assert a != evaluate(model, va, 4, 16, 3, seed=6)


def test_batches_depend_only_on_seed_and_step():
    a = batch_rng(1, 7).integers(0, 1000, 5)
    assert np.array_equal(a, batch_rng(1, 7).integers(0, 1000, 5))
    assert not np.array_equal(a, batch_rng(1, 8).integers(0, 1000, 5))
    assert not np.array_equal(a, batch_rng(2, 7).integers(0, 1000, 5))


def test_grad_clip_caps_the_update(corpus_ids):
    """With a tiny clip the logged norm is the unclipped one, and training still runs."""
    tr, va = corpus_ids
    res = train(mm.GPT(CFG, seed=0), tr, None, short(steps=3, grad_clip=1e-3), progress=False)
    assert all(h["grad_norm"] > 1e-3 for h in res.history)
    assert res.evals == []


def test_log_receives_every_record(corpus_ids):
    tr, va = corpus_ids
    seen = []
    res = train(mm.GPT(CFG, seed=0), tr, va, short(), progress=False, log=seen.append)
    assert [r for r in seen if "loss" in r] == res.history
    assert [r for r in seen if "val_loss" in r] == res.evals


def test_divergence_is_reported(corpus_ids, monkeypatch):
    tr, va = corpus_ids
    model = mm.GPT(CFG, seed=0)
    real = model.loss_and_grads
    monkeypatch.setattr(model, "loss_and_grads", lambda x, y: (float("nan"), real(x, y)[1]))
    with pytest.raises(RuntimeError, match="loss is nan at step 1"):
        train(model, tr, va, short(), progress=False)


# --- checkpoints and resume ------------------------------------------------------------
class Interrupt(Exception):
    pass


def interrupt_at(step):
    def log(record):
        if record.get("step") == step and "loss" in record:
            raise Interrupt
    return log


def test_resume_is_exact(corpus_ids, tmp_path):
    """8 steps straight == 4 steps, interruption, resume from the checkpoint, 4 more."""
    tr, va = corpus_ids
    tcfg = short(checkpoint_interval=4)
    straight = train(mm.GPT(CFG, seed=0), tr, va, tcfg, progress=False)

    first = mm.GPT(CFG, seed=0)
    with pytest.raises(Interrupt):           # dies during step 6: the checkpoint is step 4's
        train(first, tr, va, tcfg, out_dir=tmp_path / "run", progress=False, log=interrupt_at(6))
    assert checkpoint.load_meta(tmp_path / "run")["step"] == 4

    other_init = mm.GPT(CFG, seed=99)        # proves the parameters come from the checkpoint
    resumed = train(other_init, tr, va, tcfg, out_dir=tmp_path / "run", resume=True,
                    progress=False)
    assert resumed.start_step == 4
    assert resumed.tokens_per_s > 0 and len(resumed.history) == 8
    keys = ("step", "loss", "lr", "grad_norm")
    assert [[h[k] for k in keys] for h in resumed.history] == \
           [[h[k] for k in keys] for h in straight.history]                 # bit for bit
    assert resumed.evals == straight.evals
    for name, p in straight.model.params.items():
        assert np.array_equal(resumed.model.params[name], p), name
    # the final checkpoint holds the finished run
    assert checkpoint.load_meta(tmp_path / "run")["step"] == 8
    loaded = mm.GPT.load(tmp_path / "run")
    assert all(np.array_equal(loaded.params[k], p) for k, p in straight.model.params.items())


def test_checkpoint_contents(corpus_ids, tmp_path):
    tr, va = corpus_ids
    tcfg = short(steps=2)
    res = train(mm.GPT(CFG, seed=0), tr, va, tcfg, out_dir=tmp_path, progress=False,
                tokenizer=ByteTokenizer())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "meta.json", "model.safetensors",
                     "optimizer.safetensors", "tokenizer.model"]
    meta = checkpoint.load_meta(tmp_path)
    assert meta["step"] == 2 and meta["tokenizer"] == "tokenizer.model"
    assert TrainConfig.from_dict(meta["train_config"]) == tcfg
    assert meta["history"] == res.history and meta["evals"] == res.evals
    state = checkpoint.load_extra(tmp_path, "optimizer")
    assert state["step"].tolist() == [2]
    assert set(state) == {"step"} | {f"{s}.{k}" for s in "mv" for k in res.model.params}


def test_resume_needs_a_checkpoint(corpus_ids, tmp_path):
    tr, va = corpus_ids
    with pytest.raises(ValueError, match="does not exist|not a directory"):
        train(mm.GPT(CFG, seed=0), tr, va, short(), out_dir=tmp_path / "none", resume=True,
              progress=False)
    with pytest.raises(ValueError, match="out_dir"):
        train(mm.GPT(CFG, seed=0), tr, va, short(), resume=True, progress=False)


def test_resume_refuses_another_model_config(corpus_ids, tmp_path):
    tr, va = corpus_ids
    train(mm.GPT(CFG, seed=0), tr, va, short(steps=1), out_dir=tmp_path, progress=False)
    wider = mm.GPT(dataclasses.replace(CFG, n_embd=64), seed=0)
    with pytest.raises(ValueError, match="config"):
        train(wider, tr, va, short(), out_dir=tmp_path, resume=True, progress=False)


def test_resume_refuses_another_train_config(corpus_ids, tmp_path):
    tr, va = corpus_ids
    train(mm.GPT(CFG, seed=0), tr, va, short(steps=1), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="seed"):
        train(mm.GPT(CFG, seed=0), tr, va, short(seed=4), out_dir=tmp_path, resume=True,
              progress=False)


def test_resume_refuses_a_plain_model_save(corpus_ids, tmp_path):
    tr, va = corpus_ids
    mm.GPT(CFG, seed=0).save(tmp_path)
    with pytest.raises(ValueError, match="optimizer state"):
        train(mm.GPT(CFG, seed=0), tr, va, short(), out_dir=tmp_path, resume=True, progress=False)


# --- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"), ({"batch_size": -1}, "batch_size"), ({"seq_len": 0}, "seq_len"),
    ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"min_lr": 1.0, "lr": 0.1}, "min_lr"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"grad_clip": -1.0}, "grad_clip"), ({"betas": (0.9,)}, "betas"), ({"eps": 0}, "eps"),
    ({"eval_batches": 0}, "eval_batches"), ({"seed": -1}, "seed"), ({"steps": 2.5}, "steps"),
])
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_config_defaults_and_round_trip():
    t = TrainConfig()
    assert math.isclose(t.lr_at(t.steps), t.lr / 10)       # min_lr None -> lr / 10
    assert TrainConfig.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"nope": 1})


def test_train_argument_errors(corpus_ids):
    tr, va = corpus_ids
    model = mm.GPT(CFG, seed=0)
    with pytest.raises(ValueError, match="block_size"):
        train(model, tr, va, short(seq_len=33), progress=False)
    with pytest.raises(ValueError, match="train_data has 10 ids"):
        train(model, tr[:10], va, short(), progress=False)
    with pytest.raises(ValueError, match="val_data must be a 1-D integer"):
        train(model, tr, va.astype(np.float32), short(), progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train(mm.GPT(dataclasses.replace(CFG, vocab_size=100), seed=0), tr, va, short(),
              progress=False)
    with pytest.raises(ValueError, match="tcfg"):
        train(model, tr, va, {"steps": 3}, progress=False)


# --- the step's hooks ---------------------------------------------------------------------------
class NormEMA(TrainHook):
    """A hook with state: an EMA of the gradient norm that damps the gradients, a
    per-step batch size, and a skipped update whenever the norm jumps above the EMA."""

    name = "norm_ema"

    def __init__(self):
        self.ema = np.zeros(1)
        self.calls = 0

    def batch_size(self, step, batch_size):
        return 2 + step % 3

    def transform_grads(self, grads, step, record):
        norm = mm.optim.grad_norm(grads)
        self.ema = 0.5 * self.ema + 0.5 * norm
        record["ema"] = float(self.ema[0])
        for g in grads.values():
            g *= g.dtype.type(1.0 / (1.0 + self.ema[0]))
        return grads

    def skip(self, step, record):
        return step % 4 == 3

    def state_dict(self):
        return {"ema": self.ema}

    def load_state_dict(self, state):
        self.ema = state["ema"].copy()


def test_resume_with_a_stateful_hook_is_exact(corpus_ids, tmp_path):
    """The hook's state travels in the checkpoint: 8 steps straight == 5 + resume 3,
    bit for bit, including the per-step batch sizes and the skipped steps."""
    tr, va = corpus_ids
    tcfg = short(checkpoint_interval=5)
    straight = train(mm.GPT(CFG, seed=0), tr, va, tcfg, progress=False, hooks=[NormEMA()])
    assert [h["batch_size"] for h in straight.history] == [2 + s % 3 for s in range(8)]
    assert [h["skipped"] for h in straight.history] == [s % 4 == 3 for s in range(8)]
    with pytest.raises(Interrupt):
        train(mm.GPT(CFG, seed=0), tr, va, tcfg, out_dir=tmp_path / "run", progress=False,
              log=interrupt_at(7), hooks=[NormEMA()])
    hook = NormEMA()
    resumed = train(mm.GPT(CFG, seed=5), tr, va, tcfg, out_dir=tmp_path / "run", resume=True,
                    progress=False, hooks=[hook])
    keys = ("step", "loss", "lr", "grad_norm", "ema", "batch_size", "skipped")
    assert [[h[k] for k in keys] for h in resumed.history] == \
           [[h[k] for k in keys] for h in straight.history]
    for name, p in straight.model.params.items():
        assert np.array_equal(resumed.model.params[name], p), name
    with pytest.raises(ValueError, match="hooks"):             # not resumable without its hook
        train(mm.GPT(CFG, seed=0), tr, va, tcfg, out_dir=tmp_path / "run", resume=True,
              progress=False)


def test_a_skipped_step_leaves_the_parameters(corpus_ids):
    tr, _ = corpus_ids

    class SkipAll(TrainHook):
        name = "skip_all"

        def skip(self, step, record):
            return True
    model = mm.GPT(CFG, seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    res = train(model, tr, None, short(steps=3), progress=False, hooks=[SkipAll()])
    assert all(h["skipped"] for h in res.history)
    assert all(np.array_equal(model.params[k], v) for k, v in before.items())


def test_after_update_keeps_a_mask_at_zero(corpus_ids):
    tr, _ = corpus_ids
    model = mm.GPT(CFG, seed=0)
    mask = np.random.default_rng(0).random(model.params["h.0.mlp.c_fc.weight"].shape) < 0.5

    class Mask(TrainHook):
        name = "mask"

        def after_update(self, model, step, record):
            model.params["h.0.mlp.c_fc.weight"][mask] = 0
    train(model, tr, None, short(steps=3), progress=False, hooks=[Mask()])
    w = model.params["h.0.mlp.c_fc.weight"]
    assert (w[mask] == 0).all() and (w[~mask] != 0).all()


@pytest.mark.parametrize("micro", [1, 3, 4])
def test_micro_batches_accumulate_to_the_whole_batch(corpus_ids, micro):
    """B=8 in micro-batches of 1, 3 (uneven: 3+3+2) or 4 gives the whole batch's loss and
    gradients (float64: equal up to rounding)."""
    tr, _ = corpus_ids
    cfg64 = dataclasses.replace(CFG, dtype="float64")
    model = mm.GPT(cfg64, seed=0)
    x, y = data.get_batch(tr, 8, 16, batch_rng(3, 0))
    loss, grads = model.loss_and_grads(x, y)
    loss_m, grads_m = accumulated_loss_and_grads(model, x, y, 0, micro_batch_size=micro)
    assert loss_m == pytest.approx(loss, rel=1e-12)
    for k in grads:
        assert_close(k, grads_m[k], grads[k], rtol=1e-10, atol=1e-13)


def test_custom_loss_hook_is_used_and_checked(corpus_ids):
    tr, _ = corpus_ids

    class HalfLoss(TrainHook):
        name = "half"

        def loss_and_grads(self, model, x, y, step):
            loss, grads = model.loss_and_grads(x, y)
            return loss / 2, {k: g / 2 for k, g in grads.items()}
    res = train(mm.GPT(CFG, seed=0), tr, None, short(steps=2), progress=False, hooks=[HalfLoss()])
    plain = train(mm.GPT(CFG, seed=0), tr, None, short(steps=2), progress=False)
    assert res.losses[0] == pytest.approx(plain.losses[0] / 2)

    class WrongKeys(TrainHook):
        name = "wrong"

        def loss_and_grads(self, model, x, y, step):
            loss, grads = model.loss_and_grads(x, y)
            grads.pop("wte.weight")
            return loss, grads
    with pytest.raises(ValueError, match="hook 'wrong' loss_and_grads.*missing.*wte.weight"):
        train(mm.GPT(CFG, seed=0), tr, None, short(steps=1), progress=False, hooks=[WrongKeys()])


@pytest.mark.parametrize("hooks, match", [
    (["not a hook"], "TrainHook"),
    ([NormEMA(), NormEMA()], "distinct"),
])
def test_bad_hooks_are_refused(corpus_ids, hooks, match):
    tr, _ = corpus_ids
    with pytest.raises(ValueError, match=match):
        train(mm.GPT(CFG, seed=0), tr, None, short(steps=1), progress=False, hooks=hooks)


def test_a_hook_with_bad_state_or_batch_size_is_named(corpus_ids, tmp_path):
    tr, _ = corpus_ids

    class BadState(TrainHook):
        name = "bad_state"

        def state_dict(self):
            return {"x": 3}

    class ZeroBatch(TrainHook):
        name = "zero"

        def batch_size(self, step, batch_size):
            return 0
    with pytest.raises(ValueError, match="bad_state"):
        train(mm.GPT(CFG, seed=0), tr, None, short(steps=1), out_dir=tmp_path / "r",
              progress=False, hooks=[BadState()])
    with pytest.raises(ValueError, match="hook 'zero'"):
        train(mm.GPT(CFG, seed=0), tr, None, short(steps=1), progress=False, hooks=[ZeroBatch()])
