"""The backend switch: which array library and which kernel table run the model.

One switch, three backends (tinygrad's `device.py` idea, kept small):

- ``numpy`` - the reference. Every kernel is the readable code in ``minillm/``.
- ``numba`` - same arrays (NumPy), but named hot loops are replaced by
  ``@njit`` twins from ``backends/numba_backend.py``.
- ``cupy``  - arrays live on a GPU; the reference code runs unchanged through
  ``xp = xp_of(x)``, and ``backends/cupy_backend.py`` may add twins.

A reference kernel is declared with ``@kernel("module.fn")``. Calling it looks
up the current backend's ``KERNELS`` table and runs the twin of that name if
there is one, else the reference. ``reference("module.fn")`` always returns the
plain reference (tests compare the two).

Select a backend with ``use("numba")`` (also a context manager) or the
environment variable ``MINILLM_BACKEND``. An unknown name is a ``ValueError``;
asking for one that cannot run raises ``BackendError`` saying why and what is
available; nothing falls back silently.

Twins are compiled for float32 and float64; a half-precision call (float16 or
bfloat16 arrays, ``minillm.precision``) runs the reference unless the twin
says ``accepts_half = True``.

Dispatch follows the data, not only the switch: a kernel called on arrays
that live on a device (CuPy's, or any registered array module whose arrays
say so through ``__array_namespace__``) runs that device backend's twin or the
reference, never a CPU twin, whatever backend is active. So a CuPy array
never reaches a Numba twin. ``register_backend`` adds a backend module at run
time (the tests register a device stand-in this way).
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Callable

import numpy as np

# name -> module path of the backend; modules are imported on first use only.
_MODULES = {
    "numpy": "backends.numpy_backend",
    "numba": "backends.numba_backend",
    "cupy": "backends.cupy_backend",
}
_loaded: dict[str, ModuleType] = {}
_REFERENCE: dict[str, Callable] = {}     # kernel name -> reference function
_state = {"current": None}               # the active backend's name


class BackendError(RuntimeError):
    """A known backend was asked for that cannot run here (not installed, no device)."""


def _probe(name: str) -> tuple[bool, str]:
    """(ok, reason) for one backend, without raising."""
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # an accelerator that is not installed
        return False, f"import failed: {type(exc).__name__}: {exc}"
    ok, reason = module.is_available()
    return bool(ok), reason


def available() -> dict[str, tuple[bool, str]]:
    """``{name: (ok, reason)}`` for every known backend."""
    return {name: _probe(name) for name in _MODULES}


def _load(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(
            f"backend={name!r} is unknown; known backends: {sorted(_MODULES)}")
    if name not in _loaded:
        ok, reason = _probe(name)
        if not ok:
            usable = [n for n, (good, _) in available().items() if good]
            raise BackendError(
                f"backend={name!r} cannot run here: {reason}; available: {usable}")
        module = _loaded[name] = importlib.import_module(_MODULES[name])
        if module.xp is not np:
            _BY_XP[id(module.xp)] = module
    return _loaded[name]


def _default_name() -> str:
    return os.environ.get("MINILLM_BACKEND", "numpy").strip().lower() or "numpy"


def current() -> str:
    """Name of the active backend (``MINILLM_BACKEND`` or ``"numpy"`` at start)."""
    if _state["current"] is None:
        _load(_default_name())
        _state["current"] = _default_name()
    return _state["current"]


def current_module() -> ModuleType:
    """The active backend module (``NAME``, ``xp``, ``KERNELS``, ``is_available``)."""
    return _load(current())


class use:
    """Switch backend: ``backend.use("numba")`` or ``with backend.use("numba"): ...``.

    As a plain call the switch stays; as a context manager the previous backend
    comes back on exit.
    """

    def __init__(self, name: str):
        if not isinstance(name, str):
            raise ValueError(f"backend name must be a string, got {name!r}")
        self._previous = _state["current"]
        _load(name.strip().lower())
        _state["current"] = name.strip().lower()

    def __enter__(self) -> "use":
        return self

    def __exit__(self, *exc) -> None:
        _state["current"] = self._previous


def kernel(name: str) -> Callable[[Callable], Callable]:
    """Register a reference kernel under ``name`` and dispatch through the table.

    The returned function runs ``current_module().KERNELS[name]`` when the active
    backend has a twin of that name, else the reference itself.
    """
    def register(fn: Callable) -> Callable:
        if name in _REFERENCE and _REFERENCE[name] is not fn:
            raise ValueError(f"kernel name {name!r} is registered twice")
        _REFERENCE[name] = fn

        @functools.wraps(fn)
        def dispatch(*args, **kwargs):
            twin = _table_for(args).get(name)
            if twin is not None and _is_half(args) and not getattr(twin, "accepts_half", False):
                twin = None          # a twin compiled for float32/64 only: the reference runs
            return (twin or fn)(*args, **kwargs)

        dispatch.kernel_name = name
        return dispatch
    return register


def _table_for(args) -> dict:
    """The kernel table for these arguments: the device's if any array lives on one,
    else the active backend's when it computes on host (NumPy) arrays, else none."""
    device = _device_of(args)
    if device is not None:
        return device.KERNELS
    module = current_module()
    return module.KERNELS if module.xp is np else {}


def _is_half(args) -> bool:
    """True when the first float array among ``args`` is float16 or bfloat16 (2 bytes)."""
    for a in args:
        if isinstance(a, tuple) and a and not isinstance(a[0], tuple):
            a = a[0]
        dtype = getattr(a, "dtype", None)
        if dtype is not None and dtype.kind in "fV":
            return dtype.itemsize == 2
    return False


def _device_of(args):
    """The backend module owning the first device array among ``args`` (one level into
    tuples, where caches keep their arrays), or None when all are host data."""
    if not _BY_XP:                   # no device backend was ever loaded: all arrays are host ones
        return None
    for a in args:
        if isinstance(a, tuple) and a and not isinstance(a[0], tuple):
            a = a[0]
        if isinstance(a, np.ndarray) or not hasattr(a, "shape"):
            continue
        xp = xp_of(a)
        if xp is not np:
            return _BY_XP.get(id(xp))
    return None


def register_backend(name: str, module: ModuleType) -> None:
    """Add a backend module (``NAME``, ``xp``, ``KERNELS``, ``is_available``) at run time.

    Its arrays must say where they live through ``__array_namespace__``
    (returning ``module.xp``), as CuPy's are recognised by their type.
    """
    for attr in ("NAME", "xp", "KERNELS", "is_available"):
        if not hasattr(module, attr):
            raise ValueError(f"backend module {module!r} lacks {attr!r}")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"backend name={name!r} must be a non-empty string")
    _MODULES[name] = module.__name__
    _loaded[name] = module
    if module.xp is not np:
        _BY_XP[id(module.xp)] = module


_BY_XP: dict[int, ModuleType] = {}       # id(array module) -> its backend module (device ones)


def reference(name: str) -> Callable:
    """The reference implementation registered under ``name``."""
    if name not in _REFERENCE:
        raise KeyError(f"no reference kernel named {name!r}; known: {sorted(_REFERENCE)}")
    return _REFERENCE[name]


def kernels() -> dict[str, Callable]:
    """All registered reference kernels ``{name: fn}`` (what backend tests iterate).

    Every ``minillm`` module is imported first: a technique module that the package
    imports lazily (``kv_cache``, ...) registers its kernels only when imported.
    """
    import pkgutil

    import minillm
    for info in pkgutil.iter_modules(minillm.__path__):
        importlib.import_module(f"minillm.{info.name}")
    return dict(_REFERENCE)


def twin(backend_name: str, name: str) -> Callable | None:
    """The accelerated twin of kernel ``name`` in ``backend_name``, or None."""
    return _load(backend_name).KERNELS.get(name)


def xp_of(*arrays):
    """The array module that owns ``arrays`` (cupy, a registered device's, or numpy)."""
    for a in arrays:
        if isinstance(a, (np.ndarray, np.generic)):
            continue
        if type(a).__module__.startswith("cupy"):
            xp = _load("cupy").xp
            _BY_XP.setdefault(id(xp), _loaded["cupy"])
            return xp
        namespace = getattr(a, "__array_namespace__", None)
        if namespace is not None:
            xp = namespace()
            if id(xp) in _BY_XP:
                return xp
    return np


def xp_for(name: str):
    """The array module of backend ``name`` (numpy for numpy and numba)."""
    return _load(name).xp


def to_numpy(x) -> np.ndarray:
    """A NumPy copy of ``x`` wherever it lives (no copy if it already is NumPy)."""
    if xp_of(x) is not np:
        return x.get()           # the explicit device -> host copy (CuPy's API)
    return np.asarray(x)


def synchronize(*arrays) -> None:
    """Wait until the device that owns ``arrays`` has finished its queued work
    (a no-op for host arrays): read a clock only after this."""
    xp = xp_of(*arrays)
    if xp is np:
        return
    cuda = getattr(xp, "cuda", None)
    if cuda is not None:
        cuda.get_current_stream().synchronize()
    elif hasattr(xp, "synchronize"):
        xp.synchronize()
