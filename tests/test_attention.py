"""minillm.attention: causal SDPA (T == S in training, T < S with a KV cache) and the
multi-head self-attention wrapper, against central differences and a loop reference."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm import attention as attn
from tests.helpers import assert_close, check_grads

FD = settings(deadline=None, max_examples=15)
seeds = st.integers(0, 2**32 - 1)


def sdpa_loop(q, k, v):
    """Attention one query at a time, over the keys it may see (a reference written apart)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    y = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                seen = S - T + t + 1                       # keys 0 .. S - T + t
                s = k[b, h, :seen] @ q[b, h, t] / math.sqrt(D)
                w = np.exp(s - s.max())
                y[b, h, t] = (w / w.sum()) @ v[b, h, :seen]
    return y


@given(T=st.integers(1, 6), extra=st.integers(0, 4))
@settings(deadline=None, max_examples=20)
def test_causal_mask(T, extra):
    S = T + extra
    m = attn.causal_mask(T, S)
    assert m.shape == (T, S) and m.dtype == bool
    for t in range(T):
        assert m[t].tolist() == [s <= S - T + t for s in range(S)]
    assert m[-1].all()                                     # the newest query sees every key


@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 4),
       extra=st.integers(0, 3), D=st.integers(1, 4))
@settings(deadline=None, max_examples=20)
def test_sdpa_forward_matches_a_loop(seed, B, H, T, extra, D):
    rng = np.random.default_rng(seed)
    S = T + extra
    q, k, v = (rng.standard_normal((B, H, n, D)) for n in (T, S, S))
    y, cache = attn.sdpa_forward(q, k, v)
    assert y.shape == (B, H, T, D)
    assert_close("sdpa", y, sdpa_loop(q, k, v))
    assert_close("att rows", cache.att.sum(-1), np.ones((B, H, T)))
    assert np.all(cache.att[..., ~attn.causal_mask(T, S)] == 0.0)


@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 4),
       extra=st.integers(0, 3), D=st.integers(1, 3))
@FD
def test_sdpa_backward(seed, B, H, T, extra, D):
    """Includes T < S: queries are the last T of S positions, as when decoding with a KV cache."""
    rng = np.random.default_rng(seed)
    S = T + extra
    q, k, v = (rng.standard_normal((B, H, n, D)) for n in (T, S, S))
    y, cache = attn.sdpa_forward(q, k, v)
    dy = rng.standard_normal(y.shape)
    dq, dk, dv = attn.sdpa_backward(dy, cache)
    f = lambda: float(np.sum(attn.sdpa_forward(q, k, v)[0] * dy))  # noqa: E731
    check_grads("sdpa", f, [q, k, v], [dq, dk, dv])


@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 4), H=st.integers(1, 3),
       D=st.integers(1, 3))
@FD
def test_self_attention_backward(seed, B, T, H, D):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * D))
    y, cache = attn.self_attention_forward(qkv, H)
    assert y.shape == (B, T, H * D)
    dy = rng.standard_normal(y.shape)
    dqkv = attn.self_attention_backward(dy, cache)
    f = lambda: float(np.sum(attn.self_attention_forward(qkv, H)[0] * dy))  # noqa: E731
    check_grads("self_attention", f, [qkv], [dqkv])


@given(seed=seeds, T=st.integers(1, 4), H=st.integers(1, 3), D=st.integers(1, 3))
@settings(deadline=None, max_examples=10)
def test_heads_are_independent_slices_of_the_channels(seed, T, H, D):
    """Head h of self_attention is SDPA on channels h*D:(h+1)*D of q, k, v."""
    rng = np.random.default_rng(seed)
    C = H * D
    qkv = rng.standard_normal((1, T, 3 * C))
    y, _ = attn.self_attention_forward(qkv, H)
    for h in range(H):
        sl = slice(h * D, (h + 1) * D)
        q, k, v = (qkv[:, None, :, i * C:(i + 1) * C][..., sl] for i in range(3))
        assert_close(f"head {h}", y[:, :, sl], sdpa_loop(q, k, v)[:, 0])


def test_split_and_merge_heads_are_inverse(rng):
    x = rng.standard_normal((2, 5, 12))
    h = attn.split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4)
    assert np.array_equal(attn.merge_heads(h), x)


@given(seed=seeds, T=st.integers(2, 6), t=st.integers(0, 5))
@settings(deadline=None, max_examples=15)
def test_future_keys_and_values_do_not_change_earlier_outputs(seed, T, t):
    t = t % (T - 1)
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 2, T, 3)) for _ in range(3))
    y, _ = attn.sdpa_forward(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, t + 1:] += rng.standard_normal(k2[:, :, t + 1:].shape)
    v2[:, :, t + 1:] += rng.standard_normal(v2[:, :, t + 1:].shape)
    y2, _ = attn.sdpa_forward(q, k2, v2)
    assert_close("outputs up to t", y2[:, :, :t + 1], y[:, :, :t + 1])
    assert not np.allclose(y2[:, :, t + 1:], y[:, :, t + 1:])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("T,S", [(4, 4), (1, 5), (2, 6)])
def test_attention_keeps_its_input_dtype(dtype, T, S, rng):
    q, k, v = (rng.standard_normal((2, 2, n, 3)).astype(dtype) for n in (T, S, S))
    y, cache = attn.sdpa_forward(q, k, v)
    outs = {"y": y, "att": cache.att}
    dy = rng.standard_normal(y.shape).astype(dtype)
    outs.update(zip(("dq", "dk", "dv"), attn.sdpa_backward(dy, cache)))
    qkv = rng.standard_normal((2, T, 12)).astype(dtype)
    y, cache = attn.self_attention_forward(qkv, 2)
    outs["self_attention y"] = y
    outs["dqkv"] = attn.self_attention_backward(rng.standard_normal(y.shape).astype(dtype), cache)
    for name, a in outs.items():
        assert a.dtype == np.dtype(dtype), f"{name} is {a.dtype}, inputs {dtype}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float32_matches_float64(dtype, rng):
    q, k, v = (rng.standard_normal((2, 2, 5, 4)) for _ in range(3))
    y64, c64 = attn.sdpa_forward(q, k, v)
    y, c = attn.sdpa_forward(*(a.astype(dtype) for a in (q, k, v)))
    assert_close("y", y, y64, dtype)
    dy = rng.standard_normal(y.shape)
    for name, g, g64 in zip("qkv", attn.sdpa_backward(dy.astype(dtype), c), attn.sdpa_backward(dy, c64)):
        assert_close(f"d{name}", g, g64, dtype)
