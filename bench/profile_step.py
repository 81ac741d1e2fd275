"""Profile one training step (loss_and_grads + AdamW if available) with cProfile.

    .venv/bin/python bench/profile_step.py --preset small --batch-size 8 --backend numpy

Prints the top functions by cumulative and by own time, then the time per
kernel group (what dominates a step).

``--wall``: instead of cProfile, the wall-clock time of every kernel call
(each ``@kernel`` entry point, twin or reference), per step: right on several
threads too, where cProfile sees only the main thread (the attention's head
slabs run on a second one) and its overhead shifts the balance.

    OPENBLAS_NUM_THREADS=2 NUMBA_NUM_THREADS=2 python bench/profile_step.py --backend numba --wall
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

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
    ap.add_argument("--wall", action="store_true", help="wall time per kernel instead of cProfile")
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
    if args.wall:
        print(wall_table(step, args.steps))
        return
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


def wall_table(step, steps: int) -> str:
    """Run ``steps`` steps with every kernel entry point timed -> ms per step per kernel.

    Patches each minillm module attribute that is a dispatching kernel (it has
    ``kernel_name``) with a timing wrapper for the duration, then restores it.
    A kernel called inside another counts as the outer one's time; the rest of
    the step (Python, copies, NumPy glue) is the last row.
    """
    spent: dict = {}
    depth: list = []          # the kernel being timed (outermost only: no double counting)
    patched = []
    for name, module in list(sys.modules.items()):
        if not (name == "minillm" or name.startswith("minillm.")):
            continue
        for attr, fn in list(vars(module).items()):
            kname = getattr(fn, "kernel_name", None)
            if kname is None:
                continue

            def timed(*a, _fn=fn, _k=kname, **kw):
                if depth:                                   # inside another kernel: its time
                    return _fn(*a, **kw)
                depth.append(_k)
                t = time.perf_counter()
                try:
                    return _fn(*a, **kw)
                finally:
                    spent[_k] = spent.get(_k, 0.0) + time.perf_counter() - t
                    depth.pop()
            patched.append((module, attr, fn))
            setattr(module, attr, timed)
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        total = time.perf_counter() - t0
    finally:
        for module, attr, fn in patched:
            setattr(module, attr, fn)
    lines = ["| kernel | ms per step | share |", "|---|---|---|"]
    for k, t in sorted(spent.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {t / steps * 1e3:.1f} | {t / total:.0%} |")
    rest = total - sum(spent.values())
    lines.append(f"| (the rest: Python, copies, glue) | {rest / steps * 1e3:.1f} | {rest / total:.0%} |")
    lines.append(f"| **step** | {total / steps * 1e3:.1f} | 100% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
