"""Vocab size vs sequence length vs model quality, at equal training time.

    .venv/bin/python bench/vocab_sweep.py                       # 256..4096, 30 s of training each
    .venv/bin/python bench/vocab_sweep.py --seconds 5 --vocabs 256,1024   # a quick look

For each vocab size: train a BPE tokenizer on the corpus (numba backend),
encode it (bytes/token = how much text one position of the context holds),
then train the same small GPT (only V differs) for the same wall-clock budget
and measure validation loss in **bits per byte** (loss per token / ln 2 /
bytes per token): the only quality number comparable across tokenizers.
The step count comes from a timed pilot, so each model gets ~``--seconds``.
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
from minillm import backend, data
from minillm.train import TrainConfig, evaluate, train

OUT = Path(__file__).parent / "results"


def one_vocab(text, vocab, cfg_kw, seconds, batch_size, seed):
    with backend.use("numba"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        tok = mm.BPETokenizer.train(text, vocab)
        tok_s = time.perf_counter() - t0
        ids = np.asarray(tok.encode(text), dtype=np.int32)                 # (N,)
    train_ids, val_ids = data.split(ids)
    bytes_per_token = len(tok.decode_bytes(val_ids.tolist())) / len(val_ids)
    cfg = mm.GPTConfig(vocab_size=tok.vocab_size, **cfg_kw)
    pilot = mm.GPT(cfg, seed=seed)                                           # time a few steps
    res = train(pilot, train_ids, None, TrainConfig(steps=4, batch_size=batch_size, seed=seed),
                progress=False)
    step_s = float(np.median([1 / (r["tokens_per_s"] / (batch_size * cfg.block_size))
                              for r in res.history[1:]]))
    steps = max(10, int(seconds / step_s))
    model = mm.GPT(cfg, seed=seed)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, eval_interval=0)
    res = train(model, train_ids, None, tcfg, progress=False)
    val = evaluate(model, val_ids, batch_size, cfg.block_size, 20, seed)
    return dict(vocab=tok.vocab_size, tokenizer_train_s=tok_s, bytes_per_token=bytes_per_token,
                tokens=int(len(ids)), params=cfg.num_params(), steps=steps,
                train_s=res.wall_time_s, val_loss_per_token=val,
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
    args = ap.parse_args(argv)
    text = data.load_corpus()
    cfg_kw = dict(block_size=64, n_layer=2, n_head=4, n_embd=128)
    rows = []
    print("| vocab | bytes/token | context bytes | params | steps | train s | val bits/byte |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        r = one_vocab(text, vocab, cfg_kw, args.seconds, args.batch_size, args.seed)
        rows.append(r)
        print(f"| {r['vocab']} | {r['bytes_per_token']:.2f} | {r['context_bytes']:.0f} | {r['params']:,} "
              f"| {r['steps']} | {r['train_s']:.1f} | {r['bits_per_byte']:.3f} |", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / "vocab_sweep.json.tmp"
    tmp.write_text(json.dumps({"model": cfg_kw, "batch_size": args.batch_size,
                               "seconds": args.seconds, "rows": rows}, indent=1))
    os.replace(tmp, OUT / "vocab_sweep.json")
    plot(rows, OUT / "vocab_sweep.png")
    print(f"wrote {OUT / 'vocab_sweep.json'} and {OUT / 'vocab_sweep.png'}")


if __name__ == "__main__":
    main()
