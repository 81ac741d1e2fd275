"""The trade-off report: rows in, a table, report.md, report.json and plots out.

The tour (``minillm.tour``) collects one ``Row`` per technique; this module only
turns rows into output. Every numeric cell is shown with its ratio to the first
row (the baseline): ``ratios`` is the one place that computes them, so row
functions never do. Files are written atomically (``minillm.files``).
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:                 # tour imports this module; the types only flow back
    from .baseline import Baseline
    from .tour import Row


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
def write_report(out_dir: Path, rows, sources, base: Baseline, sample, env, seconds, total_s,
                 command) -> None:
    """report.md, report.json, loss.png, ratios.png (each written atomically).

    ``sources``: the technique that made each row; ``seconds``: time per technique;
    ``sample``: ``{"prompt", "text", "settings"}``; ``env``: ``tour.environment``.
    """
    atomic_write_bytes(out_dir / "loss.png", plot_loss(base.history, base.evals))
    atomic_write_bytes(out_dir / "ratios.png", plot_ratios(rows))
    record = {"command": command, "environment": env, "total_s": total_s,
              "technique_s": seconds, "cached": base.cached, "settings": base.info["settings"],
              "baseline_timings": base.info["timings"], "sample": sample,
              "rows": [{**asdict(r), "ratios": ratios(r, rows[0]), "source": src}
                       for r, src in zip(rows, sources)]}
    atomic_write_text(out_dir / "report.json", json.dumps(record, indent=2, default=float))
    atomic_write_text(out_dir / "report.md", report_markdown(rows, base, sample, env, seconds,
                                                             total_s, command))


def report_markdown(rows, base: Baseline, sample, env, seconds, total_s, command) -> str:
    """The report as markdown: setup, the table, details, timings, a sample, the plots."""
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


# --- the plots -------------------------------------------------------------------------
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
