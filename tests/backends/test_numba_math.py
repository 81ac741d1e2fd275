"""backends.numba_math: the vectorisable exp and sigmoid against float64 NumPy."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

numba = pytest.importorskip("numba")

from backends.numba_math import vexp, vsigmoid  # noqa: E402


@numba.njit
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = vexp(x[i])


@numba.njit
def _sigmoid_all(x, out):
    for i in range(x.shape[0]):
        out[i] = vsigmoid(x[i])


def _ulps(got, ref64):
    """|got - ref| in units of float32 spacing at the (float32-rounded) reference."""
    return np.abs(got.astype(np.float64) - ref64) / np.spacing(np.abs(ref64).astype(np.float32))


def _run(fn, x):
    out = np.empty_like(x)
    fn(x, out)
    return out


@settings(deadline=None)                         # the first example compiles
@given(st.lists(st.floats(-86.5, 88.71875, width=32), min_size=1, max_size=300))
def test_float32_exp_is_within_2_ulp_of_the_true_value(values):
    x = np.array(values, dtype=np.float32)
    got = _run(_exp_all, x)
    assert got.dtype == np.float32
    assert _ulps(got, np.exp(x.astype(np.float64))).max() <= 2.0


def test_float32_exp_on_a_dense_grid_and_at_the_edges():
    x = np.linspace(-86.5, 88.71875, 2_000_003, dtype=np.float32)
    assert _ulps(_run(_exp_all, x), np.exp(x.astype(np.float64))).max() <= 2.0
    edges = np.array([-np.inf, -1e30, -87.0, 88.73, 1e30, np.inf, np.nan, 0.0, -0.0], np.float32)
    got = _run(_exp_all, edges)
    np.testing.assert_array_equal(got[:6], [0, 0, 0, np.inf, np.inf, np.inf])
    assert np.isnan(got[6]) and got[7] == 1.0 and got[8] == 1.0


@settings(deadline=None)
@given(st.lists(st.floats(-1000.0, 1000.0, width=32), min_size=1, max_size=300))
def test_float32_sigmoid_is_close_to_the_true_value_in_both_tails(values):
    x = np.array(values, dtype=np.float32)
    got = _run(_sigmoid_all, x)
    e = np.exp(-np.abs(x.astype(np.float64)))    # <= 1: no overflow on either side
    ref = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    tiny = ref < 1e-37                           # true value below float32's normal range: 0 is fine
    assert np.all(_ulps(got[~tiny], ref[~tiny]) <= 4.0)
    assert np.all(got[tiny] <= 1e-37) and np.all((got >= 0) & (got <= 1))


def test_float64_calls_stay_float64_and_exact():
    x = np.linspace(-700, 700, 10_001)
    np.testing.assert_allclose(_run(_exp_all, x), np.exp(x), rtol=1e-15, atol=0)
    np.testing.assert_allclose(_run(_sigmoid_all, x), 1.0 / (1.0 + np.exp(-x)), rtol=1e-15, atol=0)
