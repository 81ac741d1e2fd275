"""The embedded corpus, the train/validation split and random batches.

text --tokenizer--> ids (N,) int32 --split--> train, val --get_batch--> x, y (B, T)

The corpus is the King James Bible (public domain), shipped in
``minillm/data/kjv.txt``; ``minillm/data/PROVENANCE.md`` says where it comes
from and ``CORPUS_SHA256`` pins its exact bytes.

A batch holds ``B`` windows of ``T + 1`` consecutive ids starting at random
offsets; ``x`` is the first ``T`` of each window and ``y`` the last ``T``, so
``y[b, t]`` is the token that follows ``x[b, t]`` (next-token prediction).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .checks import check_float, check_int

CORPUS_PATH = Path(__file__).parent / "data" / "kjv.txt"
CORPUS_SHA256 = "6f74f5589333c56c263963e6347dba662bae2d96861302e690aaae0b4a855eda"


def corpus_sha256(path=None) -> str:
    """Hex sha256 of the corpus file's bytes (compare with ``CORPUS_SHA256``)."""
    return hashlib.sha256(_corpus_file(path).read_bytes()).hexdigest()


def _corpus_file(path) -> Path:
    path = CORPUS_PATH if path is None else Path(path)
    if not path.is_file():
        raise ValueError(f"corpus path={str(path)!r} does not exist or is not a file "
                         f"(the embedded corpus is {str(CORPUS_PATH)!r})")
    return path


def load_corpus(path=None) -> str:
    """The text of ``path`` (UTF-8); the embedded KJV corpus when ``path`` is None."""
    path = _corpus_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"corpus path={str(path)!r} is not UTF-8 text: {exc}") from None


def encode_corpus(tokenizer, text: str) -> np.ndarray:
    """``tokenizer.encode(text)`` as a 1-D int32 array (N,)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    ids = np.asarray(tokenizer.encode(text), dtype=np.int32)            # (N,)
    vocab_size = getattr(tokenizer, "vocab_size", None)
    if ids.size and vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"tokenizer produced ids outside [0, vocab_size={vocab_size})")
    return ids


def _check_ids(ids, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D integer array, got dtype {ids.dtype} "
                         f"shape {ids.shape}")
    return ids


def split(ids, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous split: the first ``1 - val_fraction`` of ``ids`` trains, the rest validates.

    Contiguous (not shuffled) so that no validation window overlaps a training one.
    """
    ids = _check_ids(ids, "ids")
    check_float("val_fraction", val_fraction, 0, 1, lo_open=True, hi_open=True)
    n_val = int(round(len(ids) * val_fraction))
    if n_val < 1 or n_val >= len(ids):
        raise ValueError(f"val_fraction={val_fraction} of {len(ids)} ids leaves "
                         f"{n_val} validation and {len(ids) - n_val} training ids; "
                         f"both must be >= 1")
    cut = len(ids) - n_val
    return ids[:cut], ids[cut:]


def get_batch(data, batch_size: int, seq_len: int, rng: np.random.Generator):
    """``batch_size`` random windows of ``data`` -> (x, y), both (B, T) int32, y = x shifted by one."""
    data = _check_ids(data, "data")
    check_int("batch_size", batch_size, 1)
    check_int("seq_len", seq_len, 1)
    if seq_len >= len(data):
        raise ValueError(f"seq_len={seq_len} must be < len(data)={len(data)} "
                         f"(a window needs seq_len + 1 ids)")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    starts = rng.integers(0, len(data) - seq_len, size=batch_size)      # (B,) last start: N - T - 1
    window = starts[:, None] + np.arange(seq_len + 1)                   # (B, T + 1)
    chunk = data[window].astype(np.int32)                               # (B, T + 1)
    x = np.ascontiguousarray(chunk[:, :-1])                             # (B, T)
    y = np.ascontiguousarray(chunk[:, 1:])                              # (B, T)
    return x, y
