"""Adaptive batch sizing and continuous batching, measured (minillm/batching.py).

    .venv/bin/python bench/bench_batching.py                # ~3 min on one core
    .venv/bin/python bench/bench_batching.py --quick        # fewer sizes and requests (seconds)
    .venv/bin/python bench/bench_batching.py --serving-only # redo the serving part (and the decode
                                                            # memory rows, the buckets) into the saved results

Every model here is a *random* ``small`` model (V=4096, L=6, H=8, C=256; weights
do not change memory or speed), float32, dense attention.

1. Memory model: ``batching.memory_model`` against the peak tracemalloc sees
   (it hooks NumPy's allocations) for B in {1, 2, 4, 8, 16, 32} x T in {64, 128, 256}:
   *training*, one ``train.train_step`` (model and AdamW allocated under the trace);
   *decoding*, a ``batching.Server`` of B rows and T slots serving B prompts of T - 4
   tokens for 4 new tokens each (prefill at its longest).
2. Adaptive training (T=256): the batch ``find_batch_size`` picks for budgets of
   256 MiB, 1 GiB and 4 GiB, the measured peak of a step at that batch, and its
   tokens/s; tokens/s against the batch (the knee: the first batch within 10% of
   the best). Variable lengths: KJV verses (bytes, cut to 256) batched at random
   and by length buckets: the fraction of padded slots.
3. Serving: 64 requests, prompt lengths uniform in 8..200, output lengths in
   8..256 (two draws: uniform, and log-uniform = many short answers), greedy, on
   ``small`` with block_size 512 so that 200 + 256 fits; continuous vs static
   batching with the same max batch 16 and the same scheduler code
   (``Server(policy=...)``): generated tokens/s, p50/p99 latency, p50/p99 time to
   first token (all requests submitted at t=0); each policy run ``--serve-repeats``
   times, alternating, and the run with the median wall time reported; every
   output checked equal to the prompt generated alone; KV bytes and the traced
   peak under a 512 MiB budget.

Medians after warm-up (``minillm.timing``); set the thread variables
(``OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1``). Writes
``bench/results/bench_batching.{md,json,png}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

import minillm as mm
from minillm import backend, batching, data, generation, timing, train
from minillm.files import atomic_write_bytes, atomic_write_text
from minillm.optim import AdamW

RESULTS = Path(__file__).resolve().parent / "results"
SMALL = mm.GPTConfig.preset("small")


def traced_peak(fn) -> int:
    """Peak bytes NumPy (and Python) allocated while ``fn`` ran, from a clean trace."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- 1. the memory model against tracemalloc ------------------------------------------------
def train_peak(B: int, T: int, ids) -> int:
    def step():
        model = mm.GPT(SMALL, seed=0)
        opt = AdamW(model.trainable())
        tcfg = train.TrainConfig(steps=1, batch_size=B, seq_len=T)
        train.train_step(model, opt, ids, tcfg, T, 0)
    return traced_peak(step)


def decode_peak(B: int, T: int) -> int:
    rng = np.random.default_rng(0)

    def serve():
        model = mm.GPT(SMALL, seed=0)
        server = batching.Server(model, max_batch=B, max_len=T)
        for _ in range(B):
            server.submit(rng.integers(0, SMALL.vocab_size, T - 4), 4)
        server.run_until_done()
    return traced_peak(serve)


def memory_rows(sizes_b, sizes_t, ids, modes=("train", "decode")) -> list[dict]:
    rows = []
    for mode, peak_of in (("train", lambda b, t: train_peak(b, t, ids)), ("decode", decode_peak)):
        if mode not in modes:
            continue
        for T in sizes_t:
            for B in sizes_b:
                pred = batching.memory_model(SMALL, B, T, mode)["total"]
                peak = peak_of(B, T)
                rows.append(dict(mode=mode, B=B, T=T, predicted=pred, measured=peak,
                                 error=(pred - peak) / peak))
                print(f"memory {mode:6s} B={B:3d} T={T:3d}: predicted {pred / 2**20:8.1f} MiB, "
                      f"measured {peak / 2**20:8.1f} MiB ({rows[-1]['error']:+.1%})", flush=True)
    return rows


# --- 2. adaptive training --------------------------------------------------------------------
def step_tok_s(B: int, T: int, ids, repeats: int) -> float:
    model = mm.GPT(SMALL, seed=0)
    opt = AdamW(model.trainable())
    tcfg = train.TrainConfig(steps=10**6, batch_size=B, seq_len=T)
    hooks = train.step_hooks(tcfg, model=model)
    steps = iter(range(10**6))
    t = timing.median_time(lambda: train.train_step(model, opt, ids, tcfg, T, next(steps), hooks),
                           repeats=repeats, warmup=1)
    return B * T / t["median_s"]


def adaptive_rows(budgets, curve_b, T, ids, repeats) -> tuple[list, list]:
    curve = []
    for B in curve_b:
        curve.append(dict(B=B, tok_s=step_tok_s(B, T, ids, repeats)))
        print(f"train B={B:3d} T={T}: {curve[-1]['tok_s']:,.0f} tokens/s", flush=True)
    rows = []
    for name in budgets:
        budget = batching.parse_bytes(name)
        B = batching.find_batch_size(SMALL, T, budget)
        peak = train_peak(B, T, ids)
        rows.append(dict(budget=name, budget_bytes=budget, B=B,
                         predicted=batching.memory_model(SMALL, B, T)["total"], measured=peak,
                         within=peak <= budget, tok_s=step_tok_s(B, T, ids, repeats)))
        print(f"budget {name}: B={B}, peak {peak / 2**20:.1f} MiB "
              f"({'within' if peak <= budget else 'OVER'}), {rows[-1]['tok_s']:,.0f} tokens/s", flush=True)
    return rows, curve


def knee(curve) -> int:
    """The smallest batch within 10% of the best tokens/s."""
    best = max(c["tok_s"] for c in curve)
    return min(c["B"] for c in curve if c["tok_s"] >= 0.9 * best)


def bucket_rows(text: str, B: int) -> dict:
    lengths = np.array([min(len(v.encode()), 256) for v in text.splitlines() if v.strip()])
    rnd = batching.padding_waste(batching.random_batches(lengths, B), lengths)
    bkt = batching.padding_waste(batching.bucket_batches(lengths, B), lengths)
    return dict(sequences=int(lengths.size), B=B, mean_len=float(lengths.mean()),
                waste_random=rnd, waste_bucketed=bkt)


# --- 3. serving --------------------------------------------------------------------------
def workload(n: int, dist: str, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, SMALL.vocab_size, int(p)) for p in rng.integers(8, 201, n)]
    if dist == "uniform":
        outs = rng.integers(8, 257, n)
    else:                                         # log-uniform: many short answers, a few long
        outs = np.exp(rng.uniform(np.log(8), np.log(257), n)).astype(int)
    return list(zip(prompts, (int(o) for o in outs)))


def serve(model, work, policy: str, max_batch: int, budget=None) -> dict:
    server = batching.Server(model, max_batch=max_batch, memory_budget=budget, policy=policy)
    t0 = time.perf_counter()
    handles = [server.submit(p, n, temperature=0.0) for p, n in work]
    server.run_until_done()
    backend.synchronize()
    wall = time.perf_counter() - t0
    stats = [server.stats(h) for h in handles]
    lat = np.array([s["latency_s"] for s in stats])
    ttft = np.array([s["ttft_s"] for s in stats])
    new = sum(s["new_tokens"] for s in stats)
    busy = np.mean([np.mean([i >= 0 for i in t]) for t in server.timeline])
    return dict(policy=policy, wall_s=wall, new_tokens=new, tok_s=new / wall,
                p50_latency_s=float(np.percentile(lat, 50)), p99_latency_s=float(np.percentile(lat, 99)),
                p50_ttft_s=float(np.percentile(ttft, 50)), p99_ttft_s=float(np.percentile(ttft, 99)),
                decode_steps=len(server.timeline), row_occupancy=float(busy), slots=server.slots,
                rows_run=server.rows_run, decode_s=server.decode_s, prefill_s=server.prefill_s,
                prefill_passes=server.prefill_passes,
                kv_bytes=server.kv_bytes, outputs=[server.result(h) for h in handles])


def serving_rows(n: int, max_batch: int, dists, check: bool, repeats: int = 1) -> list[dict]:
    model = mm.GPT(mm.GPTConfig.preset("small", block_size=512), seed=0)
    serve(model, workload(4, "uniform", seed=9), "continuous", max_batch)        # warm-up
    rows = []
    for dist in dists:
        work = workload(n, dist)
        runs = {"continuous": [], "static": []}
        for _ in range(repeats):                     # alternate, so load on the machine hits both
            for p in runs:
                runs[p].append(serve(model, work, p, max_batch))
        res = {}
        for p, rs in runs.items():                   # the run with the median wall time
            res[p] = sorted(rs, key=lambda r: r["wall_s"])[(len(rs) - 1) // 2]
            res[p]["wall_s_runs"] = [r["wall_s"] for r in rs]
        same = None
        if check:
            alone = [generation.generate(model, p[None], k, temperature=0.0)[0] for p, k in work]
            same = all(np.array_equal(a, res[p]["outputs"][i]) for p in res
                       for i, a in enumerate(alone))
        for p in res:
            res[p].pop("outputs")
            rows.append(dict(dist=dist, equal_to_alone=same, **res[p]))
        ratio = res["continuous"]["tok_s"] / res["static"]["tok_s"]
        rows[-2]["speedup"] = rows[-1]["speedup"] = ratio
        print(f"serve {dist}: continuous {res['continuous']['tok_s']:.0f} tok/s vs static "
              f"{res['static']['tok_s']:.0f} ({ratio:.2f}x); equal to alone: {same}", flush=True)
    return rows


def budget_row(max_batch: int, budget: str) -> dict:
    """KV bytes held and the traced peak of a continuous run under ``budget``."""
    work = workload(16, "uniform", seed=1)
    out = {}

    def run():
        model = mm.GPT(mm.GPTConfig.preset("small", block_size=512), seed=0)
        out.update(serve(model, work, "continuous", max_batch, budget))
    peak = traced_peak(run)
    return dict(budget=budget, slots=out["slots"], kv_bytes=out["kv_bytes"], measured=peak,
                predicted=batching.memory_model(mm.GPTConfig.preset("small", block_size=512),
                                                out["slots"], 512, "decode")["total"],
                within=peak <= batching.parse_bytes(budget))


# --- report ----------------------------------------------------------------------------------
def report(res: dict) -> str:
    out = [f"# bench_batching ({res['machine']}; backend {res['backend']})", "",
           f"Command: `{res['command']}`" + (
               f"; the training rows of the memory table and adaptive training are kept "
               f"from `{res['earlier']['command']}` on {res['earlier']['machine']}"
               if "earlier" in res else ""), "",
           "## Memory model vs tracemalloc peak (random `small`, float32)", "",
           "| mode | T | " + " | ".join(f"B={b}" for b in res["sizes_b"]) + " |",
           "|---|---|" + "---|" * len(res["sizes_b"])]
    for mode in ("train", "decode"):
        for T in res["sizes_t"]:
            cells = [f"{r['measured'] / 2**20:.0f} MiB ({r['error']:+.1%})" for r in res["memory"]
                     if r["mode"] == mode and r["T"] == T]
            out.append(f"| {mode} | {T} | " + " | ".join(cells) + " |")
    worst = max(abs(r["error"]) for r in res["memory"])
    out += ["", f"Cells: measured peak (model's error). Worst error {worst:.1%}.", "",
            "## Adaptive training (T=256)", "", "| budget | batch chosen | predicted | measured peak "
            "| within | tokens/s |", "|---|---|---|---|---|---|"]
    for r in res["adaptive"]:
        out.append(f"| {r['budget']} | {r['B']} | {r['predicted'] / 2**20:.0f} MiB | "
                   f"{r['measured'] / 2**20:.0f} MiB | {'yes' if r['within'] else 'NO'} | {r['tok_s']:,.0f} |")
    out += ["", "tokens/s vs batch: " + ", ".join(f"B={c['B']}: {c['tok_s']:,.0f}" for c in res["curve"])
            + f"; knee (first within 10% of the best): B={res['knee']}", ""]
    b = res["buckets"]
    out += [f"Length buckets ({b['sequences']} KJV verses, bytes, mean {b['mean_len']:.0f}, B={b['B']}): "
            f"padding {b['waste_random']:.1%} of slots at random, {b['waste_bucketed']:.1%} bucketed.", "",
            "## Serving: 64 requests, max batch 16, greedy", "",
            "| output lengths | policy | tokens/s | speedup | p50 / p99 latency | p50 / p99 TTFT "
            "| decode steps | rows busy | rows decoded | decode / prefill s | equal to alone |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["serving"]:
        out.append(f"| {r['dist']} | {r['policy']} | {r['tok_s']:.0f} | "
                   f"{r['speedup'] if r['policy'] == 'continuous' else 1.0:.2f}x | "
                   f"{r['p50_latency_s']:.2f} / {r['p99_latency_s']:.2f} s | "
                   f"{r['p50_ttft_s']:.2f} / {r['p99_ttft_s']:.2f} s | {r['decode_steps']} | "
                   f"{r['row_occupancy']:.0%} | {r.get('rows_run', '')} | "
                   f"{r.get('decode_s', 0):.1f} / {r.get('prefill_s', 0):.1f} | {r['equal_to_alone']} |")
    out += ["", "Rows decoded: the sum over decode steps of the rows the step ran (continuous: "
            "the running requests; static: its whole batch until the last request is done). "
            "Tokens/s: the run with the median wall time of "
            f"{len(res['serving'][0].get('wall_s_runs', [0]))} per policy, alternating."]
    k = res["kv_budget"]
    out += ["", f"Under --memory-budget {k['budget']}: {k['slots']} rows, KV cache "
            f"{k['kv_bytes'] / 2**20:.1f} MiB, traced peak {k['measured'] / 2**20:.1f} MiB "
            f"(model {k['predicted'] / 2**20:.1f} MiB; within: {k['within']}).", ""]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, marker in (("train", "o"), ("decode", "s")):
        r = [x for x in res["memory"] if x["mode"] == mode]
        ax[0].scatter([x["measured"] / 2**20 for x in r], [x["predicted"] / 2**20 for x in r],
                      marker=marker, label=mode)
    hi = max(x["measured"] for x in res["memory"]) / 2**20
    ax[0].plot([0, hi], [0, hi], "k:", lw=1)
    ax[0].set(xscale="log", yscale="log", xlabel="measured peak (MiB, tracemalloc)",
              ylabel="memory_model (MiB)", title="memory model, small, B x T grid")
    ax[0].legend()
    c = res["curve"]
    ax[1].plot([x["B"] for x in c], [x["tok_s"] for x in c], "o-")
    ax[1].axvline(res["knee"], color="gray", ls=":", label=f"knee B={res['knee']}")
    for r in res["adaptive"]:
        ax[1].plot(r["B"], r["tok_s"], "r*", ms=10)
        ax[1].annotate(r["budget"], (r["B"], r["tok_s"]), textcoords="offset points", xytext=(4, -12))
    ax[1].set(xscale="log", xlabel="batch (T=256)", ylabel="train tokens/s", title="throughput vs batch")
    ax[1].legend()
    dists = sorted({r["dist"] for r in res["serving"]})
    for j, pol in enumerate(("static", "continuous")):
        vals = [next(r["tok_s"] for r in res["serving"] if r["dist"] == d and r["policy"] == pol)
                for d in dists]
        ax[2].bar(np.arange(len(dists)) + 0.4 * j, vals, 0.4, label=pol)
    ax[2].set_xticks(np.arange(len(dists)) + 0.2, [f"outputs {d}" for d in dists])
    ax[2].set(ylabel="generated tokens/s", title="serving 64 requests, max batch 16")
    ax[2].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="numpy", help="numpy | numba | cupy")
    p.add_argument("--quick", action="store_true", help="a few sizes, 16 requests")
    p.add_argument("--repeats", type=int, default=3, help="timed training steps per batch")
    p.add_argument("--no-check", action="store_true", help="skip generating every request alone")
    p.add_argument("--serve-repeats", type=int, default=3, help="runs of each serving policy")
    p.add_argument("--serving-only", action="store_true",
                   help="redo the decode memory rows and the serving part; keep the rest of the "
                        "saved results (bench/results/bench_batching.json)")
    args = p.parse_args(argv)
    backend.use(args.backend)
    if args.serving_only:
        return serving_only(args, argv)
    sizes_b = [1, 4] if args.quick else [1, 2, 4, 8, 16, 32]
    sizes_t = [64] if args.quick else [64, 128, 256]
    text = data.load_corpus()
    ids = np.frombuffer(text.encode()[:2_000_000], dtype=np.uint8).astype(np.int64) % SMALL.vocab_size
    res = {"machine": timing.machine_line(), "backend": backend.current(),
           "threads": timing.thread_settings(),
           "model": "random small (V=4096, T=256, L=6, H=8, C=256), float32; serving: block_size 512",
           "sizes_b": sizes_b, "sizes_t": sizes_t,
           "command": " ".join(["bench/bench_batching.py"] + (argv or sys.argv[1:]))}
    res["memory"] = memory_rows(sizes_b, sizes_t, ids)
    budgets = ["256MiB"] if args.quick else ["256MiB", "1GiB", "4GiB"]
    curve_b = [1, 4] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    res["adaptive"], res["curve"] = adaptive_rows(budgets, curve_b, 64 if args.quick else 256, ids,
                                                  1 if args.quick else args.repeats)
    res["knee"] = knee(res["curve"])
    res["buckets"] = bucket_rows(text, 16)
    res["serving"] = serving_rows(16 if args.quick else 64, 16, ["uniform", "log-uniform"],
                                  not args.no_check, 1 if args.quick else args.serve_repeats)
    res["kv_budget"] = budget_row(16, "512MiB")
    return save(res, "bench_batching_quick" if args.quick else "bench_batching")


def serving_only(args, argv) -> int:
    """Redo the decode rows of the memory table, the buckets, the serving table and the budget row."""
    old = json.loads((RESULTS / "bench_batching.json").read_text())
    res = dict(old, machine=timing.machine_line(), backend=backend.current(),
               threads=timing.thread_settings(),
               command=" ".join(["bench/bench_batching.py"] + (argv or sys.argv[1:])),
               earlier=old.get("earlier") or {"command": old["command"], "machine": old["machine"]})
    res["earlier"]["kept"] = ["memory (train rows)", "adaptive", "curve", "knee"]
    res["memory"] = ([r for r in old["memory"] if r["mode"] == "train"] +
                     [r for r in memory_rows(old["sizes_b"], old["sizes_t"], None, ("decode",))])
    res["buckets"] = bucket_rows(data.load_corpus(), 16)
    res["serving"] = serving_rows(64, 16, ["uniform", "log-uniform"], not args.no_check,
                                  args.serve_repeats)
    res["kv_budget"] = budget_row(16, "512MiB")
    return save(res, "bench_batching")


def save(res: dict, stem: str) -> int:
    RESULTS.mkdir(exist_ok=True)
    md = report(res)
    atomic_write_text(RESULTS / f"{stem}.md", md + "\n")
    atomic_write_text(RESULTS / f"{stem}.json", json.dumps(res, indent=1, default=float) + "\n")
    plot(res, RESULTS / f"{stem}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
