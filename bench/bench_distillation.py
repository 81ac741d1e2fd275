"""Distillation: a student (L=2, C=128) learns from the tour's trained `small` model,
against the same student trained on labels alone.

    .venv/bin/python bench/bench_distillation.py                 # ~12 min on 2 busy cores
    .venv/bin/python bench/bench_distillation.py --quick         # 10 steps, 1 seed (a smoke test)

Teacher: the tour's baseline (``minillm.baseline.get_baseline(tour_settings())``; the
first call trains it, ~4 min, then it is cached). Student:
``distillation.student_config_for(small)`` = L=2 H=4 C=128, same tokenizer and block size.
Every run: ``--steps`` AdamW steps of B=8 x T=128 from the tour's training ids, lr 3e-3,
the batches of step s drawn from (seed, s) and the student initialised from ``seed``, so
KD and scratch runs of one seed see the same batches and start from the same weights.

Reported: validation loss / perplexity / bits per byte on 16 fixed batches of the tour's
validation ids (mean and spread over ``--seeds``) for scratch, forward KL and reverse KL
(T=2, alpha=0.5); a temperature sweep (1, 2, 4, 8; seed 0); the top-k teacher (k=32,
precomputed once); params, weight bytes, train step and decode tokens/s of teacher vs
student; the teacher's forward time per student step. Writes
bench/results/bench_distillation.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from minillm import backend, data, timing
from minillm import distillation as kd
from minillm.baseline import get_baseline, tour_settings
from minillm.train import TrainConfig, batch_rng, evaluate

RESULTS = Path(__file__).resolve().parent / "results"


def student_run(teacher, scfg, base, args, seed, **kd_args):
    """One student: returns its final validation numbers, learning curve and step speed."""
    tcfg = TrainConfig(steps=args.steps, batch_size=8, seq_len=128, lr=3e-3,
                       warmup_steps=max(1, args.steps // 15), eval_interval=max(1, args.steps // 6),
                       eval_batches=4, seed=seed)
    t0 = time.perf_counter()
    res = kd.distill_run(teacher, scfg, args.steps, seed=seed, train_ids=base.train_ids,
                         val_ids=base.val_ids, train_config=tcfg, **kd_args)
    wall = time.perf_counter() - t0
    loss = evaluate(res.model, base.val_ids, 8, 128, 16, seed=12345)
    return dict(seed=seed, **{k: v for k, v in kd_args.items()}, val_loss=loss,
                val_ppl=math.exp(loss), curve=[(e["step"], e["val_loss"]) for e in res.evals],
                step_tok_s=float(np.median([h["tokens_per_s"] for h in res.history[1:]])),
                wall_s=wall), res.model


def speeds(model, x, y, prompt, n_new, reps):
    """Train step (loss_and_grads) tokens/s, forward s, decode tok/s (KV cache and without)."""
    step = timing.median_time(lambda: model.loss_and_grads(x, y), reps)["median_s"]
    fwd = timing.median_time(lambda: model.forward(x), reps)["median_s"]
    out = {"train_step_tok_s": x.size / step, "forward_s": fwd}
    for cache in (True, False):
        s = timing.median_time(lambda: model.generate(prompt, n_new, temperature=0.0,
                                                      use_cache=cache), reps)["median_s"]
        out[f"decode_tok_s_{'cached' if cache else 'uncached'}"] = n_new / s
    return out


def run(args) -> dict:
    backend.use(args.backend)
    base = get_baseline(tour_settings(), data.load_corpus(), progress=False, log=print)
    teacher = base.model
    scfg = kd.student_config_for(teacher.config)
    val_bytes = len(base.tokenizer.decode(base.val_ids.tolist()).encode("utf-8"))
    bpt = val_bytes / len(base.val_ids)                   # bytes per token of the val text
    x, y = data.get_batch(base.train_ids, 8, 128, batch_rng(0, 0))
    prompt = np.asarray([base.tokenizer.encode("In the beginning")], dtype=np.int64)
    student0 = kd._make_student(teacher, scfg, 0)
    sizes = {"teacher": speeds(teacher, x, y, prompt, args.decode_tokens, args.repeats),
             "student": speeds(student0, x, y, prompt, args.decode_tokens, args.repeats)}
    for name, m in (("teacher", teacher), ("student", student0)):
        sizes[name].update(params=m.num_params(), weight_bytes=m.nbytes())
    hook = kd.DistillHook(teacher, 2.0, 0.5)
    sizes["kd_step_s"] = timing.median_time(lambda: hook.loss_and_grads(student0, x, y, 0),
                                            args.repeats)["median_s"]
    print("speeds done", flush=True)
    runs = []
    variants = [dict(alpha=0.0), dict(alpha=0.5, temperature=2.0, kind="forward"),
                dict(alpha=0.5, temperature=2.0, kind="reverse")]
    for seed in args.seeds:
        for v in variants:
            r, _ = student_run(teacher, scfg, base, args, seed, **v)
            runs.append(r)
            print(f"  seed {seed} {v}: val ppl {r['val_ppl']:.1f} ({r['wall_s']:.0f} s)", flush=True)
    extra = [dict(alpha=0.5, temperature=T, kind="forward") for T in args.temperatures if T != 2.0]
    extra.append(dict(alpha=0.5, temperature=2.0, kind="forward", top_k=args.top_k))
    for v in extra:
        r, _ = student_run(teacher, scfg, base, args, args.seeds[0], **v)
        runs.append(r)
        print(f"  seed {args.seeds[0]} {v}: val ppl {r['val_ppl']:.1f} ({r['wall_s']:.0f} s)", flush=True)
    t_loss = evaluate(teacher, base.val_ids, 8, 128, 16, seed=12345)
    return dict(teacher=dict(config=teacher.config.to_dict(), val_loss=t_loss,
                             val_ppl=math.exp(t_loss)),
                student_config=scfg.to_dict(), bytes_per_token=bpt, sizes=sizes, runs=runs,
                steps=args.steps, batch="B=8 x T=128", backend=args.backend,
                topk_bytes=dict(k=args.top_k, per_step_topk=8 * 128 * args.top_k * (4 + 4),
                                per_step_dense=8 * 128 * teacher.config.vocab_size * 4),
                machine=dict(platform=platform.platform(), cpu=timing.cpu_name(),
                             cpus=os.cpu_count(), threads=timing.thread_settings(),
                             line=timing.machine_line()),
                command="bench/bench_distillation.py " + " ".join(args.argv))


def label(r) -> str:
    if r["alpha"] == 0:
        return "scratch (labels only)"
    top = f", top-{r['top_k']}" if r.get("top_k") else ""
    return f"KD {r['kind']} T={r['temperature']:g} alpha={r['alpha']:g}{top}"


def table(res: dict) -> str:
    bpt = res["bytes_per_token"]
    bpb = lambda loss: loss / math.log(2) / bpt                      # noqa: E731
    t_bpb = bpb(res["teacher"]["val_loss"])
    groups = {}
    for r in res["runs"]:
        groups.setdefault(label(r), []).append(r)
    scratch = np.mean([r["val_ppl"] for r in groups["scratch (labels only)"]])
    lines = [f"Teacher: val ppl {res['teacher']['val_ppl']:.1f}, {t_bpb:.3f} bits/byte "
             f"({bpt:.2f} bytes/token). Students: {res['steps']} steps of {res['batch']}, "
             f"backend {res['backend']}; {res['machine']['line']}.", "",
             "| student | seeds | val ppl mean | spread (min-max) | vs scratch | bits/byte | "
             "teacher quality kept | step tok/s |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        p = [r["val_ppl"] for r in rs]
        b = bpb(np.mean([r["val_loss"] for r in rs]))
        lines.append(f"| {name} | {','.join(str(r['seed']) for r in rs)} | {np.mean(p):.1f} | "
                     f"{min(p):.1f}-{max(p):.1f} | {np.mean(p) / scratch:.3f}x | {b:.3f} | "
                     f"{t_bpb / b:.1%} | {np.median([r['step_tok_s'] for r in rs]):,.0f} |")
    s = res["sizes"]
    lines += ["", "| model | params | weight bytes | train step tok/s | forward s (B=8,T=128) | "
              "decode tok/s (KV cache) | decode tok/s (no cache) |", "|---|---|---|---|---|---|---|"]
    for name in ("teacher", "student"):
        m = s[name]
        lines.append(f"| {name} | {m['params']:,} | {m['weight_bytes'] / 2**20:.2f} MiB | "
                     f"{m['train_step_tok_s']:,.0f} | {m['forward_s']:.3f} | "
                     f"{m['decode_tok_s_cached']:,.0f} | {m['decode_tok_s_uncached']:,.0f} |")
    t, st = s["teacher"], s["student"]
    tk = res["topk_bytes"]
    lines += ["", f"Student / teacher: {t['params'] / st['params']:.1f}x fewer params, decode "
              f"{st['decode_tok_s_cached'] / t['decode_tok_s_cached']:.2f}x faster (KV cache), "
              f"{st['decode_tok_s_uncached'] / t['decode_tok_s_uncached']:.2f}x (no cache); train "
              f"step {st['train_step_tok_s'] / t['train_step_tok_s']:.2f}x.",
              f"Teacher cost: a KD step takes {s['kd_step_s']:.3f} s, of which the teacher's "
              f"forward {t['forward_s']:.3f} s; a plain student step "
              f"{8 * 128 / st['train_step_tok_s']:.3f} s. Top-{tk['k']} table: "
              f"{tk['per_step_topk'] / 2**20:.2f} MiB per step (values + ids) vs "
              f"{tk['per_step_dense'] / 2**20:.1f} MiB of dense logits "
              f"({tk['per_step_dense'] / tk['per_step_topk']:.0f}x less)."]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res["runs"]:
        if r["seed"] != res["runs"][0]["seed"] or r.get("top_k") or r.get("temperature", 2) != 2:
            continue
        steps, loss = zip(*r["curve"])
        ax.plot(steps, np.exp(loss), marker="o", label=label(r))
    ax.axhline(res["teacher"]["val_ppl"], color="gray", ls="--", label="teacher")
    ax.set_xlabel("student step")
    ax.set_ylabel("val perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("student L=2 C=128: KD vs labels only (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None) -> None:
    import sys
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="numba" if backend.available()["numba"][0] else "numpy")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="10 steps, one seed, T in (2, 8)")
    p.add_argument("--out", default=str(RESULTS), help="directory for the results")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.steps, args.seeds, args.temperatures, args.repeats = 10, [0], [2.0, 8.0], 1
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(res)
    print(md)
    (out / "bench_distillation.md").write_text(md + "\n")
    (out / "bench_distillation.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "bench_distillation.png")


if __name__ == "__main__":
    main()
