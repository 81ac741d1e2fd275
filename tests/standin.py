"""A device stand-in: arrays that live on a pretend GPU and behave like CuPy's
where code usually breaks, so the GPU path runs on every CI machine.

It is a backend module (``NAME``, ``xp``, ``KERNELS``, ``is_available``) that
``tests/conftest.py`` registers as ``"standin"``; ``model.to("standin")`` then
moves the model onto it. A ``DeviceArray`` wraps a private NumPy array, and
NumPy does the arithmetic, so every result follows NumPy's dtype rules.

What it refuses, as CuPy does (the bugs that only show up on a GPU):

- implicit conversion to NumPy: ``np.asarray(dev)`` / ``np.array(dev)`` raise
  TypeError (CuPy's ``__array__``); ``dev.get()`` is the explicit copy back;
- host arrays mixed with device arrays: a ``numpy.ndarray`` operand of an
  operator, a ufunc, a NumPy function or an ``xp.*`` function raises TypeError
  (CuPy: "Unsupported type <class 'numpy.ndarray'>"). Python and NumPy
  scalars are fine, as in CuPy; ``xp.asarray`` / ``xp.array`` copy host data in;
- host indices and values: ``dev[np_idx]``, ``dev[[0, 2]]``, ``dev[i] = np_val``
  raise TypeError. Stricter than CuPy on purpose: CuPy copies such host data
  to the device silently, one synchronous transfer per call; here the code
  has to say ``xp.asarray(...)``, so every transfer is visible in the source.

What works as in CuPy: NumPy ufuncs and functions on device arrays
(``np.exp(dev)``, ``np.add.at``, ``np.concatenate``) return device arrays
(``__array_ufunc__`` / ``__array_function__``); reductions and scalar indexing
give 0-d device arrays that ``float()``, ``int()``, ``bool()``, ``.item()`` read
back; ``xp`` is every NumPy name through one generic wrapper, with dtypes and
constants passed through, ``xp.ndarray`` the device class and ``xp.cuda``'s
stream counting each ``synchronize()``.
"""
from __future__ import annotations

import types

import numpy as np

NAME = "standin"
KERNELS: dict = {}                     # no twins: every kernel runs its reference here

_SCALARS = (bool, int, float, complex, np.generic)   # what CuPy accepts beside its arrays
_INDEX_ITEMS = (int, np.integer, slice, type(None), type(Ellipsis))


def is_available() -> tuple[bool, str]:
    return True, f"device stand-in (a test double: NumPy {np.__version__} under CuPy's rules)"


# --- crossing the host/device line -------------------------------------------------------
def _refused(obj, where: str) -> TypeError:
    hint = ("a host (NumPy) array mixed with device arrays; copy it over with "
            "xp.asarray(...) or bring the device array back with .get()")
    if isinstance(obj, list):
        hint = "a list is host data; make it a device array with xp.asarray(...)"
    elif not isinstance(obj, np.ndarray):
        hint = "only device arrays and Python/NumPy scalars are operands"
    return TypeError(f"Unsupported type {type(obj)} in {where}: {hint}")


def _unwrap(obj, where: str, host_ok: bool = False):
    """Device arrays -> their NumPy data, also inside lists and tuples; NumPy arrays are
    refused unless ``host_ok`` (the explicit copies ``xp.asarray`` / ``xp.array``)."""
    if isinstance(obj, DeviceArray):
        return obj._data
    if isinstance(obj, np.ndarray) and not host_ok:
        raise _refused(obj, where)
    if isinstance(obj, (list, tuple)):
        items = [_unwrap(o, where, host_ok) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _wrap(obj):
    """NumPy results -> device arrays (a NumPy scalar becomes a 0-d array, as CuPy's
    reductions return); lists, tuples and random generators are wrapped inside."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return DeviceArray(np.asarray(obj))
    if isinstance(obj, (list, tuple)):
        items = [_wrap(o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, np.random.Generator):
        return _Namespace(obj)
    return obj


def _call(fn, args, kwargs, where: str):
    """``fn`` on the NumPy data of its device arguments -> device results."""
    out = kwargs.get("out")
    result = fn(*_unwrap(args, where), **{k: _unwrap(v, where) for k, v in kwargs.items()})
    if out is not None:                    # written in place: hand back the caller's arrays
        return out[0] if isinstance(out, tuple) and len(out) == 1 else out
    return _wrap(result)


def _check_operand(x, where: str) -> None:
    if not isinstance(x, (DeviceArray,) + _SCALARS):
        raise _refused(x, where)


def _check_index(index, where: str) -> None:
    """ints, slices, None, Ellipsis, device arrays, or a tuple of those."""
    for item in index if isinstance(index, tuple) else (index,):
        if not isinstance(item, (DeviceArray,) + _INDEX_ITEMS):
            raise _refused(item, where)


def _apply_ufunc(ufunc, method: str, inputs, kwargs):
    """A ufunc (or its method: at, reduce, accumulate, outer) on device operands."""
    where = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
    for i, x in enumerate(inputs):
        (_check_index if method == "at" and i == 1 else _check_operand)(x, where)
    return _call(getattr(ufunc, method), inputs, kwargs, where)


# --- the array ------------------------------------------------------------------------------
_METHODS = frozenset(
    "all any argmax argmin argsort astype clip conj copy cumprod cumsum diagonal dot fill "
    "flatten item max mean min nonzero prod put ravel repeat reshape round sort squeeze std "
    "sum swapaxes take tolist trace transpose var view".split())
_ATTRIBUTES = frozenset("shape dtype ndim size nbytes itemsize strides T mT real imag flags".split())


class DeviceArray:
    """An array on the pretend device (``xp.ndarray``); see the module docstring."""

    __slots__ = ("_data",)
    __hash__ = None

    def __init__(self, data: np.ndarray):
        if not isinstance(data, np.ndarray):
            raise TypeError(f"DeviceArray wraps a numpy.ndarray, got {type(data)}; use xp.asarray")
        self._data = data

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None) -> np.ndarray:
        """The explicit device -> host copy."""
        return self._data.copy()

    def __array_namespace__(self, api_version=None):
        return xp

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _apply_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return _call(func, args, kwargs, f"numpy.{func.__name__}")

    def __getattr__(self, name):
        if name in _ATTRIBUTES:
            return _wrap(getattr(self._data, name))
        if name in _METHODS:
            method = getattr(self._data, name)
            return lambda *args, **kwargs: _call(method, args, kwargs, f"ndarray.{name}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # indexing: views, as in CuPy; a scalar result is a 0-d device array
    def __getitem__(self, index):
        _check_index(index, "indexing")
        return _wrap(self._data[_unwrap(index, "indexing")])

    def __setitem__(self, index, value):
        _check_index(index, "index assignment")
        _check_operand(value, "index assignment")
        self._data[_unwrap(index, "index assignment")] = _unwrap(value, "index assignment")

    # reading back to Python: an explicit, synchronising copy (allowed, as in CuPy)
    def __len__(self):
        return len(self._data)

    def __iter__(self):
        if self._data.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __bool__(self):
        return bool(self._data)

    def __float__(self):
        return float(self._data)

    def __int__(self):
        return int(self._data)

    def __complex__(self):
        return complex(self._data)

    def __index__(self):
        return self._data.__index__()

    def __repr__(self):
        return repr(self._data)

    def __str__(self):
        return str(self._data)

    def __format__(self, spec):
        return format(self._data, spec)

    def __copy__(self):
        return DeviceArray(self._data.copy())

    def __deepcopy__(self, memo):
        return DeviceArray(self._data.copy())


def _binary(ufunc, reflected=False):
    def op(self, other):
        if not isinstance(other, (DeviceArray, np.ndarray) + _SCALARS):
            return NotImplemented              # lets Python try the other side (== None is False)
        return _apply_ufunc(ufunc, "__call__", (other, self) if reflected else (self, other), {})
    return op


def _inplace(ufunc):
    def op(self, other):
        _apply_ufunc(ufunc, "__call__", (self, other), {"out": (self,)})
        return self
    return op


def _unary(ufunc):
    return lambda self: _apply_ufunc(ufunc, "__call__", (self,), {})


for _name, _ufunc in {"add": np.add, "sub": np.subtract, "mul": np.multiply,
                      "truediv": np.true_divide, "floordiv": np.floor_divide, "mod": np.remainder,
                      "pow": np.power, "matmul": np.matmul, "and": np.bitwise_and,
                      "or": np.bitwise_or, "xor": np.bitwise_xor, "lshift": np.left_shift,
                      "rshift": np.right_shift}.items():
    setattr(DeviceArray, f"__{_name}__", _binary(_ufunc))
    setattr(DeviceArray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    setattr(DeviceArray, f"__i{_name}__", _inplace(_ufunc))
for _name, _ufunc in {"lt": np.less, "le": np.less_equal, "gt": np.greater,
                      "ge": np.greater_equal, "eq": np.equal, "ne": np.not_equal}.items():
    setattr(DeviceArray, f"__{_name}__", _binary(_ufunc))
for _name, _ufunc in {"neg": np.negative, "pos": np.positive, "abs": np.absolute,
                      "invert": np.invert}.items():
    setattr(DeviceArray, f"__{_name}__", _unary(_ufunc))


# --- the namespace: ``xp`` -------------------------------------------------------------------
class _Ufunc:
    """``xp.add`` etc.: the NumPy ufunc on device operands, its methods too (``xp.add.at``)."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "__call__", args, kwargs)

    def __getattr__(self, name):
        if name in ("at", "reduce", "accumulate", "reduceat", "outer"):
            return lambda *args, **kwargs: _apply_ufunc(self._ufunc, name, args, kwargs)
        return getattr(self._ufunc, name)      # nin, nout, identity, ...


class _Namespace:
    """Every name of ``target`` (NumPy, a submodule, a Generator): functions take device
    arrays and return device arrays; types and constants pass through as in CuPy."""

    def __init__(self, target, **own):
        self._target = target
        self.__dict__.update(own)

    def __getattr__(self, name):
        obj = getattr(self._target, name)
        if isinstance(obj, types.ModuleType):
            return _Namespace(obj)                            # xp.random, xp.linalg
        if isinstance(obj, np.ufunc):
            return _Ufunc(obj)
        if isinstance(obj, type) or not callable(obj):
            return obj                                        # float32, finfo, inf, newaxis
        return lambda *args, **kwargs: _call(obj, args, kwargs, f"xp.{name}")

    def __repr__(self):
        return f"<device stand-in namespace over {getattr(self._target, '__name__', self._target)}>"


def asarray(a, dtype=None, order=None):
    """Host data (NumPy arrays, lists, scalars) copied to the device; a device array is
    returned as it is when its dtype already matches (``cupy.asarray``)."""
    if isinstance(a, DeviceArray) and (dtype is None or a.dtype == np.dtype(dtype)):
        return a
    return DeviceArray(np.array(_unwrap(a, "xp.asarray", host_ok=True), dtype=dtype,
                                order=order or "K", copy=True))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    """Always a fresh device array (``cupy.array``)."""
    return DeviceArray(np.array(_unwrap(a, "xp.array", host_ok=True), dtype=dtype,
                                order=order, ndmin=ndmin, copy=True))


def asnumpy(a) -> np.ndarray:
    """``cupy.asnumpy``: a NumPy copy of a device array (host arrays pass through)."""
    return a.get() if isinstance(a, DeviceArray) else np.asarray(a)


class Stream:
    """The one stream of the pretend device; counts how often code waits for it."""

    synchronized = 0

    def synchronize(self) -> None:
        Stream.synchronized += 1


_STREAM = Stream()

xp = _Namespace(
    np, ndarray=DeviceArray, asarray=asarray, asanyarray=asarray, array=array,
    asnumpy=asnumpy,
    get_array_module=lambda *arrays: xp if any(isinstance(a, DeviceArray) for a in arrays) else np,
    cuda=types.SimpleNamespace(get_current_stream=lambda: _STREAM),
)
