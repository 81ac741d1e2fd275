"""minillm: a minimal NumPy GPT on which LLM optimizations are built and measured.

    import minillm as mm
    model = mm.GPT(mm.GPTConfig.preset("tiny"), seed=0)
"""
import os as _os
import sys as _sys

# Before NumPy loads OpenBLAS (it reads this once, at load): OpenBLAS's idle
# workers otherwise spin for 2^28 CPU cycles (~0.1 s) after every product and
# hold the core that the compiled twins' second thread needs; 2^20 (~0.3 ms)
# leaves products as fast and frees the core (measured, issue 15: README
# "Threads"). A value the user exported wins; if NumPy was imported first,
# nothing changes and backends.numba_attention keeps its heads on one thread.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
from . import backend, data, train       # mm.train(...) runs minillm.train.train
from .config import GPTConfig
from .model import GPT
from .tokenizer import BPETokenizer

__version__ = "0.1.0"
__all__ = ["BPETokenizer", "GPT", "GPTConfig", "backend", "data", "train", "__version__"]

# techniques: one line each, e.g. `from .quantization import quantize; __all__ += ["quantize"]`
from .pruning import prune, sparsity; __all__ += ["prune", "sparsity"]  # noqa: E402
from .quantization import quantize; __all__ += ["quantize"]  # noqa: E402
from .distillation import distill; __all__ += ["distill"]  # noqa: E402
from .batching import Server, find_batch_size, memory_model; __all__ += ["Server", "find_batch_size", "memory_model"]  # noqa: E402
