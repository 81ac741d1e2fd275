"""Shared test helpers: the package's ``assert_close`` and float64 central differences.

Import as ``from tests.helpers import assert_close, TOLERANCES, numerical_grads``.
They live in ``minillm.gradcheck`` so that chapters use the very same checks.
"""
from minillm.gradcheck import (FD_STEP, FD_TOL, TOLERANCES, assert_close,  # noqa: F401
                               check_grads, check_model_grads, numerical_grads)


def host_device_pair(config, device: str, seed: int = 0):
    """(NumPy model, the same model on ``device``) with nontrivial weights: GPT-2 init
    moved by 0.1 * noise, so LayerNorms and biases are not 1 / 0."""
    import numpy as np

    from minillm import GPT
    rng = np.random.default_rng(seed)
    cpu = GPT(config, seed=seed)
    for k, v in cpu.params.items():
        cpu.params[k] = (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
    return cpu, GPT(config, params={k: v.copy() for k, v in cpu.params.items()}).to(device)


def sparse_patterns(max_window: int):
    """Hypothesis strategy: every sparse attention pattern (window up to ``max_window``,
    strided with or without its own window, block with 0-6 global keys)."""
    from hypothesis import strategies as st

    from minillm.sparse_attention import Pattern
    return st.one_of(
        st.builds(lambda w: Pattern("window", w), st.integers(1, max_window)),
        st.builds(lambda w, s: Pattern("strided", w, s), st.one_of(st.none(), st.integers(1, 20)),
                  st.integers(1, 12)),
        st.builds(lambda b, g: Pattern("block", block=b, n_global=g), st.integers(1, 20),
                  st.integers(0, 6)))
