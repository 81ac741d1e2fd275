"""The model on the device stand-in equals the model on NumPy (``test_gpu.py``'s
counterpart that runs on every CI machine, GPU or not).

``model.to("standin")`` moves the parameters onto arrays that refuse, as CuPy's
do, implicit conversion to NumPy and mixing with host arrays (``tests/standin.py``).
The reference code must then run unchanged through ``xp_of``, whichever backend
is active: a failure here is a host/device mix-up that a real GPU would hit too.
"""
from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest

from minillm import GPT, GPTConfig, backend
from tests import standin
from tests.backends.test_kernels import MAKERS, assert_same_output, to_backend
from tests.helpers import assert_close

CFG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32)
ACTIVE = [pytest.param(name, marks=pytest.mark.skipif(not backend.available()[name][0],
                                                      reason=backend.available()[name][1]))
          for name in ("numpy", "numba")]


def nontrivial_pair(seed=0):
    """(numpy model, stand-in model) with the same nontrivial float32 weights."""
    rng = np.random.default_rng(seed)
    cpu = GPT(CFG, seed=seed)
    for k, v in cpu.params.items():
        cpu.params[k] = (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
    dev = GPT(CFG, params={k: v.copy() for k, v in cpu.params.items()}).to("standin")
    return cpu, dev


def batch(seed=1, B=3, T=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG.vocab_size, size=(B, T)), rng.integers(0, CFG.vocab_size, size=(B, T))


def on_device(obj) -> bool:
    """Every array in ``obj`` (also inside tuples / NamedTuples) is a stand-in array."""
    if isinstance(obj, tuple):
        return all(on_device(o) for o in obj)
    return not isinstance(obj, (np.ndarray, np.generic)) and (
        not hasattr(obj, "shape") or isinstance(obj, standin.DeviceArray))


def generate_batch_fn():
    """Batched generation of prompts of different lengths, wherever it lives now."""
    for module in ("minillm.generation", "minillm.kv_cache"):
        try:
            fn = getattr(importlib.import_module(module), "generate_batch", None)
        except ModuleNotFoundError:
            continue
        if fn is not None:
            return fn
    pytest.fail("no generate_batch in minillm.generation or minillm.kv_cache")


# --- the model ---------------------------------------------------------------------------------
def test_to_standin_moves_every_parameter_and_back():
    cpu, dev = nontrivial_pair()
    assert dev.xp is standin.xp
    assert all(isinstance(v, standin.DeviceArray) for v in dev.params.values())
    dev.to("numpy")
    assert dev.xp is np
    for k in cpu.params:
        assert type(dev.params[k]) is np.ndarray and np.array_equal(dev.params[k], cpu.params[k]), k


@pytest.mark.parametrize("active", ACTIVE)
def test_forward_and_grads_equal_numpy(active):
    cpu, dev = nontrivial_pair()
    idx, targets = batch()
    logits = cpu.forward(idx)
    loss, grads = cpu.loss_and_grads(idx, targets)
    with backend.use(active):
        logits_d = dev.forward(idx)
        loss_d, grads_d = dev.loss_and_grads(idx, targets)
    assert isinstance(logits_d, standin.DeviceArray)
    assert logits_d.dtype == np.float32
    assert_close("logits", logits_d, logits, "float32")
    assert_close("loss", loss_d, loss, "float32")
    assert set(grads_d) == set(grads)
    for k in grads:
        assert isinstance(grads_d[k], standin.DeviceArray), k
        assert grads_d[k].dtype == np.float32, k
        assert_close(k, grads_d[k], grads[k], rtol=0, atol=1e-4 * np.abs(grads[k]).max())


@pytest.mark.parametrize("active", ACTIVE)
def test_training_steps_run_on_the_device_and_lower_the_loss(active):
    from minillm.optim import AdamW
    _, dev = nontrivial_pair()
    idx, targets = batch()
    opt = AdamW(dev.params, lr=1e-2)
    losses = []
    with backend.use(active):
        for _ in range(3):
            loss, grads = dev.loss_and_grads(idx, targets)
            opt.step(dev.params, grads)
            losses.append(loss)
        losses.append(dev.loss(idx, targets))
    assert all(isinstance(v, standin.DeviceArray) for v in dev.params.values())
    assert all(isinstance(v, standin.DeviceArray) for v in opt.m.values())
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("active", ACTIVE)
def test_greedy_generation_equals_numpy(active, use_cache):
    cpu, dev = nontrivial_pair()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    kw = dict(max_new_tokens=6, temperature=0, use_cache=use_cache)
    expected = cpu.generate(prompt, **kw)
    with backend.use(active):
        got = dev.generate(prompt, **kw)
    assert np.array_equal(backend.to_numpy(got), expected)


@pytest.mark.parametrize("active", ACTIVE)
def test_sampled_generation_equals_numpy(active):
    cpu, dev = nontrivial_pair()
    prompt = np.array([[1, 2, 3]])
    kw = dict(max_new_tokens=5, temperature=0.8, top_k=10, top_p=0.9, seed=3)
    expected = cpu.generate(prompt, **kw)
    with backend.use(active):
        got = dev.generate(prompt, **kw)
    assert np.array_equal(backend.to_numpy(got), expected)


@pytest.mark.parametrize("active", ACTIVE)
def test_batched_generation_of_different_lengths_equals_numpy(active):
    generate_batch = generate_batch_fn()
    cpu, dev = nontrivial_pair()
    prompts = [np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([9, 8, 7])]
    kw = dict(max_new_tokens=5, temperature=0)
    expected = generate_batch(cpu, prompts, **kw)
    with backend.use(active):
        got = generate_batch(dev, prompts, **kw)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert np.array_equal(backend.to_numpy(g), e)


# --- every kernel of the table, reference on device copies of its inputs -----------------------
KERNEL_NAMES = sorted(set(backend.kernels()) & set(MAKERS))


def test_the_kernel_table_has_inputs_to_run_here():
    assert KERNEL_NAMES, "no kernel of backend.kernels() has an input maker in MAKERS"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_every_kernel_runs_on_the_device_and_equals_numpy(name, dtype):
    ref = backend.reference(name)
    for seed in (0, 1, 2):
        args = MAKERS[name](np.random.default_rng(seed), dtype)
        expected = ref(*copy.deepcopy(args))
        got = ref(*to_backend(copy.deepcopy(args), standin.xp))
        assert on_device(got), f"{name}[seed={seed}]: a result came back on the host: {type(got)}"
        assert_same_output(f"standin:{name}[seed={seed}]", got, expected, dtype)
