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
