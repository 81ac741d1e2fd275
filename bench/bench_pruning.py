"""Pruning measured on the tour's trained model: quality, recovery, speed, and when zeros pay.

    .venv/bin/python bench/bench_pruning.py                 # the tour's small model (~6 min on 2 cores;
                                                             # trains the baseline first if not cached)
    .venv/bin/python bench/bench_pruning.py --quick         # the quick tour's tiny model (seconds)

1. Quality: validation perplexity (the tour's fixed batches) vs sparsity 10-90%
   for magnitude and Wanda; 2:4 with Wanda's and with |W|'s score; 25% / 50%
   heads, 25% / 50% neurons, and 25% heads + 25% neurons removed.
2. Recovery: ``--finetune-steps`` steps of plain ``minillm.train.train`` (masks
   kept by the sparse kind's hook) for Wanda 50%, 2:4 and the structured model,
   next to the unpruned model trained the same steps (the baseline itself is
   still improving, so that is the fair control).
3. Structured speed: the unpruned and the 25% heads + 25% neurons model,
   interleaved: a training step (forward + backward, B=8, T=block_size) and
   cached greedy decoding (batch 1, 16-token prompt, ``--decode-tokens``).
4. The CSR crossover: ``pruning.csr_matmul`` (backend ``--backend``) vs dense
   BLAS ``x @ W`` on the model's c_fc (C -> 4C) and mlp.c_proj (4C -> C)
   weights, magnitude-pruned to each density, for N=1 row (decode GEMV) and
   N=B*T rows (training GEMM).

Medians after warm-up (``minillm.timing``); set the thread variables
(``OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1``) to compare
code, not thread pools. Writes ``bench/results/bench_pruning.{md,json,png}``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import minillm as mm
from minillm import backend, baseline, data, pruning, timing, tour, train

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
DENSITIES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]


def get_model(quick: bool):
    text = data.load_corpus()
    settings = baseline.tour_settings(quick=quick)
    if settings.corpus_chars is not None:
        text = text[:settings.corpus_chars]
    return baseline.get_baseline(settings, text, progress=False, log=lambda m: print(m, flush=True))


def ppl(model, base, args) -> float:
    T = model.config.block_size
    return tour.val_perplexity(model, base.val_ids, args.eval_batch, T, args.eval_batches, seed=0)


def quality(model, cal, base, args) -> list[dict]:
    rows = [dict(method="dense", sparsity=0.0, ppl=ppl(model, base, args), params=model.num_params())]
    for method in ("magnitude", "wanda"):
        for s in args.sparsities:
            pm = mm.prune(model, method, sparsity=s, calibration=cal)
            rows.append(dict(method=method, sparsity=s, ppl=ppl(pm, base, args),
                             params=pruning.nonzero_params(pm)))
            print(f"  {method} {s:.0%}: ppl {rows[-1]['ppl']:.1f}", flush=True)
    for label, c in (("2:4 wanda", cal), ("2:4 magnitude", None)):
        pm = mm.prune(model, "2:4", calibration=c)
        rows.append(dict(method=label, sparsity=0.5, ppl=ppl(pm, base, args),
                         params=pruning.nonzero_params(pm)))
    for method in ("heads", "neurons"):
        for s in (0.25, 0.5):
            pm = mm.prune(model, method, sparsity=s, calibration=cal)
            rows.append(dict(method=method, sparsity=s, ppl=ppl(pm, base, args), params=pm.num_params()))
    sm = structured(model, cal)
    rows.append(dict(method="heads+neurons", sparsity=0.25, ppl=ppl(sm, base, args), params=sm.num_params()))
    return rows


def groups(model, cal, base, args) -> list[dict]:
    """Score x comparison group at each sparsity: which half of Wanda's recipe helps here?"""
    norms = pruning.calibrate(model, cal)
    rows = []
    for s in args.group_sparsities:
        for score_name in ("|W|", "|W| ||X||"):
            for group, mask in (("matrix", pruning.matrix_mask), ("column", pruning.column_mask)):
                keep = {}
                for name in pruning.linear_names(model.config):
                    w = model.params[name + ".weight"]
                    score = abs(w) if score_name == "|W|" else pruning.wanda_score(w, norms[name])
                    keep[name] = mask(score, s)
                rows.append(dict(score=score_name, group=group, sparsity=s,
                                 ppl=ppl(pruning.with_masks(model, keep), base, args)))
        print(f"  groups {s:.0%}: done", flush=True)
    return rows


def structured(model, cal):
    return mm.prune(mm.prune(model, "heads", 0.25, cal), "neurons", 0.25, cal)


def recovery(model, cal, base, args) -> list[dict]:
    """Fine-tune each pruned model with plain ``train``; the unpruned model trains alongside."""
    cfg = base.info["settings"]["train"]
    tcfg = train.TrainConfig(steps=args.finetune_steps, batch_size=cfg["batch_size"],
                             seq_len=cfg["seq_len"], lr=args.finetune_lr, warmup_steps=2,
                             eval_interval=0, seed=1)
    models = {"dense (control)": copy(model),
              "wanda 50%": mm.prune(model, "wanda", sparsity=0.5, calibration=cal),
              "2:4 wanda": mm.prune(model, "2:4", calibration=cal),
              "heads+neurons 25%": structured(model, cal)}
    out = []
    for label, m in models.items():
        before = ppl(m, base, args)
        t0 = time.perf_counter()
        train.train(m, base.train_ids, None, tcfg, progress=False)
        zeros_kept = all(v >= 0.5 for v in mm.sparsity(m).values()) if m.config.linear == "sparse" else None
        out.append(dict(model=label, steps=tcfg.steps, lr=tcfg.lr, ppl_before=before,
                        ppl_after=ppl(m, base, args), seconds=time.perf_counter() - t0,
                        zeros_kept=zeros_kept))
        print(f"  fine-tune {label}: {before:.1f} -> {out[-1]['ppl_after']:.1f}", flush=True)
    return out


def copy(model):
    return mm.GPT(model.config, params={k: v.copy() for k, v in model.params.items()})


def speed(model, cal, args) -> dict:
    """Train step (forward + backward) and cached decoding: unpruned vs 25% heads + neurons."""
    sm = structured(model, cal)
    T = model.config.block_size
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, model.config.vocab_size, (8, T)) for _ in range(2))
    prompt = rng.integers(0, model.config.vocab_size, (1, 16))
    n_new = min(args.decode_tokens, T - 16)
    out = {"params": {"dense": model.num_params(), "pruned": sm.num_params()}}
    with backend.use(args.backend):
        for what, fn in (("train_step_s", lambda m: (lambda: m.loss_and_grads(x, y))),
                         ("decode_s", lambda m: (lambda: m.generate(prompt, n_new, temperature=0.0)))):
            times = {"dense": [], "pruned": []}
            for _ in range(args.rounds):                      # interleaved: noise hits both
                for label, m in (("dense", model), ("pruned", sm)):
                    times[label].append(timing.median_time(fn(m), args.repeats, 1)["median_s"])
            out[what] = {k: float(np.median(v)) for k, v in times.items()}
    out["train_tok_s"] = {k: 8 * T / v for k, v in out["train_step_s"].items()}
    out["decode_tok_s"] = {k: n_new / v for k, v in out["decode_s"].items()}
    out["train_speedup"] = out["train_step_s"]["dense"] / out["train_step_s"]["pruned"]
    out["decode_speedup"] = out["decode_s"]["dense"] / out["decode_s"]["pruned"]
    out["decode_tokens"] = n_new
    return out


def crossover(model, args) -> list[dict]:
    """CSR twin vs dense BLAS on the model's MLP weights at each density."""
    T = model.config.block_size
    rng = np.random.default_rng(0)
    rows = []
    for role in ("mlp.c_fc", "mlp.c_proj"):
        w0 = model.params[f"h.0.{role}.weight"]
        n_in, n_out = w0.shape
        for N in (1, 8 * T):
            x = rng.standard_normal((N, n_in)).astype(w0.dtype)
            inner = max(1, int(2e6 // (N * n_in * n_out) ** 0.9)) if N == 1 else 1   # batch tiny calls
            dense = timing.median_time(loop(lambda: x @ w0, inner), args.repeats, 1)["median_s"] / inner
            for d in args.densities:
                w = w0 * pruning.matrix_mask(np.abs(w0), 1 - d)
                csr = pruning.to_csr(w)
                with backend.use(args.backend):
                    fn = lambda: pruning.csr_matmul(x, csr.data, csr.indices, csr.indptr, n_out)   # noqa: E731
                    err = float(np.abs(fn() - x @ w).max())
                    t = timing.median_time(loop(fn, inner), args.repeats, 1)["median_s"] / inner
                rows.append(dict(layer=role, shape=[n_in, n_out], N=N, density=d, nnz=len(csr.data),
                                 dense_s=dense, csr_s=t, csr_over_dense=dense / t, max_abs_err=err,
                                 csr_bytes=csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes,
                                 dense_bytes=w0.nbytes))
            print(f"  crossover {role} N={N}: done", flush=True)
    return rows


def loop(fn, n):
    def run():
        for _ in range(n):
            out = fn()
        return out
    return run


def crossing(rows, layer, N) -> float | None:
    """Density where CSR time equals dense time (log-linear interpolation), None if never."""
    pts = sorted((r["density"], r["csr_over_dense"]) for r in rows if r["layer"] == layer and r["N"] == N)
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 >= 1 > r1:
            f = math.log(r0) / (math.log(r0) - math.log(r1))
            return float(math.exp(math.log(d0) + f * (math.log(d1) - math.log(d0))))
    return None if not pts or pts[0][1] < 1 else float(pts[-1][0])


def table(res: dict) -> str:
    lines = [f"Backend {res['backend']}; {res['machine']}"]
    if "quality" in res:
        lines += quality_table(res)
    if res.get("groups"):
        lines += ["", "Score x comparison group (val ppl):", "",
                  "| sparsity | score | per matrix | per column (output) |", "|---|---|---|---|"]
        g = {(r["sparsity"], r["score"], r["group"]): r["ppl"] for r in res["groups"]}
        for s, score in sorted({(r["sparsity"], r["score"]) for r in res["groups"]}):
            lines.append(f"| {s:.0%} | {score} | {g[(s, score, 'matrix')]:.1f} | {g[(s, score, 'column')]:.1f} |")
    if res.get("recovery"):
        lines += ["", "| fine-tuned (plain train) | steps | ppl before | ppl after | zeros kept |",
                  "|---|---|---|---|---|"]
        for r in res["recovery"]:
            lines.append(f"| {r['model']} | {r['steps']} | {r['ppl_before']:.1f} | {r['ppl_after']:.1f} | "
                         f"{'-' if r['zeros_kept'] is None else r['zeros_kept']} |")
    if "speed" in res:
        lines += speed_table(res["speed"])
    if "crossover" in res:
        lines += crossover_table(res)
    return "\n".join(lines)


def quality_table(res: dict) -> list[str]:
    q = {(r["method"], r["sparsity"]): r for r in res["quality"]}
    dense = q[("dense", 0.0)]["ppl"]
    lines = ["", f"Validation perplexity (dense {dense:.1f}):", "",
             "| sparsity | magnitude | wanda |", "|---|---|---|"]
    for s in res["sparsities"]:
        lines.append(f"| {s:.0%} | {q[('magnitude', s)]['ppl']:.1f} | {q[('wanda', s)]['ppl']:.1f} |")
    lines += ["", "| method | removed | params (nonzero) | val ppl | vs dense |", "|---|---|---|---|---|"]
    for r in res["quality"]:
        if r["method"] not in ("magnitude", "wanda"):
            lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['params']:,} | {r['ppl']:.1f} | "
                         f"{r['ppl'] / dense:.2f}x |")
    return lines


def speed_table(s: dict) -> list[str]:
    lines = ["", "| model | params | train step ms (B=8) | train tok/s | decode tok/s (cached, B=1) |",
             "|---|---|---|---|---|"]
    for k in ("dense", "pruned"):
        lines.append(f"| {k} | {s['params'][k]:,} | {1e3 * s['train_step_s'][k]:.1f} | "
                     f"{s['train_tok_s'][k]:,.0f} | {s['decode_tok_s'][k]:,.0f} |")
    return lines + ["", f"Structured speedup: train step {s['train_speedup']:.2f}x, decode "
                        f"{s['decode_speedup']:.2f}x."]


def crossover_table(res: dict) -> list[str]:
    lines = ["", "| layer | N | density | dense BLAS us | CSR us | dense / CSR |", "|---|---|---|---|---|---|"]
    for r in res["crossover"]:
        lines.append(f"| {r['layer']} {r['shape'][0]}x{r['shape'][1]} | {r['N']} | {r['density']:.0%} | "
                     f"{1e6 * r['dense_s']:.1f} | {1e6 * r['csr_s']:.1f} | {r['csr_over_dense']:.2f}x |")
    lines.append("")
    for key, d in res["crossings"].items():
        lines.append(f"- CSR overtakes dense ({key}): " + ("never in range" if d is None else f"below ~{d:.0%} density"))
    return lines


def plot(res: dict, path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    q = res["quality"]
    dense = next(r["ppl"] for r in q if r["method"] == "dense")
    for method, style in (("magnitude", "o-"), ("wanda", "s-")):
        pts = [(r["sparsity"], r["ppl"]) for r in q if r["method"] == method]
        ax.plot(*zip(*pts), style, label=method)
    for r, m in zip([r for r in q if r["method"] not in ("dense", "magnitude", "wanda")], "^v<>Dpx"):
        ax.plot(r["sparsity"], r["ppl"], m, label=f"{r['method']} {r['sparsity']:.0%}")
    ax.axhline(dense, color="gray", ls=":", label="dense")
    ax.set(xlabel="fraction pruned", ylabel="validation perplexity", yscale="log",
           title="quality vs sparsity")
    ax.legend(fontsize=7)
    for (layer, N), style in zip(sorted({(r["layer"], r["N"]) for r in res["crossover"]}), ("o-", "s-", "o--", "s--")):
        pts = [(r["density"], r["csr_over_dense"]) for r in res["crossover"] if r["layer"] == layer and r["N"] == N]
        bx.plot(*zip(*pts), style, label=f"{layer} N={N}")
    bx.axhline(1, color="gray", ls=":")
    bx.set(xscale="log", yscale="log", xlabel="density (fraction of weights kept)",
           ylabel="dense time / CSR time (>1: CSR faster)", title=f"CSR ({res['backend']}) vs dense BLAS")
    bx.legend(fontsize=7)
    fig.savefig(path, dpi=90)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="numba" if backend.available()["numba"][0] else "numpy")
    p.add_argument("--quick", action="store_true", help="the quick tour's tiny model, fewer points")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the speed test")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--calibration", type=int, default=16, help="calibration sequences of 128 tokens")
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--parts", default="quality,groups,recovery,speed,crossover",
                   help="comma-separated subset of quality,groups,recovery,speed,crossover")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.sparsities, args.densities, args.group_sparsities = SPARSITIES, DENSITIES, [0.5, 0.7, 0.8]
    parts = set(args.parts.split(","))
    if args.quick:
        args.sparsities, args.densities, args.group_sparsities = [0.3, 0.5, 0.7], [0.05, 0.3, 1.0], [0.5]
        args.repeats, args.rounds, args.finetune_steps, args.calibration = 2, 1, 4, 2
    t0 = time.perf_counter()
    with backend.use(args.backend):
        base = get_model(args.quick)
        model = base.model
        cal = pruning.calibration_ids(base.train_ids, args.calibration, min(128, model.config.block_size))
        res = dict(backend=args.backend, quick=args.quick, sparsities=args.sparsities,
                   config=model.config.to_dict(), calibration=list(cal.shape), parts=sorted(parts))
        for part, fn in (("quality", quality), ("groups", groups), ("recovery", recovery)):
            if part in parts:
                print(f"{part} ...", flush=True)
                res[part] = fn(model, cal, base, args)
    if "speed" in parts:
        print("speed ...", flush=True)
        res["speed"] = speed(model, cal, args)
    if "crossover" in parts:
        print("crossover ...", flush=True)
        res["crossover"] = crossover(model, args)
        res["crossings"] = {f"{layer} N={N}": crossing(res["crossover"], layer, N)
                            for layer, N in sorted({(r["layer"], r["N"]) for r in res["crossover"]})}
    res["bytes"] = {"dense": model.nbytes(), "sparse_kind_50": mm.prune(model, "magnitude", 0.5).nbytes()}
    res.update(machine=timing.machine_line(), threads=timing.thread_settings(), cpu=timing.cpu_name(),
               seconds=time.perf_counter() - t0, command="bench/bench_pruning.py " + " ".join(args.argv))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_pruning" + ("_quick" if args.quick else "") + \
        ("" if parts == set(p.get_default("parts").split(",")) else "_" + "_".join(sorted(parts)))
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    md = table(res)
    (args.out / f"{stem}.md").write_text(f"`{res['command']}`\n\n{md}\n")
    if "quality" in res and "crossover" in res:
        plot(res, args.out / f"{stem}.png")
    print(md)
    return res


if __name__ == "__main__":
    main()
