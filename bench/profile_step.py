"""Profile one training step (loss_and_grads + AdamW if available) with cProfile.

    .venv/bin/python bench/profile_step.py --preset small --batch-size 8 --backend numpy

Prints the top functions by cumulative and by own time, then the time per
kernel group (what dominates a step).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats

import minillm as mm  # first: it sets OpenBLAS's thread timeout before NumPy loads OpenBLAS
import numpy as np

from minillm import backend, timing


def make_step(model, idx, targets):
    """A closure running one full step: loss_and_grads + optimizer update if present."""
    try:
        from minillm import optim
        opt = optim.AdamW(model.params, lr=1e-4)
    except Exception:  # optim.py not there yet
        opt = None

    def step():
        loss, grads = model.loss_and_grads(idx, targets)
        if opt is not None:
            opt.step(model.params, grads)
        return loss
    return step, opt is not None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    backend.use(args.backend)
    cfg = mm.GPTConfig.preset(args.preset)
    model = mm.GPT(cfg, seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (args.batch_size, cfg.block_size + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    step, has_opt = make_step(model, x, y)
    wall = timing.median_time(step, repeats=args.steps, warmup=1)["median_s"]  # warm-up: numba, BLAS
    print(f"backend={args.backend} preset={args.preset} B={args.batch_size} "
          f"T={cfg.block_size} optimizer={'AdamW' if has_opt else 'none'}: "
          f"{wall * 1e3:.1f} ms/step (median of {args.steps})")
    print(timing.machine_line())
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(args.top)
    print(group_table(stats, args.steps))


# Own time (tottime) of each profiled function goes to the first group whose
# words appear in its file:function name; the rest is "other".
GROUPS = (("linear (BLAS)", ("linear", "matmul")),
          ("attention", ("attention", "flash", "sdpa", "_fwd_", "_bwd_", "_row_dot", "qkv")),
          ("GELU", ("gelu",)),
          ("LayerNorm", ("layernorm", "_ln_")),
          ("cross-entropy", ("cross_entropy", "_ce_")),
          ("embedding", ("embedding", "'at' of")),
          ("optimizer", ("optim",)))


def group_table(stats, steps: int) -> str:
    """ms per step of each kernel group (own time), largest first, with its share."""
    totals: dict = {}
    for (path, _, func), (_, _, tottime, _, _) in stats.stats.items():
        name = f"{path}:{func}".lower()
        group = next((g for g, words in GROUPS if any(w in name for w in words)), "other")
        totals[group] = totals.get(group, 0.0) + tottime
    all_s = sum(totals.values())
    lines = ["| group | ms per step | share |", "|---|---|---|"]
    for g, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {g} | {t / steps * 1e3:.1f} | {t / all_s:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
