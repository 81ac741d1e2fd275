"""Shared test helpers: the package's ``assert_close`` and float64 central differences.

Import as ``from tests.helpers import assert_close, TOLERANCES, numerical_grads``.
They live in ``minillm.gradcheck`` so that chapters use the very same checks.
"""
from minillm.gradcheck import (FD_STEP, FD_TOL, TOLERANCES, assert_close,  # noqa: F401
                               check_grads, check_model_grads, numerical_grads)
