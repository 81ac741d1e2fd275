"""minillm: a minimal NumPy GPT on which LLM optimizations are built and measured.

    import minillm as mm
    model = mm.GPT(mm.GPTConfig.preset("tiny"), seed=0)
"""
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
