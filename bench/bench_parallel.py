"""Tensor and data parallelism measured: collectives, bytes per step, memory per rank, scaling.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \\
        .venv/bin/python bench/bench_parallel.py            # ~1-2 min on 2 cores
    .venv/bin/python bench/bench_parallel.py --quick        # a small model, seconds

This process measures the single-process step (N = 1) and then starts
``mpiexec -n 2 python bench/bench_parallel.py --worker`` (BLAS at 1 thread per
rank), whose ranks measure:

1. all-reduce latency and bandwidth of this MPI: median time of ``Allreduce`` on
   float32 buffers of 8 B .. 64 MB, fitted as t = a + b * bytes;
2. bytes and calls of every collective in one training step, counted, for TP=2
   and DP=2, against ``parallel.comm_formula`` (Megatron: 4 all-reduces of B*T*C
   per layer, plus the vocab-parallel embedding, head and loss);
3. per-rank bytes (weights, gradients, AdamW m and v, the KV cache) counted from
   the arrays against ``parallel.memory_formula``, and a per-rank memory budget
   that the model exceeds alone but meets when split: it trains with TP=2;
4. the training-step time of TP=2 and DP=2 on a matmul-bound model.

Then a model of the step predicts N = 4, 8, 64: compute + communication.
Compute per rank is *measured* for N = 1, 2, 4, 8 in this process: one rank's
slice of the work (rank 0's shards, or its B/N rows) with the collectives stubbed
out (``StubComm``: the same arithmetic, no partner), so it is not disturbed by
the other rank competing for a core; beyond 8 it is extrapolated as a + b / N
(fitted). Communication is a ring all-reduce, 2 (N - 1) alpha + 2 (N - 1) / N *
bytes * beta per call, with alpha = a / 2 and beta = b from the fit of step 1
(N = 2: one step each way). alpha and beta are this machine's shared-memory MPI;
across hosts both are larger. The measured N = 2 step is compared with the model.

Medians after warm-up (``minillm.timing``). Writes
``bench/results/bench_parallel.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import minillm as mm
from minillm import backend, parallel as par, timing
from minillm.files import atomic_write_bytes, atomic_write_text
from minillm.optim import AdamW
from minillm.train import TrainConfig, step_hooks, train_step

RESULTS = Path(__file__).resolve().parent / "results"
# Big enough that the matmuls dominate a step (C = 512: (B T) x 512 x 2048 GEMMs).
CONFIG = mm.GPTConfig(vocab_size=4096, block_size=128, n_layer=2, n_head=8, n_embd=512)
QUICK = mm.GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=4, n_embd=64)
PREDICT_N = [1, 2, 4, 8, 16, 32, 64]


def settings(quick: bool):
    cfg = QUICK if quick else CONFIG
    tcfg = TrainConfig(steps=1000, batch_size=8, seq_len=cfg.block_size, warmup_steps=0,
                       eval_interval=0, lr=1e-4)
    return cfg, tcfg


def corpus(cfg) -> np.ndarray:
    return np.random.default_rng(0).integers(0, cfg.vocab_size, 200_000)


def step_time(model, tcfg, hooks, repeats: int) -> dict:
    """Median seconds of one ``train_step`` (batch, forward, backward, hooks, AdamW)."""
    opt, ids, seq = AdamW(model.trainable(), lr=tcfg.lr), corpus(model.config), tcfg.seq_len
    hooks = step_hooks(tcfg, hooks, model)
    step = iter(range(10_000))
    return timing.median_time(lambda: train_step(model, opt, ids, tcfg, seq, next(step), hooks),
                              repeats=repeats, warmup=1)


# --- the ranks' part ---------------------------------------------------------------------------
def allreduce_sweep(comm, quick: bool, repeats: int) -> list[dict]:
    sizes = [8 * 8 ** k for k in range(8 if quick else 9)] + ([] if quick else [64 * 2 ** 20])
    out = []
    for nbytes in sizes:
        x = np.ones(nbytes // 4, dtype=np.float32)
        comm.barrier()
        t = timing.median_time(lambda: comm.allreduce(x), repeats=repeats if nbytes < 2 ** 22 else 5,
                               warmup=2)
        out.append({"bytes": nbytes, "median_s": t["median_s"]})
    return out


def one_step_counts(model, tcfg, hooks) -> dict:
    """Collective calls, bytes and seconds of one training step (this rank's)."""
    for c in (model.tp, model.dp):
        c.reset_counts()
    opt = AdamW(model.trainable(), lr=tcfg.lr)
    train_step(model, opt, corpus(model.config), tcfg, tcfg.seq_len, 0, step_hooks(tcfg, hooks, model))
    counts = {"tp": {k: list(v) for k, v in model.tp.counts.items()},
              "dp": {k: list(v) for k, v in model.dp.counts.items()},
              "seconds": sum(model.tp.seconds.values()) + sum(model.dp.seconds.values())}
    return counts


def memory_run(comm, cfg, tcfg) -> dict:
    """Per-rank bytes counted vs the formula, and the budget a single process exceeds."""
    B, S = tcfg.batch_size, cfg.block_size
    single = par.memory_formula(cfg, 1, B, S)
    train_state = lambda m: m["weights"] + m["grads"] + m["optimizer"]       # noqa: E731
    budget = int(0.75 * train_state(single))                  # the bench's per-rank budget
    model = par.ParallelGPT(mm.GPT(cfg, seed=0), comm)
    hooks = [par.ParallelStep(tcfg.grad_clip, model)]
    opt, ids = AdamW(model.trainable(), lr=tcfg.lr), corpus(cfg)
    all_hooks = step_hooks(tcfg, hooks, model)
    losses = [train_step(model, opt, ids, tcfg, tcfg.seq_len, s, all_hooks)["loss"] for s in range(2)]
    x = ids[:B * S].reshape(B, S)
    _, grads = model.loss_and_grads(x, x)
    counted = par.memory_per_rank(model, grads, opt, B, S)
    return {"budget_bytes": budget, "single": single, "single_train_state": train_state(single),
            "formula": par.memory_formula(cfg, comm.size, B, S), "counted": counted,
            "counted_train_state": train_state(counted), "fits": train_state(counted) <= budget,
            "losses_2_steps": losses,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cpu_share(comm, before, calls: int) -> list[dict]:
    """Per rank, per step: wall seconds, CPU seconds of this process (MPI's busy-waiting
    counts as CPU) and involuntary context switches. Wall - CPU is time the rank was
    not running: a core taken by another process while its partner waits."""
    wall0, cpu0, ru0 = before
    ru = resource.getrusage(resource.RUSAGE_SELF)
    mine = np.array([time.perf_counter() - wall0, time.process_time() - cpu0,
                     ru.ru_nivcsw - ru0.ru_nivcsw], dtype=np.float64) / calls
    return [{"wall_s": float(a[0]), "cpu_s": float(a[1]), "preempted_per_step": float(a[2])}
            for a in comm.allgather(mine)]


def worker(args) -> None:
    comm = par.world()
    cfg, tcfg = settings(args.quick)
    res = {"ranks": comm.size, "machine": timing.machine_line()}
    res["allreduce"] = allreduce_sweep(comm, args.quick, args.repeats)
    for name, (tp_n, dp_n) in (("tp", (comm.size, 1)), ("dp", (1, comm.size))):
        tp, dp = par.grid(tp_n, dp_n, comm)
        model = par.ParallelGPT(mm.GPT(cfg, seed=0), tp, dp)
        hooks = [par.ParallelStep(tcfg.grad_clip, model)]
        res[f"{name}_counts"] = one_step_counts(model, tcfg, hooks)
        before = (time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF))
        res[f"{name}_step"] = step_time(model, tcfg, hooks, args.repeats)
        res[f"{name}_cpu"] = cpu_share(comm, before, args.repeats + 1)
        res[f"{name}_formula"] = par.comm_formula(cfg, tcfg.batch_size, tcfg.seq_len, tp_n, dp_n)
    res["memory"] = memory_run(comm, cfg, tcfg)
    per_rank = comm.allgather(np.array([res["memory"]["peak_rss_mb"]]))
    res["memory"]["peak_rss_mb_per_rank"] = [float(a[0]) for a in per_rank]
    if comm.rank == 0:
        Path(args.worker).write_text(json.dumps(res, indent=1))


# --- one rank's compute, alone -------------------------------------------------------------
class StubComm(par.Communicator):
    """Rank 0 of ``size`` with no partners: every collective returns this rank's input, so
    a step does exactly one rank's arithmetic (its numbers are wrong; its time is right)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def _allreduce(self, x, op):
        return x

    def _allgather(self, x):
        return [x] * self.size

    def _broadcast(self, x, root):
        return x


def compute_per_rank(cfg, tcfg, repeats: int) -> dict:
    """Median step time of one rank's share of TP and DP for N = 1, 2, 4, 8 (as far as the
    heads and the batch divide), measured in this process."""
    out = {"tp": {}, "dp": {}}
    for N in (1, 2, 4, 8):
        for name in ("tp", "dp"):
            if (cfg.n_head if name == "tp" else tcfg.batch_size) % N:
                continue
            tp, dp = (StubComm(N), None) if name == "tp" else (None, StubComm(N))
            model = par.ParallelGPT(mm.GPT(cfg, seed=0), tp, dp)
            out[name][N] = step_time(model, tcfg, [par.ParallelStep(tcfg.grad_clip, model)],
                                     repeats)["median_s"]
    return out


# --- the step model ---------------------------------------------------------------------------
def fit_alpha_beta(sweep: list[dict]) -> tuple[float, float]:
    """Least squares t = a + b * bytes over the sweep; ring all-reduce at N = 2 is one
    step each way, so alpha = a / 2 and beta = b."""
    x = np.array([s["bytes"] for s in sweep], dtype=np.float64)
    t = np.array([s["median_s"] for s in sweep])
    w = 1 / t                                                    # relative error: small sizes count
    A = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    a, b = np.linalg.lstsq(A, t * w, rcond=None)[0]
    return max(a, 1e-9) / 2, b


def ring_allreduce_s(N: int, calls: int, nbytes: int, alpha: float, beta: float) -> float:
    return 0.0 if N == 1 else calls * 2 * (N - 1) * alpha + 2 * (N - 1) / N * nbytes * beta


def predict(t1: float, compute: dict, calls: int, nbytes: int, alpha: float, beta: float) -> dict:
    """Step time at N ranks = compute (measured where N was run, else a + b / N fitted
    on the measured points) + the ring all-reduce of ``calls`` calls, ``nbytes`` per step."""
    Ns = np.array(sorted(compute), dtype=np.float64)
    a, b = np.linalg.lstsq(np.stack([np.ones_like(Ns), 1 / Ns], axis=1),
                           np.array([compute[int(n)] for n in Ns]), rcond=None)[0]
    if a < 0:                                   # no negative fixed cost: fit b / N alone
        a, b = 0.0, float(np.mean([compute[int(n)] * n for n in Ns]))
    rows = []
    for N in PREDICT_N:
        measured = N in compute
        c = compute[N] if measured else a + b / N
        comm = ring_allreduce_s(N, calls, nbytes, alpha, beta)
        rows.append({"N": N, "compute_s": c, "compute_measured": measured, "comm_s": comm,
                     "step_s": c + comm, "speedup": t1 / (c + comm), "efficiency": t1 / (c + comm) / N})
    dominated = next((int(N) for N in 2 ** np.arange(1, 21)       # N = 2 .. 2**20, the model alone
                      if ring_allreduce_s(int(N), calls, nbytes, alpha, beta)
                      > (compute[N] if N in compute else a + b / N)), None)
    return {"split_fraction": float(b / (a + b)), "fit_a_s": float(a), "fit_b_s": float(b),
            "rows": rows, "comm_dominates_from_N": dominated}


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    sw = res["worker"]["allreduce"]
    x = np.array([s["bytes"] for s in sw])
    ax1.loglog(x, [s["median_s"] * 1e6 for s in sw], "o", label="measured (2 ranks)")
    a, b = res["alpha_s"], res["beta_s_per_byte"]
    ax1.loglog(x, (2 * a + b * x) * 1e6, "-", label=f"2 alpha + beta m: alpha={a * 1e6:.1f} us, "
                                                   f"1/beta={1 / b / 1e9:.2f} GB/s")
    ax1.set(xlabel="message bytes", ylabel="all-reduce time (us)", title="MPI all-reduce on this machine")
    ax1.legend(fontsize=8)
    for name, style in (("tp", "-"), ("dp", "--")):
        rows = res["predicted"][name]["rows"]
        Ns = [r["N"] for r in rows]
        ax2.loglog(Ns, [r["step_s"] for r in rows], style, label=f"{name.upper()} predicted step")
        ax2.loglog(Ns, [r["comm_s"] or np.nan for r in rows], style, alpha=0.4,
                   label=f"{name.upper()} predicted communication")
        ax2.plot([1, 2], [res["single_step_s"], res[f"{name}_step_s"]], "o", label=f"{name.upper()} measured")
    ax2.set(xlabel="ranks N", ylabel="seconds per step", title="step time: measured N=1,2, modelled beyond")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def table(res: dict) -> str:
    w, cfg = res["worker"], res["config"]
    lines = [f"model V={cfg['vocab_size']} T={cfg['block_size']} L={cfg['n_layer']} H={cfg['n_head']} "
             f"C={cfg['n_embd']} float32, batch {res['batch']}x{res['seq_len']}; {w['machine']}", "",
             "| run | step (median) | speedup | efficiency | all-reduce calls / bytes per step (counted) "
             "| formula | time in collectives |", "|---|---|---|---|---|---|---|",
             f"| single process | {res['single_step_s'] * 1e3:.0f} ms | 1.00 | 1.00 | 0 | 0 | 0 |"]
    for name in ("tp", "dp"):
        c = w[f"{name}_counts"][name]["allreduce"]
        f = w[f"{name}_formula"]
        t = res[f"{name}_step_s"]
        lines.append(f"| {name.upper()}=2 (mpiexec -n 2) | {t * 1e3:.0f} ms | {res['single_step_s'] / t:.2f} | "
                     f"{res['single_step_s'] / t / 2:.2f} | {c[0]} / {c[1]:,} | {f['allreduce_calls']} / "
                     f"{f['allreduce_bytes']:,} | {w[f'{name}_counts']['seconds'] * 1e3:.0f} ms |")
    for name in ("tp", "dp"):
        ranks = "; ".join(f"rank {r}: wall {c['wall_s'] * 1e3:.0f} ms, CPU {c['cpu_s'] * 1e3:.0f} ms, "
                          f"{c['preempted_per_step']:.0f} preemptions" for r, c in enumerate(w[f"{name}_cpu"]))
        lines.append(f"\n{name.upper()}=2 per step, {ranks}")
    m = w["memory"]
    lines += ["", "| bytes per rank | single (formula) | TP=2 formula | TP=2 counted |", "|---|---|---|---|"]
    for k in ("weights", "grads", "optimizer", "kv_cache"):
        lines.append(f"| {k} | {m['single'][k]:,} | {m['formula'][k]:,} | {m['counted'][k]:,} |")
    lines += ["", f"budget {m['budget_bytes'] / 1e6:.1f} MB per rank (weights + grads + AdamW): single "
                  f"process needs {m['single_train_state'] / 1e6:.1f} MB; a TP=2 rank holds "
                  f"{m['counted_train_state'] / 1e6:.1f} MB and trained 2 steps (losses "
                  f"{', '.join(f'{x:.4f}' for x in m['losses_2_steps'])}); peak RSS per rank "
                  f"{', '.join(f'{x:.0f}' for x in m['peak_rss_mb_per_rank'])} MB (includes the "
                  f"full model built once before slicing)", "",
              f"all-reduce fit: alpha = {res['alpha_s'] * 1e6:.1f} us, beta = 1 / "
              f"({1 / res['beta_s_per_byte'] / 1e9:.2f} GB/s)", "",
              "| N | TP compute / rank | TP comm (model) | TP step | TP speedup (eff.) | DP compute / rank "
              "| DP comm (model) | DP step | DP speedup (eff.) |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(r):
        mark = "" if r["compute_measured"] else " (fit)"
        return (f"{r['compute_s'] * 1e3:.0f} ms{mark} | {r['comm_s'] * 1e3:.1f} ms | {r['step_s'] * 1e3:.0f} ms | "
                f"{r['speedup']:.2f} ({r['efficiency']:.2f})")
    for tp, dp in zip(res["predicted"]["tp"]["rows"], res["predicted"]["dp"]["rows"]):
        lines.append(f"| {tp['N']} | {cell(tp)} | {cell(dp)} |")
    for name in ("tp", "dp"):
        p = res["predicted"][name]
        lines.append(f"\n{name.upper()}: compute per rank = {p['fit_a_s'] * 1e3:.0f} ms + "
                     f"{p['fit_b_s'] * 1e3:.0f} ms / N (split share {p['split_fraction']:.3f}); "
                     + (f"communication exceeds compute from N = {p['comm_dominates_from_N']} on; "
                        if p["comm_dominates_from_N"] else
                        "communication stays below compute up to N = 2**20; ")
                     + f"measured 2-rank step {res[f'{name}_step_s'] * 1e3:.0f} ms vs model "
                     f"{p['rows'][1]['step_s'] * 1e3:.0f} ms")
    return "\n".join(lines)


def measure(args) -> dict:
    """Every measurement of the bench, before any model or table."""
    cfg, tcfg = settings(args.quick)
    single = step_time(mm.GPT(cfg, seed=0), tcfg, (), args.repeats)
    compute = compute_per_rank(cfg, tcfg, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", "2", sys.executable, __file__,
               "--worker", str(out), "--repeats", str(args.repeats), "--backend", args.backend] \
            + (["--quick"] if args.quick else [])
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, timeout=900)
        w = json.loads(out.read_text())
    t1 = single["median_s"]
    return {"command": "python bench/bench_parallel.py" + (" --quick" if args.quick else ""),
           "config": cfg.to_dict(), "batch": tcfg.batch_size, "seq_len": tcfg.seq_len,
           "single_step_s": t1, "single_step": single, "worker": w,
           "tp_step_s": w["tp_step"]["median_s"], "dp_step_s": w["dp_step"]["median_s"],
           "compute_per_rank_s": compute}


def analyse(res: dict) -> None:
    """The all-reduce fit and the step model, from the measured numbers in ``res``."""
    w, t1 = res["worker"], res["single_step_s"]
    res["alpha_s"], res["beta_s_per_byte"] = alpha, beta = fit_alpha_beta(w["allreduce"])
    compute = {kind: {int(n): t for n, t in c.items()} for kind, c in res["compute_per_rank_s"].items()}
    f_tp, f_dp = w["tp_formula"], w["dp_formula"]
    res["predicted"] = {
        # TP sends activations: the same bytes per call whatever N; DP sends every gradient once
        "tp": predict(t1, compute["tp"], f_tp["allreduce_calls"], f_tp["allreduce_bytes"], alpha, beta),
        "dp": predict(t1, compute["dp"], f_dp["allreduce_calls"], f_dp["allreduce_bytes"], alpha, beta),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model (seconds; for checking the script)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default: 5)")
    ap.add_argument("--backend", default="numpy", help="the array backend (MPI buffers are host NumPy)")
    ap.add_argument("--render", action="store_true",
                    help="redo the model, table and plot from the saved results (no new measurement)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # set for the mpiexec ranks
    args = ap.parse_args(argv)
    backend.use(args.backend)
    if args.worker:
        worker(args)
        return 0
    stem = "bench_parallel" + ("_quick" if args.quick else "")
    res = json.loads((RESULTS / f"{stem}.json").read_text()) if args.render else measure(args)
    analyse(res)
    md = table(res)
    print(md)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{stem}.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(RESULTS / f"{stem}.md", f"`{res['command']}`\n\n{md}\n")
    plot(res, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
