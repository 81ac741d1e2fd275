"""The model on CuPy arrays equals the model on NumPy arrays (skipped without a GPU).

``model.to("cupy")`` moves the parameters; the reference code then runs unchanged
through ``xp_of``, with or without ``backend.use("cupy")`` (which adds CuPy twins).
"""
import numpy as np
import pytest

from minillm import GPTConfig, backend
from tests.helpers import assert_close, host_device_pair

CUPY_OK, CUPY_REASON = backend.available()["cupy"]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUPY_OK, reason=f"cupy: {CUPY_REASON}")]

CFG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32)


def nontrivial_pair(seed=0):
    """(numpy model, cupy model) with the same nontrivial float32 weights."""
    return host_device_pair(CFG, "cupy", seed)


def batch(seed=1, B=3, T=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG.vocab_size, size=(B, T)), rng.integers(0, CFG.vocab_size, size=(B, T))


def test_to_cupy_moves_every_parameter_and_back():
    cp = backend.xp_for("cupy")
    cpu, gpu = nontrivial_pair()
    assert gpu.xp is cp
    assert all(type(v).__module__.startswith("cupy") for v in gpu.params.values())
    gpu.to("numpy")
    assert gpu.xp is np
    for k in cpu.params:
        assert np.array_equal(gpu.params[k], cpu.params[k]), k


@pytest.mark.parametrize("active", ["numpy", "cupy"])
def test_forward_and_grads_equal_numpy(active):
    cpu, gpu = nontrivial_pair()
    idx, targets = batch()
    logits = cpu.forward(idx)
    loss, grads = cpu.loss_and_grads(idx, targets)
    with backend.use(active):
        logits_g = gpu.forward(idx)
        loss_g, grads_g = gpu.loss_and_grads(idx, targets)
    assert type(logits_g).__module__.startswith("cupy")
    assert logits_g.dtype == np.float32
    assert_close("logits", logits_g, logits, "float32")
    assert_close("loss", loss_g, loss, "float32")
    assert set(grads_g) == set(grads)
    for k in grads:
        assert grads_g[k].dtype == np.float32, k
        assert_close(k, grads_g[k], grads[k], rtol=0, atol=1e-4 * np.abs(grads[k]).max())


def test_training_steps_run_on_cupy_and_lower_the_loss():
    from minillm.optim import AdamW
    _, gpu = nontrivial_pair()
    idx, targets = batch()
    opt = AdamW(gpu.params, lr=1e-2)
    losses = []
    for _ in range(5):
        loss, grads = gpu.loss_and_grads(idx, targets)
        opt.step(gpu.params, grads)
        losses.append(loss)
    assert all(type(v).__module__.startswith("cupy") for v in gpu.params.values())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_greedy_generation_equals_numpy():
    cpu, gpu = nontrivial_pair()
    prompt = np.array([[1, 2, 3]])
    kw = dict(max_new_tokens=6, temperature=0, use_cache=False)
    assert np.array_equal(backend.to_numpy(gpu.generate(prompt, **kw)), cpu.generate(prompt, **kw))
