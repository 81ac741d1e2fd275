"""backends/numba_precision.py: the half-precision decode twins (layers.linear_forward,
attention.append_attend).

- every one of the 65536 float16 / bfloat16 codes widens to exactly the float32
  NumPy / ml_dtypes give (both float16 paths: F16C's instruction and the bit
  operations; subnormals, +-0, inf and nan included); float32 rounds to the
  same half code as NumPy / ml_dtypes round it (the twin's output and bias add);
- the twin equals the reference ``layers.linear_forward`` on half inputs (hypothesis
  over shapes, bias, a transposed weight like the tied head, rows on both sides of
  ``_MAX_ROWS``) within one rounding of the half output (float32 sums in another order);
- inf / nan / subnormal weights flow through as the reference's do;
- the decode step's attention over a half KV cache stores the same codes as the
  reference and returns its output within a few half ulps.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import backend
P = pytest.importorskip("backends.numba_precision")
REFERENCE = backend.reference("layers.linear_forward")
ULP = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}     # half's relative spacing near 1
DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
CODES = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)


def same_floats(got, want):
    """Bit-equal float32 arrays, except that any nan equals any nan."""
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("fmt", ["f16", "f16_bits", "f16c", "bf16"])
def test_every_code_widens_exactly(fmt):
    if fmt == "f16c" and not P.HAS_F16C:
        pytest.skip("this CPU (or Numba's target) has no F16C")
    dtype = DTYPES["bfloat16" if fmt == "bf16" else "float16"]
    same_floats(P.widen_codes(CODES, fmt), CODES.view(dtype).astype(np.float32))


@pytest.mark.parametrize("fmt", ["f16", "f16_bits", "f16c", "bf16"])
def test_narrowing_rounds_as_numpy_and_ml_dtypes(fmt):
    """float32 -> half codes (the twin rounds its sums and adds the bias in compiled code):
    random bit patterns (every exponent: overflow, subnormals, nan), exact ties, every code."""
    if fmt == "f16c" and not P.HAS_F16C:
        pytest.skip("this CPU (or Numba's target) has no F16C")
    dtype = DTYPES["bfloat16" if fmt == "bf16" else "float16"]
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore", invalid="ignore"):
        codes = CODES.view(dtype).astype(np.float64)
        values = np.concatenate([
            rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
            codes.astype(np.float32),                                           # every code itself
            ((codes[:-1] + codes[1:]) / 2).astype(np.float32),                  # exact ties: to even
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 2.0 ** -25, 3e38], np.float32)])
        want = values.astype(dtype).astype(np.float32)
    same_floats(P.narrow_codes(values, fmt).view(dtype).astype(np.float32), want)


def check_twin(x, w, b=None):
    y, cache = P.linear_forward(x, w, b)
    ref, _ = REFERENCE(x, w, b)
    assert y.dtype == ref.dtype == x.dtype and y.shape == ref.shape
    assert cache.x is x and cache.w is w and cache.has_bias == (b is not None)
    y32, ref32 = y.astype(np.float32), ref.astype(np.float32)
    # float32 sums in another order may round the half product x w to a neighbour (one
    # spacing at |x w| <= |y| + |b|), and the rounding after the bias add to another
    # (one spacing at |y|): however small y is, the bias term stays
    scale = np.abs(x.astype(np.float32)) @ np.abs(w.astype(np.float32)) + 1e-30
    bias = 0.0 if b is None else np.abs(b.astype(np.float32))
    np.testing.assert_array_less(np.abs(y32 - ref32),
                                 ULP[x.dtype.name] * (2 * np.abs(ref32) + bias + 1e-3 * scale) + 1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@given(lead=st.lists(st.integers(1, 9), min_size=1, max_size=3), K=st.integers(1, 40),
       N=st.integers(1, 40), transposed=st.booleans(), bias=st.booleans(), seed=st.integers(0, 99))
@settings(deadline=None, max_examples=30)
def test_twin_equals_the_reference(dtype, lead, K, N, transposed, bias, seed):
    rng, dtype = np.random.default_rng(seed), DTYPES[dtype]
    x = rng.standard_normal(tuple(lead) + (K,)).astype(dtype)                # rows up to 729 > _MAX_ROWS
    w = rng.standard_normal((N, K) if transposed else (K, N)).astype(dtype)
    w = w.T if transposed else w                                             # wte.T of the tied head
    b = rng.standard_normal(N).astype(dtype) if bias else None
    check_twin(x, w, b)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 2, 9])
def test_decode_and_prefill_rows(dtype, rows):
    """One row (a decode step: the row-streaming loop) and a few (a prefill: the blocked loop),
    with a bias (rounded and added in compiled code) and without."""
    rng, dtype = np.random.default_rng(rows), DTYPES[dtype]
    x = rng.standard_normal((1, rows, 37)).astype(dtype)
    w = rng.standard_normal((37, 70)).astype(dtype)
    for b in (None, rng.standard_normal(70).astype(dtype)):
        check_twin(x, w, b)
        check_twin(x, np.ascontiguousarray(w.T).T, b)                       # the tied head's layout


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_inf_nan_and_subnormal_weights_flow_through(transposed, rows):
    rng = np.random.default_rng(0)
    K, N = 19, 12
    x = np.abs(rng.standard_normal((rows, K))).astype(np.float16) + np.float16(0.5)   # positive, finite
    w = rng.standard_normal((K, N)).astype(np.float16)
    w[:, 0] = np.float16(6e-8)            # float16's smallest subnormals (2^-24)
    w[:, 1] = np.float16(-3e-5)           # larger subnormals
    w[4, 2], w[5, 3], w[6, 4] = np.inf, -np.inf, np.nan
    w[:, 5] = np.float16(-0.0)
    if transposed:
        w = np.ascontiguousarray(w.T).T
    y, _ = P.linear_forward(x, w)
    ref, _ = REFERENCE(x, w)
    same_floats(y.astype(np.float32), ref.astype(np.float32))   # sums of few terms: exact here
    assert np.isposinf(y[:, 2]).all() and np.isneginf(y[:, 3]).all() and np.isnan(y[:, 4]).all()
    assert (y[:, 0] > 0).all() and (y[:, 1] < 0).all()


def test_the_backend_runs_the_twin_on_half_models():
    assert backend.twin("numba", "layers.linear_forward") is P.linear_forward
    assert backend.twin("numba", "attention.append_attend") is P.append_attend
    assert P.linear_forward.accepts_half and P.append_attend.accepts_half
    x, w = np.ones((1, 8), np.float32), np.ones((8, 3), np.float32)
    np.testing.assert_array_equal(P.linear_forward(x, w)[0], x @ w)            # float32: unchanged


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@given(B=st.integers(1, 3), T=st.integers(1, 4), H=st.integers(1, 4), D=st.integers(1, 9),
       seed=st.integers(0, 1000))
@settings(deadline=None, max_examples=25)
def test_half_append_attend_equals_the_reference(dtype, B, T, H, D, seed):
    """The decode step's attention over a half KV cache: the same stored codes, and outputs
    within a few half ulps (the twin rounds where the reference does; sum orders differ)."""
    rng, dtype, S_max = np.random.default_rng(seed), DTYPES[dtype], 12
    pos = rng.integers(0, S_max - T + 1, B)
    qkv = (2 * rng.standard_normal((B, T, 3 * H * D))).astype(dtype)
    k0, v0 = rng.standard_normal((2, B, H, S_max, D)).astype(dtype)
    k1, v1, k2, v2 = k0.copy(), v0.copy(), k0.copy(), v0.copy()
    ref = backend.reference("attention.append_attend")(qkv, k1, v1, pos, H)
    got = backend.twin("numba", "attention.append_attend")(qkv, k2, v2, pos, H)
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
    np.testing.assert_array_equal(k2.view(np.uint16), k1.view(np.uint16))     # the same codes stored
    np.testing.assert_array_equal(v2.view(np.uint16), v1.view(np.uint16))
    vmax = np.abs(v1.astype(np.float32)).max()                                # y mixes values
    np.testing.assert_array_less(np.abs(got.astype(np.float32) - ref.astype(np.float32)),
                                 4 * ULP[dtype.name] * vmax + 1e-6)


def test_half_append_attend_refuses_slots_outside_the_cache():
    qkv = np.zeros((1, 2, 12), np.float16)
    k, v = np.zeros((2, 1, 2, 3, 2), np.float16)          # (B, H, S_max, D) each
    for pos in ([2], [-1]):
        with pytest.raises(IndexError, match="outside"):
            P.append_attend(qkv, k, v, np.array(pos), 2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_model_decodes_as_the_reference(dtype):
    """A half model's cached greedy decode under numba (both twins) picks the reference's tokens."""
    import minillm as mm
    cfg = mm.GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
    half = mm.GPT(cfg, seed=3).astype(dtype)
    prompt = np.array([[1, 5, 9, 2]])
    want = half.generate(prompt, 12, temperature=0)
    with backend.use("numba"):
        got = half.generate(prompt, 12, temperature=0)
    np.testing.assert_array_equal(got, want)
