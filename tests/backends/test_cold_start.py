"""First calls (issue 15): the numba backend says when it compiles, once per area, and
compiles nothing at import."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from minillm import backend

pytestmark = pytest.mark.skipif(not backend.available()["numba"][0], reason="numba not installed")


def test_a_compilation_is_announced_once_per_area_and_timed(capsys):
    import numba

    from backends import numba_backend
    namespace: dict = {"__name__": "backends.numba_testarea"}      # an area's module, as Numba sees it
    exec(textwrap.dedent("""
        def twice(x):
            return 2 * x
        def thrice(x):
            return 3 * x
    """), namespace)
    twice, thrice = numba.njit(namespace["twice"]), numba.njit(namespace["thrice"])
    assert twice(2) == 4
    assert "compiling testarea (first run only)..." in capsys.readouterr().err
    assert thrice(2.0) == 6.0 and twice(3) == 6              # same area, and an already compiled call
    assert "compiling" not in capsys.readouterr().err
    assert numba_backend.COMPILE_SECONDS["testarea"] > 0


def test_importing_the_backend_compiles_nothing(tmp_path):
    """A fresh cache and ``backend.use("numba")``: no "compiling" line, no compile seconds
    (twins compile on their first call, so a command compiles only what it uses)."""
    code = ("from minillm import backend; backend.use('numba'); "
            "from backends import numba_backend; print(numba_backend.COMPILE_SECONDS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"NUMBA_CACHE_DIR": str(tmp_path), "PATH": "", "OPENBLAS_NUM_THREADS": "1",
                              "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "{}"
    assert "compiling" not in out.stderr
