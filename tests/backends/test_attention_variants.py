"""The Numba twins of minillm.sparse_attention's pattern kernels equal the NumPy reference.

``backends/numba_attention_variants.py`` takes the queries four at a time against the
shared band of keys (zeroing what a row's pattern forbids; far keys row by row; its own
float32 exp; T padded to a multiple of 4); the reference is the chunked NumPy kernel. Both return
(y, lse) forward and (dq, dk, dv) backward, so the pair is compared end to end,
hypothesis over the pattern, T, H and D, in float32 and float64; the twin's
backward also meets float64 central differences and runs on the reference's
forward cache (the caches are plain arrays, the same for both).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm import backend, gradcheck
from minillm import sparse_attention as sa
from tests.helpers import assert_close, sparse_patterns

pytestmark = pytest.mark.skipif(not backend.available()["numba"][0], reason="numba not available")
FORWARD = "sparse_attention.pattern_attention_forward"
BACKWARD = "sparse_attention.pattern_attention_backward"

patterns = sparse_patterns(70)


def arrays(seed, B, H, T, D, dtype):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(4))


@given(p=patterns, T=st.integers(1, 90), H=st.integers(1, 3), D=st.integers(1, 11),
       B=st.integers(1, 2), dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 99))
@settings(deadline=None, max_examples=40)
def test_twins_equal_the_reference_forward_and_backward(p, T, H, D, B, dtype, seed):
    q, k, v, dy = arrays(seed, B, H, T, D, dtype)
    ref_f, ref_b = backend.reference(FORWARD), backend.reference(BACKWARD)
    twin_f, twin_b = backend.twin("numba", FORWARD), backend.twin("numba", BACKWARD)
    y, lse = twin_f(q, k, v, p)
    y_ref, lse_ref = ref_f(q, k, v, p)
    assert y.dtype == lse.dtype == np.dtype(dtype)
    assert_close("y", y, y_ref, dtype)
    assert_close("lse", lse, lse_ref, dtype)
    grads = twin_b(dy, q, k, v, y, lse, p)
    # dq and dk go through ds = p (dy.v - rowsum(dy * y)), two sums of size |dy| |v| that
    # cancel (exactly, for a one-key window): the absolute error scales with them, not with
    # the result, and summing in another order is allowed to leave ~1e-7 of them
    cancel = float(np.abs(dy).max() * np.abs(v).max() * max(np.abs(q).max(), np.abs(k).max()))
    atol = {"float32": 1e-6, "float64": 1e-12}[dtype] * max(cancel, 1.0)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_b(dy, q, k, v, y_ref, lse_ref, p)):
        assert g.dtype == np.dtype(dtype)
        assert_close(name, g, r, dtype, atol=atol if name != "dv" else None)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [sa.Pattern("window", 64), sa.Pattern("strided", None, 16),
                               sa.Pattern("block", block=30, n_global=4)], ids=lambda p: p.name)
def test_twins_equal_the_reference_at_the_bench_head_size(p, dtype):
    """D = 32 (the bench's; whole 4 x 4 blocks of the band loops), T = 301 (not a multiple
    of 4: the padded last quad), windows and blocks much shorter than T; block = 30 puts
    block starts inside quads (rows of one quad with different first keys)."""
    q, k, v, dy = arrays(5, 1, 2, 301, 32, dtype)
    y, lse = backend.twin("numba", FORWARD)(q, k, v, p)
    y_ref, lse_ref = backend.reference(FORWARD)(q, k, v, p)
    assert_close("y", y, y_ref, dtype)
    assert_close("lse", lse, lse_ref, dtype)
    grads = backend.twin("numba", BACKWARD)(dy, q, k, v, y, lse, p)
    for name, g, r in zip(("dq", "dk", "dv"), grads, backend.reference(BACKWARD)(dy, q, k, v, y_ref, lse_ref, p)):
        assert g.shape == r.shape and g.flags.c_contiguous
        assert_close(name, g, r, dtype)


@pytest.mark.parametrize("p", [sa.Pattern("window", 4), sa.Pattern("strided", 2, 3),
                               sa.Pattern("block", block=3, n_global=2)], ids=lambda p: p.name)
def test_twin_backward_meets_finite_differences(p):
    q, k, v, dy = arrays(0, 1, 2, 13, 3, "float64")
    with backend.use("numba"):
        _, cache = sa.sparse_attention_forward(q, k, v, p)
        grads = sa.sparse_attention_backward(dy, cache)
        f = lambda: float((sa.sparse_attention_forward(q, k, v, p)[0] * dy).sum())   # noqa: E731
        gradcheck.check_grads(p.name, f, [q, k, v], list(grads), np.random.default_rng(1))


def test_the_numba_backend_runs_the_twin_and_mixes_with_the_reference():
    """sparse_attention_forward/backward dispatch to the twin under numba; a forward on one
    backend and the backward on the other agree (the cache is the same plain arrays)."""
    q, k, v, dy = arrays(3, 1, 2, 50, 4, "float32")
    p = sa.Pattern("window", 7)
    with backend.use("numba"):
        y, cache = sa.sparse_attention_forward(q, k, v, p)
    np.testing.assert_array_equal(y, backend.twin("numba", FORWARD)(q, k, v, p)[0])
    with backend.use("numpy"):
        ref = sa.sparse_attention_backward(dy, cache)
    with backend.use("numba"):
        got = sa.sparse_attention_backward(dy, cache)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert_close(name, g, r, "float32")


def test_twin_refuses_a_pattern_it_does_not_know():
    x = np.zeros((1, 1, 4, 2), np.float32)
    with pytest.raises(ValueError, match="dense"):
        backend.twin("numba", FORWARD)(x, x, x, sa.Pattern("dense"))


@pytest.mark.parametrize("kind", [dict(attention="window", window=3),
                                  dict(attention="block", block=3, n_global=1)], ids=["window", "block"])
def test_a_model_step_on_numba_equals_numpy(kind):
    """The twins in place: loss and gradients of a small model of each kind agree."""
    import minillm as mm
    cfg = mm.GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=8, **kind)
    model = mm.GPT(cfg, seed=0)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 29, (2, 16)), rng.integers(0, 29, (2, 16))
    with backend.use("numpy"):
        loss, grads = model.loss_and_grads(idx, targets)
    with backend.use("numba"):
        loss_n, grads_n = model.loss_and_grads(idx, targets)
    assert_close("loss", loss_n, loss, "float32")
    for name in grads:
        assert_close(name, grads_n[name], grads[name], rtol=1e-4, atol=1e-5 * np.abs(grads[name]).max())
