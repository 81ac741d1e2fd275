"""Running a compiled twin on several threads: when it pays, and the pool that runs it.

The attention twin's kernels are compiled ``nogil``, so plain Python threads
run them in parallel; each thread gets a block of independent heads and writes
only its own block, so the result does not depend on the thread count, bit for
bit. Used instead of Numba's own pool (``parallel=True``), which compiled
slower (``numba_attention``'s docstring) and fought OpenBLAS's threads
(``numba_layers.PARALLEL``, where the row-wise twins' measurements are: they
are memory-bound and lost more to the hand-offs than they gained).

When it pays: OpenBLAS's idle workers spin for 2^OPENBLAS_THREAD_TIMEOUT CPU
cycles after each product (default 2^28, ~0.1 s) and keep the core that a
second thread needs. Measured (issue 15, AMD EPYC, 2 cores; a ``small`` layer's
attention, each call right after a 2-thread (2048, 256) @ (256, 1024) product):
forward split over 2 threads 21.4 ms against 21.6 on one at the default
timeout; 7.9-8.2 ms at 2^4, 2^16 or 2^20, 12.1 at 2^24, 15.0 at 2^28 (fwd alone,
1-thread 14.6). The product itself took 4.8-5.3 ms at every setting. A short
timeout makes the workers sleep between back-to-back products; 2^20 (~0.3 ms)
keeps them awake through a layer's run of products. The minillm package sets 20
before NumPy loads OpenBLAS (it reads the variable once, at load), unless the
user exported a value.

Inside a ``small`` training step at 2 threads (bench/bench_train.py --split,
README): the short timeout with the split took 576 -> 539 ms; the split alone
(timeout 20) 564 -> 551 ms, and 891 -> 840 with OpenBLAS on one thread. That
needed one more fix: memory the threads write first must not be fresh pages
(``numba_attention.flash_backward`` zeroes its gradients on the calling thread).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numba

SPLIT = None           # None: split when ``blas_workers_nap()``; True / False force it
_NAP_MAX = 20          # log2 cycles: the longest spin measured to free the core
_POOL: list = []       # [(threads, executor)]


def blas_workers_nap() -> bool:
    """True when ``OPENBLAS_THREAD_TIMEOUT`` is set to at most ``_NAP_MAX`` (log2 cycles).

    OpenBLAS reads it once, when NumPy loads it: importing minillm before NumPy
    sets 20 unless the user exported a value. (Set later in the process it is
    wrongly trusted here; the split then runs slower, never wrong.)
    """
    value = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "")
    return value.strip().isdigit() and int(value) <= _NAP_MAX


def threads() -> int:
    """Threads to split over: Numba's setting (NUMBA_NUM_THREADS) when splitting
    (``SPLIT``, or in auto mode ``blas_workers_nap()``), else 1."""
    split = blas_workers_nap() if SPLIT is None else SPLIT
    return numba.get_num_threads() if split else 1


def pool(n: int) -> ThreadPoolExecutor:
    """The shared executor with ``n`` workers (made again if the count changed)."""
    if not _POOL or _POOL[0][0] != n:
        if _POOL:
            _POOL[0][1].shutdown(wait=False)
        _POOL[:] = [(n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="minillm-twin"))]
    return _POOL[0][1]


def edges(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` near-equal blocks [(start, stop), ...] covering range(n); none empty."""
    parts = max(1, min(parts, n))
    cut = [n * i // parts for i in range(parts + 1)]
    return list(zip(cut[:-1], cut[1:]))


def run_blocks(fn, blocks: list) -> None:
    """fn(start, stop) for every block; on the pool when there is more than one."""
    if len(blocks) == 1:
        fn(*blocks[0])
        return
    jobs = [pool(len(blocks) - 1).submit(fn, a, b) for a, b in blocks[1:]]
    try:
        fn(*blocks[0])                                       # the caller takes the first block
    finally:
        for job in jobs:                                     # waited for even if that failed:
            job.result()                                     # no block still writes after we return
