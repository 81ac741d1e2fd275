"""backends.numba_threads: when a twin splits over threads, and the blocks it runs.

(That a split changes no bit of the attention twin: tests/backends/test_kernels.py.)
"""
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("numba")

import numba  # noqa: E402

from backends import numba_threads  # noqa: E402


@pytest.mark.parametrize("value, naps", [(None, False), ("20", True), ("4", True), ("21", False),
                                         ("28", False), ("", False), ("x", False), (" 16 ", True)])
@pytest.mark.parametrize("split", [None, True, False])
def test_threads_follow_the_blas_timeout_unless_forced(value, naps, split, monkeypatch):
    """Auto mode splits only when OpenBLAS's workers sleep soon after a product."""
    if value is None:
        monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", value)
    monkeypatch.setattr(numba_threads, "SPLIT", split)
    assert numba_threads.blas_workers_nap() is naps
    expect_split = naps if split is None else split
    assert numba_threads.threads() == (numba.get_num_threads() if expect_split else 1)


@given(n=st.integers(1, 500), parts=st.integers(1, 9))
def test_edges_cover_the_range_once_without_empty_blocks(n, parts):
    blocks = numba_threads.edges(n, parts)
    assert len(blocks) == min(n, parts)
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a < b for a, b in blocks)
    assert all(b == c for (_, b), (c, _) in zip(blocks[:-1], blocks[1:]))
    sizes = [b - a for a, b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_run_blocks_reraises_a_workers_error():
    def fn(a, b):
        if a > 0:
            raise ValueError(f"block {a}:{b}")
    with pytest.raises(ValueError, match="block"):
        numba_threads.run_blocks(fn, [(0, 5), (5, 10)])


def test_run_blocks_waits_for_the_workers_when_the_callers_block_fails():
    done = []

    def fn(a, b):
        if a == 0:
            raise RuntimeError("caller's block")
        time.sleep(0.05)
        done.append((a, b))
    with pytest.raises(RuntimeError, match="caller"):
        numba_threads.run_blocks(fn, [(0, 5), (5, 10)])
    assert done == [(5, 10)]                  # finished before run_blocks returned
