"""Every accelerated twin equals its reference kernel, on every available backend.

``backend.kernels()`` is the table of reference kernels; ``backend.twin(b, name)``
the accelerated version in backend ``b``. Each kernel needs an input-maker in
``MAKERS`` below: a new ``layers.*`` / ``attention.*`` kernel without one fails
``test_every_layer_and_attention_kernel_has_an_input_maker``. Kernels of other
modules (``tokenizer.*``, ``kv_cache.*``, ...) are tested by their owners'
modules and are skipped here when they have no maker.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from minillm import GPT, GPTConfig, backend, layers
from tests.helpers import assert_close

OWN_PREFIXES = ("layers.", "attention.")
DTYPES = ["float32", "float64"]
SEEDS = [0, 1, 2]          # each seed draws its own shapes


# --- input makers: (rng, dtype) -> positional arguments of the kernel ---------------
def dtype_type(dtype):
    return np.dtype(dtype).type


def _normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _lead(rng):
    """Random leading axes: (N,), (B, T) or (B, T, X), sizes not multiples of anything."""
    return tuple(int(n) for n in rng.integers(1, 9, size=int(rng.integers(1, 4))))


def _ln_fwd(rng, dtype):
    C = int(rng.integers(1, 70))
    return (_normal(rng, _lead(rng) + (C,), dtype, 3.0) + 1, _normal(rng, C, dtype),
            _normal(rng, C, dtype), float(rng.choice([1e-5, 1e-3])))


def _ln_bwd(rng, dtype):
    x, w, b, eps = _ln_fwd(rng, dtype)
    y, cache = backend.reference("layers.layernorm_forward")(x, w, b, eps)
    return _normal(rng, y.shape, dtype), cache


def _elementwise(rng, dtype):
    return (_normal(rng, _lead(rng) + (int(rng.integers(1, 70)),), dtype, 3.0),)


def _gelu_bwd(rng, dtype):
    (x,) = _elementwise(rng, dtype)
    return _normal(rng, x.shape, dtype), x


def _softmax_fwd(rng, dtype):
    (x,) = _elementwise(rng, dtype)
    x = x * dtype_type(dtype)(4)
    if x.shape[-1] > 1:                          # masked entries, as attention makes them
        mask = rng.random(x.shape) < 0.3
        mask[..., 0] = False
        x[mask] = -np.inf
    return (x,)


def _softmax_bwd(rng, dtype):
    (x,) = _softmax_fwd(rng, dtype)
    y, cache = backend.reference("layers.softmax_forward")(x)
    return _normal(rng, y.shape, dtype), cache


def _ce_fwd(rng, dtype):
    lead, V = _lead(rng), int(rng.integers(1, 90))
    return _normal(rng, lead + (V,), dtype, 3.0), rng.integers(0, V, size=lead)


def _ce_bwd(rng, dtype):
    logits, targets = _ce_fwd(rng, dtype)
    _, cache = backend.reference("layers.cross_entropy_forward")(logits, targets)
    return float(rng.uniform(0.1, 3.0)), cache, logits.shape


def _sdpa_fwd(rng, dtype):
    B, H, D = (int(n) for n in rng.integers(1, 5, size=3))
    T = int(rng.integers(1, 12))
    S = T + int(rng.choice([0, 0, rng.integers(1, 6)]))   # T < S: decoding with a KV cache
    return tuple(_normal(rng, (B, H, n, D), dtype) for n in (T, S, S))


def _sdpa_bwd(rng, dtype):
    q, k, v = _sdpa_fwd(rng, dtype)
    y, cache = backend.reference("attention.sdpa_forward")(q, k, v)
    return _normal(rng, y.shape, dtype), cache


def _flash_fwd(rng, dtype):
    """Like ``_sdpa_fwd``, and sometimes T past one tile and not a multiple of it."""
    B, H, D = (int(n) for n in rng.integers(1, 4, size=3))
    T = int(rng.choice([int(rng.integers(1, 12)), 129, 200]))
    S = T + int(rng.choice([0, 0, rng.integers(1, 70)]))   # T < S: decoding with a KV cache
    return tuple(_normal(rng, (B, H, n, D), dtype) for n in (T, S, S))


def _flash_bwd(rng, dtype):
    q, k, v = _flash_fwd(rng, dtype)
    y, cache = backend.reference("attention.flash_forward")(q, k, v)
    return _normal(rng, y.shape, dtype), cache


def _linear_fwd(rng, dtype):
    Cin, Cout = (int(n) for n in rng.integers(1, 40, size=2))
    bias = _normal(rng, Cout, dtype) if rng.random() < 0.7 else None
    w = _normal(rng, (Cout, Cin), dtype).T if rng.random() < 0.3 else _normal(rng, (Cin, Cout), dtype)
    return _normal(rng, _lead(rng) + (Cin,), dtype), w, bias          # w.T: the tied head's wte.T


def _linear_bwd(rng, dtype):
    y, cache = backend.reference("layers.linear_forward")(*_linear_fwd(rng, dtype))
    return _normal(rng, y.shape, dtype), cache


def _emb_bwd(rng, dtype):
    """Few token ids (so they repeat), positions shared (training) or one row each (decoding)."""
    V, T_max, C = int(rng.integers(1, 12)), int(rng.integers(8, 20)), int(rng.integers(1, 40))
    B, T = int(rng.integers(1, 5)), int(rng.integers(1, 8))
    pos0 = 0 if rng.random() < 0.5 else rng.integers(0, T_max - T + 1, B)
    x, cache = layers.embedding_forward(rng.integers(0, V, (B, T)), _normal(rng, (V, C), dtype),
                                        _normal(rng, (T_max, C), dtype), pos0)
    return _normal(rng, x.shape, dtype), cache


# Kernels that write into an argument by design (a cache, a parameter); their owners test them.
IN_PLACE = {"attention.append_attend": "tests/test_kv_cache.py",
            "optim.adamw_update": "tests/test_optim.py"}


MAKERS = {
    "layers.embedding_backward": _emb_bwd,
    "layers.layernorm_forward": _ln_fwd,
    "layers.layernorm_backward": _ln_bwd,
    "layers.gelu_forward": _elementwise,
    "layers.gelu_backward": _gelu_bwd,
    "layers.softmax_forward": _softmax_fwd,
    "layers.softmax_backward": _softmax_bwd,
    "layers.cross_entropy_forward": _ce_fwd,
    "layers.cross_entropy_backward": _ce_bwd,
    "attention.sdpa_forward": _sdpa_fwd,
    "attention.sdpa_backward": _sdpa_bwd,
    "attention.flash_forward": _flash_fwd,
    "attention.flash_backward": _flash_bwd,
    "layers.linear_forward": _linear_fwd,
    "layers.linear_backward": _linear_bwd,
}


# --- comparing whatever a kernel returns ----------------------------------------------
def assert_same_output(name, got, ref, dtype):
    """Arrays close (and same dtype), tuples / NamedTuples field by field, scalars equal."""
    if isinstance(ref, tuple):
        assert isinstance(got, tuple) and len(got) == len(ref), f"{name}: {type(got)} vs {type(ref)}"
        if hasattr(ref, "_fields"):               # a cache: same field names, same order
            assert getattr(got, "_fields", None) == ref._fields, f"{name}: cache fields differ"
        fields = getattr(ref, "_fields", range(len(ref)))
        for field, g, r in zip(fields, got, ref):
            assert_same_output(f"{name}.{field}", g, r, dtype)
    elif ref is None:
        assert got is None, name
    elif isinstance(ref, (np.ndarray, np.generic)) or hasattr(ref, "__cuda_array_interface__"):
        g, r = backend.to_numpy(got), backend.to_numpy(ref)
        assert g.dtype == r.dtype, f"{name}: dtype {g.dtype}, reference {r.dtype}"
        if r.dtype.kind == "f":
            assert_close(name, g, r, dtype)
        else:
            assert np.array_equal(g, r), name
    else:
        assert got == ref, f"{name}: {got!r} != {ref!r}"


def to_backend(obj, xp):
    """Copy arrays (also inside tuples / NamedTuples) into ``xp``'s arrays."""
    if isinstance(obj, tuple):
        items = [to_backend(o, xp) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, np.ndarray):
        return xp.asarray(obj)
    return obj


# --- the parametrisation: every (backend, kernel) that has a twin -------------------------
def twin_cases():
    names = sorted(backend.kernels())
    for b, (ok, _) in backend.available().items():
        if not ok:
            continue
        for name in names:
            if backend.twin(b, name) is not None:
                yield pytest.param(b, name, id=f"{b}:{name}")


TWIN_CASES = list(twin_cases())


def test_every_layer_and_attention_kernel_has_an_input_maker():
    missing = [n for n in backend.kernels()
               if n.startswith(OWN_PREFIXES) and n not in MAKERS and n not in IN_PLACE]
    assert not missing, f"add an input-maker to tests/backends/test_kernels.py MAKERS for {missing}"


def test_makers_name_only_registered_kernels():
    assert set(MAKERS) <= set(backend.kernels())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_makers_feed_the_reference(name, dtype):
    """The inputs are valid: the reference runs on them and keeps their dtype."""
    out = backend.reference(name)(*MAKERS[name](np.random.default_rng(0), dtype))
    first = out[0] if isinstance(out, tuple) else out
    assert np.asarray(first).dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name,name", TWIN_CASES)
def test_twin_equals_reference(backend_name, name, dtype):
    if name in IN_PLACE:
        pytest.skip(f"{name} writes into its cache argument by design; {IN_PLACE[name]} checks the twin")
    if name not in MAKERS:
        if name.startswith(OWN_PREFIXES):
            pytest.fail(f"{name} has a {backend_name} twin but no input-maker in MAKERS")
        pytest.skip(f"{name}: no input-maker here; its owner's tests (tests/test_"
                    f"{name.split('.')[0]}.py) check the twin")
    fn, ref = backend.twin(backend_name, name), backend.reference(name)
    xp = backend.xp_for(backend_name)
    for seed in SEEDS:
        args = MAKERS[name](np.random.default_rng(seed), dtype)
        expected = ref(*copy.deepcopy(args))
        twin_args = to_backend(copy.deepcopy(args), xp)
        before = copy.deepcopy(twin_args)
        got = fn(*twin_args)
        assert_same_output(f"{backend_name}:{name}[seed={seed}]", got, expected, dtype)
        assert_same_output(f"{backend_name}:{name} inputs after the call", twin_args, before,
                           dtype)   # a twin must not modify its inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", [b for b, (ok, _) in backend.available().items()
                                          if ok and backend.xp_for(b) is np])   # host backends
def test_model_step_on_every_cpu_backend_equals_numpy(backend_name, dtype):
    """The twins compose: a whole forward + backward gives the reference's loss and grads."""
    cfg = GPTConfig(vocab_size=37, block_size=12, n_layer=2, n_head=2, n_embd=16, dtype=dtype)
    rng = np.random.default_rng(0)
    model = GPT(cfg, seed=0)
    for k, v in model.params.items():        # nontrivial LayerNorms and biases
        model.params[k] = (v + 0.1 * rng.standard_normal(v.shape)).astype(dtype)
    idx, targets = rng.integers(0, 37, size=(3, 12)), rng.integers(0, 37, size=(3, 12))
    with backend.use("numpy"):
        loss, grads = model.loss_and_grads(idx, targets)
        logits = model.forward(idx)
    with backend.use(backend_name):
        loss_b, grads_b = model.loss_and_grads(idx, targets)
        logits_b = model.forward(idx)
    assert logits_b.dtype == logits.dtype == np.dtype(dtype)
    assert_close("logits", logits_b, logits, dtype)
    assert_close("loss", loss_b, loss, dtype)
    for k in grads:      # relative to each tensor's scale: summation order differs
        assert grads_b[k].dtype == grads[k].dtype
        assert_close(k, grads_b[k], grads[k], rtol=0,
                     atol=(1e-4 if dtype == "float32" else 1e-10) * np.abs(grads[k]).max())


@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("shape", [(3, 2, 70, 8), (1, 5, 70, 8), (1, 1, 9, 4)])   # split B, split H, one head
def test_flash_twin_split_over_threads_equals_reference(n_threads, shape, monkeypatch):
    """The numba flash twin's head slabs (one per thread) give the reference's outputs."""
    if not backend.available().get("numba", (False, ""))[0]:
        pytest.skip("numba not available")
    from backends import numba_attention
    monkeypatch.setattr(numba_attention, "threads", lambda: n_threads)
    monkeypatch.setattr(numba_attention, "MIN_SPLIT_WORK", 0)         # split even these small heads
    assert len(numba_attention._slabs(shape[0], shape[1], 1)) == min(n_threads, max(shape[:2]))
    rng = np.random.default_rng(n_threads)
    q, k, v = (_normal(rng, shape, "float32") for _ in range(3))
    dy = _normal(rng, shape, "float32")
    y, cache = numba_attention.flash_forward(q, k, v)
    y_ref, cache_ref = backend.reference("attention.flash_forward")(q, k, v)
    assert_same_output("flash_forward", (y, cache), (y_ref, cache_ref), "float32")
    got = numba_attention.flash_backward(dy, cache)
    assert_same_output("flash_backward", got, backend.reference("attention.flash_backward")(dy, cache_ref),
                       "float32")
    monkeypatch.setattr(numba_attention, "threads", lambda: 1)      # heads are independent:
    y1, cache1 = numba_attention.flash_forward(q, k, v)            # the split changes no bit
    for a, b in zip((y, cache.lse, *got), (y1, cache1.lse, *numba_attention.flash_backward(dy, cache1))):
        np.testing.assert_array_equal(a, b)


def test_linear_backward_twin_gives_dw_in_ws_layout():
    """For a transposed weight (the tied head's wte.T) dw comes transposed too, so the
    model's dwte adds up without a transposing pass; the values are the reference's."""
    if not backend.available().get("numba", (False, ""))[0]:
        pytest.skip("numba not available")
    from backends import numba_layers
    rng = np.random.default_rng(0)
    wte = _normal(rng, (50, 8), "float32")
    x, dy = _normal(rng, (2, 3, 8), "float32"), _normal(rng, (2, 3, 50), "float32")
    for w in (wte.T, np.ascontiguousarray(wte.T)):
        _, cache = numba_layers.linear_forward(x, w)
        dx, dw, db = numba_layers.linear_backward(dy, cache)
        ref = backend.reference("layers.linear_backward")(dy, cache)
        assert dw.shape == w.shape and dw.flags.f_contiguous == w.flags.f_contiguous and db is None
        assert_same_output("linear_backward", (dx, dw, db), ref, "float32")
