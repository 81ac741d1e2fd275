"""Suite-wide pytest setup: skip `gpu` tests without CuPy + a GPU, skip `mpi` tests
when mpi4py cannot run, and put the active backend back after every test.

Hypothesis explores new random examples on every local run; CI (`.ci/run` sets
MINILLM_HYPOTHESIS=ci) draws the same ones every time, so a red CI is a change's
fault, not the dice's. A failure found locally prints the example to pin with
``@example``."""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from minillm import backend
from tests import standin

settings.register_profile("ci", derandomize=True)
if os.environ.get("MINILLM_HYPOTHESIS") == "ci":
    settings.load_profile("ci")

# The device stand-in (CuPy's rules on NumPy): registered once for the whole session.
backend.register_backend("standin", standin)


@functools.lru_cache(maxsize=None)
def cupy_status() -> tuple[bool, str]:
    """(ok, reason) of the cupy backend, probed once."""
    return backend.available()["cupy"]


def mpiexec_path() -> str | None:
    """The MPI launcher of this environment (the venv's bin first), or None."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


@functools.lru_cache(maxsize=None)
def mpi_status() -> tuple[bool, str]:
    """(ok, reason): mpi4py imports and `mpiexec -n 1` can start a Python that uses it.

    Probed in a subprocess so this process never initialises MPI.
    """
    if importlib.util.find_spec("mpi4py") is None:
        return False, "mpi4py is not installed (pip install 'minillm[dev]')"
    launcher = mpiexec_path()
    if launcher is None:
        return False, "no mpiexec launcher found"
    cmd = [launcher, "-n", "1", sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"mpiexec failed to start: {exc}"
    if run.returncode != 0:
        return False, f"mpiexec -n 1 python failed: {run.stderr.strip()[-300:]}"
    return True, "ok"


def pytest_collection_modifyitems(config, items):
    """Skip marked tests whose hardware or launcher is missing, saying why."""
    for marker, status, label in (("gpu", cupy_status, "gpu test: cupy backend unavailable ({})"),
                                  ("mpi", mpi_status, "mpi test: {}")):
        marked = [item for item in items if item.get_closest_marker(marker)]
        if not marked:
            continue               # the probe (a subprocess for mpi) runs only when needed
        ok, reason = status()
        if not ok:
            skip = pytest.mark.skip(reason=label.format(reason))
            for item in marked:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    """A test that calls ``backend.use(...)`` must not leak its choice to the next test."""
    before = backend.current()
    yield
    if backend.current() != before:
        backend.use(before)


@pytest.fixture
def rng(request):
    """A fresh generator seeded from the test's name (reproducible, distinct per test)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A 20k-character slice of the embedded corpus as a file (CLI tests pass it as --corpus)."""
    from minillm import data
    f = tmp_path_factory.mktemp("corpus") / "slice.txt"
    f.write_text(data.load_corpus()[:20_000], encoding="utf-8")
    return f
