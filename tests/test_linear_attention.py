"""minillm.linear_attention: elu + 1 linear attention, parallel and recurrent.

- the chunked prefix sum equals its definition (plain sums), for any chunk size;
- the parallel form equals the formula of the issue and the recurrent form
  (hypothesis over T, chunk, shapes); its backward equals float64 central differences;
- the kind trains through the model, decodes with a state of fixed size
  (cached == uncached, an inactive row redoes its last token), saves and loads,
  runs on the device stand-in; pattern settings are refused.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import backend, gradcheck, kv_cache
from minillm import linear_attention as la
from minillm.generation import generate_batch
from tests.helpers import assert_close, host_device_pair

CFG64 = mm.GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=8, dtype="float64",
                     attention="linear")


def normal(rng, *shape, dtype="float64"):
    return rng.standard_normal(shape).astype(dtype)


def by_definition(q, k, v):
    """y_i = phi(q_i) . sum_{j<=i} phi(k_j) v_j^T / (phi(q_i) . sum_{j<=i} phi(k_j)), as loops."""
    phi = lambda x: np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))   # noqa: E731
    y = np.zeros_like(v)
    for i in range(q.shape[2]):
        w = np.einsum("bhd,bhjd->bhj", phi(q[:, :, i]), phi(k[:, :, :i + 1]))   # (B, H, i + 1)
        y[:, :, i] = np.einsum("bhj,bhjd->bhd", w, v[:, :, :i + 1]) / w.sum(-1)[..., None]
    return y


def test_feature_map_and_its_derivative(rng):
    x = np.concatenate([normal(rng, 50) * 3, [0.0, -50.0, 50.0]])
    phi = la.feature_map(x)
    assert (phi > 0).all() and np.allclose(phi, np.where(x > 0, x + 1, np.exp(x)))
    dphi = normal(rng, x.size)
    f = lambda: float((la.feature_map(x) * dphi).sum())                # noqa: E731
    gradcheck.check_grads("phi", f, [x[:50]], [la.feature_map_backward(dphi, x)[:50]])


@given(T=st.integers(1, 50), chunk=st.integers(1, 20), seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=40)
def test_chunked_prefix_sums_equal_their_definition(T, chunk, seed):
    rng = np.random.default_rng(seed)
    a, b, c = normal(rng, 2, 2, T, 3), normal(rng, 2, 2, T, 3), normal(rng, 2, 2, T, 4)
    scores = np.einsum("bhie,bhje->bhij", a, b)
    assert_close("causal", la.causal_linear(a, b, c, chunk), np.tril(scores) @ c)
    assert_close("anticausal", la.anticausal_linear(a, b, c, chunk), np.triu(scores) @ c)


@given(T=st.integers(1, 40), chunk=st.integers(1, 16), B=st.integers(1, 2), H=st.integers(1, 3),
       seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=40)
def test_parallel_form_equals_the_formula_and_the_recurrent_form(T, chunk, B, H, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (normal(rng, B, H, T, 4) for _ in range(3))
    y, _ = la.linear_attention_forward(q, k, v, chunk)
    assert_close("parallel vs definition", y, by_definition(q, k, v))
    assert_close("parallel vs recurrent", y, la.linear_attention_recurrent(q, k, v))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_backward_matches_finite_differences(chunk, rng):
    q, k, v = (normal(rng, 2, 2, 13, 3) for _ in range(3))
    dy = normal(rng, 2, 2, 13, 3)
    _, cache = la.linear_attention_forward(q, k, v, chunk)
    grads = la.linear_attention_backward(dy, cache, chunk)
    f = lambda: float((la.linear_attention_forward(q, k, v, chunk)[0] * dy).sum())   # noqa: E731
    gradcheck.check_grads("linear", f, [q, k, v], list(grads), rng, max_entries=30)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_is_kept(dtype, rng):
    q, k, v = (normal(rng, 1, 2, 70, 4, dtype=dtype) for _ in range(3))
    y, cache = la.linear_attention_forward(q, k, v)
    assert y.dtype == np.dtype(dtype)
    assert all(g.dtype == np.dtype(dtype) for g in la.linear_attention_backward(y, cache))


# --- the kind in the model --------------------------------------------------------------------------
def nontrivial(cfg, seed=0):
    model = mm.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for k, v in model.params.items():
        model.params[k] = (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype)
    return model


def test_the_kind_trains_through_the_model(rng):
    model = nontrivial(CFG64)
    idx, targets = rng.integers(0, 23, (2, 12)), rng.integers(0, 23, (2, 12))
    gradcheck.check_model_grads(model, idx, targets, rng, max_entries=3)


def test_cached_generation_equals_uncached():
    model = nontrivial(dataclasses.replace(CFG64, block_size=80, dtype="float32"))
    prompt = np.array([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]])
    for kw in (dict(temperature=0), dict(temperature=0.9, top_k=5, seed=3)):
        np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=70, **kw),
                                      model.generate(prompt, max_new_tokens=70, use_cache=False, **kw))


def test_the_state_has_a_fixed_size():
    """H D (D + 1) + H D + H (D + 1) floats per layer and row, plus a position counter."""
    cfg = dataclasses.replace(CFG64, block_size=512, dtype="float32")
    H, D = cfg.n_head, cfg.head_size
    per_row = cfg.n_layer * (4 * (H * D * (D + 1) + H * D + H * (D + 1)) + 8)
    assert {kv_cache.KVCache(cfg, 3, n).nbytes for n in (8, 100, 512)} == {3 * per_row}


def test_an_inactive_row_keeps_its_state_and_a_freed_row_starts_again(rng):
    """decode_step(active=...) gives an inactive row n_valid 0: its dummy token never enters S."""
    model = nontrivial(dataclasses.replace(CFG64, block_size=24, dtype="float32"))
    prompt = rng.integers(0, 23, (2, 6))
    cache = kv_cache.KVCache.for_model(model, 2, 24)
    kv_cache.prefill(model, cache, prompt)
    kv_cache.decode_step(model, cache, np.array([3, 9]), active=np.array([True, False]))
    got = kv_cache.decode_step(model, cache, np.array([3, 4]))
    assert_close("row 1", got[1], model.forward(np.concatenate([prompt[1], [4]])[None])[0, -1])
    assert_close("row 0", got[0], model.forward(np.concatenate([prompt[0], [3, 3]])[None])[0, -1])
    new = rng.integers(0, 23, (1, 4))
    row = cache.rows(slice(1, 2))
    assert_close("admitted", kv_cache.prefill(model, row, new)[0], model.forward(new)[0, -1])
    with pytest.raises(ValueError, match="recurrent state"):     # behind the state: refused
        la.recurrent_step(np.zeros((1, 1, 3 * 8)), *row.layers[0], np.array([2]), 2)


def test_unequal_prompts_decode_in_one_batch_as_each_alone():
    """Right-padded prompts: the padding never enters S (the step gets n_valid = the prompt
    lengths), so each row equals its prompt decoded alone (greedy), cached or not."""
    model = nontrivial(dataclasses.replace(CFG64, block_size=24, dtype="float32"))
    prompts = [np.arange(1, 11), np.array([7, 8]), np.array([3, 1, 4, 1, 5, 9])]
    kw = dict(max_new_tokens=8, temperature=0)
    alone = [model.generate(p[None], **kw)[0] for p in prompts]
    for use_cache in (True, False):
        for got, want in zip(generate_batch(model, prompts, use_cache=use_cache, **kw), alone):
            np.testing.assert_array_equal(got, want)


def test_config_round_trip_save_load_and_refusals(tmp_path):
    cfg = mm.GPTConfig.preset("tiny", attention="linear")
    assert mm.GPTConfig.from_dict(cfg.to_dict()) == cfg
    model = nontrivial(cfg)
    model.save(tmp_path / "m")
    back = mm.GPT.load(tmp_path / "m")
    assert back.config == cfg
    idx = np.arange(30)[None]
    assert_close("reloaded", back.forward(idx), model.forward(idx))
    with pytest.raises(ValueError, match="attention='linear'"):
        model.save_hf(tmp_path / "hf")
    for field in ("window", "stride", "block", "n_global"):
        with pytest.raises(ValueError, match=f"{field}=4 is not used by attention='linear'"):
            mm.GPTConfig.preset("tiny", attention="linear", **{field: 4})


ACTIVE = [pytest.param(n, marks=pytest.mark.skipif(not backend.available()[n][0], reason="unavailable"))
          for n in ("numpy", "numba")]


@pytest.mark.parametrize("active", ACTIVE)
def test_the_device_stand_in_runs_it(active):
    cfg = mm.GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=16, attention="linear")
    cpu, dev = host_device_pair(cfg, "standin")
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 31, (2, 16)), rng.integers(0, 31, (2, 16))
    loss, grads = cpu.loss_and_grads(idx, targets)
    prompt = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
    want = cpu.generate(prompt, max_new_tokens=8, temperature=0)
    with backend.use(active):
        loss_d, grads_d = dev.loss_and_grads(idx, targets)
        got = dev.generate(prompt, max_new_tokens=8, temperature=0)
    assert_close("loss", loss_d, loss, "float32")
    for k in grads:
        assert_close(k, grads_d[k], grads[k], rtol=0, atol=1e-4 * np.abs(grads[k]).max())
    np.testing.assert_array_equal(backend.to_numpy(got), want)
