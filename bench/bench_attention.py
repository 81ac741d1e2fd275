"""Sparse and linear attention: scaling of one layer, decoding state, and quality.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \\
        .venv/bin/python bench/bench_attention.py --backend numba     # scaling + decode (~6 min)
    .venv/bin/python bench/bench_attention.py --parts quality --quality-steps 240 --backend numba \\
        --quality-variants dense "window 64"        # training runs, some variants at a time
    .venv/bin/python bench/bench_attention.py --quick                # small sizes, seconds

Parts (``--parts``):

- ``scaling``: one attention layer, B=1, H=8, D=32, float32, forward + backward
  (random upstream gradient) at T = --sizes: dense (query rows in chunks of 1024
  so the (T, T) scores never exist at once: ``attention.sdpa_forward/backward`` on
  each chunk against the keys up to it), window 256 (the backend's twin: Numba's takes
  four queries at a time over their band of allowed keys; and the NumPy chunked kernel,
  always), block 256 + 4 global,
  strided (stride 128), linear; torch's ``scaled_dot_product_attention(is_causal=True)``
  (its CPU flash kernel, 1 thread) as the dense peer. Median over --repeats after
  one warm-up; peak memory: tracemalloc's peak of one more run (NumPy reports its
  buffers to it; Numba's own scratch inside a twin is not seen, O(T D) here), inputs excluded. Fitted exponent: least-squares slope of
  log(time) on log(T).
- ``decode``: a 2-layer model of ``small``'s width (C=256, H=8) with block_size
  8192: one-token decode steps from position 1 to --decode-len; time per token
  (median over 64 steps around each reported position) and the decode state's
  bytes at that position (dense: 2 L H p D 4, what a cache of p slots holds).
- ``quality``: the ``small`` preset trained from the same init, batches and
  schedule for --quality-steps steps with each variant; validation loss.

Writes bench/results/bench_attention.{json,md} (and _quality.json/.md) and PNGs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np

import minillm as mm
from minillm import attention as attn
from minillm import backend, timing
from minillm import linear_attention as la
from minillm import sparse_attention as sa
from minillm.kv_cache import KVCache, decode_step, prefill

RESULTS = Path(__file__).resolve().parent / "results"
H, D = 8, 32
DENSE_CHUNK = 1024


# --- one layer, forward + backward ----------------------------------------------------------------
def dense_chunked(q, k, v, dy):
    """Dense causal attention fwd + bwd, query rows in chunks (memory O(T chunk))."""
    T = q.shape[2]
    y, dq, dk, dv = (np.zeros_like(q) for _ in range(4))
    for a in range(0, T, DENSE_CHUNK):
        b = min(a + DENSE_CHUNK, T)
        y[:, :, a:b], cache = attn.sdpa_forward(q[:, :, a:b], k[:, :, :b], v[:, :, :b])
        dq_c, dk_c, dv_c = attn.sdpa_backward(dy[:, :, a:b], cache)
        dq[:, :, a:b] = dq_c
        dk[:, :, :b] += dk_c
        dv[:, :, :b] += dv_c
    return y, dq, dk, dv


def sparse_run(pattern):
    def run(q, k, v, dy):
        y, cache = sa.sparse_attention_forward(q, k, v, pattern)
        return (y,) + sa.sparse_attention_backward(dy, cache)
    return run


def reference_run(pattern):
    """The NumPy chunked kernel whatever the backend (to compare the twin with)."""
    fwd = backend.reference("sparse_attention.pattern_attention_forward")
    bwd = backend.reference("sparse_attention.pattern_attention_backward")

    def run(q, k, v, dy):
        y, lse = fwd(q, k, v, pattern)
        return (y,) + bwd(dy, q, k, v, y, lse, pattern)
    return run


def linear_run(q, k, v, dy):
    y, cache = la.linear_attention_forward(q, k, v)
    return (y,) + la.linear_attention_backward(dy, cache)


def torch_run():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    F = torch.nn.functional

    def run(q, k, v, dy):
        qt, kt, vt = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        y.backward(torch.from_numpy(dy))
        return y.detach().numpy(), qt.grad.numpy()
    run.version = torch.__version__
    return run


VARIANTS = {
    "dense (chunked)": dense_chunked,
    "window 256": sparse_run(sa.Pattern("window", 256)),
    "window 256, NumPy chunked": reference_run(sa.Pattern("window", 256)),
    "block 256 + 4 global": sparse_run(sa.Pattern("block", block=256, n_global=4)),
    "strided 128": sparse_run(sa.Pattern("strided", None, 128)),
    "linear": linear_run,
}


def peak_mb(fn, args) -> float | None:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak / 2**20


def scaling(args) -> list[dict]:
    rows = []
    variants = dict(VARIANTS)
    peer = torch_run() if not args.no_torch else None
    if peer is not None:
        variants[f"torch {peer.version} sdpa (peer)"] = peer
    for T in args.sizes:
        rng = np.random.default_rng(T)
        q, k, v, dy = (rng.standard_normal((1, H, T, D)).astype(np.float32) for _ in range(4))
        for name, fn in variants.items():
            reps = args.repeats if not (name.startswith("dense") and T > 4096) else 1
            t = timing.median_time(lambda: fn(q, k, v, dy), reps, warmup=1)["median_s"]
            mem = peak_mb(fn, (q, k, v, dy)) if not name.startswith("torch") else None
            rows.append(dict(variant=name, T=T, seconds=t, peak_mb=mem))
            print(f"  {name:28s} T={T:6d}  {t * 1e3:9.1f} ms  "
                  f"{'-' if mem is None else f'{mem:.0f}'} MB", flush=True)
    return rows


def exponents(rows) -> dict:
    out = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        pts = [(r["T"], r["seconds"]) for r in rows if r["variant"] == name]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[name] = float(np.polyfit(x, y, 1)[0])
    return out


# --- decoding ---------------------------------------------------------------------------------------
def decode(args) -> list[dict]:
    base = dict(vocab_size=4096, block_size=args.decode_len, n_layer=2, n_head=H, n_embd=H * D)
    kinds = {"dense": {}, "window 256": dict(attention="window", window=256),
             "block 256 + 4 global": dict(attention="block", block=256, n_global=4),
             "linear": dict(attention="linear")}
    marks = [p for p in (256, 1024, 2048, 4096, 8192) if p <= args.decode_len]
    rows = []
    for name, kw in kinds.items():
        model = mm.GPT(mm.GPTConfig(**base, **kw), seed=0)
        cache = KVCache.for_model(model, 1, args.decode_len)
        prefill(model, cache, np.array([[1]]))
        times = np.zeros(args.decode_len)
        tokens = np.random.default_rng(0).integers(0, 4096, args.decode_len)
        for p in range(1, args.decode_len):
            t0 = time.perf_counter()
            decode_step(model, cache, tokens[p:p + 1])
            times[p] = time.perf_counter() - t0
        for m in marks:
            lo, hi = max(1, m - 64), min(m, args.decode_len)
            dense_like = kw.get("attention") in (None, "block")          # keep every K and V
            state = KVCache(model.config, 1, m).nbytes if dense_like else cache.nbytes
            rows.append(dict(variant=name, position=m, ms_per_token=float(np.median(times[lo:hi])) * 1e3,
                             state_bytes=int(state)))
            print(f"  {name:12s} pos {m:5d}  {rows[-1]['ms_per_token']:.2f} ms/token  "
                  f"{state / 1e6:.2f} MB", flush=True)
    return rows


# --- quality ------------------------------------------------------------------------------------------
QUALITY_VARIANTS = {"dense": {}, "window 64": dict(attention="window", window=64),
                    "strided 16": dict(attention="strided", stride=16),
                    "block 32 + 4 global": dict(attention="block", block=32, n_global=4),
                    "linear": dict(attention="linear")}


def merge_quality(new: dict, path: Path) -> dict:
    """Rows of an earlier run of other variants with the same steps, batch and corpus join
    this run's (so the variants can run one at a time, each a short locked run)."""
    if not path.exists():
        return new
    old = json.loads(path.read_text()).get("quality") or {}
    if any(old.get(k) != new[k] for k in ("steps", "batch", "T", "chars")):
        return new
    mine = {r["variant"] for r in new["rows"]}
    rows = [r for r in old["rows"] if r["variant"] not in mine] + new["rows"]
    return {**new, "rows": sorted(rows, key=lambda r: list(QUALITY_VARIANTS).index(r["variant"]))}

def quality(args) -> dict:
    from minillm import data
    from minillm.train import TrainConfig, evaluate, train
    text = data.load_corpus()[:args.quality_chars]
    tok = mm.BPETokenizer.train(text, 4096, progress=False)
    ids = data.encode_corpus(tok, text)
    train_ids, val_ids = data.split(ids, 0.1)
    variants = {name: QUALITY_VARIANTS[name] for name in args.quality_variants}
    tcfg = TrainConfig(steps=args.quality_steps, batch_size=8, lr=1e-3,
                       warmup_steps=max(1, args.quality_steps // 10),
                       eval_interval=max(1, args.quality_steps // 6), eval_batches=4)
    out = {"steps": args.quality_steps, "batch": 8, "T": 256, "chars": args.quality_chars,
           "rows": []}
    for name, kw in variants.items():
        model = mm.GPT(mm.GPTConfig.preset("small", vocab_size=tok.vocab_size, **kw), seed=0)
        t0 = time.perf_counter()
        res = train(model, train_ids, val_ids, tcfg, progress=False)
        seconds = time.perf_counter() - t0
        val = float(evaluate(model, val_ids, 8, 256, 16, 0))
        out["rows"].append(dict(variant=name, val_loss=val, seconds=seconds,
                                curve=[(e["step"], e["val_loss"]) for e in res.evals]))
        print(f"  {name:22s} val loss {val:.4f}  ({seconds:.0f} s)", flush=True)
    return out


# --- output -------------------------------------------------------------------------------------------
def scaling_table(rows, fits, ratio_T) -> str:
    dense = {r["T"]: r["seconds"] for r in rows if r["variant"].startswith("dense")}
    lines = ["| variant | T | fwd+bwd ms | peak MB | time / dense | fitted exponent |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["seconds"] / dense[r["T"]] if r["T"] in dense else float("nan")
        mem = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        fit = f"{fits.get(r['variant'], float('nan')):.2f}" if r["T"] == rows[-1]["T"] else ""
        lines.append(f"| {r['variant']} | {r['T']} | {r['seconds'] * 1e3:.1f} | {mem} | "
                     f"{ratio:.3f}x | {fit} |")
    return "\n".join(lines)


def decode_table(rows) -> str:
    lines = ["| variant | position | ms / token | decode state MB |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['position']} | {r['ms_per_token']:.2f} | {r['state_bytes'] / 1e6:.2f} |"
              for r in rows]
    return "\n".join(lines)


def quality_table(q) -> str:
    dense = next((r["val_loss"] for r in q["rows"] if r["variant"] == "dense"), float("nan"))
    lines = [f"`small`, {q['steps']} steps of B={q['batch']} x T={q['T']}, same init and batches",
             "", "| variant | val loss | vs dense | train s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['val_loss']:.4f} | {r['val_loss'] - dense:+.4f} | {r['seconds']:.0f} |"
              for r in q["rows"]]
    return "\n".join(lines)


def plots(res, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if res.get("scaling"):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(r["variant"] for r in res["scaling"]):
            pts = [r for r in res["scaling"] if r["variant"] == name]
            a.loglog([r["T"] for r in pts], [r["seconds"] for r in pts], "o-", label=name)
            if pts[0]["peak_mb"] is not None:
                b.loglog([r["T"] for r in pts], [r["peak_mb"] for r in pts], "o-", label=name)
        a.set(xlabel="T", ylabel="fwd+bwd seconds", title=f"one layer, H={H} D={D}, B=1")
        b.set(xlabel="T", ylabel="peak MB (tracemalloc)", title="memory")
        a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "bench_attention.png", dpi=100)
    if res.get("decode"):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(r["variant"] for r in res["decode"]):
            pts = [r for r in res["decode"] if r["variant"] == name]
            a.plot([r["position"] for r in pts], [r["ms_per_token"] for r in pts], "o-", label=name)
            b.plot([r["position"] for r in pts], [r["state_bytes"] / 1e6 for r in pts], "o-", label=name)
        a.set(xlabel="position", ylabel="ms / token", title="decode step (L=2, C=256)")
        b.set(xlabel="position", ylabel="decode state MB")
        a.legend()
        fig.tight_layout()
        fig.savefig(out / "bench_attention_decode.png", dpi=100)
    if res.get("quality"):
        fig, a = plt.subplots(figsize=(6, 4))
        for r in res["quality"]["rows"]:
            a.plot(*zip(*r["curve"]), "o-", label=r["variant"])
        a.set(xlabel="step", ylabel="validation loss", title="small preset, same steps")
        a.legend()
        fig.tight_layout()
        fig.savefig(out / "bench_attention_quality.png", dpi=100)
    plt.close("all")


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["scaling", "decode"],
                    choices=["scaling", "decode", "quality"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-len", type=int, default=8192)
    ap.add_argument("--quality-steps", type=int, default=60)
    ap.add_argument("--quality-chars", type=int, default=1_000_000)
    ap.add_argument("--quality-variants", nargs="+", default=list(QUALITY_VARIANTS),
                    choices=list(QUALITY_VARIANTS), help="train these (the others' rows of an "
                    "earlier run with the same steps are kept)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch peer")
    ap.add_argument("--backend", default="numpy", help="minillm backend (default: numpy)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repeat, 4 quality steps")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.decode_len = [256, 512, 1024], 1, 600
        args.quality_steps, args.quality_chars = 4, 100_000
    if min(args.sizes + [args.repeats, args.decode_len, args.quality_steps]) < 1:
        raise SystemExit("--sizes, --repeats, --decode-len, --quality-steps must be >= 1")
    res = dict(command="python bench/bench_attention.py " + " ".join(argv), backend=args.backend,
               machine=dict(platform=platform.platform(), cpu=timing.cpu_name(), cpus=os.cpu_count(),
                            threads=timing.thread_settings(), line=timing.machine_line()))
    text = [f"`{res['command']}`; backend {args.backend}; {res['machine']['line']}", ""]
    with backend.use(args.backend):
        if "scaling" in args.parts:
            print("scaling (one layer, fwd + bwd)")
            res["scaling"] = scaling(args)
            res["exponents"] = exponents(res["scaling"])
            text += [scaling_table(res["scaling"], res["exponents"], None), ""]
        if "decode" in args.parts:
            print("decoding")
            res["decode"] = decode(args)
            text += [decode_table(res["decode"]), ""]
        if "quality" in args.parts:
            print("quality")
            res["quality"] = merge_quality(quality(args), args.out / "bench_attention_quality.json")
            text += [quality_table(res["quality"]), ""]
    text = "\n".join(text)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_attention_quality" if args.parts == ["quality"] else "bench_attention"
    for suffix, body in ((".json", json.dumps({**res, "table": text}, indent=2)), (".md", text + "\n")):
        tmp = args.out / f".{stem}{suffix}.tmp"
        tmp.write_text(body)
        os.replace(tmp, args.out / f"{stem}{suffix}")
    plots(res, args.out)
    print(f"wrote {args.out / stem}.json/.md and PNGs")


if __name__ == "__main__":
    main()
