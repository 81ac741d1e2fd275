"""The device stand-in (``tests/standin.py``) refuses what CuPy refuses and computes
what NumPy computes: each refusal and each working path, proven here.
"""
from __future__ import annotations

import copy
import importlib
import operator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minillm import backend, layers
from tests import standin
from tests.standin import DeviceArray, xp

NUMBA_OK = backend.available()["numba"][0]


def dev(a):
    return xp.asarray(np.asarray(a))


def host_and_dev(shape=(2, 3), dtype=np.float32):
    a = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape) - 2
    return a, dev(a)


# --- registration and the backend seam ---------------------------------------------------------
def test_registered_as_a_device_backend():
    a, d = host_and_dev()
    assert backend.available()["standin"][0]
    assert backend.xp_of(d) is standin.xp
    assert backend.xp_of(a) is np
    assert backend.xp_for("standin") is standin.xp
    got = backend.to_numpy(d)
    assert type(got) is np.ndarray and np.array_equal(got, a)


def test_synchronize_waits_on_the_stream():
    before = standin.Stream.synchronized
    backend.synchronize(dev([1.0]))
    assert standin.Stream.synchronized == before + 1
    backend.synchronize(np.ones(2))             # host arrays: nothing to wait for
    assert standin.Stream.synchronized == before + 1


@pytest.mark.skipif(not NUMBA_OK, reason="numba not installed")
def test_kernels_on_device_arrays_run_the_reference_never_the_numba_twin(monkeypatch):
    calls = []

    def twin(*args):
        calls.append(args)
        raise AssertionError("the numba twin got the arrays")

    numba_backend = importlib.import_module("backends.numba_backend")
    monkeypatch.setitem(numba_backend.KERNELS, "layers.gelu_forward", twin)
    x, d = host_and_dev((3, 4))
    with backend.use("numba"):
        y, cache = layers.gelu_forward(d)
        assert type(y) is DeviceArray and cache is d
        np.testing.assert_allclose(y.get(), backend.reference("layers.gelu_forward")(x)[0])
        with pytest.raises(AssertionError, match="numba twin"):   # control: host arrays reach it
            layers.gelu_forward(x)
    assert len(calls) == 1


# --- crossing the host/device line --------------------------------------------------------------
@pytest.mark.parametrize("convert", [np.asarray, np.array, lambda d: np.asarray(d, dtype=np.float64)])
def test_implicit_conversion_to_numpy_is_refused(convert):
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        convert(dev([1.0, 2.0]))


def test_get_and_asarray_copy():
    a, d = host_and_dev()
    h = d.get()
    h[0, 0] = 99                                   # the host copy is not the device data
    assert d.get()[0, 0] == a[0, 0]
    a[0, 0] = -99                                  # nor the host source of xp.asarray
    assert d.get()[0, 0] != -99
    assert xp.asarray(d) is d                      # already there: no copy (cupy.asarray)
    assert xp.asarray(d, dtype=np.float64).dtype == np.float64
    c = xp.array(d)
    assert c is not d and np.array_equal(c.get(), d.get())


@pytest.mark.parametrize("data", [np.arange(3), [1, 2, 3], [[1.5], [2.5]], 7, 2.5, np.float32(1.5),
                                  True])
def test_asarray_accepts_host_data(data):
    for make in (xp.asarray, xp.array):
        d = make(data)
        assert type(d) is DeviceArray
        ref = np.asarray(data)
        assert d.dtype == ref.dtype and np.array_equal(d.get(), ref)


HOST = np.ones((2, 3), dtype=np.float32)
MIXED = {
    "dev + host": lambda d: d + HOST,
    "host + dev": lambda d: HOST + d,
    "dev * host": lambda d: d * HOST,
    "host - dev": lambda d: HOST - d,
    "dev / host": lambda d: d / HOST,
    "dev ** host": lambda d: d ** HOST,
    "dev < host": lambda d: d < HOST,
    "host == dev": lambda d: HOST == d,
    "dev @ host.T": lambda d: d @ HOST.T,
    "host.T @ dev": lambda d: HOST.T @ d,
    "np.add(dev, host)": lambda d: np.add(d, HOST),
    "np.maximum(host, dev)": lambda d: np.maximum(HOST, d),
    "np.exp(dev, out=host)": lambda d: np.exp(d, out=HOST.copy()),
    "np.concatenate([dev, host])": lambda d: np.concatenate([d, HOST]),
    "np.where(dev > 0, dev, host)": lambda d: np.where(d > 0, d, HOST),
    "xp.add(dev, host)": lambda d: xp.add(d, HOST),
    "xp.add(host, host)": lambda d: xp.add(HOST, HOST),
    "xp.exp(host)": lambda d: xp.exp(HOST),
    "xp.where(host > 0, dev, 0)": lambda d: xp.where(HOST > 0, d, 0),
    "xp.concatenate([dev, host])": lambda d: xp.concatenate([d, HOST]),
    "xp.zeros_like(host)": lambda d: xp.zeros_like(HOST),
    "dev.dot(host.T)": lambda d: d.dot(HOST.T),
    "xp.add.at(dev, idx, host)": lambda d: xp.add.at(d, xp.asarray([0, 1]), HOST),
    "np.add.at(dev, host idx, 1)": lambda d: np.add.at(d, np.array([0]), 1.0),
    "xp.maximum.reduce(host)": lambda d: xp.maximum.reduce(HOST),
}


@pytest.mark.parametrize("name", sorted(MIXED))
def test_numpy_operands_are_refused(name):
    _, d = host_and_dev()
    with pytest.raises(TypeError, match="numpy.ndarray"):
        MIXED[name](d)


@pytest.mark.parametrize("op", [operator.iadd, operator.isub, operator.imul, operator.itruediv])
def test_inplace_with_a_numpy_operand_is_refused_and_changes_nothing(op):
    a, d = host_and_dev()
    with pytest.raises(TypeError, match="numpy.ndarray"):
        op(d, HOST)
    assert np.array_equal(d.get(), a)


@pytest.mark.parametrize("other", [[1.0, 2.0, 3.0], "text", object()])
def test_other_operands_are_refused(other):
    _, d = host_and_dev()
    with pytest.raises(TypeError):
        d + other
    with pytest.raises(TypeError, match="Unsupported type"):
        np.add(d, other)


def test_compare_with_none_is_false_not_an_error():
    _, d = host_and_dev()
    assert (d == None) is False and (d != None) is True   # noqa: E711 (the point of the test)


# --- arithmetic equals NumPy's, dtype included --------------------------------------------------
DTYPES = [np.float32, np.float64, np.int32, np.int64]
BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
          operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne,
          np.maximum, np.minimum, np.arctan2, np.hypot]
UNARY = [operator.neg, operator.pos, abs, np.exp, np.tanh, np.sqrt, np.log, np.log1p, np.sign,
         np.square, lambda x: x.sum(), lambda x: x.mean(axis=-1, keepdims=True),
         lambda x: x.max(axis=0), lambda x: x.argmax(), lambda x: x.cumsum(), lambda x: x.T,
         lambda x: x.reshape(-1), lambda x: x.astype(np.float16), lambda x: x.any(),
         lambda x: x.std(), lambda x: x.clip(-1, 1)]


def arrays(dtype, shape):
    elements = (st.floats(-3, 3, width=32) if np.dtype(dtype).kind == "f"
                else st.integers(-3, 3))
    return hnp.arrays(dtype, shape, elements=elements)


def same(got, ref):
    """A device result equals NumPy's: a device array, same dtype, same values."""
    assert type(got) is DeviceArray, type(got)
    ref = np.asarray(ref)
    g = got.get()
    assert g.dtype == ref.dtype, (g.dtype, ref.dtype)
    np.testing.assert_array_equal(g, ref)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype_a=st.sampled_from(DTYPES), dtype_b=st.sampled_from(DTYPES),
       shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), op=st.sampled_from(BINARY))
def test_binary_ops_on_device_equal_numpy(data, dtype_a, dtype_b, shape, op):
    a = data.draw(arrays(dtype_a, shape))
    b = data.draw(arrays(dtype_b, shape[1:]))           # broadcasting
    if op is operator.pow and np.dtype(dtype_b).kind == "i":
        b = np.abs(b)                                    # ints to negative powers: ValueError
    with np.errstate(all="ignore"):
        ref = op(a, b)
        same(op(dev(a), dev(b)), ref)
        same(op(dev(a), b[()] if b.ndim == 0 else 2), op(a, b[()] if b.ndim == 0 else 2))
        same(op(1.5, dev(a)), op(1.5, a))                 # Python scalars: NumPy's weak promotion
        same(op(dev(a), np.float32(2)), op(a, np.float32(2)))   # NumPy scalars are welcome


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), op=st.sampled_from(UNARY),
       shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4))
def test_unary_ops_and_reductions_on_device_equal_numpy(data, dtype, op, shape):
    a = data.draw(arrays(dtype, shape))
    with np.errstate(all="ignore"):
        same(op(dev(a)), op(a))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]),
       b=st.integers(1, 3), m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 4))
def test_matmul_on_device_equals_numpy(data, dtype, b, m, k, n):
    x = data.draw(arrays(dtype, (b, m, k)))
    w = data.draw(arrays(dtype, (k, n)))
    np.testing.assert_allclose((dev(x) @ dev(w)).get(), x @ w, rtol=1e-6)
    assert (dev(x) @ dev(w)).dtype == (x @ w).dtype


@pytest.mark.parametrize("op,value", [(operator.iadd, 2.0), (operator.imul, 3), (operator.isub, None),
                                      (operator.itruediv, np.float32(2)), (operator.ipow, 2)])
def test_inplace_ops_update_the_same_array_and_keep_its_dtype(op, value):
    a, d = host_and_dev()
    view = d[0]                                    # a view sees the in-place update
    other = dev(np.full(3, 0.5, np.float32)) if value is None else value
    got = op(d, other)
    ref = op(a.copy(), np.full(3, 0.5, np.float32) if value is None else value)
    assert got is d
    same(d, ref)
    same(view, ref[0])


def test_inplace_follows_numpys_casting_rule():
    d = dev(np.arange(3))
    with pytest.raises(TypeError):                 # int += float: NumPy's same_kind refusal
        d += 0.5


# --- indexing ------------------------------------------------------------------------------------
A = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
INDICES = {
    "int": lambda I: 1,
    "negative int": lambda I: -1,
    "numpy int": lambda I: np.int64(1),
    "slice": lambda I: slice(0, 2),
    "tuple of ints": lambda I: (1, 2, 3),
    "ellipsis": lambda I: (..., 1),
    "newaxis": lambda I: (None, 0, slice(None, None, -1)),
    "int array": lambda I: I(np.array([1, 0, 1])),
    "bool mask": lambda I: I(A > 10),
    "two int arrays": lambda I: (I(np.array([0, 1])), slice(None), I(np.array([3, 2]))),
    "broadcast arrays": lambda I: (I(np.arange(2)[:, None]), I(np.array([[0, 2]]))),
}


@pytest.mark.parametrize("name", sorted(INDICES))
def test_indexing_with_device_and_python_indices_equals_numpy(name):
    d = dev(A)
    same(d[INDICES[name](dev)], A[INDICES[name](np.asarray)])


@pytest.mark.parametrize("name", sorted(INDICES))
def test_index_assignment_equals_numpy(name):
    for value in (-1.0, np.float32(-2)):
        d, a = dev(A), A.copy()
        d[INDICES[name](dev)] = value
        a[INDICES[name](np.asarray)] = value
        same(d, a)
    d, a = dev(A), A.copy()
    a[1] = np.arange(12).reshape(3, 4)
    d[1] = xp.arange(12).reshape(3, 4)                 # a device value
    same(d, a)


def test_scalar_index_gives_a_0d_device_array():
    d = dev(A)
    s = d[1, 2, 3]
    assert type(s) is DeviceArray and s.shape == () and float(s) == 23.0


def test_slices_are_views_as_in_cupy():
    d = dev(A)
    d[0][1, :] = 0                                  # through a view
    assert d.get()[0, 1].sum() == 0


@pytest.mark.parametrize("index", [np.array([0, 1]), np.int64(0) + np.zeros(1, np.int64),
                                   [0, 1], (0, [1, 2]), (slice(None), np.array([True, False, True])),
                                   A > 3])
def test_host_indices_are_refused(index):
    d = dev(A)
    with pytest.raises(TypeError, match="Unsupported type"):
        d[index]
    with pytest.raises(TypeError, match="Unsupported type"):
        d[index] = 1.0


@pytest.mark.parametrize("value", [np.zeros(4, np.float32), np.zeros((3, 4)), [1, 2, 3, 4]])
def test_host_values_are_refused(value):
    d = dev(A)
    with pytest.raises(TypeError, match="Unsupported type"):
        d[0, 0] = value
    assert np.array_equal(d.get(), A)


# --- ufuncs, their methods and NumPy functions on device arrays ------------------------------------
def test_ufunc_at_and_reduce_on_device_arrays():
    idx = np.array([0, 2, 0, 1])
    vals = np.arange(12, dtype=np.float32).reshape(4, 3)
    ref = np.zeros((3, 3), np.float32)
    np.add.at(ref, idx, vals)
    for add_at in (np.add.at, xp.add.at):
        d = xp.zeros((3, 3), dtype=xp.float32)
        assert add_at(d, dev(idx), dev(vals)) is None
        same(d, ref)
    d = xp.zeros((3, 3), dtype=xp.float32)
    xp.add.at(d, (dev(np.array([0, 0])), dev(np.array([1, 1]))), 1.0)   # a tuple index
    assert d.get()[0, 1] == 2
    same(xp.maximum.reduce(dev(vals), axis=0), np.maximum.reduce(vals, axis=0))
    same(np.add.accumulate(dev(vals)), np.add.accumulate(vals))
    same(xp.multiply.outer(dev(idx), dev(idx)), np.multiply.outer(idx, idx))


def test_ufunc_out_argument_writes_in_place():
    a, d = host_and_dev()
    out = xp.empty_like(d)
    assert np.exp(d, out=out) is out
    np.testing.assert_allclose(out.get(), np.exp(a))
    assert xp.add(d, 1, out=d) is d


FUNCTIONS = {
    "concatenate": lambda m, a: m.concatenate([a, a], axis=-1),
    "stack": lambda m, a: m.stack([a, a]),
    "where": lambda m, a: m.where(a > 0, a, -m.inf),
    "sum": lambda m, a: m.sum(a, axis=0),
    "einsum": lambda m, a: m.einsum("ij,kj->ik", a, a),
    "take_along_axis": lambda m, a: m.take_along_axis(a, m.argsort(a, axis=-1), axis=-1),
    "linalg.norm": lambda m, a: m.linalg.norm(a),
    "split": lambda m, a: m.split(a, 3, axis=1)[1],
    "tril": lambda m, a: m.tril(a),
    "isclose": lambda m, a: m.isclose(a, a + 1e-9),
    "zeros_like": lambda m, a: m.zeros_like(a),
    "clip": lambda m, a: m.clip(a, -1, 1),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_numpy_and_xp_functions_on_device_arrays_equal_numpy(name):
    a, d = host_and_dev()
    ref = FUNCTIONS[name](np, a)
    same(FUNCTIONS[name](np, d), ref)                   # np.f(dev): __array_function__
    same(FUNCTIONS[name](xp, d), ref)                   # xp.f(dev): the generic wrapper


def test_creation_functions_make_device_arrays():
    for got, ref in [(xp.zeros((2, 3), dtype=xp.float32), np.zeros((2, 3), np.float32)),
                     (xp.arange(5), np.arange(5)), (xp.full(3, 2.5), np.full(3, 2.5)),
                     (xp.ones(2, dtype=xp.int64), np.ones(2, np.int64)), (xp.eye(3), np.eye(3)),
                     (xp.linspace(0, 1, 5), np.linspace(0, 1, 5))]:
        same(got, ref)
    r = xp.random.default_rng(0).standard_normal((2, 2))
    same(r, np.random.default_rng(0).standard_normal((2, 2)))


# --- the namespace passes types and constants through ---------------------------------------------
def test_namespace_constants_and_types():
    assert xp.float32 is np.float32 and xp.int64 is np.int64 and xp.bool_ is np.bool_
    assert xp.inf == np.inf and xp.pi == np.pi and xp.newaxis is None
    assert xp.ndarray is DeviceArray and isinstance(dev([1]), xp.ndarray)
    assert xp.finfo(xp.float32).eps == np.finfo(np.float32).eps
    assert xp.iinfo(xp.int32).max == 2**31 - 1
    assert xp.dtype("float32") == np.float32
    assert xp.get_array_module(dev([1])) is xp and xp.get_array_module(np.ones(1)) is np
    assert np.array_equal(xp.asnumpy(dev([1, 2])), [1, 2])


# --- the array's attributes and conversions ----------------------------------------------------------
def test_attributes_and_methods():
    a, d = host_and_dev((2, 3))
    assert d.shape == (2, 3) and d.dtype == np.float32 and d.ndim == 2
    assert d.size == 6 and d.nbytes == 24 and d.itemsize == 4
    same(d.T, a.T)
    same(d.transpose(1, 0), a.transpose(1, 0))
    same(d.reshape(3, 2), a.reshape(3, 2))
    same(d.astype(np.int64), a.astype(np.int64))
    c = d.copy()
    c[0, 0] = 100
    assert d.get()[0, 0] == a[0, 0]                   # copy() is a new device array
    for method in ("sum", "mean", "max", "min", "argmax", "argmin", "any", "all", "cumsum"):
        same(getattr(d, method)(), getattr(a, method)())   # reductions: 0-d device arrays
    assert d.sum().shape == ()
    assert d.tolist() == a.tolist() and d[1, 1].item() == a[1, 1].item()
    assert type(d.tolist()[0][0]) is float


def test_python_conversions_and_protocols():
    a, d = host_and_dev((2, 3))
    assert float(d[0, 1]) == float(a[0, 1]) and int(d[1, 2]) == int(a[1, 2])
    assert bool(dev([1])) and not bool(dev([0]))
    with pytest.raises(ValueError):                  # ambiguous, as NumPy says
        bool(d)
    assert len(d) == 2
    rows = list(d)
    assert all(type(r) is DeviceArray for r in rows) and np.array_equal(rows[1].get(), a[1])
    with pytest.raises(TypeError, match="0-d"):
        iter(d.sum())
    assert repr(d) == repr(a) and str(d) == str(a)
    assert f"{d[0, 0]:.1f}" == f"{a[0, 0]:.1f}"
    assert list(range(10))[dev(np.int64(3))] == 3    # __index__ for 0-d ints
    twin = copy.deepcopy((d, 1))
    assert twin[0] is not d and np.array_equal(twin[0].get(), a)
    with pytest.raises(TypeError):
        hash(d)


def test_host_buffers_are_not_exposed():
    d = dev([1.0, 2.0])
    for name in ("__array_interface__", "__array_struct__", "ctypes", "data", "_secret"):
        with pytest.raises(AttributeError):
            getattr(d, name)
    with pytest.raises(TypeError):
        memoryview(d)
