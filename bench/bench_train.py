"""Training-step benchmark (issue 15): minillm's numba backend against PyTorch CPU,
plus the cold-start cost of every compiled area.

One step = ``loss_and_grads`` (forward, cross-entropy, backward) + one AdamW
update, on random token ids (B, T) with T = the preset's block size. PyTorch
runs Hugging Face ``GPT2LMHeadModel`` (its default SDPA attention) built from
the *same* weights, with ``torch.optim.AdamW`` on the same hyper-parameters
and decay groups. Presets: ``tiny``, ``small`` and ``wide`` (C=768, L=4, H=12,
T=256, V=4096: the issue's wide model; B=4 for it, to keep the run short).

Method: every (backend, preset, threads) case runs in its own fresh
subprocess, so thread pools, JIT caches and memory high-water marks do not
leak between cases. Each thread setting (``--threads 1 2``) sets
OPENBLAS/OMP/NUMBA_NUM_THREADS and ``torch.set_num_threads`` alike. The cases
of one preset and thread setting run interleaved, ``--rounds`` times
(numba, torch, torch, numba, ...), so machine noise hits both sides; a case
does ``--warmup`` steps then times ``--repeats`` steps, and the table shows
the median over all rounds' timed steps (``minillm.timing.median_time``).
Peak MB is the process's resident-set high-water mark (``VmHWM``, Linux)
during the timed steps minus its resident set right after the imports: weights
+ AdamW state + the step's peak working set, for minillm and PyTorch alike
(the largest over rounds). The mark is reset after warm-up
(``/proc/self/clear_refs``), so JIT compilation does not count.

Cold start (``--cold``): each compiled area's first call in a fresh process
with ``NUMBA_CACHE_DIR`` pointed at an empty directory (a fresh install), then
again in a fresh process on the now filled cache (every later run), and the
second call in-process (steady state): tokenizer = train a BPE tokenizer
(vocab 512) on 200 kB of text + encode it; layers = the first training step
of ``tiny``; decode = the first ``generate`` (KV cache, 32 tokens) of ``tiny``
after that step. Numba's compile seconds per area come from its
"numba:compile" events (``backends.numba_backend.COMPILE_SECONDS``).

Thread split (``--split``): instead of the comparison, the numba backend alone
with every pair (OpenBLAS threads, Numba threads) from ``--threads``, same
interleaving: OpenBLAS runs the linear layers' products, Numba's setting sizes
the attention twin's head split (``backends/numba_threads.py``: on when
OpenBLAS's idle workers sleep soon, which ``import minillm`` arranges; this
script imports it before NumPy) and the layer twins' loops when
``numba_layers.PARALLEL`` is on. Written
to ``bench/results/bench_train_split.{json,md}`` unless ``--out`` says otherwise.
``--blas-timeouts 28 20`` runs every pair at each OPENBLAS_THREAD_TIMEOUT (28:
OpenBLAS's default spin, under which the heads stay on one thread; 20: what
``import minillm`` sets), and ``--with-torch`` adds torch at each thread count,
all interleaved: the before / after of the head split in one table.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/bench_train.py
    python bench/bench_train.py --split --presets small --no-cold
    python bench/bench_train.py --split --presets small --no-cold --threads 2 --blas-timeouts 28 20 --with-torch --rounds 5

Prints the tables and writes ``bench/results/bench_train.{json,md,png}``.
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

import minillm  # noqa: F401  (first: it sets OpenBLAS's thread timeout before NumPy loads OpenBLAS)
import numpy as np

from minillm import files, timing

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "bench_train.json"
BACKENDS = ("numpy", "numba", "torch")
WIDE = dict(vocab_size=4096, block_size=256, n_layer=4, n_head=12, n_embd=768)   # the wide model
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")
LR, BETAS, EPS, WD = 3e-4, (0.9, 0.95), 1e-8, 0.1


# --- memory: resident set, from /proc (Linux) --------------------------------
def _proc_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(step, warmup: int, repeats: int, base_kb: int | None) -> dict:
    """Warm up, then time ``repeats`` calls of ``step``; peak RSS over ``base_kb``."""
    for _ in range(warmup):        # here, not in median_time: the peak is reset in between
        step()
    reset = _reset_peak()          # forget JIT compilation and first-touch peaks
    timed = timing.median_time(step, repeats=repeats, warmup=0)
    peak = _proc_kb("VmHWM")
    peak_mb = (peak - base_kb) / 1024 if peak is not None and base_kb is not None else None
    method = "VmHWM(timed steps) - VmRSS(after imports)" + ("" if reset else ", HWM not reset")
    return {"times_s": timed["times_s"], "median_s": timed["median_s"], "min_s": timed["min_s"],
            "peak_mb": peak_mb, "peak_method": method, "threads": timing.thread_settings()}


# --- the two sides --------------------------------------------------------------
def config(preset: str):
    import minillm as mm
    return mm.GPTConfig(**WIDE) if preset == "wide" else mm.GPTConfig.preset(preset)


def batch(cfg, batch_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (batch_size, cfg.block_size + 1))   # (B, T + 1)
    return ids[:, :-1].astype(np.int64), ids[:, 1:].astype(np.int64)         # (B, T) each


def minillm_case(backend_name: str, preset: str, batch_size: int, warmup: int, repeats: int) -> dict:
    import minillm as mm
    from minillm import backend, optim
    backend.use(backend_name)
    if backend_name == "numba":
        import backends.numba_backend  # noqa: F401  (numba and its twins: part of the baseline)
    base_kb = _proc_kb("VmRSS")
    cfg = config(preset)
    model = mm.GPT(cfg, seed=0)
    opt = optim.AdamW(model.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    x, y = batch(cfg, batch_size)

    def step():
        loss, grads = model.loss_and_grads(x, y)
        opt.step(model.params, grads)
        return loss
    out = measure(step, warmup, repeats, base_kb)
    out["version"] = f"numpy {np.__version__}"
    if backend_name == "numba":
        import numba
        from backends import numba_attention, numba_layers
        layers = f"{numba.get_num_threads()} threads" if numba_layers.PARALLEL else "serial"
        B, T, H = batch_size, cfg.block_size, cfg.n_head
        heads = len(numba_attention._slabs(B, H, B * H * T * T * (cfg.n_embd // H)))
        out["version"] += (f", numba {numba.__version__} (attention heads on {heads} thread(s), "
                           f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}, "
                           f"other twins {layers})")
    return out


def torch_case(preset: str, batch_size: int, warmup: int, repeats: int, threads: int) -> dict:
    import torch
    import transformers
    import minillm as mm
    from minillm import checkpoint, optim
    torch.set_num_threads(threads)
    base_kb = _proc_kb("VmRSS")
    cfg = config(preset)
    params = mm.GPT(cfg, seed=0).params                 # the same weights minillm starts from
    hf_cfg = transformers.GPT2Config(**checkpoint.hf_config_json(cfg))
    hf_cfg.resid_pdrop = hf_cfg.embd_pdrop = hf_cfg.attn_pdrop = 0.0
    model = transformers.GPT2LMHeadModel(hf_cfg).train()
    state = {"transformer." + k: torch.from_numpy(v.copy()) for k, v in params.items()}
    missing, _ = model.load_state_dict(state, strict=False)
    if set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights not loaded into torch: {missing}")
    named = {n[len("transformer."):]: p for n, p in model.named_parameters()}
    decay = [p for n, p in named.items() if optim.decays(n, p.detach().numpy())]
    rest = [p for n, p in named.items() if not optim.decays(n, p.detach().numpy())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                             {"params": rest, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
    x, y = (torch.from_numpy(a) for a in batch(cfg, batch_size))

    def step():
        logits = model(x).logits                                          # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    out = measure(step, warmup, repeats, base_kb)
    out["version"] = (f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                      f"transformers {transformers.__version__}, attn={model.config._attn_implementation}")
    return out


# --- cold start: each compiled area's first call, on an empty and on a filled cache --------
CORPUS = ROOT / "minillm" / "data" / "kjv.txt"


def area_case(area: str) -> dict:
    """First and second call of one area's work in this (fresh) process, numba backend."""
    import time
    t0 = time.perf_counter()
    import minillm as mm
    from minillm import backend, optim
    backend.use("numba")
    from backends import numba_backend
    imports_s = time.perf_counter() - t0
    cfg = mm.GPTConfig.preset("tiny")
    model = mm.GPT(cfg, seed=0)
    x, y = batch(cfg, 8)
    opt = optim.AdamW(model.params, lr=LR)

    def step():
        opt.step(model.params, model.loss_and_grads(x, y)[1])

    if area == "tokenizer":
        text = CORPUS.read_text(encoding="utf-8")[:200_000]
        work = lambda: mm.BPETokenizer.train(text, 512).encode(text)         # noqa: E731
    elif area == "layers":
        work = step
    elif area == "decode":
        step()                                      # the layers first: a user trains, then generates
        numba_backend.COMPILE_SECONDS.clear()
        work = lambda: model.generate(x[:1, :8], max_new_tokens=32, temperature=0.0)  # noqa: E731
    else:
        raise ValueError(f"area={area!r} must be tokenizer, layers or decode")
    times = []
    for _ in range(2):
        t = time.perf_counter()
        work()
        times.append(time.perf_counter() - t)
    return {"imports_s": imports_s, "first_s": times[0], "second_s": times[1],
            "compile_s": dict(numba_backend.COMPILE_SECONDS)}


def cold_start() -> list[dict]:
    """Each area in fresh processes sharing one new NUMBA_CACHE_DIR: empty, then filled."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for area in ("tokenizer", "layers", "decode"):
            row = {"area": area}
            for state in ("cold", "warm"):
                res, stderr = run_worker(["--area", area], {"NUMBA_CACHE_DIR": cache})
                row[state] = res
                row[state]["says_compiling"] = "(first run only)..." in stderr
            rows.append(row)
            print(f"  cold start {area}: {row['cold']['first_s']:.2f} s cold, "
                  f"{row['warm']['first_s']:.2f} s warm, {row['warm']['second_s']:.3f} s steady",
                  file=sys.stderr)
    return rows


# --- driver -------------------------------------------------------------------
def run_worker(args: list, env: dict) -> tuple[dict, str]:
    """Run this script as a worker in a fresh interpreter -> (its JSON result, its stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        proc = subprocess.run([sys.executable, __file__, *args, "--worker-out", str(out)],
                              cwd=ROOT, text=True, capture_output=True, env={**os.environ, **env})
        if proc.returncode != 0:
            raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text()), proc.stderr


def run_case(backend_name, preset, batch_size, warmup, repeats, threads, numba_threads=None,
             blas_timeout=None) -> dict:
    """One case in a fresh interpreter with every thread pool sized ``threads`` (Numba's
    ``numba_threads`` when given, and OPENBLAS_THREAD_TIMEOUT=``blas_timeout``: the
    thread-split measurement)."""
    env = {var: str(threads) for var in THREAD_ENV}
    if numba_threads is not None:
        env["NUMBA_NUM_THREADS"] = str(numba_threads)
    if blas_timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = str(blas_timeout)
    res, _ = run_worker(["--worker", backend_name, "--presets", preset, "--batch-size", str(batch_size),
                         "--warmup", str(warmup), "--repeats", str(repeats), "--threads", str(threads)],
                        env)
    return res


def worker(args) -> None:
    if args.area:
        res = area_case(args.area)
    elif args.worker == "torch":
        res = torch_case(args.presets[0], args.batch_size, args.warmup, args.repeats, args.threads[0])
    else:
        res = minillm_case(args.worker, args.presets[0], args.batch_size, args.warmup, args.repeats)
    Path(args.worker_out).write_text(json.dumps(res))


def interleaved(backends, preset, batch_size, warmup, repeats, threads, rounds) -> dict:
    """Each backend ``rounds`` times, the order reversed every round; timed steps pooled."""
    runs: dict = {b: [] for b in backends}
    for r in range(rounds):
        for b in (backends if r % 2 == 0 else backends[::-1]):
            runs[b].append(run_case(b, preset, batch_size, warmup, repeats, threads))
    out = {}
    for b, results in runs.items():
        times = [t for res in results for t in res["times_s"]]
        peaks = [res["peak_mb"] for res in results if res["peak_mb"] is not None]
        out[b] = {"median_s": float(np.median(times)), "times_s": times,
                  "peak_mb": max(peaks) if peaks else None, "peak_method": results[0]["peak_method"],
                  "version": results[0]["version"], "threads": results[0]["threads"]}
    return out


def thread_split(preset, batch_size, warmup, repeats, threads, rounds, timeouts=(None,),
                 torch=False) -> list[dict]:
    """numba backend, every (OpenBLAS, Numba) thread pair for every OpenBLAS idle timeout
    (None: inherited), plus torch at each thread count if ``torch``; interleaved ``rounds``
    times."""
    cases = [("numba", b, n, to) for to in timeouts for b in threads for n in threads]
    cases += [("torch", t, t, None) for t in threads] if torch else []
    runs: dict = {case: [] for case in cases}
    for r in range(rounds):
        for backend_name, blas, nb, to in (cases if r % 2 == 0 else cases[::-1]):
            runs[backend_name, blas, nb, to].append(
                run_case(backend_name, preset, batch_size, warmup, repeats, blas, nb, to))
    rows = []
    for (backend_name, blas, nb, to), results in runs.items():
        times = [t for res in results for t in res["times_s"]]
        to = to if to is not None else os.environ.get("OPENBLAS_THREAD_TIMEOUT")
        rows.append({"preset": preset, "B": batch_size, "backend": backend_name, "blas_threads": blas,
                     "numba_threads": nb if backend_name == "numba" else None,
                     "blas_timeout": to if backend_name == "numba" else None,
                     "median_ms": float(np.median(times)) * 1e3, "times_ms": [t * 1e3 for t in times],
                     "round_medians_ms": [res["median_s"] * 1e3 for res in results],
                     "version": results[0]["version"], "threads": results[0]["threads"]})
        print(f"  split {preset} {backend_name} openblas {blas} numba {nb} timeout {to}: "
              f"{rows[-1]['median_ms']:.1f} ms", file=sys.stderr)
    base = rows[0]["median_ms"]
    for row in rows:
        row["vs_first"] = row["median_ms"] / base
    return rows


def split_table(rows: list[dict], cpu: str) -> str:
    lines = [f"| preset | B | backend | OpenBLAS threads | Numba threads | OPENBLAS_THREAD_TIMEOUT "
             f"| median step ms ({cpu}) | per-round medians | vs first row |", "|" + "---|" * 9]
    for r in rows:
        rounds = ", ".join(f"{m:.0f}" for m in r.get("round_medians_ms", []))
        lines.append(f"| {r['preset']} | {r['B']} | {r.get('backend', 'numba')} | {r['blas_threads']} "
                     f"| {r['numba_threads'] or ''} | {r.get('blas_timeout') or ''} | {r['median_ms']:.1f} "
                     f"| {rounds} | {r['vs_first']:.2f}x |")
    return "\n".join(lines)


def table(rows: list[dict], cpu: str) -> str:
    head = (f"| backend | preset | B | T | threads | median step ms ({cpu}) | tokens/s | peak MB "
            "| step time / torch | peak MB / torch |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        ratio = "" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.2f}x"
        mem = "" if r["peak_vs_torch"] is None else f"{r['peak_vs_torch']:.2f}x"
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"| {r['backend']} | {r['preset']} | {r['B']} | {r['T']} | {r['n_threads']} "
                     f"| {r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} | {peak} | {ratio} | {mem} |")
    return "\n".join(lines)


def cold_table(rows: list[dict], cpu: str) -> str:
    lines = [f"| area ({cpu}) | first call, empty cache s | Numba compile s | first call, filled cache s "
             "| second call s | says \"compiling\" (empty / filled) |", "|" + "---|" * 6]
    for r in rows:
        c, w = r["cold"], r["warm"]
        compiled = ", ".join(f"{a} {s:.1f}" for a, s in sorted(c["compile_s"].items())) or "none"
        lines.append(f"| {r['area']} | {c['first_s']:.2f} | {compiled} | {w['first_s']:.2f} "
                     f"| {w['second_s']:.3f} | {'yes' if c['says_compiling'] else 'no'} / "
                     f"{'yes' if w['says_compiling'] else 'no'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = [r for r in rows if r["backend"] != "torch" and r["ratio_vs_torch"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['backend']} {r['preset']}\n{r['n_threads']} thr" for r in cases]
    ax.bar(range(len(cases)), [r["ratio_vs_torch"] for r in cases],
           color=["tab:blue" if r["n_threads"] == 1 else "tab:orange" for r in cases])
    ax.axhline(1.0, color="k", lw=1, ls="--", label="PyTorch")
    ax.set_xticks(range(len(cases)), labels, fontsize=7)
    ax.set_ylabel("step time / PyTorch's")
    ax.set_title("Training step (forward + backward + AdamW), same run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Training-step time: minillm vs PyTorch CPU.")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "wide"],
                    choices=["tiny", "small", "wide"])
    ap.add_argument("--backends", nargs="+", default=["numba", "torch"], choices=BACKENDS)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per case and round (>= 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (JIT, caches)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved runs of each case")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--wide-batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread settings: every pool (BLAS, OpenMP, Numba, torch) gets this many")
    ap.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-start part")
    ap.add_argument("--split", action="store_true",
                    help="numba only: every (OpenBLAS, Numba) thread pair from --threads")
    ap.add_argument("--blas-timeouts", type=int, nargs="+", default=None,
                    help="with --split: each pair at each OPENBLAS_THREAD_TIMEOUT (log2 cycles; "
                         "28 is OpenBLAS's default, 20 what minillm sets)")
    ap.add_argument("--with-torch", action="store_true", help="with --split: torch at each thread count too")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results file (default {RESULTS.name}, or bench_train_split.json with --split)")
    ap.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--area", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 5:
        raise ValueError(f"--repeats={args.repeats} must be >= 5 (medians over >= 5 runs)")
    if min(args.batch_size, args.wide_batch_size, args.warmup, args.rounds, *args.threads) < 1:
        raise ValueError("--batch-size, --wide-batch-size, --warmup, --rounds and --threads must be >= 1")
    if args.worker or args.area:
        return worker(args)
    if args.out is None:
        args.out = RESULTS.with_name("bench_train_split.json") if args.split else RESULTS
    if args.split:
        return split_main(args)

    cpu = timing.cpu_name()
    load_start = os.getloadavg()
    rows = []
    for preset in args.presets:
        cfg = config(preset)
        B = args.wide_batch_size if preset == "wide" else args.batch_size
        for n in args.threads:
            results = interleaved(args.backends, preset, B, args.warmup, args.repeats, n, args.rounds)
            torch_res = results.get("torch")
            for b, res in results.items():
                rows.append({"backend": b, "preset": preset, "B": B, "T": cfg.block_size,
                             "n_threads": n, "median_ms": res["median_s"] * 1e3,
                             "tokens_per_s": B * cfg.block_size / res["median_s"],
                             "peak_mb": res["peak_mb"], "peak_method": res["peak_method"],
                             "ratio_vs_torch": res["median_s"] / torch_res["median_s"] if torch_res else None,
                             "peak_vs_torch": (res["peak_mb"] / torch_res["peak_mb"]
                                               if torch_res and res["peak_mb"] and torch_res["peak_mb"] else None),
                             "times_ms": [t * 1e3 for t in res["times_s"]], "version": res["version"],
                             "threads": res["threads"]})
                print(f"  {preset} {n} thr {b}: {res['median_s'] * 1e3:.1f} ms, "
                      f"{res['peak_mb'] or 0:.0f} MB ({res['version']})", file=sys.stderr)
    cold = cold_start() if args.cold else []
    load_end = os.getloadavg()
    load = (f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end "
            f"(1-minute; {os.cpu_count()} CPUs, shared machine)")
    text = table(rows, cpu) + "\n\n" + (cold_table(cold, cpu) + "\n\n" if cold else "") + load
    print(text)
    meta = {"bench": "train_step", "argv": sys.argv[1:], "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
            "threads": timing.thread_settings(), "load_avg_start": load_start, "load_avg_end": load_end,
            "step": "loss_and_grads + AdamW (lr=3e-4, betas=(0.9, 0.95), eps=1e-8, wd=0.1)",
            "peak_memory": "VmHWM during timed steps - VmRSS after imports, fresh subprocess per case",
            "rounds": args.rounds, "repeats": args.repeats, "warmup": args.warmup}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows, "cold_start": cold}, indent=2))
    files.atomic_write_text(args.out.with_suffix(".md"), text + "\n")
    if rows:
        plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.{json,md,png}')}", file=sys.stderr)


def split_main(args) -> None:
    cpu = timing.cpu_name()
    load_start = os.getloadavg()
    rows = []
    for preset in args.presets:
        B = args.wide_batch_size if preset == "wide" else args.batch_size
        rows += thread_split(preset, B, args.warmup, args.repeats, args.threads, args.rounds,
                             tuple(args.blas_timeouts or (None,)), args.with_torch)
    load_end = os.getloadavg()
    text = (split_table(rows, cpu) + f"\n\nload average {load_start[0]:.2f} at the start, {load_end[0]:.2f} "
            f"at the end (1-minute; {os.cpu_count()} CPUs, shared machine)")
    print(text)
    meta = {"bench": "train_step_thread_split", "argv": sys.argv[1:], "cpu": cpu, "cpus": os.cpu_count(),
            "load_avg_start": load_start, "load_avg_end": load_end, "rounds": args.rounds,
            "repeats": args.repeats, "warmup": args.warmup}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2))
    files.atomic_write_text(args.out.with_suffix(".md"), text + "\n")
    print(f"wrote {args.out.with_suffix('.{json,md}')}", file=sys.stderr)


if __name__ == "__main__":
    main()
