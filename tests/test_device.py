"""The model on the device stand-in equals the model on NumPy (``test_gpu.py``'s
counterpart that runs on every CI machine, GPU or not).

``model.to("standin")`` moves the parameters onto arrays that refuse, as CuPy's
do, implicit conversion to NumPy and mixing with host arrays (``tests/standin.py``).
The reference code must then run unchanged through ``xp_of``, whichever backend
is active: a failure here is a host/device mix-up that a real GPU would hit too.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from minillm import GPT, GPTConfig, backend
from minillm.generation import generate_batch
from tests import standin
from tests.backends.test_kernels import MAKERS, assert_same_output, to_backend
from tests.helpers import assert_close, host_device_pair

CFG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32)
ACTIVE = [pytest.param(name, marks=pytest.mark.skipif(not backend.available()[name][0],
                                                      reason=backend.available()[name][1]))
          for name in ("numpy", "numba")]


def nontrivial_pair(seed=0):
    """(numpy model, stand-in model) with the same nontrivial float32 weights."""
    return host_device_pair(CFG, "standin", seed)


def batch(seed=1, B=3, T=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG.vocab_size, size=(B, T)), rng.integers(0, CFG.vocab_size, size=(B, T))


def on_device(obj) -> bool:
    """Every array in ``obj`` (also inside tuples / NamedTuples) is a stand-in array."""
    if isinstance(obj, tuple):
        return all(on_device(o) for o in obj)
    return not isinstance(obj, (np.ndarray, np.generic)) and (
        not hasattr(obj, "shape") or isinstance(obj, standin.DeviceArray))


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


@pytest.mark.parametrize("kw", [dict(temperature=0, use_cache=True), dict(temperature=0, use_cache=False),
                                dict(temperature=0.8, top_k=10, top_p=0.9, seed=3)],
                         ids=["greedy-cached", "greedy-uncached", "sampled"])
@pytest.mark.parametrize("active", ACTIVE)
def test_generation_equals_numpy(active, kw):
    cpu, dev = nontrivial_pair()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    expected = cpu.generate(prompt, max_new_tokens=6, **kw)
    with backend.use(active):
        got = dev.generate(prompt, max_new_tokens=6, **kw)
    assert np.array_equal(backend.to_numpy(got), expected)


@pytest.mark.parametrize("active", ACTIVE)
def test_batched_generation_of_different_lengths_equals_numpy(active):
    cpu, dev = nontrivial_pair()
    prompts = [np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([9, 8, 7])]
    kw = dict(max_new_tokens=5, temperature=0)
    expected = generate_batch(cpu, prompts, **kw)
    with backend.use(active):
        got = generate_batch(dev, prompts, **kw)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert np.array_equal(backend.to_numpy(g), e)


@pytest.mark.parametrize("active", ACTIVE)
def test_generation_with_eos_equals_numpy(active):
    cpu, dev = nontrivial_pair()
    prompt = np.array([[1, 2, 3], [3, 2, 1]])
    eos = int(cpu.generate(prompt, max_new_tokens=1, temperature=0)[0, -1])  # row 0 stops at once
    kw = dict(max_new_tokens=6, temperature=0, eos_id=eos)
    expected = cpu.generate(prompt, **kw)
    with backend.use(active):
        got = dev.generate(prompt, **kw)
    assert np.array_equal(backend.to_numpy(got), expected)


def test_save_and_load_of_a_device_model(tmp_path):
    cpu, dev = nontrivial_pair()
    dev.save(tmp_path / "m")
    back = GPT.load(tmp_path / "m")
    for k in cpu.params:
        assert type(back.params[k]) is np.ndarray and np.array_equal(back.params[k], cpu.params[k]), k


def test_clipping_and_optimizer_state_on_the_device():
    from minillm.optim import AdamW, clip_grad_norm, grad_norm
    cpu, dev = nontrivial_pair()
    idx, targets = batch()
    _, grads = cpu.loss_and_grads(idx, targets)
    _, grads_d = dev.loss_and_grads(idx, targets)
    assert_close("grad norm", grad_norm(grads_d), grad_norm(grads), "float32")
    assert_close("norm before clipping", clip_grad_norm(grads_d, 0.1), clip_grad_norm(grads, 0.1),
                 "float32")
    assert_close("norm after clipping", grad_norm(grads_d), 0.1, "float32")
    opt, opt_d = AdamW(cpu.params), AdamW(dev.params)
    opt.step(cpu.params, grads)
    opt_d.step(dev.params, grads_d)
    state = opt_d.state_dict()
    assert all(type(v) is np.ndarray for v in state.values())      # checkpoints hold host arrays
    fresh = AdamW(dev.params)
    fresh.load_state_dict(opt.state_dict())                          # host state into device moments
    for k in opt.m:
        assert isinstance(fresh.m[k], standin.DeviceArray), k
        assert_close(f"m.{k}", fresh.m[k], state[f"m.{k}"], "float32")


@pytest.mark.parametrize("active", ACTIVE)
def test_training_loop_with_checkpoint_and_resume_equals_numpy(active, tmp_path):
    """``train``: micro-batches, clipping, evaluation, a checkpoint, then a resume."""
    from minillm.train import TrainConfig, train
    cpu, dev = nontrivial_pair()
    ids = np.random.default_rng(5).integers(0, CFG.vocab_size, size=400)
    tcfg = TrainConfig(steps=4, batch_size=4, seq_len=8, lr=1e-2, warmup_steps=1, grad_clip=0.5,
                       eval_interval=2, eval_batches=2, checkpoint_interval=2, micro_batch_size=2)
    ref = train(cpu, ids[:300], ids[300:], tcfg, progress=False)
    with backend.use(active):
        train(dev, ids[:300], ids[300:], dataclasses.replace(tcfg, steps=2), out_dir=tmp_path,
              progress=False)
        got = train(dev, ids[:300], ids[300:], tcfg, out_dir=tmp_path, resume=True, progress=False)
    assert got.start_step == 2
    assert all(isinstance(v, standin.DeviceArray) for v in dev.params.values())
    assert_close("losses", np.array(got.losses), np.array(ref.losses), "float32")
    assert_close("val losses", np.array([e["val_loss"] for e in got.evals]),
                 np.array([e["val_loss"] for e in ref.evals]), "float32")
    for k in cpu.params:
        assert_close(k, dev.params[k], cpu.params[k], rtol=1e-3, atol=1e-5)


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
