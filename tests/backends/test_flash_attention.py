"""Tiled causal attention (``attention.flash_forward`` / ``flash_backward``, issue 15).

The reference pair equals the textbook ``sdpa_*`` pair and float64 central
differences; the Numba twin equals the reference for shapes drawn by
hypothesis, with T and S on and off the tile size (the tile is shrunk so that
small shapes cross many tiles, diagonal ones included).
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm import attention as attn, backend
from tests.helpers import assert_close, check_grads

SETTINGS = settings(deadline=None, max_examples=12)
shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 23), st.integers(0, 9),
                   st.integers(1, 5))                       # B, H, T, S - T, D
HAVE_NUMBA = backend.available()["numba"][0]


def qkv(seed, B, H, T, extra, D, dtype="float64"):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, H, n, D)).astype(dtype) for n in (T, T + extra, T + extra))


@given(seed=st.integers(0, 2**16), shape=shapes, tile=st.sampled_from([1, 4, 7, 64]))
@SETTINGS
def test_reference_equals_sdpa_forward_and_backward(seed, shape, tile):
    with tile_set(attn, "FLASH_TILE", tile):
        check_reference_equals_sdpa(seed, shape)


def check_reference_equals_sdpa(seed, shape):
    q, k, v = qkv(seed, *shape)
    y, cache = attn.sdpa_forward(q, k, v)
    yf, fc = attn.flash_forward(q, k, v)
    assert_close("y", yf, y)
    scores = np.where(attn.causal_mask(q.shape[2], k.shape[2]),
                      q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[3]), -np.inf)
    m = scores.max(-1)
    assert_close("lse", fc.lse, m + np.log(np.exp(scores - m[..., None]).sum(-1)))
    dy = np.random.default_rng(seed + 1).standard_normal(y.shape)
    for name, g, r in zip("qkv", attn.flash_backward(dy, fc), attn.sdpa_backward(dy, cache)):
        assert_close(f"d{name}", g, r)


@pytest.mark.parametrize("tile", [2, 3, 64])
def test_reference_backward_against_central_differences(tile, monkeypatch):
    monkeypatch.setattr(attn, "FLASH_TILE", tile)
    q, k, v = qkv(0, 2, 2, 5, 2, 3)
    dy = np.random.default_rng(1).standard_normal(q.shape)
    y, cache = attn.flash_forward(q, k, v)
    dq, dk, dv = attn.flash_backward(dy, cache)
    check_grads(f"flash tile={tile}", lambda: float(np.sum(attn.flash_forward(q, k, v)[0] * dy)),
                [q, k, v], [dq, dk, dv])


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@given(seed=st.integers(0, 2**16), shape=shapes, tile=st.sampled_from([4, 7, 16]),
       keys=st.sampled_from(["same", "ragged", "wide"]), dtype=st.sampled_from(["float32", "float64"]))
@SETTINGS
def test_numba_twin_equals_reference(seed, shape, tile, keys, dtype):
    """Query blocks and key tiles cross T and S; key tiles as wide as the query block,
    wider by a ragged amount, or all keys at once."""
    from backends import numba_attention as na
    key_max = {"same": tile, "ragged": 2 * tile + 1, "wide": 256}[keys]
    with tile_set(na, "TILE", tile), tile_set(na, "KEY_TILE_MAX", key_max), \
            tile_set(attn, "FLASH_TILE", tile):
        check_twin_equals_reference(na, seed, shape, dtype)


def check_twin_equals_reference(na, seed, shape, dtype):
    q, k, v = qkv(seed, *shape, dtype=dtype)
    y, ref = attn.flash_forward(q, k, v)
    y2, twin = na.flash_forward(q, k, v)
    assert y2.dtype == y.dtype and twin.lse.dtype == ref.lse.dtype
    assert_close("y", y2, y, dtype)
    assert_close("lse", twin.lse, ref.lse, dtype)
    dy = np.random.default_rng(seed + 1).standard_normal(y.shape).astype(dtype)
    for name, g, r in zip("qkv", na.flash_backward(dy, twin), attn.flash_backward(dy, ref)):
        assert g.dtype == r.dtype
        assert_close(f"d{name}", g, r, dtype)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
def test_numba_twin_at_the_real_tile_with_a_ragged_end():
    """The shipped tiles (no monkeypatching): T = 2 tiles + 3, and T < S; with D = 32 the
    key tiles are wider than the query blocks (``_key_tile``), T = 2 of them + 3."""
    from backends import numba_attention as na
    assert na._key_tile(32) > na.TILE
    for T, extra, D in ((2 * na.TILE + 3, 0, 4), (na.TILE + 1, 5, 4), (2 * na._key_tile(32) + 3, 7, 32)):
        q, k, v = qkv(3, 1, 2, T, extra, D, dtype="float32")
        y, ref = attn.flash_forward(q, k, v)
        y2, twin = na.flash_forward(q, k, v)
        assert_close("y", y2, y, "float32")
        dy = np.ones_like(y)
        for g, r in zip(na.flash_backward(dy, twin), attn.flash_backward(dy, ref)):
            assert_close("grad", g, r, "float32")


@contextlib.contextmanager
def tile_set(module, name, value):
    """Set a module's tile size for the block (hypothesis runs many examples per test call)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)
