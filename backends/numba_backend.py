"""CPU backend with Numba: NumPy arrays, hot loops compiled with ``@njit(cache=True)``.

The twins live in one file per area (``numba_layers.py``, ``numba_bpe.py``,
``numba_decode.py``, ...); each exports its own ``KERNELS`` and this module
merges them. A twin has the reference's name and signature; its first
docstring line reads "Accelerated minillm.<module>.<fn> — see it for the math."
This package never imports ``minillm``.
"""
import importlib

import numpy as xp

NAME = "numba"
KERNELS: dict = {}

# One line per area; a new technique appends its module here.
_PARTS = (
    "backends.numba_layers",
    "backends.numba_decode",
    "backends.numba_bpe",
    "backends.numba_quant",
    "backends.numba_pruning",
    "backends.numba_precision",
)

try:
    import numba
    _IMPORT_ERROR = None
except Exception as exc:  # numba not installed or broken
    numba = None
    _IMPORT_ERROR = exc

if numba is not None:
    for _part in _PARTS:
        KERNELS.update(importlib.import_module(_part).KERNELS)


def is_available() -> tuple[bool, str]:
    if numba is None:
        return False, f"numba is not importable ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})"
    return True, f"numba {numba.__version__}"
