"""Decode speed with and without the KV cache: minillm (numpy, numba) vs transformers.

    .venv/bin/python bench/bench_kv_cache.py                 # full run (> 10 min on 2 cores,
                                                              # mostly the uncached 1024 runs)
    .venv/bin/python bench/bench_kv_cache.py --max-uncached 512   # ~10 min under load
    .venv/bin/python bench/bench_kv_cache.py --quick         # 64/128 new tokens, 1 repeat

Model: the ``small`` preset's shape (L=6 H=8 C=256 V=4096) with block_size
1040 instead of 256 so that 16 + 1024 tokens fit (only the position table
grows; the per-token work is the same). Weights: GPT-2 init, seed 0; the same
weights go to transformers through ``model.save_hf`` ->
``GPT2LMHeadModel.from_pretrained``. Greedy decoding, batch 1, 16-token prompt;
transformers runs with 2 torch threads, ``do_sample=False``.

Reported: median seconds over ``--repeats`` runs after one warm-up run, new
tokens/s, the ratio to transformers with the same cache setting, cached over
uncached; batch 8 vs batch 1; bytes of weights + cache read per new token
against the measured time (effective GB/s) next to a streaming-read bandwidth
measured in the same run. Writes bench/results/bench_kv_cache.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

import minillm as mm
from minillm import backend, timing
from minillm.kv_cache import KVCache

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_LEN = 16


def minillm_runner(model, idx, n_new, use_cache, backend_name):
    def run():
        with backend.use(backend_name):
            return model.generate(idx, n_new, temperature=0.0, use_cache=use_cache)
    return run


def hf_runner(hf, torch, idx, n_new, use_cache):
    ids = torch.from_numpy(idx)

    def run():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                               min_new_tokens=n_new, do_sample=False, use_cache=use_cache,
                               pad_token_id=0).numpy()
    return run


def load_transformers(model):
    """The same weights in transformers (2 threads), or (None, None, reason)."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        return None, None, f"transformers not importable: {exc}"
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_hf(tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    return hf, torch, f"transformers {transformers.__version__}, torch {torch.__version__}"


def bytes_per_token(model, n_new: int) -> int:
    """Bytes a B=1 decode step reads: every weight except the position table (one row of
    it), plus the cache's filled K/V at the run's mean length."""
    cfg = model.config
    wpe = model.params["wpe.weight"]
    weights = model.nbytes() - wpe.nbytes + wpe[0].nbytes
    mean_len = PROMPT_LEN + n_new / 2
    kv = 2 * cfg.n_layer * cfg.n_head * cfg.head_size * mean_len * cfg.np_dtype.itemsize
    return int(weights + kv)


def run(args) -> dict:
    cfg = mm.GPTConfig.preset("small", block_size=1040)
    model = mm.GPT(cfg, seed=0)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, PROMPT_LEN))
    hf, torch, peer = load_transformers(model)
    backends = [b for b in ("numpy", "numba") if backend.available()[b][0]]
    rows, checks = [], []
    for n in args.sizes:
        for use_cache in (True, False):
            if not use_cache and n > args.max_uncached:
                continue
            reps = args.repeats if use_cache or n <= 256 else 1
            outs = {}
            for b in backends:
                fn = minillm_runner(model, idx, n, use_cache, b)
                rows.append(dict(impl=f"minillm-{b}", cache=use_cache, n_new=n, repeats=reps,
                                 seconds=timing.median_time(fn, reps)["median_s"]))
                outs[b] = fn()
            if hf is not None:
                fn = hf_runner(hf, torch, idx, n, use_cache)
                rows.append(dict(impl="transformers", cache=use_cache, n_new=n, repeats=reps,
                                 seconds=timing.median_time(fn, reps)["median_s"]))
                outs["transformers"] = fn()
            same = all(np.array_equal(o, outs["numpy"]) for o in outs.values())
            checks.append(dict(n_new=n, cache=use_cache, greedy_ids_identical=bool(same)))
            print(f"  n_new={n} cache={use_cache}: done (greedy ids identical: {same})", flush=True)
    for r in rows:
        r["tok_s"] = r["n_new"] / r["seconds"]
    batch = batch_rows(model, backends, args)
    gbs = timing.stream_read_gbs()
    for r in rows:
        if r["cache"] and r["impl"].startswith("minillm"):
            r["bytes_per_token"] = bytes_per_token(model, r["n_new"])
            r["effective_gbs"] = r["bytes_per_token"] * r["tok_s"] / 1e9
    return dict(config=cfg.to_dict(), prompt_len=PROMPT_LEN, peer=peer, rows=rows, batch=batch,
                checks=checks, stream_read_gbs=gbs,
                cache_bytes_1040=KVCache(cfg, 1, 1040).nbytes,
                machine=dict(platform=platform.platform(), cpu=timing.cpu_name(),
                             cpus=os.cpu_count(), threads=timing.thread_settings(),
                             line=timing.machine_line()),
                command="bench/bench_kv_cache.py " + " ".join(args.argv))


def batch_rows(model, backends, args) -> list[dict]:
    """Cached greedy decoding of ``--batch-tokens`` new tokens at batch 8 vs batch 1."""
    out = []
    n = args.batch_tokens
    for b in backends:
        for B in (1, 8):
            idx = np.random.default_rng(B).integers(0, model.config.vocab_size, (B, PROMPT_LEN))
            s = timing.median_time(minillm_runner(model, idx, n, True, b), args.repeats)["median_s"]
            out.append(dict(impl=f"minillm-{b}", batch=B, n_new=n, seconds=s, tok_s=B * n / s))
    return out


def table(res: dict) -> str:
    rows = res["rows"]
    peer = {(r["cache"], r["n_new"]): r["tok_s"] for r in rows if r["impl"] == "transformers"}
    unc = {(r["impl"], r["n_new"]): r["tok_s"] for r in rows if not r["cache"]}
    lines = ["| impl | KV cache | new tokens | median s | tokens/s | vs transformers | cached / uncached | GB/s read |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = peer.get((r["cache"], r["n_new"]))
        cu = unc.get((r["impl"], r["n_new"])) if r["cache"] else None
        vs_s = f"{r['tok_s'] / vs:.2f}x" if vs else "-"
        cu_s = f"{r['tok_s'] / cu:.1f}x" if cu else "-"
        gb_s = f"{r['effective_gbs']:.1f}" if "effective_gbs" in r else "-"
        lines.append(f"| {r['impl']} | {'yes' if r['cache'] else 'no'} | {r['n_new']} | "
                     f"{r['seconds']:.3f} | {r['tok_s']:.0f} | {vs_s} | {cu_s} | {gb_s} |")
    lines += ["", "| impl | batch | new tokens | median s | tokens/s (all rows) | vs batch 1 |",
              "|---|---|---|---|---|---|"]
    one = {r["impl"]: r["tok_s"] for r in res["batch"] if r["batch"] == 1}
    for r in res["batch"]:
        lines.append(f"| {r['impl']} | {r['batch']} | {r['n_new']} | {r['seconds']:.3f} | "
                     f"{r['tok_s']:.0f} | {r['tok_s'] / one[r['impl']]:.2f}x |")
    c = res["config"]
    lines += ["", f"Model: small shape (L={c['n_layer']} H={c['n_head']} C={c['n_embd']} "
              f"V={c['vocab_size']}) with block_size={c['block_size']} so 16 + 1024 tokens fit; "
              f"batch 1, {res['prompt_len']}-token prompt, greedy; peer: {res['peer']} (2 threads).",
              f"Streaming read bandwidth measured in the same run: {res['stream_read_gbs']:.1f} GB/s; "
              f"GB/s read = (weights + mean filled cache bytes) per token x tokens/s.",
              f"Greedy ids identical across implementations: "
              f"{all(ch['greedy_ids_identical'] for ch in res['checks'])}.",
              res["machine"]["line"] + "."]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = sorted({(r["impl"], r["cache"]) for r in res["rows"]})
    for impl, cache in series:
        pts = sorted((r["n_new"], r["seconds"]) for r in res["rows"]
                     if r["impl"] == impl and r["cache"] == cache)
        ax.plot(*zip(*pts), marker="o", ls="-" if cache else "--",
                label=f"{impl} {'cached' if cache else 'uncached'}")
    ax.set(xscale="log", yscale="log", xlabel="new tokens (batch 1, 16-token prompt)",
           ylabel="seconds (median)", title="Greedy decoding time vs new tokens")
    ax.legend(fontsize=8)
    tmp = path.with_name("." + path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-uncached", type=int, default=1024,
                    help="skip uncached runs above this many new tokens (they are quadratic)")
    ap.add_argument("--batch-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="64 and 128 new tokens, 1 repeat")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.argv = list(argv)
    if args.quick:
        args.sizes, args.repeats, args.batch_tokens = [64, 128], 1, 64
    for name in ("sizes", "repeats", "batch_tokens"):
        vals = getattr(args, name) if name == "sizes" else [getattr(args, name)]
        if any(v < 1 for v in vals):
            raise SystemExit(f"--{name.replace('_', '-')}={vals} must be >= 1")
    if max(args.sizes) + PROMPT_LEN > 1040:
        raise SystemExit(f"--sizes max {max(args.sizes)} + {PROMPT_LEN} exceeds block_size 1040")
    res = run(args)
    text = table(res)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".bench_kv_cache.json.tmp"
    tmp.write_text(json.dumps({**res, "table": text}, indent=2))
    os.replace(tmp, args.out / "bench_kv_cache.json")
    plot(res, args.out / "bench_kv_cache.png")
    print(f"wrote {args.out / 'bench_kv_cache.json'} and bench_kv_cache.png")


if __name__ == "__main__":
    main()
