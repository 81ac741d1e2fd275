"""minillm.backend: the switch, its errors, the env variable, the kernel table seam."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minillm import backend, layers
from minillm.backend import BackendError

REPO = Path(__file__).resolve().parent.parent
START = backend.current()                  # MINILLM_BACKEND or numpy; tests leave it so
USABLE = [name for name, (ok, _) in backend.available().items() if ok]


def test_available_reports_every_backend_with_a_reason():
    status = backend.available()
    assert set(status) >= {"numpy", "numba", "cupy"}
    for name, (ok, reason) in status.items():
        assert isinstance(ok, bool), name
        assert isinstance(reason, str) and reason.strip(), name
    assert status["numpy"][0] and "numpy" in status["numpy"][1]


def test_unknown_backend_names_it_and_lists_the_available():
    with pytest.raises(ValueError, match="nope") as info:
        backend.use("nope")
    message = str(info.value)
    for name in ("numpy", "numba", "cupy"):
        assert name in message
    assert backend.current() == START        # nothing changed


def test_non_string_backend_name_is_refused():
    with pytest.raises(ValueError, match="string"):
        backend.use(3)
    with pytest.raises(ValueError, match="tpu"):
        backend.use("tpu")


@pytest.mark.skipif(backend.available()["cupy"][0], reason="cupy runs here")
def test_unavailable_cupy_says_why_and_what_is_available():
    reason = backend.available()["cupy"][1]
    with pytest.raises(BackendError) as info:
        backend.use("cupy")
    message = str(info.value)
    assert "cupy" in message and "cannot run" in message
    assert reason in message                 # the probe's reason, e.g. "cupy is not importable"
    assert "numpy" in message                # and the list of what does run
    assert backend.current() == START


@pytest.mark.parametrize("name", USABLE)
def test_use_as_a_context_manager_restores(name):
    with backend.use(name):
        assert backend.current() == name
        assert backend.current_module().NAME == name
        with backend.use("numpy"):
            assert backend.current() == "numpy"
        assert backend.current() == name
    assert backend.current() == START


@pytest.mark.parametrize("name", USABLE)
def test_use_as_a_plain_call_stays(name):
    backend.use(name)
    assert backend.current() == name
    backend.use(" NumPy ")                   # case and spaces are forgiven
    assert backend.current() == "numpy"


def test_context_manager_restores_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with backend.use("numpy"):
            1 / 0
    assert backend.current() == START


def _current_in_subprocess(value):
    env = {k: v for k, v in os.environ.items() if k != "MINILLM_BACKEND"}
    if value is not None:
        env["MINILLM_BACKEND"] = value
    code = "from minillm import backend; print(backend.current())"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value,expected", [(None, "numpy"), ("numba", "numba"), ("NUMPY", "numpy")])
def test_env_variable_selects_the_backend(value, expected):
    if expected not in USABLE:
        pytest.skip(f"{expected} is not available here")
    run = _current_in_subprocess(value)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected


def test_env_variable_with_an_unknown_backend_fails_loudly():
    run = _current_in_subprocess("nope")
    assert run.returncode != 0
    assert "ValueError" in run.stderr and "nope" in run.stderr


def test_xp_of_and_to_numpy_on_numpy_data():
    a = np.arange(3.0)
    assert backend.xp_of(a) is np
    assert backend.xp_of([1, 2], 3.0, a) is np
    assert backend.xp_of() is np
    assert backend.to_numpy(a) is a                        # no copy for NumPy input
    b = backend.to_numpy([[1, 2]])
    assert isinstance(b, np.ndarray) and b.shape == (1, 2)
    assert backend.xp_for("numpy") is np


@pytest.mark.skipif(not backend.available()["cupy"][0], reason="needs cupy and a GPU")
def test_xp_of_and_to_numpy_on_cupy_data():
    cp = backend.xp_for("cupy")
    a = cp.arange(3.0)
    assert backend.xp_of(np.zeros(1), a) is cp
    b = backend.to_numpy(a)
    assert isinstance(b, np.ndarray) and b.tolist() == [0.0, 1.0, 2.0]


# --- the kernel table ------------------------------------------------------------------
def test_registered_kernels_include_the_layer_kernels():
    names = set(backend.kernels())
    for name in ("layers.layernorm_forward", "layers.layernorm_backward", "layers.gelu_forward",
                 "layers.gelu_backward", "layers.softmax_forward", "layers.softmax_backward",
                 "layers.cross_entropy_forward", "layers.cross_entropy_backward",
                 "attention.sdpa_forward", "attention.sdpa_backward"):
        assert name in names
        assert backend.reference(name).__name__ == name.split(".")[1]


def test_a_twin_in_the_active_backend_replaces_the_reference(monkeypatch):
    calls = []

    def fake_gelu(x):
        calls.append(x)
        return x, x
    monkeypatch.setitem(backend.current_module().KERNELS, "layers.gelu_forward", fake_gelu)
    x = np.array([1.0, -1.0])
    y, _ = layers.gelu_forward(x)
    assert calls and np.array_equal(y, x)
    monkeypatch.undo()
    y, _ = layers.gelu_forward(x)                          # back to the reference
    assert len(calls) == 1 and not np.array_equal(y, x)


def test_registering_a_kernel_name_twice_is_refused():
    with pytest.raises(ValueError, match="layers.gelu_forward"):
        backend.kernel("layers.gelu_forward")(lambda x: (x, x))
    assert backend.reference("layers.gelu_forward") is layers.gelu_forward.__wrapped__


def test_unknown_reference_kernel_names_it():
    with pytest.raises(KeyError, match="layers.nope"):
        backend.reference("layers.nope")


def test_dispatch_wrappers_know_their_names():
    assert layers.softmax_forward.kernel_name == "layers.softmax_forward"


@pytest.mark.parametrize("name", USABLE)
def test_twin_lookup_returns_a_callable_or_none(name):
    for kernel_name in backend.kernels():
        t = backend.twin(name, kernel_name)
        assert t is None or callable(t)
    assert backend.twin(name, "layers.nope") is None


@pytest.mark.parametrize("name", USABLE)
def test_every_twin_is_named_after_a_registered_kernel_and_says_so(name):
    """A twin's name is a reference kernel's; its first docstring line points at it."""
    with backend.use(name):
        table = backend.current_module().KERNELS
    known = backend.kernels()
    for kernel_name, fn in table.items():
        assert kernel_name in known, f"{name} twin {kernel_name!r} has no reference kernel"
        first = (fn.__doc__ or "").strip().split("\n")[0]
        assert first.startswith(f"Accelerated minillm.{kernel_name}"), (name, kernel_name, first)


def test_backends_package_never_imports_minillm():
    for path in (REPO / "backends").glob("*.py"):
        text = path.read_text()
        assert "import minillm" not in text and "from minillm" not in text, path.name


def test_minillm_never_imports_accelerators_at_top_level():
    code = ("import sys, minillm, minillm.model, minillm.sampling; "
            "print(sorted(m for m in ('cupy', 'numba', 'torch', 'transformers', 'tiktoken', "
            "'tokenizers') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "MINILLM_BACKEND"}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
