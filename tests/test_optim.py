"""minillm.optim: AdamW against torch.optim.AdamW, the decay rule, the LR
schedule and gradient clipping."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm import backend
from minillm.optim import AdamW, clip_grad_norm, decays, grad_norm, lr_schedule
from tests.helpers import assert_close


def tiny_params(dtype="float64", seed=0):
    cfg = mm.GPTConfig(vocab_size=11, block_size=5, n_layer=1, n_head=2, n_embd=4, dtype=dtype)
    return mm.GPT(cfg, seed=seed).params


def random_grads(params, rng):
    return {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}


# --- the decay rule ---------------------------------------------------------------
def test_decay_rule_on_gpt_names():
    params = tiny_params()
    decayed = sorted(k for k, p in params.items() if decays(k, p))
    assert decayed == sorted(["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight",
                              "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"])


def test_no_decay_params_only_move_by_adam():
    """With grads zero and m=v=0, Adam's step is 0: only decayed params may change."""
    params = tiny_params()
    before = {k: p.copy() for k, p in params.items()}
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    opt.step(params, {k: np.zeros_like(p) for k, p in params.items()})
    for k, p in params.items():
        if decays(k, p):
            assert_close(k, p, before[k] * (1 - 0.1 * 0.5))
        else:
            assert np.array_equal(p, before[k]), k


# --- parity with torch --------------------------------------------------------------
@pytest.mark.peers
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adamw_matches_torch(dtype, rng):
    torch = pytest.importorskip("torch")
    params = tiny_params(dtype)
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tparams = {k: torch.nn.Parameter(torch.tensor(p.copy())) for k, p in params.items()}
    groups = [{"params": [t for k, t in tparams.items() if decays(k, params[k])],
               "weight_decay": hp["weight_decay"]},
              {"params": [t for k, t in tparams.items() if not decays(k, params[k])],
               "weight_decay": 0.0}]
    topt = torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"])
    opt = AdamW(params, **hp)
    for step in range(3):                         # step 1 and beyond (bias correction)
        grads = random_grads(params, rng)
        lr = hp["lr"] * (step + 1) / 3            # a changing lr, as the schedule gives
        for g in topt.param_groups:
            g["lr"] = lr
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        topt.step()
        opt.step(params, grads, lr)
        for k, t in tparams.items():
            assert params[k].dtype == np.dtype(dtype)
            assert_close(f"step {step + 1} {k}", params[k], t.detach().numpy())
            state = topt.state[t]
            assert_close(f"m {k}", opt.m[k], state["exp_avg"].numpy())
            assert_close(f"v {k}", opt.v[k], state["exp_avg_sq"].numpy())
    assert opt.t == 3


# --- the compiled twin of one update ---------------------------------------------------
@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31), dtype=st.sampled_from(["float32", "float64"]),
       shape=st.sampled_from([(1,), (7,), (3, 5), (4, 6, 2)]), wd=st.sampled_from([0.0, 0.1]),
       strided=st.booleans(), t=st.integers(1, 50))
def test_every_cpu_twin_of_the_update_equals_the_reference_bit_for_bit(seed, dtype, shape, wd, strided, t):
    """Same operations, same order, same rounding: p, m and v equal exactly, also on a
    strided view (updated through a copy) and with g in another dtype."""
    rng = np.random.default_rng(seed)
    twins = {b: backend.twin(b, "optim.adamw_update") for b, (ok, _) in backend.available().items()
             if ok and backend.xp_for(b) is np}
    twins = {b: fn for b, fn in twins.items() if fn is not None}
    if not twins:
        pytest.skip("no CPU backend has a twin of optim.adamw_update")
    full = shape[:-1] + (2 * shape[-1],) if strided else shape
    arrays = [rng.standard_normal(full).astype(dtype) for _ in range(3)]
    arrays[2] = np.abs(arrays[2])                             # v >= 0
    g = rng.standard_normal(shape).astype("float32")          # grads may come in float32
    b1, b2 = 0.9, 0.95
    hp = (3e-3, b1, b2, 1 - b1 ** t, 1 - b2 ** t, 1e-8, wd)
    view = (lambda a: a[..., ::2]) if strided else (lambda a: a)
    ref = [a.copy() for a in arrays]
    backend.reference("optim.adamw_update")(*(view(a) for a in ref[:1]), g, *(view(a) for a in ref[1:]), *hp)
    for name, fn in twins.items():
        got = [a.copy() for a in arrays]
        fn(view(got[0]), g, view(got[1]), view(got[2]), *hp)
        for what, a, r in zip("pmv", got, ref):
            assert a.dtype == r.dtype and np.array_equal(a, r), f"{name}: {what} differs"


# --- state dict ------------------------------------------------------------------------
def test_state_dict_round_trip(rng):
    params = tiny_params("float32")
    opt = AdamW(params)
    for _ in range(2):
        opt.step(params, random_grads(params, rng), 1e-3)
    state = opt.state_dict()
    assert state["step"].tolist() == [2]
    assert set(state) == {"step"} | {f"m.{k}" for k in params} | {f"v.{k}" for k in params}
    fresh = AdamW(params)
    fresh.load_state_dict(state)
    assert fresh.t == 2
    for k in params:
        assert np.array_equal(fresh.m[k], opt.m[k]) and np.array_equal(fresh.v[k], opt.v[k])
    # the next steps of both optimizers agree exactly
    p1 = {k: v.copy() for k, v in params.items()}
    p2 = {k: v.copy() for k, v in params.items()}
    g = random_grads(params, rng)
    opt.step(p1, g, 1e-3)
    fresh.step(p2, g, 1e-3)
    assert all(np.array_equal(p1[k], p2[k]) for k in params)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("step"), "missing"),
    (lambda s: s.pop("m.wte.weight"), "missing"),
    (lambda s: s.__setitem__("m.extra", np.zeros(3, np.float32)), "unexpected"),
    (lambda s: s.__setitem__("v.wte.weight", np.zeros((2, 2), np.float32)), "v.wte.weight"),
    (lambda s: s.__setitem__("m.wpe.weight", s["m.wpe.weight"].astype(np.float64)), "float64"),
    (lambda s: s.__setitem__("step", np.array([-1])), "step"),
])
def test_load_state_dict_refuses_mismatch(edit, match):
    params = tiny_params("float32")
    state = AdamW(params).state_dict()
    edit(state)
    with pytest.raises(ValueError, match=match):
        AdamW(params).load_state_dict(state)


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_adamw_bad_hparams(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW(tiny_params(), **kwargs)


def test_step_refuses_other_names(rng):
    params = tiny_params()
    grads = random_grads(params, rng)
    grads.pop("wte.weight")
    with pytest.raises(ValueError, match="names"):
        AdamW(params).step(params, grads)


# --- schedule ------------------------------------------------------------------------
schedule_args = st.tuples(
    st.floats(1e-5, 1.0), st.floats(0.0, 1.0), st.integers(0, 50), st.integers(1, 300))


@settings(deadline=None, max_examples=60)
@given(args=schedule_args)
def test_schedule_shape(args):
    max_lr, frac, warmup, total = args
    min_lr = max_lr * frac
    lrs = [lr_schedule(s, max_lr, min_lr, warmup, total) for s in range(total + 5)]
    eps = 1e-12 * max_lr
    assert all(0 <= lr <= max_lr + eps for lr in lrs)
    assert all(lr > 0 for lr in lrs[:total])                       # every training step moves
    n_up = min(warmup, total + 5)
    up, down = lrs[:n_up], lrs[n_up:]
    assert all(b > a for a, b in zip(up, up[1:]))                  # warmup rises linearly
    for i in range(1, len(up)):
        assert math.isclose(up[i] - up[i - 1], max_lr / warmup, rel_tol=1e-9)
    assert all(b <= a + eps for a, b in zip(down, down[1:]))      # then never rises
    if warmup >= 1 and warmup <= total:
        assert math.isclose(lrs[warmup - 1], max_lr)              # peak reached at warmup's end
    if warmup < total:
        assert math.isclose(lrs[warmup], max_lr)                  # cosine starts at the peak
        assert all(lr >= min_lr - eps for lr in down)
    if warmup <= total:
        assert lrs[total] == min_lr and lrs[-1] == min_lr          # floor after the end


def test_schedule_midpoint_is_mean():
    """Half way through the cosine, lr is the mean of max and min (cos(pi/2) = 0)."""
    assert math.isclose(lr_schedule(60, 1.0, 0.2, 10, 110), 0.6)


@pytest.mark.parametrize("args, match", [
    ((0, 1.0, 2.0, 0, 10), "min_lr"), ((-1, 1.0, 0.1, 0, 10), "step"),
    ((0, 1.0, 0.1, -1, 10), "warmup_steps"), ((0, 1.0, 0.1, 0, 0), "total_steps"),
])
def test_schedule_bad_args(args, match):
    with pytest.raises(ValueError, match=match):
        lr_schedule(*args)


# --- clipping ---------------------------------------------------------------------------
@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**31), scale=st.floats(1e-3, 1e3), max_norm=st.floats(1e-2, 10.0))
def test_clip_grad_norm_properties(seed, scale, max_norm):
    rng = np.random.default_rng(seed)
    grads = {"a": rng.standard_normal((3, 4)) * scale, "b": rng.standard_normal(5) * scale}
    before = {k: g.copy() for k, g in grads.items()}
    expected = math.sqrt(sum(float((g ** 2).sum()) for g in before.values()))
    total = clip_grad_norm(grads, max_norm)
    assert math.isclose(total, expected, rel_tol=1e-12)          # returns the norm before
    after = grad_norm(grads)
    if expected <= max_norm:
        assert all(np.array_equal(grads[k], before[k]) for k in grads)   # untouched
    else:
        assert math.isclose(after, max_norm, rel_tol=1e-9)       # exactly on the bound
        c = grads["a"].ravel()[0] / before["a"].ravel()[0]       # one common factor
        for k in grads:
            assert_close(k, grads[k], before[k] * c)


def test_clip_keeps_float32():
    grads = {"a": np.full((4, 4), 10.0, np.float32)}
    clip_grad_norm(grads, 1.0)
    assert grads["a"].dtype == np.float32


@pytest.mark.parametrize("bad", [0, -1.0, None, True])
def test_clip_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm({"a": np.ones(3)}, bad)
