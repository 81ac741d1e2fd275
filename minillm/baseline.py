"""The tour's baseline: the small model it trains once and keeps in a cache.

``get_baseline(settings, text)`` trains a byte-level BPE tokenizer and the
``small`` GPT (``tour_settings``), or reuses the cache entry that the same
settings, corpus and cache format made before. An entry is a directory named
by the hash of those (``TourSettings.key``), written atomically: ``tour.json``
(settings, timings, backend), ``ids.npy`` (the encoded corpus) and ``model/``
(a training checkpoint with its tokenizer). Techniques that train keep their
models beside it (``TECHNIQUES_DIR``, see ``tour.TourContext.cached_model``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import backend
from .checks import check_int
from .files import atomic_dir, atomic_write_text


CACHE_FORMAT = 1           # bump when a cache entry's layout or meaning changes
CACHE_FILES = ("tour.json", "ids.npy", "model/model.safetensors", "model/meta.json",
               "model/tokenizer.model")
TECHNIQUES_DIR = "techniques"   # inside a baseline's entry: the models of cached_model


@dataclass(frozen=True)
class TourSettings:
    """Everything that decides the baseline model; its hash names the cache entry.

    model            the GPT's shape (vocab_size == the BPE vocabulary)
    train            the training run (``minillm.train.TrainConfig``)
    pattern          the BPE pre-tokenizer ("gpt2")
    tokenizer_chars  BPE merges are learned on the first this many characters
    corpus_chars     the corpus is cut to its first this many characters (None: all)
    val_fraction     the last this fraction of the ids validates
    """
    model: Any
    train: Any
    pattern: str = "gpt2"
    tokenizer_chars: int = 2_000_000
    corpus_chars: int | None = None
    val_fraction: float = 0.05

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": self.train.to_dict(),
                "pattern": self.pattern, "tokenizer_chars": self.tokenizer_chars,
                "corpus_chars": self.corpus_chars, "val_fraction": self.val_fraction}

    def key(self, corpus_sha256: str) -> str:
        """Cache key: hash of the settings, the corpus bytes' sha256 and the cache format."""
        blob = json.dumps({"format": CACHE_FORMAT, "corpus": corpus_sha256,
                           "settings": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


DEFAULT_STEPS = 200
DEFAULT_LR = 3e-3


def tour_settings(quick: bool = False, steps: int | None = None, seed: int = 0) -> TourSettings:
    """The default tour (small preset, a few minutes on 2 cores) or ``quick`` (seconds; tests).

    Default: the ``small`` preset (V=4096 BPE, T=256, L=6, H=8, C=256) trained
    for DEFAULT_STEPS steps of B=8 x T=256 tokens with AdamW, warmup + cosine.
    """
    from .config import GPTConfig
    from .train import TrainConfig
    check_int("seed", seed, 0)
    if steps is not None:
        check_int("steps", steps, 1)
    if quick:
        model = GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32)
        train = TrainConfig(steps=steps or 6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2,
                            eval_interval=3, eval_batches=2, seed=seed)
        return TourSettings(model, train, tokenizer_chars=20_000, corpus_chars=100_000)
    model = GPTConfig.preset("small")
    train = TrainConfig(steps=steps or DEFAULT_STEPS, batch_size=8, seq_len=model.block_size,
                        lr=DEFAULT_LR, min_lr=DEFAULT_LR / 10, warmup_steps=10,
                        eval_interval=25, eval_batches=2, seed=seed)
    return TourSettings(model, train)


def default_cache_dir() -> Path:
    """``$MINILLM_CACHE/tour``, else ``~/.cache/minillm/tour``."""
    root = os.environ.get("MINILLM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "minillm") / "tour"


@dataclass
class Baseline:
    """The trained baseline and how it was made (fresh or from the cache)."""
    model: Any
    tokenizer: Any
    train_ids: np.ndarray
    val_ids: np.ndarray
    history: list
    evals: list
    info: dict                   # tour.json: settings, key, timings, backend of the training
    cached: bool                 # True when loaded from the cache, not trained now
    entry: Path | None           # the cache entry directory (None with use_cache=False)


def build_baseline(settings: TourSettings, text: str, progress: bool, log) -> Callable[[Path], None]:
    """-> ``write(dir)``: trains tokenizer and model and writes a cache entry into ``dir``."""
    from . import data
    from .model import GPT
    from .tokenizer import BPETokenizer
    from .train import train

    def write(tmp: Path) -> None:
        timings, t0 = {}, time.perf_counter()
        log(f"training the BPE tokenizer (vocab {settings.model.vocab_size}) on "
            f"{min(len(text), settings.tokenizer_chars):,} characters")
        tok = BPETokenizer.train(text[:settings.tokenizer_chars], settings.model.vocab_size,
                                 pattern=settings.pattern, progress=progress)
        timings["tokenizer_train_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        ids = data.encode_corpus(tok, text)                                   # (N,) int32
        timings["encode_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        log(f"encoded the corpus: {len(text):,} characters -> {len(ids):,} tokens")
        train_ids, val_ids = data.split(ids, settings.val_fraction)
        model = GPT(settings.model, seed=settings.train.seed)
        log(f"training {model} for {settings.train.steps} steps on backend {backend.current()}")
        train(model, train_ids, val_ids, settings.train, out_dir=tmp / "model",
              progress=progress, tokenizer=tok)
        timings["train_s"] = time.perf_counter() - t0
        np.save(tmp / "ids.npy", ids, allow_pickle=False)
        info = {"format": CACHE_FORMAT, "settings": settings.to_dict(),
                "backend": backend.current(), "timings": timings,
                "n_tokens": int(len(ids)), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_text(tmp / "tour.json", json.dumps(info, indent=2))
    return write


def load_baseline(entry: Path, settings: TourSettings, cached: bool) -> Baseline:
    """Read a cache entry (``ValueError`` if anything is missing or does not match)."""
    from . import checkpoint, data
    from .model import GPT
    from .tokenizer import BPETokenizer
    missing = [f for f in CACHE_FILES if not (entry / f).is_file()]
    if missing:
        raise ValueError(f"cache entry {str(entry)!r} lacks {missing}")
    info = json.loads((entry / "tour.json").read_text())
    if info.get("format") != CACHE_FORMAT or info.get("settings") != settings.to_dict():
        raise ValueError(f"cache entry {str(entry)!r} was made by other settings")
    model = GPT.load(entry / "model")
    tok = BPETokenizer.load(entry / "model" / "tokenizer.model")
    ids = np.load(entry / "ids.npy", allow_pickle=False)
    if model.config != settings.model or tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"cache entry {str(entry)!r}: model or tokenizer does not match")
    meta = checkpoint.load_meta(entry / "model")
    train_ids, val_ids = data.split(ids, settings.val_fraction)
    return Baseline(model, tok, train_ids, val_ids, meta["history"], meta["evals"], info,
                    cached, entry)


def get_baseline(settings: TourSettings, text: str, cache_dir=None, use_cache: bool = True,
                 progress: bool = True, log=print) -> Baseline:
    """Reuse the cache entry for ``settings`` if it is there and sound, else train and store it.

    The entry is ``cache_dir/<key>`` (``default_cache_dir()`` when ``cache_dir`` is
    None), written atomically, so an interrupted run leaves no half entry.
    ``use_cache=False`` trains in a temporary directory and touches no cache.
    """
    write = build_baseline(settings, text, progress, log)
    if not use_cache:
        with tempfile.TemporaryDirectory(prefix="minillm-tour-") as tmp:
            write(Path(tmp))
            return load_baseline(Path(tmp), settings, cached=False)
    key = settings.key(hashlib.sha256(text.encode("utf-8")).hexdigest())
    entry = Path(cache_dir if cache_dir is not None else default_cache_dir()) / key
    if entry.exists():
        try:
            baseline = load_baseline(entry, settings, cached=True)
            log(f"reusing the trained baseline from {entry}")
            return baseline
        except (ValueError, OSError, KeyError) as exc:
            log(f"cache entry {entry} is unusable ({exc}); training again")
    atomic_dir(entry, write)
    return load_baseline(entry, settings, cached=False)
