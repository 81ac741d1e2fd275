"""GPU backend: CuPy arrays; the reference code runs unchanged through ``xp_of``.

Twins go in ``KERNELS`` only where CuPy's NumPy-compatible API is not enough.
Importing this module never fails: ``is_available`` says why CuPy cannot run.
"""
try:
    import cupy as xp
    _IMPORT_ERROR = None
except Exception as exc:  # CuPy not installed, or no CUDA driver
    xp = None
    _IMPORT_ERROR = exc

NAME = "cupy"
KERNELS: dict = {}


def is_available() -> tuple[bool, str]:
    if xp is None:
        return False, f"cupy is not importable ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); pip install 'minillm[gpu]'"
    try:
        n = xp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"no CUDA device ({type(exc).__name__}: {exc})"
    if n < 1:
        return False, "no CUDA device"
    name = xp.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return True, f"cupy {xp.__version__} on {name}"
