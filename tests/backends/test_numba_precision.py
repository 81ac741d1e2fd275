"""backends/numba_precision.py: the half-precision decode twin of layers.linear_forward.

- every one of the 65536 float16 / bfloat16 codes widens to exactly the float32
  NumPy / ml_dtypes give (both float16 paths: F16C's instruction and the bit
  operations; subnormals, +-0, inf and nan included);
- the twin equals the reference ``layers.linear_forward`` on half inputs (hypothesis
  over shapes, bias, a transposed weight like the tied head, rows on both sides of
  ``_MAX_ROWS``) within one rounding of the half output (float32 sums in another order);
- inf / nan / subnormal weights flow through as the reference's do.
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


def check_twin(x, w, b=None):
    y, cache = P.linear_forward(x, w, b)
    ref, _ = REFERENCE(x, w, b)
    assert y.dtype == ref.dtype == x.dtype and y.shape == ref.shape
    assert cache.x is x and cache.w is w and cache.has_bias == (b is not None)
    y32, ref32 = y.astype(np.float32), ref.astype(np.float32)
    # float32 sums in another order may round the half result to a neighbour
    scale = np.abs(x.astype(np.float32)) @ np.abs(w.astype(np.float32)) + 1e-30
    np.testing.assert_array_less(np.abs(y32 - ref32), ULP[x.dtype.name] * (np.abs(ref32) + 1e-3 * scale) + 1e-6)


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


@pytest.mark.parametrize("transposed", [False, True])
def test_inf_nan_and_subnormal_weights_flow_through(transposed):
    rng = np.random.default_rng(0)
    K, N = 19, 12
    x = np.abs(rng.standard_normal((3, K))).astype(np.float16) + np.float16(0.5)   # positive, finite
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
    assert P.linear_forward.accepts_half
    x, w = np.ones((1, 8), np.float32), np.ones((8, 3), np.float32)
    np.testing.assert_array_equal(P.linear_forward(x, w)[0], x @ w)            # float32: unchanged
