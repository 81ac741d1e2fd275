"""Vocab size vs sequence length vs model quality, at equal training time.

    .venv/bin/python bench/vocab_sweep.py                       # 256..4096, 30 s of training each
    .venv/bin/python bench/vocab_sweep.py --seconds 5 --vocabs 256,1024   # a quick look

For each vocab size: train a BPE tokenizer on the corpus (numba backend),
encode it (bytes/token = how much text one position of the context holds),
then train the same small GPT (only V differs) for the same wall-clock budget
and measure validation loss in **bits per byte** (loss per token / ln 2 /
bytes per token): the only quality number comparable across tokenizers.
Each model trains until ``--seconds`` of wall clock are spent (constant lr
after warmup, so no schedule depends on a step count) on ``--backend``.
Writes bench/results/vocab_sweep.json and bench/results/vocab_sweep.png.
Timings on a shared machine are noisy; the equal-time budget inherits that.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

import minillm as mm
from minillm import backend, data, timing
from minillm.optim import AdamW
from minillm.train import TrainConfig, evaluate, train_step

OUT = Path(__file__).parent / "results"


def one_vocab(text, vocab, cfg_kw, seconds, batch_size, seed, model_backend, lr=3e-3):
    with backend.use("numba"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        toks = []
        tok_s = timing.median_time(lambda: toks.append(mm.BPETokenizer.train(text, vocab)),
                                   repeats=1, warmup=0)["median_s"]          # one run: it is slow
        tok = toks[0]
        ids = np.asarray(tok.encode(text), dtype=np.int32)                 # (N,)
    train_ids, val_ids = data.split(ids)
    bytes_per_token = len(tok.decode_bytes(val_ids.tolist())) / len(val_ids)
    cfg = mm.GPTConfig(vocab_size=tok.vocab_size, **cfg_kw)
    model = mm.GPT(cfg, seed=seed)
    # constant lr after warmup (min_lr = lr): the step count is not known in advance
    tcfg = TrainConfig(steps=10**9, batch_size=batch_size, seed=seed, lr=lr, min_lr=lr)
    opt = AdamW(model.params, lr=lr, betas=tcfg.betas, eps=tcfg.eps, weight_decay=tcfg.weight_decay)
    steps, t0 = 0, time.perf_counter()
    with backend.use(model_backend):
        while time.perf_counter() - t0 < seconds:          # equal wall-clock budget
            train_step(model, opt, train_ids, tcfg, cfg.block_size, steps)
            steps += 1
        train_s = time.perf_counter() - t0
        val = evaluate(model, val_ids, batch_size, cfg.block_size, 20, seed)
    return dict(vocab=tok.vocab_size, tokenizer_train_s=tok_s, bytes_per_token=bytes_per_token,
                tokens=int(len(ids)), params=cfg.num_params(), steps=steps,
                train_s=train_s, val_loss_per_token=val,
                bits_per_byte=val / math.log(2) / bytes_per_token,
                context_bytes=cfg.block_size * bytes_per_token)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    v = [r["vocab"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(v, [r["bytes_per_token"] for r in rows], "o-")
    ax[0].set(xscale="log", xlabel="vocab size", ylabel="bytes per token",
              title="compression (longer tokens = more text per context)")
    ax[1].plot(v, [r["bits_per_byte"] for r in rows], "o-", color="C1")
    for r in rows:
        ax[1].annotate(f"{r['steps']} steps", (r["vocab"], r["bits_per_byte"]), fontsize=8,
                       textcoords="offset points", xytext=(4, 4))
    ax[1].set(xscale="log", xlabel="vocab size", ylabel="val bits per byte (lower is better)",
              title="quality at equal training time")
    from matplotlib.ticker import NullFormatter
    for a in ax:   # log2 axis labelled with the measured vocab sizes only
        a.set_xscale("log", base=2)
        a.set_xticks(v, [str(x) for x in v])
        a.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="256,512,1024,2048,4096")
    ap.add_argument("--seconds", type=float, default=30.0, help="training budget per model")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="numpy", help="backend that trains the models (default: numpy)")
    args = ap.parse_args(argv)
    text = data.load_corpus()
    cfg_kw = dict(block_size=64, n_layer=2, n_head=4, n_embd=128)
    rows = []
    print("| vocab | bytes/token | context bytes | params | steps | train s | val bits/byte |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        r = one_vocab(text, vocab, cfg_kw, args.seconds, args.batch_size, args.seed, args.backend)
        rows.append(r)
        print(f"| {r['vocab']} | {r['bytes_per_token']:.2f} | {r['context_bytes']:.0f} | {r['params']:,} "
              f"| {r['steps']} | {r['train_s']:.1f} | {r['bits_per_byte']:.3f} |", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / "vocab_sweep.json.tmp"
    tmp.write_text(json.dumps({"model": cfg_kw, "batch_size": args.batch_size,
                               "seconds": args.seconds, "cpu": timing.cpu_name(),
                               "threads": timing.thread_settings(), "rows": rows}, indent=1))
    print(f"\n{timing.machine_line()}; models trained on backend {args.backend}")
    os.replace(tmp, OUT / "vocab_sweep.json")
    plot(rows, OUT / "vocab_sweep.png")
    print(f"wrote {OUT / 'vocab_sweep.json'} and {OUT / 'vocab_sweep.png'}")


if __name__ == "__main__":
    main()
