"""The tour: train (or reuse) the small model, run every technique, collect one row each.

A technique joins the tour with one *row function* in its own module (for
kv_cache, at the end of ``minillm/kv_cache.py``)::

    from .tour import Row, technique

    @technique("kv_cache", order=2)
    def kv_cache_row(ctx: TourContext) -> Row:
        ...   # call the technique's public API on ctx.model; return a Row

Nothing else is needed: the tour imports every ``minillm`` module (``collect``),
so every ``@technique`` row registers itself. Rows run in a fixed order:
by ``order`` (by convention the technique's chapter number,
``chapters/NN_<stem>.ipynb``), then by name; so the table does not depend on
which modules happened to be imported first.

The row function gets a ``TourContext`` (the trained baseline model, its
tokenizer, the token splits, helpers that measure perplexity and decode speed
the same way for every row) and returns one ``Row`` or a list of rows. Ratios to
the baseline are computed by the report (``minillm.report``), never by row
functions. A row function that raises, or a module that fails to import, does
not stop the tour: its row shows the error.

Time: the default tour must finish in a few minutes on 2 CPU cores, so the
tour has a time budget (``TOUR_BUDGET_S``, baseline training included) and each
row gets ``ctx.budget_s`` seconds, an equal share of what is left. A row that
must train uses ``ctx.cached_model(name, settings, build)``: ``build(budget_s)``
trains within that many seconds, and its model is kept in the tour's cache
beside the baseline it was built from, so the next tour reuses it at once.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import backend
from .checks import check_float, check_int
from .baseline import CACHE_FORMAT, TECHNIQUES_DIR, Baseline, get_baseline, tour_settings
from .report import format_table, write_report
from .timing import cpu_name


# --- the registry ------------------------------------------------------------------
@dataclass
class Row:
    """One line of the trade-off table.

    ``val_ppl`` is perplexity per token *of that row's tokenizer* (rows with a
    different tokenizer are not directly comparable; say so in ``notes``).
    Missing measurements are ``None``. ``extra`` holds technique-specific
    numbers (cache bytes, bytes/token, ...) shown under the table.
    """
    technique: str
    params: int | None           # None only in an error row
    weight_bytes: int | None
    val_ppl: float | None
    train_tok_s: float | None
    decode_tok_s: float | None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def error_row(name: str, exc: BaseException, what: str = "") -> Row:
    """The row that stands in for a technique that failed: every number missing."""
    return Row(name, None, None, None, None, None,
               notes=f"error: {what}{type(exc).__name__}: {exc}", extra={"error": True})


RowFn = Callable[["TourContext"], "Row | list[Row]"]
TECHNIQUES: dict[str, RowFn] = {}
ORDER: dict[str, int] = {}       # name -> order given to ``technique``
DEFAULT_ORDER = 100              # rows without an order come after the numbered ones


def technique(name: str, order: int = DEFAULT_ORDER) -> Callable[[RowFn], RowFn]:
    """Decorator: register ``fn(ctx) -> Row | list[Row]`` under ``name``.

    ``order`` places the row in the table (ascending, then by name); by
    convention it is the technique's chapter number.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"technique name={name!r} must be a non-empty string")
    order = check_int("order", order)

    def register(fn: RowFn) -> RowFn:
        if name in TECHNIQUES and TECHNIQUES[name] is not fn:
            raise ValueError(f"technique name={name!r} is registered twice")
        TECHNIQUES[name] = fn
        ORDER[name] = order
        return fn
    return register


def collect() -> dict[str, Exception]:
    """Import every ``minillm`` module so that its rows register; -> ``{module: error}``
    for modules that failed to import (the tour shows them as error rows)."""
    import minillm
    failed = {}
    for info in sorted(pkgutil.iter_modules(minillm.__path__), key=lambda m: m.name):
        try:
            importlib.import_module(f"minillm.{info.name}")
        except Exception as exc:   # one broken module must not hide the other rows
            failed[info.name] = exc
    return failed


def ordered_names() -> list[str]:
    """Every registered technique, in table order (``order``, then name)."""
    return sorted(TECHNIQUES, key=lambda n: (ORDER.get(n, DEFAULT_ORDER), n))


# --- what every row function gets -------------------------------------------------------
@dataclass
class TourContext:
    """What every row function gets: the trained baseline and shared measurements."""
    model: Any                   # minillm.GPT, trained
    tokenizer: Any               # minillm.tokenizer.BPETokenizer
    train_ids: np.ndarray        # (N_train,) int32
    val_ids: np.ndarray          # (N_val,) int32
    text: str                    # the corpus
    baseline: Row | None
    out_dir: Path
    quick: bool
    seed: int
    eval_batch_size: int = 8
    eval_seq_len: int = 128
    eval_batches: int = 8
    prompt: str = "In the beginning"
    decode_tokens: int = 64
    history: list = field(default_factory=list)   # the baseline's training steps (train.py records)
    train_config: Any = None                      # the baseline's TrainConfig
    budget_s: float = 60.0       # seconds this row may spend (set by the tour before each row)
    cache_dir: Path | None = None   # where cached_model keeps models; None: no cache
    log: Callable[[str], None] = field(default=lambda message: None, repr=False)

    def val_ppl(self, model=None, ids: np.ndarray | None = None) -> float:
        """Validation perplexity on fixed batches (same for every row)."""
        return val_perplexity(model if model is not None else self.model,
                              self.val_ids if ids is None else ids,
                              self.eval_batch_size, self.eval_seq_len,
                              self.eval_batches, self.seed)

    def decode_tok_s(self, model=None, use_cache: bool = False, **generate_kwargs) -> float:
        """New tokens per second of greedy ``model.generate`` from the tour prompt."""
        return decode_speed(model if model is not None else self.model,
                            self.prompt_ids(), self.decode_tokens,
                            use_cache=use_cache, **generate_kwargs)

    def prompt_ids(self) -> np.ndarray:
        """The tour prompt encoded with the tour tokenizer, (1, T) int64."""
        return np.asarray([self.tokenizer.encode(self.prompt)], dtype=np.int64)

    def cached_model(self, name: str, settings: dict, build: Callable[[float], Any],
                     budget_s: float | None = None):
        """A model a technique trains: reused from the cache if there and sound, else built.

        The entry is ``<cache_dir>/<baseline key>/techniques/<name>-<hash of settings>``:
        a directory written by ``model.save`` (atomically) and read by ``GPT.load``.
        It lives inside the baseline's entry, so it goes when the baseline is
        trained again. Otherwise ``build(budget_s)`` makes the model and must
        return within ``budget_s`` seconds (default ``self.budget_s``). Put
        everything that decides the model into ``settings`` (JSON-able): change
        one and the model is built again. With no cache (``use_cache=False``)
        the model is built and stored in a temporary directory.
        """
        key = technique_key(name, settings)
        budget_s = self.budget_s if budget_s is None else \
            check_float("budget_s", budget_s, 0, lo_open=True)
        if self.cache_dir is None:
            with tempfile.TemporaryDirectory(prefix="minillm-technique-") as tmp:
                return self._build(Path(tmp) / name, name, settings, build, budget_s)
        entry = Path(self.cache_dir) / f"{name}-{key}"
        if entry.exists():
            try:
                model = load_technique_model(entry, name, settings)
                self.log(f"reusing {name}'s model from {entry}")
                return model
            except (ValueError, OSError, KeyError) as exc:
                self.log(f"cache entry {entry} is unusable ({exc}); building again")
        return self._build(entry, name, settings, build, budget_s)

    def _build(self, entry: Path, name: str, settings: dict, build, budget_s: float):
        from .model import GPT
        self.log(f"building {name}'s model (budget {budget_s:.1f} s)")
        t0 = time.perf_counter()
        model = build(budget_s)
        seconds = time.perf_counter() - t0
        if not isinstance(model, GPT):
            raise TypeError(f"build for technique {name!r} must return a GPT, "
                            f"got {type(model).__name__}")
        if seconds > 1.1 * budget_s + 1.0:
            self.log(f"{name}: build took {seconds:.1f} s, over its budget of {budget_s:.1f} s")
        model.save(entry, meta={"format": CACHE_FORMAT, "technique": name, "settings": settings,
                                "budget_s": budget_s, "build_s": seconds})
        return load_technique_model(entry, name, settings)


def technique_key(name: str, settings: dict) -> str:
    """Hash of a technique's name and settings (names its cache entry)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"name={name!r} must be letters, digits, '_', '.', '-' (a directory name)")
    if not isinstance(settings, dict):
        raise ValueError(f"settings={settings!r} must be a dict")
    try:
        blob = json.dumps({"format": CACHE_FORMAT, "technique": name, "settings": settings},
                          sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"settings={settings!r} must be JSON (str, numbers, lists, dicts): "
                         f"{exc}") from None
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_technique_model(entry: Path, name: str, settings: dict):
    """``GPT.load(entry)``; ``ValueError`` unless it was stored for ``name`` and ``settings``."""
    from .checkpoint import load_meta
    from .model import GPT
    meta = load_meta(entry) or {}
    if (meta.get("format") != CACHE_FORMAT or meta.get("technique") != name
            or meta.get("settings") != json.loads(json.dumps(settings))):
        raise ValueError(f"cache entry {str(entry)!r} was stored for other settings")
    return GPT.load(entry)


# --- measurements shared by every row -----------------------------------------
def val_perplexity(model, val_ids, batch_size, seq_len, n_batches, seed) -> float:
    """exp(mean cross-entropy) over ``n_batches`` fixed random windows of ``val_ids``."""
    from .train import evaluate
    seq_len = min(seq_len, model.config.block_size, len(val_ids) - 1)
    return float(np.exp(evaluate(model, val_ids, batch_size, seq_len, n_batches, seed)))


def decode_speed(model, prompt_ids, n_new, use_cache=False, repeats=3, **kwargs) -> float:
    """New tokens / second of greedy generation: the best of ``repeats`` runs after a
    warm-up of two tokens (the prefill *and* one decode step, so the first call's
    compile or cache load of either path is never timed)."""
    model.generate(prompt_ids, max_new_tokens=2, temperature=0.0, use_cache=use_cache, **kwargs)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompt_ids, max_new_tokens=n_new, temperature=0.0,
                       use_cache=use_cache, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return n_new / best


# --- time budgets -------------------------------------------------------------------
TOUR_BUDGET_S = 270.0        # the default tour in all, baseline training included (< 5 min)
QUICK_TOUR_BUDGET_S = 30.0
MIN_ROW_BUDGET_S = 5.0       # a row late in an overrun tour still gets this much
QUICK_MIN_ROW_BUDGET_S = 0.5


def row_budget_s(quick: bool, elapsed_s: float, rows_left: int) -> float:
    """Seconds the next row may spend: an equal share of what the tour has left."""
    total, floor = ((QUICK_TOUR_BUDGET_S, QUICK_MIN_ROW_BUDGET_S) if quick
                    else (TOUR_BUDGET_S, MIN_ROW_BUDGET_S))
    return max(floor, (total - elapsed_s) / max(rows_left, 1))


# --- the tour ------------------------------------------------------------------------
def pick_backend(name: str | None, quick: bool) -> str:
    """``name``, else ``$MINILLM_BACKEND``, else the fastest CPU backend that runs here
    (numba if available, else numpy); ``quick`` keeps the current backend (no JIT wait)."""
    if name:
        return name
    if os.environ.get("MINILLM_BACKEND", "").strip():
        return os.environ["MINILLM_BACKEND"].strip().lower()
    if quick:
        return backend.current()
    return "numba" if backend.available()["numba"][0] else "numpy"


def run_tour(out_dir="runs/tour", cache_dir=None, quick: bool = False, steps: int | None = None,
             seed: int = 0, techniques=None, progress: bool = True, use_cache: bool = True,
             backend_name: str | None = None, command: str | None = None) -> list[Row]:
    """Train (or reuse) the baseline, run the techniques, print and write the report.

    ``techniques``: names to run, in that order (a list or a comma-separated
    string); None runs every registered one in table order (``ordered_names``).
    Writes ``report.md``, ``report.json``, ``loss.png`` and ``ratios.png`` into
    ``out_dir``. Returns the rows, baseline first.
    """
    failed = collect()
    names = _check_tour_args(out_dir, cache_dir, quick, techniques, failed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _logger(progress)
    settings = tour_settings(quick, steps, seed)
    t_start = time.perf_counter()
    with backend.use(pick_backend(backend_name, quick)):
        from .data import load_corpus
        text = load_corpus()
        if settings.corpus_chars is not None:
            text = text[:settings.corpus_chars]
        base = get_baseline(settings, text, cache_dir, use_cache, progress, log)
        ctx = make_context(base, text, out_dir, quick, seed, log)
        ctx.baseline = baseline_row(ctx, base)
        rows, sources, seconds = [ctx.baseline], ["baseline"], {}
        if techniques is None:   # modules that did not import: their rows cannot run
            for module, exc in failed.items():
                log(f"module minillm.{module} failed to import: {type(exc).__name__}: {exc}")
                rows.append(error_row(module, exc, f"cannot import minillm.{module}: "))
                sources.append(f"minillm.{module}")
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            ctx.budget_s = row_budget_s(quick, t0 - t_start, len(names) - i)
            log(f"technique {name} (budget {ctx.budget_s:.0f} s)")
            new = run_technique(name, ctx, log)
            rows, sources = rows + new, sources + [name] * len(new)
            seconds[name] = time.perf_counter() - t0
        sample = sample_text(ctx)
        env = environment(base)
    total_s = time.perf_counter() - t_start
    print(format_table(rows))
    write_report(out_dir, rows, sources, base, sample, env, seconds, total_s,
                 command or _api_command(out_dir, quick, steps, seed, techniques))
    log(f"wrote {out_dir / 'report.md'} ({total_s:.0f} s)")
    return rows


def _check_tour_args(out_dir, cache_dir, quick, techniques, failed: dict) -> list[str]:
    for name, value in (("out_dir", out_dir), ("cache_dir", cache_dir)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{name}={value!r} must be a path")
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"{name}={str(value)!r} exists and is not a directory")
    if not isinstance(quick, bool):
        raise ValueError(f"quick={quick!r} must be True or False")
    if techniques is None:
        return ordered_names()
    if isinstance(techniques, str):
        techniques = [t.strip() for t in techniques.split(",") if t.strip()]
    unknown = [t for t in techniques if t not in TECHNIQUES]
    if unknown:
        why = "".join(f"; minillm.{m} failed to import ({type(e).__name__}: {e})"
                      for m, e in failed.items())
        raise ValueError(f"techniques={unknown} are not registered; known: "
                         f"{sorted(TECHNIQUES)}{why}")
    return list(dict.fromkeys(techniques))


def _logger(progress: bool):
    def log(message: str) -> None:
        if progress:
            print(f"[tour] {message}", file=sys.stderr, flush=True)
    return log


def make_context(base: Baseline, text: str, out_dir: Path, quick: bool, seed: int,
                 log=lambda message: None) -> TourContext:
    T = base.model.config.block_size
    return TourContext(model=base.model, tokenizer=base.tokenizer, train_ids=base.train_ids,
                       val_ids=base.val_ids, text=text, baseline=None, out_dir=out_dir,
                       quick=quick, seed=seed, eval_batch_size=4 if quick else 8,
                       eval_seq_len=T, eval_batches=2 if quick else 4,
                       decode_tokens=8 if quick else 64, history=base.history,
                       train_config=_train_config(base),
                       cache_dir=base.entry / TECHNIQUES_DIR if base.entry else None, log=log)


def _train_config(base: Baseline):
    from .train import TrainConfig
    return TrainConfig.from_dict(base.info["settings"]["train"])


def baseline_row(ctx: TourContext, base: Baseline) -> Row:
    """The plain model: its size, perplexity, training and (uncached) decode speed."""
    model = ctx.model
    # median step of the training run; step 1 is left out (first calls, JIT compilation)
    speeds = [h["tokens_per_s"] for h in base.history[1:]] or [base.history[0]["tokens_per_s"]]
    cfg = model.config
    notes = (f"GPT-2 (L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} T={cfg.block_size}), "
             f"byte-level BPE V={cfg.vocab_size}; decode without KV cache")
    return Row("baseline", model.num_params(), model.nbytes(), ctx.val_ppl(),
               float(np.median(speeds)), ctx.decode_tok_s(use_cache=False), notes,
               {"cached": base.cached, "train_backend": base.info["backend"],
                "train_steps": len(base.history), "final_train_loss": base.history[-1]["loss"],
                "decode_tokens": ctx.decode_tokens})


def run_technique(name: str, ctx: TourContext, log) -> list[Row]:
    """Call one row function; an exception becomes an error row, not a dead tour."""
    try:
        out = TECHNIQUES[name](ctx)
        rows = [out] if isinstance(out, Row) else list(out)
        bad = [type(r).__name__ for r in rows if not isinstance(r, Row)]
        if bad or not rows:
            raise TypeError(f"row function must return a Row or a non-empty list of Rows, got {bad or '[]'}")
        return rows
    except Exception as exc:   # a broken technique must not take the others down
        log(f"technique {name} failed: {type(exc).__name__}: {exc}")
        return [error_row(name, exc)]


def sample_text(ctx: TourContext, n_new: int = 200) -> dict:
    """A seeded sample from the tour prompt (temperature 0.8, top-k 40)."""
    prompt = ctx.prompt_ids()
    n_new = max(0, min(n_new, ctx.model.config.block_size - prompt.shape[1]))
    kwargs = dict(max_new_tokens=n_new, temperature=0.8, top_k=40, seed=ctx.seed)
    try:
        out = ctx.model.generate(prompt, use_cache=True, **kwargs)
    except ImportError:        # before the KV cache exists
        out = ctx.model.generate(prompt, use_cache=False, **kwargs)
    return {"prompt": ctx.prompt, "text": ctx.tokenizer.decode(out[0].tolist()),
            "settings": "temperature 0.8, top-k 40, seed " + str(ctx.seed) + f", {n_new} new tokens"}


def environment(base: Baseline) -> dict:
    """Versions, machine, CPU and backends, as the report prints them."""
    import platform
    from . import __version__
    name = backend.current()
    ok, reason = backend.available()[name]
    return {"minillm": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            "processor": cpu_name(),
            "backend": f"{name} ({reason})", "train_backend": base.info["backend"]}


def _api_command(out_dir, quick, steps, seed, techniques) -> str:
    return (f"minillm.tour.run_tour(out_dir={str(out_dir)!r}, quick={quick}, steps={steps}, "
            f"seed={seed}, techniques={techniques!r})")
