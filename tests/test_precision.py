"""minillm.precision: half-precision compute on fp32 master weights, and the loss scaler.

- ``LossScaler`` follows PyTorch's ``GradScaler`` step for step (scales and skipped steps);
- fp16 / bf16 forward and backward stay within the formats' rounding of fp32;
- an overflow skips the update and halves the scale; the parameters are untouched;
- a run with a scaler resumes exactly; half models save, load and round-trip;
- the device stand-in runs it; bad input is named.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import checkpoint, precision
from minillm.precision import LossScaler, MixedPrecision
from minillm.train import TrainConfig, TrainHook
from tests.helpers import assert_close

CFG = mm.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)
IDS = np.random.default_rng(0).integers(0, 64, 4000)


def short(**kw) -> TrainConfig:
    return TrainConfig(**({"steps": 6, "batch_size": 4, "seq_len": 16, "lr": 1e-2, "warmup_steps": 1,
                           "eval_interval": 0, "seed": 1} | kw))


def perturbed(cfg=CFG, seed=0) -> mm.GPT:
    model = mm.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 7)
    for k, v in model.params.items():
        model.params[k] = (v + 0.2 * rng.standard_normal(v.shape)).astype(v.dtype)
    return model


# --- the scaler == PyTorch's GradScaler ----------------------------------------------------
@given(overflows=st.lists(st.booleans(), min_size=1, max_size=40),
       init=st.sampled_from([1.0, 2.0 ** 8, 2.0 ** 16]), growth=st.sampled_from([2.0, 1.5]),
       backoff=st.sampled_from([0.5, 0.25]), interval=st.integers(1, 5))
@settings(deadline=None, max_examples=25)
def test_loss_scaler_matches_torch_grad_scaler(overflows, init, growth, backoff, interval):
    torch = pytest.importorskip("torch")
    ref = torch.amp.GradScaler("cpu", init_scale=init, growth_factor=growth,
                               backoff_factor=backoff, growth_interval=interval)
    ours = LossScaler(init, growth, backoff, interval)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    for inf in overflows:
        ref.scale(torch.ones(()))                           # GradScaler's lazy init
        before = p.detach().clone()
        p.grad = torch.tensor([float("inf") if inf else 1.0])
        ref.step(opt)                                      # skipped on inf
        skipped = bool(torch.equal(p.detach(), before))
        ref.update()
        ours.update(inf)
        assert skipped == inf
        assert ours.scale == ref.get_scale()


# --- numbers: half vs fp32 --------------------------------------------------------------------
# (relative to the largest |value|): fp16 has 11 significant bits, bf16 8
HALF_TOL = {"float16": 2e-2, "bfloat16": 1e-1}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@given(B=st.integers(1, 3), T=st.integers(1, 16), seed=st.integers(0, 50))
@settings(deadline=None, max_examples=8)
def test_half_forward_and_backward_track_fp32(dtype, B, T, seed):
    model = perturbed(seed=seed)
    half = model.astype(dtype)
    rng = np.random.default_rng(seed)
    idx, targets = rng.integers(0, 64, (B, T)), rng.integers(0, 64, (B, T))
    logits, logits_h = model.forward(idx), half.forward(idx)
    assert logits_h.dtype == half.config.np_dtype
    tol = HALF_TOL[dtype]
    assert_close("logits", logits_h.astype(np.float32), logits, rtol=0,
                 atol=tol * np.abs(logits).max())
    loss, grads = model.loss_and_grads(idx, targets)
    loss_h, grads_h = half.loss_and_grads(idx, targets)
    assert abs(loss_h - loss) <= tol * abs(loss)
    for k, g in grads.items():
        assert grads_h[k].dtype == half.config.np_dtype, k
        assert_close(k, grads_h[k].astype(np.float32), g, rtol=0, atol=4 * tol * np.abs(g).max() + 1e-6)


def test_astype_round_trip_is_within_half_rounding():
    model = perturbed()
    for dtype, bits in (("float16", 11), ("bfloat16", 8)):
        back = model.astype(dtype).astype("float32")
        for k, v in model.params.items():
            err = np.abs(back.params[k] - v)
            assert (err <= np.abs(v) * 2.0 ** -bits + 2.0 ** -25).all(), (dtype, k)
    assert model.params["wte.weight"].dtype == np.float32                 # the original is untouched


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_models_save_and_load(dtype, tmp_path):
    half = perturbed().astype(dtype)
    half.save(tmp_path / "m")
    back = mm.GPT.load(tmp_path / "m")
    assert back.config.dtype == dtype
    for k, v in half.params.items():
        assert back.params[k].dtype == v.dtype and np.array_equal(back.params[k].view(np.uint16),
                                                                    v.view(np.uint16)), k
    idx = np.arange(8)[None]
    np.testing.assert_array_equal(back.generate(idx, 4, temperature=0), half.generate(idx, 4, temperature=0))
    if dtype == "bfloat16":                         # the file says BF16, as safetensors means it
        raw = (tmp_path / "m" / "model.safetensors").read_bytes()
        assert b'"BF16"' in raw[:int.from_bytes(raw[:8], "little") + 8]


# --- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_mixed_precision_training_tracks_fp32(prec):
    ref = mm.train(mm.GPT(CFG, seed=0), IDS, None, short(steps=8), progress=False)
    res = mm.train(mm.GPT(CFG, seed=0), IDS, None, short(steps=8, precision=prec), progress=False)
    assert res.model.params["wte.weight"].dtype == np.float32              # masters stay fp32
    assert np.allclose(res.losses, ref.losses, rtol=2e-2)
    assert all("loss_scale" in h for h in res.history)
    assert res.history[0]["loss_scale"] == (2.0 ** 16 if prec == "fp16" else 1.0)


def test_an_overflow_skips_the_step_and_halves_the_scale():
    model = mm.GPT(CFG, seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    hook = MixedPrecision("float16", LossScaler(init_scale=2.0 ** 40, growth_interval=1000))
    res = mm.train(model, IDS, None, short(steps=1), progress=False, hooks=[hook])
    assert res.history[0]["found_inf"] and res.history[0]["skipped"]
    assert hook.scaler.scale == 2.0 ** 39
    assert all(np.array_equal(model.params[k], v) for k, v in before.items())
    # the scale keeps halving until the gradients fit, then training moves
    res = mm.train(model, IDS, None, short(steps=40), progress=False, hooks=[hook])
    assert not res.history[-1]["found_inf"] and hook.scaler.scale < 2.0 ** 39
    assert not all(np.array_equal(model.params[k], v) for k, v in before.items())


class Interrupt(Exception):
    pass


def test_resume_with_a_scaler_is_exact(tmp_path):
    """Overflows and growth in the run (init 2^20, growth every 2 clean steps): 8 straight
    == 5, interruption, resume 3; the scale and the skipped steps too."""
    def hook():
        return MixedPrecision("float16", LossScaler(init_scale=2.0 ** 20, growth_interval=2))
    tcfg = short(steps=8, checkpoint_interval=5)
    straight = mm.train(mm.GPT(CFG, seed=0), IDS, None, tcfg, progress=False, hooks=[hook()])
    assert any(h["skipped"] for h in straight.history) and not all(h["skipped"] for h in straight.history)

    def stop(record):
        if record.get("step") == 7:
            raise Interrupt
    with pytest.raises(Interrupt):
        mm.train(mm.GPT(CFG, seed=0), IDS, None, tcfg, out_dir=tmp_path / "r", progress=False,
                 log=stop, hooks=[hook()])
    assert "precision.scale" in checkpoint.load_extra(tmp_path / "r", "hooks")
    resumed = mm.train(mm.GPT(CFG, seed=3), IDS, None, tcfg, out_dir=tmp_path / "r", resume=True,
                       progress=False, hooks=[hook()])
    keys = ("loss", "loss_scale", "found_inf", "skipped")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in straight.history]
    for k, v in straight.model.params.items():
        assert np.array_equal(resumed.model.params[k], v), k


def test_cli_trains_in_fp16_and_resumes(tmp_path, capsys):
    from minillm import cli
    corpus = tmp_path / "c.txt"
    corpus.write_text("In the beginning God created the heaven and the earth. " * 60)
    base = ["train", "--preset", "tiny", "--vocab-size", "256", "--block-size", "16", "--corpus",
            str(corpus), "--out", str(tmp_path / "r"), "--precision", "fp16", "--batch-size", "2",
            "--eval-interval", "0", "--no-progress"]
    assert cli.main(base + ["--steps", "2"]) == 0
    assert cli.main(["train", "--out", str(tmp_path / "r"), "--resume", "--steps", "3",
                     "--no-progress"]) == 0
    meta = checkpoint.load_meta(tmp_path / "r")
    assert meta["train_config"]["precision"] == "fp16" and len(meta["history"]) == 3
    assert all("loss_scale" in h for h in meta["history"])


def test_the_device_stand_in_runs_mixed_precision():
    cpu = mm.GPT(CFG, seed=0)
    dev = mm.GPT(CFG, params={k: v.copy() for k, v in cpu.params.items()}).to("standin")
    ref = mm.train(cpu, IDS, None, short(steps=3, precision="fp16"), progress=False)
    got = mm.train(dev, IDS, None, short(steps=3, precision="fp16"), progress=False)
    assert got.losses == pytest.approx(ref.losses, rel=1e-5)
    half = dev.astype("float16")
    assert type(half.params["wte.weight"]).__module__ == "tests.standin"
    np.testing.assert_array_equal(mm.backend.to_numpy(half.generate(np.array([[1, 2]]), 3, temperature=0)),
                                  cpu.astype("float16").generate(np.array([[1, 2]]), 3, temperature=0))


# --- what it prevents, and the helpers the chapter uses ----------------------------------------
def test_unscaled_fp16_gradients_flush_to_zero_and_scaling_brings_them_back():
    model = mm.GPT(dataclasses.replace(CFG, n_layer=2), seed=0)
    idx = IDS[:64].reshape(4, 16)
    _, grads = model.loss_and_grads(idx, IDS[1:65].reshape(4, 16))
    tiny = {k: g * 1e-4 for k, g in grads.items()}              # a smaller loss: small gradients
    share = precision.fp16_flush_share(tiny)
    scaled = precision.fp16_flush_share({k: g * 2.0 ** 16 for k, g in tiny.items()})
    assert share > 0.01 and scaled < share / 10
    counts, edges = precision.log2_histogram(tiny)
    assert counts.sum() == sum(int((g != 0).sum()) for g in tiny.values()) and len(edges) == len(counts) + 1


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda: TrainConfig(precision="fp8"), "precision='fp8'.*bf16.*fp16.*fp32"),
    (lambda: mm.GPT(CFG).astype("int8"), "dtype='int8'"),
    (lambda: mm.GPT(CFG).astype(np.int64), "dtype="),
    (lambda: mm.GPT(CFG).astype("float8"), "float8"),
    (lambda: LossScaler(growth_factor=1.0), "growth_factor"),
    (lambda: LossScaler(backoff_factor=1.0), "backoff_factor"),
    (lambda: LossScaler(backoff_factor=0.0), "backoff_factor"),
    (lambda: LossScaler(growth_interval=0), "growth_interval"),
    (lambda: LossScaler(init_scale=0), "init_scale"),
    (lambda: MixedPrecision("float64"), "dtype='float64'"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_non_finite_fp32_loss_is_an_error_not_a_skip():
    class Poison(TrainHook):
        name = "poison"

        def loss_and_grads(self, model, x, y, step):
            loss, grads = model.loss_and_grads(x, y)
            return float("inf"), grads
    with pytest.raises(RuntimeError, match="loss is inf"):
        mm.train(mm.GPT(CFG), IDS, None, short(steps=1), progress=False, hooks=[Poison()])
