"""CPU backend with Numba: NumPy arrays, hot loops compiled with ``@njit(cache=True)``.

The twins live in one file per area (``numba_layers.py``, ``numba_bpe.py``,
``numba_decode.py``, ...); each exports its own ``KERNELS`` and this module
merges them. A twin has the reference's name and signature; its first
docstring line reads "Accelerated minillm.<module>.<fn> — see it for the math."
This package never imports ``minillm``.
"""
import importlib
import os
import sys
import time

import numpy as xp

# The parallel twins (``numba_quant``'s prange loops) run on GNU OpenMP threads, which
# by default spin for a while after each parallel region, as OpenBLAS's threads do
# after each product: with both pools at 2 threads on 2 cores, each steals the other's
# core. Measured (AMD EPYC, default threads): a w8 GEMV beside a 1024 x 1024 BLAS
# product, 8.0 ms per pair with spinning OpenMP threads, 0.06-0.3 ms with sleeping
# ones; the tour model's w8 decode 100 -> 740-860 tok/s. Set before Numba loads
# OpenMP; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

NAME = "numba"
KERNELS: dict = {}

# One line per area; a new technique appends its module here.
_PARTS = (
    "backends.numba_layers",
    "backends.numba_attention",
    "backends.numba_decode",
    "backends.numba_bpe",
    "backends.numba_quant",
    "backends.numba_pruning",
    "backends.numba_precision",
    "backends.numba_attention_variants",
    "backends.numba_optim",
)

try:
    import numba
    import numba.core.event
    _IMPORT_ERROR = None
except Exception as exc:  # numba not installed or broken
    numba = None
    _IMPORT_ERROR = exc

if numba is not None:
    for _part in _PARTS:
        KERNELS.update(importlib.import_module(_part).KERNELS)


# --- first calls: say when Numba compiles, once per area -----------------------------------
# Every twin is compiled on its first call (nothing at import, nothing a command
# does not call) and saved to Numba's on-disk cache (``cache=True``), so only the
# first run after an install or an edit compiles; later runs load the machine
# code in milliseconds. Numba fires a "numba:compile" event only on a real
# compilation (a cache miss), so listening to it tells the user, before the
# wait, that the pause is the compiler and happens once.
# module -> the area's name in messages (else the suffix); None: compiled inside its caller's area
_AREA = {"numba_bpe": "tokenizer", "numba_math": None}
COMPILE_SECONDS: dict = {}                # area -> seconds spent compiling in this process


def _area_of(dispatcher) -> str | None:
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", None) or ""
    if not module.startswith("backends.numba_"):
        return None
    name = module.split(".")[-1]
    return _AREA.get(name, name[len("numba_"):])


class _CompileNotice(numba.core.event.Listener if numba is not None else object):
    """Prints "compiling <area> (first run only)..." on an area's first compilation and
    adds up the compile time per area (outermost compilations only: callees nest)."""

    def __init__(self, stream=None):
        self.stream = stream
        self.announced: set = set()
        self.open: list = []              # (area, start time) of compilations in progress

    def on_start(self, event):
        area = _area_of(event.data.get("dispatcher"))
        if area is not None and area not in self.announced:
            self.announced.add(area)
            print(f"compiling {area} (first run only)...", file=self.stream or sys.stderr, flush=True)
        self.open.append((area, time.perf_counter()))

    def on_end(self, event):
        area, start = self.open.pop()
        if area is not None and not any(a == area for a, _ in self.open):
            COMPILE_SECONDS[area] = COMPILE_SECONDS.get(area, 0.0) + time.perf_counter() - start


if numba is not None:
    numba.core.event.register("numba:compile", _CompileNotice())


def is_available() -> tuple[bool, str]:
    if numba is None:
        return False, f"numba is not importable ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})"
    return True, f"numba {numba.__version__}"
