"""minillm.quantization: int8 / int4 weights, int8 activations, LLM.int8's outlier split.

- quantizers: dequantized weights within s/2 of the originals (hypothesis), packing
  round-trips, per-row activation codes;
- kernels: the Numba twins equal the NumPy references (integers exactly) on random
  shapes, on both sides of the twins' row threshold;
- models: w8 logits equal the float model run on the dequantized weights; the
  backward of w8 / w4g64 matches float64 central differences; quantize -> save ->
  load -> same logits; cached == uncached generation; the stand-in runs it;
- the outlier experiment: an injected 20x feature breaks w8a8, llm.int8 holds;
- bad input: ValueErrors that name the argument, nothing half-written.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import backend, gradcheck, quantization as Q, seams
from tests.helpers import assert_close, host_device_pair

SCHEMES = list(Q.SCHEMES)
CFG = mm.GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=64)
CFG64 = mm.GPTConfig(vocab_size=29, block_size=8, n_layer=2, n_head=2, n_embd=64, dtype="float64")
HAS_NUMBA = backend.available()["numba"][0]
ACTIVE = ["numpy"] + (["numba"] if HAS_NUMBA else [])


def nontrivial(cfg, seed=0, noise=0.1):
    """GPT-2 init moved by noise, so LayerNorms and biases are not 1 / 0."""
    model = mm.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 7)
    for k, v in model.params.items():
        model.params[k] = (v + noise * rng.standard_normal(v.shape)).astype(v.dtype)
    return model


def ids(cfg, B=2, T=None, seed=1):
    rng = np.random.default_rng(seed)
    T = T or cfg.block_size
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


# --- quantizers ------------------------------------------------------------------------------
weights = st.tuples(st.integers(1, 9), st.integers(1, 7), st.integers(0, 10**6),
                    st.sampled_from([1e-3, 1.0, 50.0]))


@given(weights, st.booleans())
@settings(deadline=None, max_examples=40)
def test_int8_dequantized_within_half_a_step(shape, per_channel):
    n_in, n_out, seed, scale = shape
    w = (np.random.default_rng(seed).standard_normal((n_in, n_out)) * scale).astype(np.float32)
    w[:, 0] = 0                                                    # an all-zero column: s = 0, q = 0
    q, s = Q.quantize_int8(w, per_channel=per_channel)
    assert q.dtype == np.int8 and q.shape == w.shape and np.abs(q).max() <= 127
    assert s.shape == ((n_out,) if per_channel else ())
    err = np.abs(Q.dequantize_int8(q, s) - w)
    assert np.all(err <= np.broadcast_to(s, w.shape) / 2 * (1 + 1e-6) + 1e-12)


@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 10**6), st.sampled_from([1e-2, 1.0, 30.0]))
@settings(deadline=None, max_examples=30)
def test_int4_dequantized_within_half_a_step_and_packing_round_trips(groups, n_out, seed, scale):
    n_in = 64 * groups
    w = (np.random.default_rng(seed).standard_normal((n_in, n_out)) * scale).astype(np.float32)
    q, s = Q.quantize_int4(w)
    assert q.dtype == np.int8 and np.abs(q).max() <= 7 and s.shape == (groups, n_out)
    packed = Q.pack_int4(q.T)
    assert packed.dtype == np.uint8 and packed.shape == (n_out, n_in // 2)
    np.testing.assert_array_equal(Q.unpack_int4(packed), q.T)
    deq = Q.dequantize_int4(packed, s.T)                            # (out, in)
    step = np.repeat(s, 64, axis=0).T                               # (out, in)
    assert np.all(np.abs(deq - w.T) <= step / 2 * (1 + 1e-6) + 1e-12)


@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 10**6))
@settings(deadline=None, max_examples=30)
def test_rows_are_quantized_per_token(M, K, seed):
    x = np.random.default_rng(seed).standard_normal((M, K)).astype(np.float32) * 3
    xq, sx = Q.quantize_rows(x)
    assert xq.dtype == np.int8 and sx.shape == (M, 1)
    assert np.all(np.abs(xq).max(axis=1) == 127)                    # each row uses the full range
    assert np.all(np.abs(xq * sx - x) <= sx / 2 + 1e-6 * np.abs(x))   # float32 rounding of x / s_x


def test_outlier_columns_are_the_features_above_the_threshold():
    x = np.zeros((3, 5), np.float32)
    x[1, 2], x[2, 4], x[0, 0] = -6.5, 7.0, 6.0                      # 6.0 itself is not an outlier
    np.testing.assert_array_equal(Q.outlier_columns(x), [False, False, True, False, True])


# --- kernels: twins == references ------------------------------------------------------------
def kernel_args(name, M, K, N, rng, dtype=np.float32):
    x = rng.standard_normal((M, K)).astype(dtype)
    if name == "quantization.int8_matmul":
        return (rng.integers(-127, 128, (M, K)).astype(np.int8), rng.integers(-127, 128, (N, K)).astype(np.int8))
    if name == "quantization.w8_matmul":
        return x, rng.integers(-127, 128, (N, K)).astype(np.int8), rng.random(N).astype(dtype)
    packed = rng.integers(0, 256, (N, K // 2)).astype(np.uint8)
    if name == "quantization.unpack_int4":
        return (packed,)
    return x, packed, rng.random((N, K // 64)).astype(dtype)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba unavailable")
@pytest.mark.parametrize("name", ["quantization.int8_matmul", "quantization.unpack_int4",
                                  "quantization.w8_matmul", "quantization.w4_matmul"])
@given(M=st.sampled_from([1, 2, 3, 8, 9, 20]), groups=st.integers(1, 3), N=st.integers(1, 300),
       odd=st.integers(0, 63), seed=st.integers(0, 10**6), f64=st.booleans())
@settings(deadline=None, max_examples=12)
def test_twins_equal_the_reference(name, M, groups, N, odd, seed, f64):
    K = 64 * groups if "4" in name else 64 * groups - odd             # int8 kernels: any K
    args = kernel_args(name, M, K, N, np.random.default_rng(seed), np.float64 if f64 else np.float32)
    ref = backend.reference(name)(*args)
    got = backend.twin("numba", name)(*args)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.dtype.kind in "iu":
        np.testing.assert_array_equal(got, ref)                     # integers: exactly
    else:
        assert_close(name, got, ref, rtol=1e-5 if not f64 else 1e-12,
                     atol=(1e-4 if not f64 else 1e-10) * max(1.0, float(np.abs(ref).max())))


def test_the_kernels_are_registered_with_their_twins():
    names = {"quantization.w8_matmul", "quantization.int8_matmul", "quantization.w4_matmul",
             "quantization.unpack_int4"}
    assert names <= set(backend.kernels())
    if HAS_NUMBA:
        assert all(backend.twin("numba", n) is not None for n in names)


def test_int8_matmul_is_exact_at_the_extremes():
    xq = np.full((2, 4096), -127, np.int8)
    q = np.full((3, 4096), -127, np.int8)
    assert (backend.reference("quantization.int8_matmul")(xq, q) == 127 * 127 * 4096).all()


# --- models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["w8", "w4g64"])
def test_weight_only_logits_equal_the_float_model_on_dequantized_weights(scheme):
    model = nontrivial(CFG64)
    qm = mm.quantize(model, scheme)
    idx, _ = ids(CFG64)
    deq = Q.dequantize(qm)
    assert deq.config.linear == "dense"
    assert_close("logits", qm.forward(idx), deq.forward(idx), "float64")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_leaves_the_float_model_untouched_and_sets_the_kind(scheme):
    model = nontrivial(CFG)
    before = {k: v.copy() for k, v in model.params.items()}
    qm = mm.quantize(model, scheme)
    assert qm.config.linear == Q.SCHEMES[scheme] and model.config.linear == "dense"
    assert all(np.array_equal(model.params[k], before[k]) for k in before)
    assert not any(np.shares_memory(a, b) for a in qm.params.values() for b in model.params.values())
    frozen = set(qm.params) - set(qm.trainable())
    assert frozen == {f"h.{i}.{r}.{s}" for i in range(2) for r in seams.LINEAR_ROLES for s in ("qweight", "scale")}
    idx, targets = ids(CFG)
    assert abs(qm.loss(idx, targets) - model.loss(idx, targets)) < 0.05


@pytest.mark.parametrize("scheme", ["w8", "w4g64"])
def test_backward_matches_central_differences(scheme, rng):
    qm = mm.quantize(nontrivial(CFG64), scheme)
    idx, targets = ids(CFG64)
    grads = gradcheck.check_model_grads(qm, idx, targets, rng, max_entries=4)
    assert set(grads) == set(qm.trainable())


@pytest.mark.parametrize("scheme", ["w8a8", "llm.int8"])
def test_activation_rounding_is_passed_straight_through(scheme):
    """dx of w8a8 / llm.int8 is w8's (d round(x)/dx := 1); only the biases' grads are taken."""
    model = nontrivial(CFG64)
    a, w8 = mm.quantize(model, scheme), mm.quantize(model, "w8")
    idx, targets = ids(CFG64)
    _, ga = a.loss_and_grads(idx, targets)
    _, gw = w8.loss_and_grads(idx, targets)
    assert set(ga) == set(a.trainable())
    for k in ga:
        assert_close(k, ga[k], gw[k], rtol=0, atol=0.05 * np.abs(gw[k]).max() + 1e-9)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_training_step_runs_and_keeps_the_codes(scheme):
    qm = mm.quantize(nontrivial(CFG), scheme)
    codes = {k: v.copy() for k, v in qm.params.items() if k.endswith(("qweight", "scale"))}
    data = np.random.default_rng(3).integers(0, CFG.vocab_size, 400)
    res = mm.train.train(qm, data, None, mm.train.TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0),
                         progress=False)
    assert len(res.losses) == 2
    assert all(np.array_equal(qm.params[k], v) for k, v in codes.items())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_load_round_trip(scheme, tmp_path):
    qm = mm.quantize(nontrivial(CFG), scheme)
    qm.save(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["config"]["linear"] == Q.SCHEMES[scheme]
    back = mm.GPT.load(tmp_path / "q")
    assert back.config == qm.config and back.nbytes() == qm.nbytes()
    idx, _ = ids(CFG)
    np.testing.assert_array_equal(back.forward(idx), qm.forward(idx))


@pytest.mark.parametrize("active", ACTIVE)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cached_generation_equals_uncached(scheme, active):
    qm = mm.quantize(nontrivial(CFG, noise=0.02), scheme)
    prompt = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    with backend.use(active):
        for kw in (dict(temperature=0.0), dict(temperature=0.9, seed=3)):
            np.testing.assert_array_equal(qm.generate(prompt, 12, use_cache=True, **kw),
                                          qm.generate(prompt, 12, use_cache=False, **kw))


@pytest.mark.skipif(not HAS_NUMBA, reason="numba unavailable")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_numba_model_equals_numpy_model(scheme):
    qm = mm.quantize(nontrivial(CFG), scheme)
    idx, _ = ids(CFG)
    with backend.use("numpy"):
        ref, ref1 = qm.forward(idx), qm.forward(idx[:1, :3])      # BLAS path, then the row loops
    with backend.use("numba"):
        got, got1 = qm.forward(idx), qm.forward(idx[:1, :3])
    assert_close("logits", got, ref, rtol=1e-4, atol=1e-4)
    assert_close("logits (3 rows)", got1, ref1, rtol=1e-4, atol=1e-4)


def test_bytes_held_per_scheme():
    model = mm.GPT(mm.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=256), seed=0)
    fp = Q.linear_nbytes(model)
    ratios = {s: Q.linear_nbytes(mm.quantize(model, s)) / fp for s in SCHEMES}
    assert ratios["w8"] == ratios["w8a8"] == ratios["llm.int8"] <= 0.27
    assert ratios["w4g64"] <= 0.15
    qm = mm.quantize(model, "w4g64")
    assert qm.nbytes() == sum(v.nbytes for v in qm.params.values()) < model.nbytes()


def test_outliers_break_w8a8_and_llm_int8_holds():
    model = nontrivial(CFG, noise=0.02)
    spiked = Q.inject_outlier(model, channel=5, factor=20.0)
    idx, _ = ids(CFG)
    ref = model.forward(idx)
    assert_close("the float model is unchanged", spiked.forward(idx), ref, rtol=1e-4, atol=1e-4)
    assert np.abs(spiked.params["h.0.ln_2.weight"]).max() > 10

    def err(m, scheme):
        return float(np.abs(mm.quantize(m, scheme).forward(idx) - ref).mean())

    assert err(spiked, "w8a8") > 3 * err(model, "w8a8")            # the outlier eats the int8 range
    assert err(spiked, "llm.int8") < err(spiked, "w8a8") / 2
    assert err(model, "llm.int8") <= err(model, "w8a8") * 1.0001


# --- the device stand-in ---------------------------------------------------------------------
@pytest.mark.parametrize("active", ACTIVE)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_standin_runs_quantized_models(scheme, active, tmp_path):
    from tests import standin
    cpu, dev = host_device_pair(CFG, "standin")
    q_cpu = mm.quantize(cpu, scheme)
    idx, targets = ids(CFG, T=12)
    with backend.use(active):
        q_dev = mm.quantize(dev, scheme)                            # quantized where it lives
        assert all(isinstance(v, standin.DeviceArray) for v in q_dev.params.values())
        logits = q_dev.forward(idx)
        _, grads = q_dev.loss_and_grads(idx, targets)
        out = q_dev.generate(idx[:1, :4], 6, temperature=0.0)
    assert isinstance(logits, standin.DeviceArray)
    with backend.use("numpy"):
        ref = q_cpu.forward(idx)
        _, g_ref = q_cpu.loss_and_grads(idx, targets)
        np.testing.assert_array_equal(out, q_cpu.generate(idx[:1, :4], 6, temperature=0.0))
    assert_close("logits", logits, ref, rtol=1e-4, atol=1e-4)
    assert set(grads) == set(g_ref)
    q_dev.save(tmp_path / "d")
    assert_close("reloaded", mm.GPT.load(tmp_path / "d").forward(idx), ref, rtol=1e-4, atol=1e-4)
    assert_close("dequantized", Q.dequantize(q_dev).forward(idx), Q.dequantize(q_cpu).forward(idx),
                 rtol=1e-4, atol=1e-4)


# --- bad input ----------------------------------------------------------------------------------
def test_unknown_scheme_lists_the_four():
    with pytest.raises(ValueError, match=r"scheme='int3'.*'w8', 'w8a8', 'llm.int8', 'w4g64'"):
        mm.quantize(mm.GPT(CFG), "int3")
    with pytest.raises(ValueError, match="scheme"):
        mm.quantize(mm.GPT(CFG), None)


def test_already_quantized_and_non_gpt_are_refused():
    qm = mm.quantize(mm.GPT(CFG), "w8")
    with pytest.raises(ValueError, match="already quantized.*'w8'"):
        mm.quantize(qm, "w4g64")
    with pytest.raises(ValueError, match="model must be a minillm GPT, got dict"):
        mm.quantize({"wte.weight": np.zeros(3)}, "w8")
    with pytest.raises(ValueError, match="not a quantized one"):
        Q.dequantize(mm.GPT(CFG))


def test_int4_layer_not_divisible_by_64_is_named_and_nothing_is_written():
    cfg = mm.GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=64)
    model = mm.GPT(cfg)
    model = mm.GPT(cfg, params=dict(model.params))
    bad = __import__("tests.test_seams", fromlist=["shrink"]).shrink(model, {}, {1: list(range(100))})
    before = {k: v.copy() for k, v in bad.params.items()}
    with pytest.raises(ValueError, match=r"layer h\.1\.mlp\.c_proj has 100 in-features, not divisible by .* 64"):
        mm.quantize(bad, "w4g64")
    assert all(np.array_equal(bad.params[k], before[k]) for k in before)
    assert bad.config.linear == "dense"
    mm.quantize(bad, "w8")                                          # int8 takes any width
    with pytest.raises(ValueError, match="h.0.attn.c_attn has 96 in-features"):
        mm.quantize(mm.GPT(mm.GPTConfig(vocab_size=61, block_size=8, n_layer=1, n_head=2, n_embd=96)),
                    "w4g64")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_checkpoint_with_missing_or_misshapen_scales_is_refused(scheme, tmp_path):
    from minillm.checkpoint import read_tensors, write_tensors
    qm = mm.quantize(mm.GPT(CFG), scheme)
    qm.save(tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    tensors = read_tensors(f)
    for role in ("mlp.c_fc", "attn.c_proj"):
        broken = dict(tensors)
        del broken[f"h.1.{role}.scale"]
        write_tensors(f, broken)
        with pytest.raises(ValueError, match=rf"h\.1\.{role}\.scale"):
            mm.GPT.load(tmp_path / "q")
        broken[f"h.1.{role}.scale"] = tensors[f"h.1.{role}.scale"][:-1]
        write_tensors(f, broken)
        with pytest.raises(ValueError, match=rf"h\.1\.{role}\.scale.*shape"):
            mm.GPT.load(tmp_path / "q")


def test_inject_outlier_checks_its_arguments():
    model = mm.GPT(CFG)
    with pytest.raises(ValueError, match="channel=64"):
        Q.inject_outlier(model, channel=64)
    with pytest.raises(ValueError, match="factor=0"):
        Q.inject_outlier(model, factor=0)
    with pytest.raises(ValueError, match="dense"):
        Q.inject_outlier(mm.quantize(model, "w8"))
