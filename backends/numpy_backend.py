"""The reference backend: NumPy arrays, no kernel overrides (the math is in minillm/)."""
import numpy as xp

NAME = "numpy"
KERNELS: dict = {}


def is_available() -> tuple[bool, str]:
    return True, f"numpy {xp.__version__}"
