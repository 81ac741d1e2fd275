"""minillm.layers: every backward against float64 central differences, softmax
properties, dtype preservation of every forward and backward output.

The gradient check uses a random upstream gradient ``dout``: the scalar
``loss = sum(out * dout)`` has d loss / d input = backward(dout, cache).
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm import layers
from tests.helpers import assert_close, check_grads

FD = settings(deadline=None, max_examples=15)
seeds = st.integers(0, 2**32 - 1)
lead_shapes = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)   # the "..." axes


def linear_sum(forward, dout):
    """The scalar loss sum(forward()[0] * dout) as a function of no arguments."""
    return lambda: float(np.sum(forward()[0] * dout))


# --- finite differences ------------------------------------------------------
@given(seed=seeds, B=st.integers(1, 3), T_max=st.integers(1, 5), V=st.integers(1, 6),
       C=st.integers(1, 4), data=st.data())
@FD
def test_embedding_backward(seed, B, T_max, V, C, data):
    rng = np.random.default_rng(seed)
    pos0 = data.draw(st.integers(0, T_max - 1), label="pos0")
    T = data.draw(st.integers(1, T_max - pos0), label="T")
    idx = rng.integers(0, V, size=(B, T))               # repeated ids are likely: scatter-add
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((T_max, C))
    out, cache = layers.embedding_forward(idx, wte, wpe, pos0)
    dout = rng.standard_normal(out.shape)
    dwte, dwpe = layers.embedding_backward(dout, cache)
    f = linear_sum(lambda: layers.embedding_forward(idx, wte, wpe, pos0), dout)
    check_grads("embedding", f, [wte, wpe], [dwte, dwpe])


@given(seed=seeds, B=st.integers(1, 3), T_max=st.integers(2, 6), C=st.integers(1, 4),
       data=st.data())
@FD
def test_embedding_with_one_start_position_per_row(seed, B, T_max, C, data):
    """Decoding embeds each row at its own position: row b equals that row embedded alone."""
    rng = np.random.default_rng(seed)
    T = data.draw(st.integers(1, T_max - 1), label="T")
    pos = rng.integers(0, T_max - T + 1, size=B)                       # (B,) starts
    idx = rng.integers(0, 5, size=(B, T))
    wte, wpe = rng.standard_normal((5, C)), rng.standard_normal((T_max, C))
    out, cache = layers.embedding_forward(idx, wte, wpe, pos)
    for b in range(B):
        alone, _ = layers.embedding_forward(idx[b:b + 1], wte, wpe, int(pos[b]))
        assert_close(f"row {b}", out[b:b + 1], alone)
    dout = rng.standard_normal(out.shape)
    dwte, dwpe = layers.embedding_backward(dout, cache)
    f = linear_sum(lambda: layers.embedding_forward(idx, wte, wpe, pos), dout)
    check_grads("embedding per row", f, [wte, wpe], [dwte, dwpe])


@given(seed=seeds, lead=lead_shapes, Cin=st.integers(1, 5), Cout=st.integers(1, 5),
       bias=st.booleans())
@FD
def test_linear_backward(seed, lead, Cin, Cout, bias):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(lead + (Cin,)), rng.standard_normal((Cin, Cout))
    b = rng.standard_normal(Cout) if bias else None
    out, cache = layers.linear_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = layers.linear_backward(dout, cache)
    assert (db is None) == (not bias)
    f = linear_sum(lambda: layers.linear_forward(x, w, b), dout)
    check_grads("linear", f, [x, w] + ([b] if bias else []), [dx, dw] + ([db] if bias else []))


@given(seed=seeds, lead=lead_shapes, C=st.integers(1, 6), eps=st.sampled_from([1e-5, 1e-2]))
@FD
def test_layernorm_backward(seed, lead, C, eps):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (C,)) * 2 + 0.5
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    out, cache = layers.layernorm_forward(x, w, b, eps)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = layers.layernorm_backward(dout, cache)
    f = linear_sum(lambda: layers.layernorm_forward(x, w, b, eps), dout)
    check_grads("layernorm", f, [x, w, b], [dx, dw, db])


@given(seed=seeds, lead=lead_shapes, C=st.integers(1, 6))
@FD
def test_gelu_backward(seed, lead, C):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (C,)) * 3
    out, cache = layers.gelu_forward(x)
    dout = rng.standard_normal(out.shape)
    dx = layers.gelu_backward(dout, cache)
    check_grads("gelu", linear_sum(lambda: layers.gelu_forward(x), dout), [x], [dx])


@given(seed=seeds, lead=lead_shapes, C=st.integers(1, 6), scale=st.sampled_from([1.0, 10.0]))
@FD
def test_softmax_backward(seed, lead, C, scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (C,)) * scale
    out, cache = layers.softmax_forward(x)
    dout = rng.standard_normal(out.shape)
    dx = layers.softmax_backward(dout, cache)
    check_grads("softmax", linear_sum(lambda: layers.softmax_forward(x), dout), [x], [dx])


@given(seed=seeds, lead=lead_shapes, V=st.integers(1, 6))
@FD
def test_cross_entropy_backward(seed, lead, V):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(lead + (V,)) * 2
    targets = rng.integers(0, V, size=lead)
    dloss = float(rng.standard_normal())
    loss, cache = layers.cross_entropy_forward(logits, targets)
    dlogits = layers.cross_entropy_backward(dloss, cache, logits.shape)
    f = lambda: float(layers.cross_entropy_forward(logits, targets)[0]) * dloss  # noqa: E731
    check_grads("cross_entropy", f, [logits], [dlogits])


# --- values against a direct formula -----------------------------------------
def test_cross_entropy_value(rng):
    logits, targets = rng.standard_normal((2, 3, 7)), rng.integers(0, 7, size=(2, 3))
    loss, _ = layers.cross_entropy_forward(logits, targets)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, targets[..., None], axis=-1).mean()
    assert_close("cross-entropy", loss, ref)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0]])
    loss, cache = layers.cross_entropy_forward(logits, np.array([0]))
    assert np.isfinite(loss) and loss == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(layers.cross_entropy_backward(1.0, cache, logits.shape)).all()


def test_layernorm_output_is_normalised(rng):
    x = rng.standard_normal((4, 16)) * 5 + 3
    y, _ = layers.layernorm_forward(x, np.ones(16), np.zeros(16), 1e-5)
    assert_close("mean", y.mean(-1), np.zeros(4), atol=1e-12)
    assert_close("var", y.var(-1), np.ones(4), rtol=1e-5)


def test_gelu_matches_gpt2_formula_and_limits():
    x = np.linspace(-6, 6, 49)
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    assert_close("gelu", layers.gelu_forward(x)[0], ref)
    assert layers.gelu_forward(np.array([0.0]))[0][0] == 0.0
    assert_close("gelu(+20)", layers.gelu_forward(np.array([20.0]))[0], [20.0])


def test_embedding_scatter_adds_repeated_ids():
    idx = np.array([[2, 2, 2]])
    wte, wpe = np.zeros((4, 1)), np.zeros((3, 1))
    _, cache = layers.embedding_forward(idx, wte, wpe)
    dwte, dwpe = layers.embedding_backward(np.ones((1, 3, 1)), cache)
    assert dwte[:, 0].tolist() == [0.0, 0.0, 3.0, 0.0]
    assert dwpe[:, 0].tolist() == [1.0, 1.0, 1.0]


# --- softmax properties -------------------------------------------------------
@given(seed=seeds, rows=st.integers(1, 6), V=st.integers(1, 12),
       scale=st.sampled_from([1e-3, 1.0, 30.0, 300.0]), dtype=st.sampled_from(["float32", "float64"]),
       mask_p=st.sampled_from([0.0, 0.5, 0.9]))
@settings(deadline=None, max_examples=40)
def test_softmax_rows_sum_to_one_and_masked_are_exactly_zero(seed, rows, V, scale, dtype, mask_p):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, V)) * scale).astype(dtype)
    masked = rng.random((rows, V)) < mask_p
    masked[np.arange(rows), rng.integers(0, V, size=rows)] = False       # one live entry per row
    x[masked] = -np.inf
    y, _ = layers.softmax_forward(x)
    assert y.dtype == x.dtype
    assert np.all(y[masked] == 0.0)
    assert np.all(y >= 0) and np.isfinite(y).all()
    assert_close("row sums", y.sum(-1), np.ones(rows, dtype))


@given(seed=seeds, V=st.integers(1, 8), shift=st.floats(-1e3, 1e3))
@settings(deadline=None, max_examples=20)
def test_softmax_is_shift_invariant(seed, V, shift):
    x = np.random.default_rng(seed).standard_normal((3, V))
    assert_close("softmax(x + c)", layers.softmax_forward(x + shift)[0],
                 layers.softmax_forward(x)[0], rtol=1e-9, atol=1e-12)


# --- dtype preservation ---------------------------------------------------------
def _all_outputs(rng, dtype):
    """name -> every array produced by each forward and backward, inputs in ``dtype``."""
    a = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    out = {}
    idx = rng.integers(0, 5, size=(2, 3))
    y, c = layers.embedding_forward(idx, a(5, 4), a(6, 4), 1)
    out["embedding_forward"] = [y]
    out["embedding_backward"] = list(layers.embedding_backward(a(2, 3, 4), c))
    for b in (a(4), None):
        y, c = layers.linear_forward(a(2, 3, 6), a(6, 4), b)
        out[f"linear_forward bias={b is not None}"] = [y]
        grads = layers.linear_backward(a(2, 3, 4), c)
        out[f"linear_backward bias={b is not None}"] = [g for g in grads if g is not None]
    y, c = layers.layernorm_forward(a(2, 3, 4), a(4), a(4))
    out["layernorm_forward"] = [y, *c[:2]]
    out["layernorm_backward"] = list(layers.layernorm_backward(a(2, 3, 4), c))
    y, c = layers.gelu_forward(a(2, 3, 4))
    out["gelu_forward"], out["gelu_backward"] = [y], [layers.gelu_backward(a(2, 3, 4), c)]
    y, c = layers.softmax_forward(a(2, 3, 4))
    out["softmax_forward"], out["softmax_backward"] = [y], [layers.softmax_backward(a(2, 3, 4), c)]
    loss, c = layers.cross_entropy_forward(a(2, 3, 5), rng.integers(0, 5, size=(2, 3)))
    out["cross_entropy_forward"] = [np.asarray(loss), c.probs]
    out["cross_entropy_backward"] = [layers.cross_entropy_backward(1.0, c, (2, 3, 5))]
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_layer_keeps_its_input_dtype(dtype, rng):
    for name, arrays in _all_outputs(rng, dtype).items():
        for i, arr in enumerate(arrays):
            assert arr.dtype == np.dtype(dtype), f"{name} output {i} is {arr.dtype}, input {dtype}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_backward_keeps_dtype_for_a_numpy_scalar_dloss(dtype, rng):
    """The upstream gradient of a loss is often a NumPy scalar (e.g. a scaled loss)."""
    loss, c = layers.cross_entropy_forward(rng.standard_normal((3, 5)).astype(dtype),
                                           rng.integers(0, 5, size=3))
    d = layers.cross_entropy_backward(np.float64(0.5), c, (3, 5))
    assert d.dtype == np.dtype(dtype)
    ref = layers.cross_entropy_backward(0.5, c, (3, 5))
    assert_close("dlogits", d, ref)
