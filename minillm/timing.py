"""Timing for the benchmarks: the median time of a call, and what it ran on.

Every table in ``bench/`` is measured the same way (STYLE.md, habit 9):
``warmup`` untimed calls first (JIT compilation, BLAS buffers, first-touch
memory), then ``repeats`` timed calls, and the median of those, which one
slow run on a shared machine does not move. A GPU queues work and returns at
once, so the clock is read only after the device has finished: before the
start (nothing queued earlier is counted) and before the stop (all of this
call's work is). ``cpu_name`` and ``thread_settings`` say where the numbers
come from, so every table can state its CPU and threads.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

from . import backend
from .checks import check_int

# Environment variables that size the thread pools numpy, numba and BLAS start with.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY")


def median_time(fn, repeats: int = 5, warmup: int = 1, sync=None) -> dict:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed.

    ``sync``: arrays to wait for (a list, passed to ``backend.synchronize``) or a
    callable that waits; whatever ``fn`` returns (an array, or a tuple / list
    holding arrays) is waited for too. Returns ``{"median_s", "min_s", "times_s",
    "repeats", "warmup"}``.
    """
    if not callable(fn):
        raise ValueError(f"fn={fn!r} must be callable")
    repeats, warmup = check_int("repeats", repeats, 1), check_int("warmup", warmup, 0)
    if sync is not None and not callable(sync) and not isinstance(sync, (list, tuple)):
        raise ValueError(f"sync={sync!r} must be None, a list of arrays or a callable")
    for _ in range(warmup):
        _wait(sync, fn())
    times = []
    for _ in range(repeats):
        _wait(sync)                          # nothing queued before counts
        start = time.perf_counter()
        out = fn()
        _wait(sync, out)                     # all of this call's work counts
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "repeats": repeats, "warmup": warmup}


def _wait(sync, out=None) -> None:
    """Block until the device has finished what ``sync`` and ``out`` depend on."""
    if callable(sync):
        sync()
    arrays = [*(sync if isinstance(sync, (list, tuple)) else ()), *_arrays(out)]
    if arrays:
        backend.synchronize(*arrays)


def _arrays(out) -> list:
    """The arrays among a call's result: itself, or the items of a tuple / list."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [a for a in items if hasattr(a, "shape") and hasattr(a, "dtype")]


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def thread_settings() -> dict:
    """CPU count, thread variables, and the live thread pools where they can be read.

    ``{"cpus", "cpus_usable", "env": {var: value or None}, "numba_threads",
    "blas": [{"library", "api", "version", "threads"}] or None}``. numba is read
    only if already imported; BLAS only if ``threadpoolctl`` is installed.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    numba = sys.modules.get("numba")
    out = {"cpus": os.cpu_count(), "cpus_usable": usable,
           "env": {var: os.environ.get(var) for var in THREAD_VARS},
           "numba_threads": numba.get_num_threads() if numba is not None else None,
           "blas": None}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return out
    out["blas"] = [{"library": info.get("internal_api"), "api": info.get("user_api"),
                    "version": info.get("version"), "threads": info.get("num_threads")}
                   for info in threadpool_info()]
    return out


def machine_line() -> str:
    """One line for under a table: CPU, cores, and the thread settings in force."""
    t = thread_settings()
    env = ", ".join(f"{k}={v}" for k, v in t["env"].items() if v is not None) or "no thread variables set"
    live = [f"{p['library']} {p['threads']}" for p in t["blas"] or []]
    if t["numba_threads"] is not None:
        live.append(f"numba {t['numba_threads']}")
    pools = f"; threads: {', '.join(live)}" if live else ""
    return f"CPU: {cpu_name()} ({t['cpus_usable']} of {t['cpus']} cores usable); {env}{pools}"


def stream_read_gbs(nbytes: int = 256 * 2**20) -> float:
    """Read bandwidth of this machine now: GB/s of summing a large float32 array (best of 5).
    A batch-1 decode step streams every weight once: this is its speed limit."""
    import numpy as np
    a = np.ones(nbytes // 4, dtype=np.float32)
    best = median_time(a.sum, repeats=5, warmup=1)["min_s"]
    return a.nbytes / best / 1e9
