"""Quantization: perplexity, bytes and batch-1 decode speed of w8 / w8a8 / llm.int8 / w4g64.

    OPENBLAS_NUM_THREADS=2 NUMBA_NUM_THREADS=2 OMP_NUM_THREADS=1 \\
        .venv/bin/python bench/bench_quantization.py             # ~5 min on 2 cores
    .venv/bin/python bench/bench_quantization.py --quick         # fewer tokens, 1 repeat

1. Accuracy: the tour's trained model (``minillm tour``'s cached baseline, trained
   here if missing), validation perplexity as the tour measures it, fp32 vs every
   scheme; then the outlier experiment (``quantization.inject_outlier``: one
   channel of every ln_2 x20, the matching c_fc rows /20; the float model is the
   same function) for fp32, w8a8 and llm.int8.
2. Memory: ``nbytes()`` and the linear layers' bytes per scheme; the resident
   set while decoding (a fresh process per scheme loads the saved model and
   decodes 16 tokens; RSS after decoding minus RSS after imports, and the peak,
   which includes the loader's copy of the file's bytes).
3. Speed: a random model big enough to be memory-bound (L=8 C=1024 V=4096,
   117 M params), batch-1 greedy decode with the KV cache, 16-token prompt, on
   ``--backend`` (numba: the compiled twins), with 1 and 2 threads (Numba's pool,
   OpenBLAS through threadpoolctl, torch); GB/s read per token against a
   streaming-read bandwidth measured in the same run. And the int8 MLP of width
   1024 (1024 -> 4096 -> GELU -> 1024) at batch 1 vs PyTorch's
   ``torch.ao.quantization.quantize_dynamic`` on the same weights.
Writes bench/results/bench_quantization.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import minillm as mm
from minillm import backend, quantization as Q, timing
from minillm.tour import val_perplexity

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = list(Q.SCHEMES)
PROMPT_LEN = 16
BIG = dict(vocab_size=4096, block_size=256, n_layer=8, n_head=16, n_embd=1024)


# --- 1. accuracy on the tour's model -------------------------------------------------------
def accuracy(args) -> dict:
    from minillm.baseline import get_baseline, tour_settings
    from minillm.data import load_corpus
    with backend.use(args.backend):
        base = get_baseline(tour_settings(), load_corpus(), progress=False, log=lambda m: None)
        model, val = base.model, base.val_ids
        ppl = lambda m: val_perplexity(m, val, 8, m.config.block_size, args.eval_batches, 0)  # noqa: E731
        out = {"fp32": ppl(model)}
        for s in SCHEMES:
            out[s] = ppl(Q.quantize(model, s))
            print(f"  ppl {s}: {out[s]:.3f} (fp32 {out['fp32']:.3f})", flush=True)
        spiked = Q.inject_outlier(model, channel=args.outlier_channel, factor=20.0)
        outl = {"fp32": ppl(spiked), **{s: ppl(Q.quantize(spiked, s)) for s in ("w8a8", "llm.int8")}}
        print(f"  outlier: {outl}", flush=True)
        # the logits' error against the float model on one validation window (B=4, T=256)
        idx = np.stack([val[i * 256:(i + 1) * 256] for i in range(4)]).astype(np.int64)
        ref = model.forward(idx)
        err = lambda m: float(np.sqrt(np.mean((m.forward(idx) - ref) ** 2) / np.var(ref)))  # noqa: E731
        logit_err = {f"{w} {s}": err(Q.quantize(m, s)) for w, m in (("plain", model), ("outlier", spiked))
                     for s in ("w8a8", "llm.int8")}
        print(f"  logit errors: {logit_err}", flush=True)
    return {"config": model.config.to_dict(), "val_ppl": out, "outlier_ppl": outl,
            "outlier_channel": args.outlier_channel, "logit_rel_rms_err": logit_err, "eval_tokens": args.eval_batches * 8 * 256,
            "bytes": {s: Q.quantize(model, s).nbytes() for s in SCHEMES} | {"fp32": model.nbytes()},
            "linear_bytes": {s: Q.linear_nbytes(Q.quantize(model, s)) for s in SCHEMES}
            | {"fp32": Q.linear_nbytes(model)}}


# --- 2. resident set while decoding (one fresh process per model) -------------------------------
RSS_CHILD = """
import sys, numpy as np
import minillm as mm
from minillm import backend
def status(key):   # kB lines of /proc/self/status: VmRSS now, VmHWM the peak since the reset
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
backend.use(sys.argv[2])
open("/proc/self/clear_refs", "w").write("5")        # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
m = mm.GPT.load(sys.argv[1])
m.generate(np.zeros((1, 16), dtype=np.int64), 16, temperature=0.0)
print(status("VmHWM:") - before, status("VmRSS:") - before)
"""


def resident(models: dict, args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            m.save(Path(tmp) / name)
            run = subprocess.run([sys.executable, "-c", RSS_CHILD, str(Path(tmp) / name), args.backend],
                                 capture_output=True, text=True, check=True)
            peak, now = (int(v) for v in run.stdout.split()[-2:])
            out[name] = {"peak": peak, "after": now}
    return out


# --- 3. speed -----------------------------------------------------------------------------------
def set_threads(n: int, blas: int | None = None):
    """numba's pool to ``n`` threads and OpenBLAS to ``blas`` (default n); both must have
    started with at least that many (NUMBA_NUM_THREADS, OPENBLAS_NUM_THREADS)."""
    import numba
    from threadpoolctl import threadpool_limits
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return threadpool_limits(n if blas is None else blas, user_api="blas")


def bytes_per_token(model, n_new) -> int:
    """Bytes a batch-1 decode step reads: every parameter but the position table (one row),
    plus the filled K/V cache at the run's mean length."""
    cfg, wpe = model.config, model.params["wpe.weight"]
    kv = 2 * cfg.n_layer * cfg.n_embd * (PROMPT_LEN + n_new / 2) * 4
    return int(model.nbytes() - wpe.nbytes + wpe[0].nbytes + kv)


def decode_speed(models: dict, args) -> list[dict]:
    idx = np.random.default_rng(0).integers(0, BIG["vocab_size"], (1, PROMPT_LEN))
    rows, ref_ids = [], None
    for threads in args.threads:
        for name, m in models.items():
            be = "numpy" if name == "fp32 numpy" else args.backend
            # float models: BLAS on all threads; quantized ones: the twins on all threads and
            # BLAS (the head, the prefill) on one, so idle OpenBLAS threads do not spin on the
            # cores the twins need (README: numba + OpenBLAS threads together ran slower)
            blas = threads if name.startswith("fp32") else 1
            with set_threads(threads, blas):
                with backend.use(be):
                    fn = lambda: m.generate(idx, args.tokens, temperature=0.0)   # noqa: E731
                    t = timing.median_time(fn, repeats=args.repeats, warmup=1)["median_s"]
                    ids = fn()
                ref_ids = ids if ref_ids is None else ref_ids
                tok_s = args.tokens / t
                rows.append(dict(model=name, threads=threads, blas_threads=blas, backend=be,
                                 seconds=t, tok_s=tok_s,
                                 bytes_per_token=bytes_per_token(m, args.tokens),
                                 gbs=bytes_per_token(m, args.tokens) * tok_s / 1e9,
                                 same_ids_as_fp32=bool(np.array_equal(ids, ref_ids))))
                print(f"  decode {name} threads={threads}: {tok_s:.1f} tok/s", flush=True)
    return rows


def mlp_speed(args) -> list[dict]:
    """The int8 MLP of width 1024 at batch 1: minillm kinds vs torch quantize_dynamic."""
    from minillm import layers
    rng = np.random.default_rng(0)
    C, F = 1024, 4096
    w1, w2 = (rng.standard_normal((C, F)) * 0.02).astype(np.float32), (rng.standard_normal((F, C)) * 0.02).astype(np.float32)
    b1, b2 = np.zeros(F, np.float32), np.zeros(C, np.float32)
    x = rng.standard_normal((1, C)).astype(np.float32)
    ours = {}
    for s in ("w8", "w8a8"):
        kind = mm.seams.linear_kind(Q.SCHEMES[s])
        l1, l2 = kind.from_dense(w1, b1), kind.from_dense(w2, b2)

        def run(kind=kind, l1=l1, l2=l2):
            h, _ = kind.forward(l1, x, "mlp.c_fc")
            h, _ = layers.gelu_forward(h)
            return kind.forward(l2, h, "mlp.c_proj")[0]
        ours[f"minillm {s}"] = run
    ours["minillm fp32"] = lambda: layers.linear_forward(layers.gelu_forward(x @ w1 + b1)[0], w2, b2)[0]
    peers = {}
    try:
        import torch
        from torch.ao.quantization import quantize_dynamic
        mlp = torch.nn.Sequential(torch.nn.Linear(C, F), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(F, C))
        with torch.no_grad():
            mlp[0].weight.copy_(torch.from_numpy(w1.T)), mlp[0].bias.zero_()
            mlp[2].weight.copy_(torch.from_numpy(w2.T)), mlp[2].bias.zero_()
        qmlp = quantize_dynamic(mlp, {torch.nn.Linear}, dtype=torch.qint8)
        tx = torch.from_numpy(x)
        peers["torch fp32"] = lambda: mlp(tx)
        peers["torch quantize_dynamic int8"] = lambda: qmlp(tx)
    except Exception as exc:                  # torch missing: the peer rows say so
        print(f"  torch peer unavailable: {exc}")
    rows = []
    for threads in args.threads:
        with set_threads(threads):
            if peers:
                torch.set_num_threads(threads)
            with backend.use(args.backend), _no_grad(peers):
                for name, fn in {**ours, **peers}.items():
                    t = timing.median_time(fn, repeats=args.mlp_repeats, warmup=5)["median_s"]
                    rows.append(dict(impl=name, threads=threads, us=t * 1e6))
                    print(f"  mlp {name} threads={threads}: {t * 1e6:.0f} us", flush=True)
    return rows


class _no_grad:
    def __init__(self, peers):
        self.ctx = None
        if peers:
            import torch
            self.ctx = torch.no_grad()

    def __enter__(self):
        if self.ctx:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx:
            self.ctx.__exit__(*exc)


def stream_gbs(nbytes: int = 256 * 2**20) -> float:
    """Read bandwidth now: GB/s of summing a large float32 array (best of 5), as bench_kv_cache."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    return a.nbytes / timing.median_time(a.sum, repeats=5, warmup=1)["min_s"] / 1e9


def run(args) -> dict:
    res = {"command": "bench/bench_quantization.py " + " ".join(args.argv), "backend": args.backend}
    print("accuracy (tour model) ...", flush=True)
    res["accuracy"] = accuracy(args)
    print("speed (random L=8 C=1024 model) ...", flush=True)
    fp = mm.GPT(mm.GPTConfig(**BIG), seed=0)
    models = {"fp32 numpy": fp, "fp32": fp, **{s: Q.quantize(fp, s) for s in SCHEMES}}
    res["big"] = {"config": fp.config.to_dict(), "params": fp.num_params(),
                  "bytes": {k: m.nbytes() for k, m in models.items()},
                  "linear_bytes": {k: Q.linear_nbytes(m) for k, m in models.items()}}
    res["decode"] = decode_speed(models, args)
    res["mlp"] = mlp_speed(args)
    res["stream_read_gbs"] = stream_gbs()
    if not args.quick:
        print("resident set ...", flush=True)
        res["rss"] = resident({k: m for k, m in models.items() if k != "fp32 numpy"}, args)
    res["machine"] = dict(platform=platform.platform(), cpu=timing.cpu_name(), cpus=os.cpu_count(),
                          threads=timing.thread_settings(), line=timing.machine_line())
    return res


def table(res: dict) -> str:
    acc = res["accuracy"]
    ppl, lin = acc["val_ppl"], acc["linear_bytes"]
    lines = ["| scheme | val ppl | vs fp32 | bytes (MiB) | linear bytes vs fp32 |", "|---|---|---|---|---|"]
    for s in ["fp32"] + SCHEMES:
        lines.append(f"| {s} | {ppl[s]:.3f} | {100 * (ppl[s] / ppl['fp32'] - 1):+.2f}% | "
                     f"{acc['bytes'][s] / 2**20:.2f} | {lin[s] / lin['fp32']:.3f}x |")
    o = acc["outlier_ppl"]
    lines += ["", f"Outlier injected (channel {acc['outlier_channel']} of every ln_2 x20, c_fc rows /20): "
              f"fp32 {o['fp32']:.3f}, w8a8 {o['w8a8']:.3f} ({100 * (o['w8a8'] / o['fp32'] - 1):+.1f}%), "
              f"llm.int8 {o['llm.int8']:.3f} ({100 * (o['llm.int8'] / o['fp32'] - 1):+.1f}%).", "",
              "Logits' relative RMS error vs the float model (4 x 256 validation tokens): " +
              ", ".join(f"{k} {v:.4f}" for k, v in acc["logit_rel_rms_err"].items()) + ".", ""]
    big = res["big"]
    lines += [f"Decode: random L={big['config']['n_layer']} C={big['config']['n_embd']} "
              f"V={big['config']['vocab_size']} model ({big['params'] / 1e6:.0f} M params), batch 1, "
              f"{PROMPT_LEN}-token prompt, greedy, KV cache; stream read {res['stream_read_gbs']:.1f} GB/s.", "",
              "| model | backend | threads (numba / BLAS) | tokens/s | vs fp32 numba (same threads) | MB/token | GB/s read | resident MB after decode (peak) | greedy ids = fp32 |",
              "|---|---|---|---|---|---|---|---|---|"]
    fp = {r["threads"]: r["tok_s"] for r in res["decode"] if r["model"] == "fp32"}
    rss = res.get("rss", {})
    for r in res["decode"]:
        mb = (f"{rss[r['model']]['after'] / 2**20:.0f} ({rss[r['model']]['peak'] / 2**20:.0f})"
              if r["model"] in rss else "-")
        lines.append(f"| {r['model']} | {r['backend']} | {r['threads']} / {r['blas_threads']} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / fp[r['threads']]:.2f}x | {r['bytes_per_token'] / 1e6:.0f} | "
                     f"{r['gbs']:.1f} | {mb} | {r['same_ids_as_fp32']} |")
    lines += ["", "MLP 1024 -> 4096 -> 1024 at batch 1:", "",
              "| impl | threads | median us | vs torch quantize_dynamic |", "|---|---|---|---|"]
    peer = {r["threads"]: r["us"] for r in res["mlp"] if r["impl"] == "torch quantize_dynamic int8"}
    for r in res["mlp"]:
        ratio = f"{r['us'] / peer[r['threads']]:.2f}x the time" if r["threads"] in peer else "-"
        lines.append(f"| {r['impl']} | {r['threads']} | {r['us']:.0f} | {ratio} |")
    lines += ["", res["machine"]["line"] + "."]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    acc = res["accuracy"]
    names = ["fp32"] + SCHEMES
    ax1.bar(names, [acc["val_ppl"][n] for n in names], color="C0")
    ax1.set(title="val perplexity (tour model)", ylim=(min(acc["val_ppl"].values()) * 0.95, None))
    ax2.bar(names, [acc["linear_bytes"][n] / acc["linear_bytes"]["fp32"] for n in names], color="C1")
    ax2.set(title="linear bytes / fp32")
    t = max(r["threads"] for r in res["decode"])
    rows = [r for r in res["decode"] if r["threads"] == t and r["model"] != "fp32 numpy"]
    ax3.bar([r["model"] for r in rows], [r["tok_s"] for r in rows], color="C2")
    ax3.set(title=f"decode tok/s, L=8 C=1024 ({t} thr)")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    tmp = path.with_name("." + path.name + ".tmp")
    fig.savefig(tmp, dpi=90, format="png")
    os.replace(tmp, path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numba", choices=["numpy", "numba"])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mlp-repeats", type=int, default=200)
    ap.add_argument("--eval-batches", type=int, default=4, help="the tour's 4 batches of 8 x 256")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--outlier-channel", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat, 1 eval batch, no RSS")
    ap.add_argument("--rss-only", action="store_true", help="only the resident-set part (merged into --out's JSON)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.argv = list(argv)
    if args.quick:
        args.tokens, args.repeats, args.eval_batches, args.mlp_repeats = 16, 1, 1, 20
    if args.rss_only:                  # add the resident sets to an earlier run's results
        res = json.loads((args.out / "bench_quantization.json").read_text())
        fp = mm.GPT(mm.GPTConfig(**BIG), seed=0)
        res["rss"] = resident({"fp32": fp, **{s: Q.quantize(fp, s) for s in SCHEMES}}, args)
        res["rss_command"] = "bench/bench_quantization.py " + " ".join(args.argv)
    else:
        res = run(args)
    text = table(res)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in (("bench_quantization.json", json.dumps({**res, "table": text}, indent=2)),
                       ("bench_quantization.md", text + "\n")):
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(data)
        os.replace(tmp, args.out / name)
    plot(res, args.out / "bench_quantization.png")
    print(f"wrote {args.out}/bench_quantization.{{json,md,png}}")


if __name__ == "__main__":
    main()
