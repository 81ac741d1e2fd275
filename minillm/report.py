"""The tour: train (or reuse) the small model, run every technique, print one table.

A technique joins the tour by registering one *row function* here::

    @technique("kv_cache")
    def kv_cache_row(ctx: TourContext) -> Row:
        ...   # call the technique's public API on ctx.model; return a Row

The row function gets a ``TourContext`` (the trained baseline model, its
tokenizer, the token splits, helpers that measure perplexity and decode speed
the same way for every row) and returns one ``Row`` or a list of rows. Ratios
to the baseline are computed by the report, never by row functions. A row
function that raises does not stop the tour: its row shows the error.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import backend


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


RowFn = Callable[[TourContext], "Row | list[Row]"]
TECHNIQUES: dict[str, RowFn] = {}


def technique(name: str) -> Callable[[RowFn], RowFn]:
    """Decorator: register ``fn(ctx) -> Row | list[Row]`` under ``name``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"technique name={name!r} must be a non-empty string")

    def register(fn: RowFn) -> RowFn:
        if name in TECHNIQUES and TECHNIQUES[name] is not fn:
            raise ValueError(f"technique name={name!r} is registered twice")
        TECHNIQUES[name] = fn
        return fn
    return register


# --- measurements shared by every row -----------------------------------------
def val_perplexity(model, val_ids, batch_size, seq_len, n_batches, seed) -> float:
    """exp(mean cross-entropy) over ``n_batches`` fixed random windows of ``val_ids``."""
    from .train import evaluate
    seq_len = min(seq_len, model.config.block_size, len(val_ids) - 1)
    return float(np.exp(evaluate(model, val_ids, batch_size, seq_len, n_batches, seed)))


def decode_speed(model, prompt_ids, n_new, use_cache=False, repeats=1, **kwargs) -> float:
    """New tokens / second of greedy generation (one warm-up token first)."""
    model.generate(prompt_ids, max_new_tokens=1, temperature=0.0, use_cache=use_cache, **kwargs)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompt_ids, max_new_tokens=n_new, temperature=0.0,
                       use_cache=use_cache, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return n_new / best


# --- what the tour trains ---------------------------------------------------------
CACHE_FORMAT = 1           # bump when a cache entry's layout or meaning changes
CACHE_FILES = ("tour.json", "ids.npy", "model/model.safetensors", "model/meta.json",
               "model/tokenizer.model")


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


def tour_settings(quick: bool = False, steps: int | None = None, seed: int = 0) -> TourSettings:
    """The default tour (small preset, a few minutes on 2 cores) or ``quick`` (seconds; tests).

    Default: the ``small`` preset (V=4096 BPE, T=256, L=6, H=8, C=256) trained
    for DEFAULT_STEPS steps of B=8 x T=256 tokens with AdamW, warmup + cosine.
    """
    from .config import GPTConfig
    from .train import TrainConfig
    _check_int("seed", seed, 0)
    if steps is not None:
        _check_int("steps", steps, 1)
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


DEFAULT_STEPS = 200
DEFAULT_LR = 3e-3


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name}={value!r} must be an int >= {lo}")


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
        _write_text(tmp / "tour.json", json.dumps(info, indent=2))
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
    from .checkpoint import atomic_dir
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

    ``techniques``: names to run (a list or a comma-separated string); None runs
    every registered one. Writes ``report.md``, ``report.json``, ``loss.png`` and
    ``ratios.png`` into ``out_dir``. Returns the rows, baseline first.
    """
    names = _check_tour_args(out_dir, cache_dir, quick, techniques)
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
        ctx = make_context(base, text, out_dir, quick, seed)
        ctx.baseline = baseline_row(ctx, base)
        rows, sources, seconds = [ctx.baseline], ["baseline"], {}
        for name in names:
            t0 = time.perf_counter()
            log(f"technique {name}")
            new = run_technique(name, ctx, log)
            rows, sources = rows + new, sources + [name] * len(new)
            seconds[name] = time.perf_counter() - t0
        sample = sample_text(ctx)
        env = environment(base)
    total_s = time.perf_counter() - t_start
    table = format_table(rows)
    print(table)
    write_report(out_dir, rows, sources, base, sample, env, seconds, total_s,
                 command or _api_command(out_dir, quick, steps, seed, techniques))
    log(f"wrote {out_dir / 'report.md'} ({total_s:.0f} s)")
    return rows


def _check_tour_args(out_dir, cache_dir, quick, techniques) -> list[str]:
    for name, value in (("out_dir", out_dir), ("cache_dir", cache_dir)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{name}={value!r} must be a path")
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"{name}={str(value)!r} exists and is not a directory")
    if not isinstance(quick, bool):
        raise ValueError(f"quick={quick!r} must be True or False")
    if techniques is None:
        return list(TECHNIQUES)
    if isinstance(techniques, str):
        techniques = [t.strip() for t in techniques.split(",") if t.strip()]
    unknown = [t for t in techniques if t not in TECHNIQUES]
    if unknown:
        raise ValueError(f"techniques={unknown} are not registered; known: {sorted(TECHNIQUES)}")
    return list(dict.fromkeys(techniques))


def _logger(progress: bool):
    def log(message: str) -> None:
        if progress:
            print(f"[tour] {message}", file=sys.stderr, flush=True)
    return log


def make_context(base: Baseline, text: str, out_dir: Path, quick: bool, seed: int) -> TourContext:
    T = base.model.config.block_size
    return TourContext(model=base.model, tokenizer=base.tokenizer, train_ids=base.train_ids,
                       val_ids=base.val_ids, text=text, baseline=None, out_dir=out_dir,
                       quick=quick, seed=seed, eval_batch_size=4 if quick else 8,
                       eval_seq_len=T, eval_batches=2 if quick else 4,
                       decode_tokens=8 if quick else 64, history=base.history,
                       train_config=_train_config(base))


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
        return [Row(name, None, None, None, None, None,
                    notes=f"error: {type(exc).__name__}: {exc}", extra={"error": True})]


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
    import platform
    from . import __version__
    name = backend.current()
    ok, reason = backend.available()[name]
    return {"minillm": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            "processor": _cpu_name(),
            "backend": f"{name} ({reason})", "train_backend": base.info["backend"]}


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --- the table -------------------------------------------------------------------------
COLUMNS = (("params", "params"), ("weight_bytes", "weight bytes"), ("val_ppl", "val ppl"),
           ("train_tok_s", "train tok/s"), ("decode_tok_s", "decode tok/s"))


def ratios(row: Row, base: Row) -> dict[str, float | None]:
    """``row / baseline`` for every numeric column (None where either is missing)."""
    out = {}
    for key, _ in COLUMNS:
        a, b = getattr(row, key), getattr(base, key)
        out[key] = float(a) / float(b) if a is not None and b not in (None, 0) else None
    return out


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "weight_bytes":
        return f"{value / 2**20:,.2f} MiB"
    if key == "params":
        return f"{value:,}"
    return f"{value:,.1f}" if value >= 100 else f"{value:,.2f}"


def format_table(rows: list[Row]) -> str:
    """One markdown table; every numeric cell reads ``value (ratio x baseline)``."""
    head = "| technique | " + " | ".join(h for _, h in COLUMNS) + " | notes |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    base = rows[0]
    for row in rows:
        r = ratios(row, base)
        cells = [_fmt(k, getattr(row, k)) + (f" ({r[k]:.2f}x)" if r[k] is not None else "")
                 for k, _ in COLUMNS]
        notes = row.notes.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row.technique} | " + " | ".join(cells) + f" | {notes} |")
    return "\n".join(lines)


# --- the files ---------------------------------------------------------------------------
def _write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, then rename (atomic)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    _write_bytes(Path(path), text.encode("utf-8"))


def write_report(out_dir: Path, rows, sources, base: Baseline, sample, env, seconds, total_s,
                 command):
    """report.md, report.json, loss.png, ratios.png (each written atomically)."""
    _write_bytes(out_dir / "loss.png", plot_loss(base.history, base.evals))
    _write_bytes(out_dir / "ratios.png", plot_ratios(rows))
    record = {"command": command, "environment": env, "total_s": total_s,
              "technique_s": seconds, "cached": base.cached, "settings": base.info["settings"],
              "baseline_timings": base.info["timings"], "sample": sample,
              "rows": [{**asdict(r), "ratios": ratios(r, rows[0]), "source": src}
                       for r, src in zip(rows, sources)]}
    _write_text(out_dir / "report.json", json.dumps(record, indent=2, default=float))
    _write_text(out_dir / "report.md", report_markdown(rows, base, sample, env, seconds,
                                                       total_s, command))


def report_markdown(rows, base: Baseline, sample, env, seconds, total_s, command) -> str:
    s = base.info["settings"]
    m, t = s["model"], s["train"]
    trained = ("reused from the cache " + f"`{base.entry}`" if base.cached else
               f"trained in this run ({base.info['timings']['train_s']:.0f} s)")
    lines = [
        "# minillm tour", "",
        f"Command: `{command}`  ", f"Total time: {total_s:.0f} s  ",
        f"Machine: {env['machine']} ({env['processor']}), Python {env['python']}, "
        f"NumPy {env['numpy']}, minillm {env['minillm']}  ",
        f"Backend: {env['backend']}; the baseline was trained on `{env['train_backend']}`", "",
        f"Baseline: GPT-2 shape V={m['vocab_size']} T={m['block_size']} L={m['n_layer']} "
        f"H={m['n_head']} C={m['n_embd']} ({m['dtype']}), byte-level BPE ({s['pattern']} pattern) "
        f"learned on the first {s['tokenizer_chars']:,} characters of the KJV corpus; "
        f"{t['steps']} AdamW steps of {t['batch_size']} x {t['seq_len']} tokens, lr {t['lr']} "
        f"(warmup {t['warmup_steps']}, cosine); {trained}.", "",
        "## Trade-offs", "", format_table(rows), "",
        "Each cell: value (ratio to the baseline). Validation perplexity is per token of the "
        "row's own tokenizer and is measured on the same fixed validation windows for every row; "
        "rows with another tokenizer are not comparable token for token. Train tokens/s is the "
        "median step of the training run; decode tokens/s is greedy generation of "
        f"{rows[0].extra.get('decode_tokens', 'the same number of')} tokens.", ""]
    details = [r for r in rows if r.extra]
    if details:
        lines += ["## Details", ""]
        lines += [f"- **{r.technique}**: " + ", ".join(f"{k}={_short(v)}" for k, v in r.extra.items())
                  for r in details]
        lines.append("")
    lines += ["Seconds per technique: " + (", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
                                           or "(none registered)"), "",
              "## Sample", "", f"Prompt `{sample['prompt']}`, {sample['settings']}:", "",
              "```", sample["text"], "```", "",
              "## Plots", "", "![loss curve](loss.png)", "", "![ratios to the baseline](ratios.png)", ""]
    return "\n".join(lines)


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _api_command(out_dir, quick, steps, seed, techniques) -> str:
    return (f"minillm.report.run_tour(out_dir={str(out_dir)!r}, quick={quick}, steps={steps}, "
            f"seed={seed}, techniques={techniques!r})")


def plot_loss(history: list, evals: list) -> bytes:
    """PNG bytes: training loss per step and validation loss at each evaluation."""
    fig, ax = _figure((7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="train")
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="baseline training")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_ratios(rows: list[Row]) -> bytes:
    """PNG bytes: grouped bars from 1.0 (log scale), one group per row, one bar per column."""
    fig, ax = _figure((8, 0.8 + 0.9 * len(rows)))
    height = 0.8 / len(COLUMNS)
    for j, (key, label) in enumerate(COLUMNS):
        values = np.array([ratios(r, rows[0])[key] or np.nan for r in rows], dtype=float)
        ys = np.arange(len(rows)) + j * height
        bars = ax.barh(ys, values - 1.0, left=1.0, height=height, label=label)   # from 1 to the ratio
        ax.scatter(values, ys, s=12, color=bars.patches[0].get_facecolor() if bars.patches else None)
        for y, v in zip(ys, values):   # a ratio of exactly 1 has no bar: its label still shows
            if np.isfinite(v):
                ax.annotate(f"{v:.2f}x", (v, y), xytext=(4, 0), textcoords="offset points",
                            va="center", fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    finite = [r for r in (ratios(row, rows[0])[k] for row in rows for k, _ in COLUMNS) if r]
    ax.set_xlim(min([0.5] + [r / 1.5 for r in finite]), max([2.0] + [r * 1.6 for r in finite]))
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_yticks(np.arange(len(rows)) + 0.4 - height / 2, [r.technique for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel="ratio to baseline (log scale)", title="trade-offs (1.0 = baseline)")
    fig.legend(loc="outside right upper", fontsize=8)
    return _png(fig)


def _figure(size):
    # the object API (no pyplot): no global backend switch, safe inside notebooks
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# --- registered rows ------------------------------------------------------------
# One short function per technique, below, in the order techniques were added.


@technique("tokenizer")
def tokenizer_row(ctx: TourContext) -> Row:
    """The tour's BPE tokenizer vs the byte-level baseline (vocab 256, no merges):
    encode throughput (MB/s, median of 3 on the active backend) and compression
    (bytes per token) on the corpus; the model is the baseline's, unchanged."""
    from . import backend
    from .tokenizer import BPETokenizer
    text = ctx.text[:200_000] if ctx.quick else ctx.text[:2_000_000]
    nbytes = len(text.encode("utf-8"))

    def measure(tok):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            n = len(tok.encode(text, disallowed_special=()))
            times.append(time.perf_counter() - t0)
        return nbytes / float(np.median(times)) / 1e6, nbytes / n
    bpe_mb_s, bpe_bpt = measure(ctx.tokenizer)
    byte_mb_s, byte_bpt = measure(BPETokenizer([], ctx.tokenizer.pattern))
    model = ctx.model
    return Row("tokenizer", model.num_params(), model.nbytes(), None, None, None,
               f"BPE V={ctx.tokenizer.vocab_size}: {bpe_bpt:.2f} bytes/token vs {byte_bpt:.2f} "
               f"byte-level ({bpe_bpt / byte_bpt:.2f}x shorter sequences); encode {bpe_mb_s:.1f} MB/s "
               f"vs {byte_mb_s:.1f} MB/s ({backend.current()})",
               {"bpe_vocab": ctx.tokenizer.vocab_size, "bpe_bytes_per_token": bpe_bpt,
                "byte_bytes_per_token": byte_bpt, "bpe_encode_mb_s": bpe_mb_s,
                "byte_encode_mb_s": byte_mb_s, "measured_bytes": nbytes,
                "backend": backend.current()})


@technique("kv_cache")
def kv_cache_row(ctx: TourContext) -> Row:
    """KV cache: the baseline's weights and math (same perplexity), decoded with a
    prefill + one-token steps instead of re-running the prefix; decode tokens/s
    with the cache next to the baseline's without it, and the cache's bytes."""
    from .kv_cache import KVCache
    model = ctx.model
    cached = ctx.decode_tok_s(use_cache=True)
    plain = ctx.baseline.decode_tok_s if ctx.baseline else ctx.decode_tok_s(use_cache=False)
    length = ctx.prompt_ids().shape[1] + ctx.decode_tokens
    cache_bytes = KVCache(model.config, 1, min(length, model.config.block_size)).nbytes
    ppl = ctx.baseline.val_ppl if ctx.baseline else ctx.val_ppl()
    return Row("kv_cache", model.num_params(), model.nbytes(), ppl, None, cached,
               f"greedy decode of {ctx.decode_tokens} tokens: {cached:.0f} tok/s cached vs "
               f"{plain:.0f} uncached ({cached / plain:.1f}x); cache {cache_bytes / 1e6:.2f} MB "
               f"(2*L*B*H*S*D*{model.config.np_dtype.itemsize}, B=1, S={length}); "
               f"perplexity unchanged (same weights and math)",
               {"cache_bytes": cache_bytes, "cache_len": length, "uncached_tok_s": plain,
                "cached_over_uncached": cached / plain, "backend": backend.current()})
