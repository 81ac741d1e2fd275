"""Training-step benchmark: minillm (numpy, numba backends) against PyTorch CPU.

One step = ``loss_and_grads`` (forward, cross-entropy, backward) + one AdamW
update, on random token ids (B, T) with T = the preset's block size. PyTorch
runs Hugging Face ``GPT2LMHeadModel`` (its default SDPA attention) built from
the *same* weights, with ``torch.optim.AdamW`` on the same hyper-parameters
and decay groups, ``torch.set_num_threads(2)``.

Method: every (backend, preset) case runs in its own fresh subprocess, so
thread pools, JIT caches and memory high-water marks do not leak between
cases. Each case does ``--warmup`` steps, then times ``--repeats`` steps
(``minillm.timing.median_time``); the table shows the median. Peak MB is the process's
resident-set high-water mark (``VmHWM``, Linux) during the timed steps minus its
resident set right after the imports, before the model is built: weights +
AdamW state + the step's peak working set (activations, caches, gradients,
temporaries), for minillm and PyTorch alike. The mark is reset after warm-up
(``/proc/self/clear_refs``), so JIT compilation does not count; the JSON says
if the reset was refused. Allocators that keep freed memory are counted at
what they hold, which is what the process really needs.

    .venv/bin/python bench/bench_train.py                      # tiny + small, B=8
    .venv/bin/python bench/bench_train.py --presets small --repeats 7 --batch-size 8

Prints one markdown table and writes ``bench/results/bench_train.json``.
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

from minillm import timing

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "bench_train.json"
BACKENDS = ("numpy", "numba", "torch")
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
    cfg = mm.GPTConfig.preset(preset)
    model = mm.GPT(cfg, seed=0)
    opt = optim.AdamW(model.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    x, y = batch(cfg, batch_size)

    def step():
        loss, grads = model.loss_and_grads(x, y)
        opt.step(model.params, grads)
        return loss
    out = measure(step, warmup, repeats, base_kb)
    out["device"] = "cpu"
    out["version"] = f"numpy {np.__version__}"
    if backend_name == "numba":
        import numba
        from backends import numba_layers
        threads = f"{numba.get_num_threads()} threads" if numba_layers.PARALLEL else "serial twins"
        out["version"] += f", numba {numba.__version__} ({threads})"
    return out


def torch_case(preset: str, batch_size: int, warmup: int, repeats: int, threads: int) -> dict:
    import torch
    import transformers
    import minillm as mm
    from minillm import checkpoint, optim
    torch.set_num_threads(threads)
    base_kb = _proc_kb("VmRSS")
    cfg = mm.GPTConfig.preset(preset)
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
    out["device"] = "cpu"
    out["version"] = (f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                      f"transformers {transformers.__version__}, attn={model.config._attn_implementation}")
    return out


# --- driver -------------------------------------------------------------------
def run_case(backend_name, preset, batch_size, warmup, repeats, threads) -> dict:
    """Run one case in a fresh interpreter; return its JSON result."""
    cmd = [sys.executable, __file__, "--worker", backend_name, "--presets", preset,
           "--batch-size", str(batch_size), "--warmup", str(warmup),
           "--repeats", str(repeats), "--threads", str(threads)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        proc = subprocess.run(cmd + ["--worker-out", str(out)], cwd=ROOT, text=True,
                              capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"case {backend_name}/{preset} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def worker(args) -> None:
    preset = args.presets[0]
    if args.worker == "torch":
        res = torch_case(preset, args.batch_size, args.warmup, args.repeats, args.threads)
    else:
        res = minillm_case(args.worker, preset, args.batch_size, args.warmup, args.repeats)
    Path(args.worker_out).write_text(json.dumps(res))


def table(rows: list[dict]) -> str:
    head = ("| backend | device | preset | B | T | median step ms | tokens/s | peak MB "
            "| step time / torch |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ratio = "" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.2f}x"
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"| {r['backend']} | {r['device']} | {r['preset']} | {r['B']} | {r['T']} "
                     f"| {r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} | {peak} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Training-step time: minillm vs PyTorch CPU.")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per case (>= 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (JIT, caches)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 5:
        raise ValueError(f"--repeats={args.repeats} must be >= 5 (medians over >= 5 runs)")
    if args.batch_size < 1 or args.warmup < 1:
        raise ValueError(f"--batch-size={args.batch_size} and --warmup={args.warmup} must be >= 1")
    if args.worker:
        return worker(args)

    import minillm as mm
    rows = []
    for preset in args.presets:
        cfg = mm.GPTConfig.preset(preset)
        results = {b: run_case(b, preset, args.batch_size, args.warmup, args.repeats, args.threads)
                   for b in args.backends}
        torch_s = results["torch"]["median_s"] if "torch" in results else None
        for b, res in results.items():
            tokens = args.batch_size * cfg.block_size
            rows.append({"backend": b, "device": res["device"], "preset": preset,
                         "B": args.batch_size, "T": cfg.block_size,
                         "median_ms": res["median_s"] * 1e3, "tokens_per_s": tokens / res["median_s"],
                         "peak_mb": res["peak_mb"], "peak_method": res["peak_method"],
                         "ratio_vs_torch": res["median_s"] / torch_s if torch_s else None,
                         "times_ms": [t * 1e3 for t in res["times_s"]], "version": res["version"],
                         "threads": res["threads"]})
            print(f"  {preset} {b}: {res['median_s'] * 1e3:.1f} ms ({res['version']})", file=sys.stderr)
    print(table(rows))
    print(f"\n{timing.machine_line()}; torch threads: {args.threads}")
    meta = {"bench": "train_step", "argv": sys.argv[1:], "python": platform.python_version(),
            "machine": platform.machine(), "cpu": timing.cpu_name(), "cpus": os.cpu_count(),
            "threads": timing.thread_settings(),
            "load_avg_at_end": os.getloadavg(),
            "step": "loss_and_grads + AdamW (lr=3e-4, betas=(0.9, 0.95), eps=1e-8, wd=0.1)",
            "peak_memory": "VmHWM during timed steps - VmRSS after imports, fresh subprocess per case"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
