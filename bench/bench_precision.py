"""Mixed precision: what fp16 / bf16 cost and buy on our model (quality, failures, memory, speed).

    flock /tmp/minillm-bench.lock env OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \\
        .venv/bin/python bench/bench_precision.py                # ~10 min on 2 cores
    .venv/bin/python bench/bench_precision.py --quick            # ~1 min: small sizes

Sections (one run, one JSON + markdown table + PNG in bench/results/):
1. quality  - `tiny` and `small` trained for the same steps and batches in fp32,
              fp16 + loss scaler and bf16: final validation loss and its ratio to fp32;
2. failures - fp16 without loss scaling (share of gradient entries that flush to
              zero, log2|g| histogram against fp16's range), fp16 without master
              weights (weights rounded to fp16 after every update: small updates
              vanish), an injected overflow (skipped, scale halved, weights untouched);
3. memory   - weights, gradients, optimizer state and activations per precision,
              measured from the arrays, beside the formula;
4. speed    - batch-1 greedy decode with the KV cache on a memory-bound random model
              (L=8, C=1024, V=4096: 105 M parameters), fp32 vs fp16 vs bf16 weights
              (numba: the half twin streams 2-byte weights), GB/s against this
              machine's streaming bandwidth; and the training step time per precision
              (emulated on the CPU: half compute costs conversions here).
`--backend cupy` runs the same on a GPU (CuPy has fp16 matmuls); clocks are read
after synchronizing the device (minillm.timing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minillm as mm  # noqa: E402
from minillm import backend, data, precision, timing  # noqa: E402
from minillm.train import TrainConfig, TrainHook  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PRECISIONS = ("fp32", "fp16", "bf16")


# --- 1. quality --------------------------------------------------------------------------
def corpus_ids(vocab: int, chars: int):
    """Byte ids (vocab 256) or a BPE of the first 1M characters (vocab > 256), split 90/10."""
    text = data.load_corpus()[:chars]
    tok = mm.BPETokenizer() if vocab == 256 else mm.BPETokenizer.train(text[:1_000_000], vocab)
    return data.split(data.encode_corpus(tok, text), 0.1)


def quality(preset: str, steps: int, backend_name: str, chars: int) -> dict:
    cfg = mm.GPTConfig.preset(preset)
    tr, va = corpus_ids(cfg.vocab_size, chars)
    out = {}
    for prec in PRECISIONS:
        tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=min(cfg.block_size, 128), lr=3e-3,
                           warmup_steps=max(1, steps // 20), eval_interval=max(1, steps // 5),
                           eval_batches=4, precision=prec, seed=0)
        with backend.use(backend_name):
            res = mm.train(mm.GPT(cfg, seed=0), tr, va, tcfg, progress=False)
        out[prec] = {"val_loss": res.val_loss, "curve": [(e["step"], e["val_loss"]) for e in res.evals],
                     "train_loss": res.losses, "step_s": 1 / res.tokens_per_s * tcfg.batch_size * tcfg.seq_len,
                     "skipped": sum(h.get("skipped", False) for h in res.history)}
        print(f"  quality {preset} {prec}: val loss {res.val_loss:.4f}", flush=True)
    return out


# --- 2. the failures it prevents -------------------------------------------------------------
class NoMaster(TrainHook):
    """fp16 weights without fp32 masters: after each update every weight is rounded to fp16."""
    name = "no_master"

    def after_update(self, model, step, record):
        for p in model.params.values():
            p[...] = p.astype(np.float16).astype(p.dtype)


def failures(steps: int) -> dict:
    cfg = mm.GPTConfig.preset("tiny")
    tr, _ = corpus_ids(256, 300_000)
    model = mm.GPT(cfg, seed=0)
    x, y = data.get_batch(tr, 8, 64, np.random.default_rng(0))
    _, grads = model.loss_and_grads(x, y)
    hist, edges = precision.log2_histogram(grads)
    out = {"flush_share_unscaled": precision.fp16_flush_share(grads),
           "flush_share_scaled_2^16": precision.fp16_flush_share({k: g * 2.0 ** 16 for k, g in grads.items()}),
           "log2_hist": hist.tolist(), "log2_edges": edges.tolist()}
    # master weights: a small learning rate, updates mostly below half an fp16 ulp
    tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=64, lr=1e-4, warmup_steps=1,
                       eval_interval=0, grad_clip=1.0, seed=0)
    with_master = mm.train(mm.GPT(cfg, seed=0), tr, None, tcfg, progress=False)
    without = mm.train(mm.GPT(cfg, seed=0), tr, None, tcfg, progress=False, hooks=[NoMaster()])
    out["loss_with_masters"] = with_master.losses
    out["loss_without_masters"] = without.losses
    # an injected overflow: a scale of 2^40
    model = mm.GPT(cfg, seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    hook = precision.MixedPrecision("float16", precision.LossScaler(init_scale=2.0 ** 40))
    res = mm.train(model, tr, None, TrainConfig(steps=1, batch_size=8, seq_len=64, eval_interval=0),
                   progress=False, hooks=[hook])
    out["overflow"] = {"found_inf": res.history[0]["found_inf"], "skipped": res.history[0]["skipped"],
                       "scale_after": hook.scaler.scale,
                       "params_untouched": all(np.array_equal(model.params[k], v) for k, v in before.items())}
    return out


# --- 3. memory ---------------------------------------------------------------------------------
def memory(preset: str) -> dict:
    """Bytes per precision, from the arrays: masters + moments (fp32), the half copy and
    its gradients, and the activations the backward pass keeps (one B=8 batch)."""
    cfg = mm.GPTConfig.preset(preset)
    model = mm.GPT(cfg, seed=0)
    x = np.zeros((8, cfg.block_size), dtype=np.int64)
    P = model.num_params()
    out = {}
    for prec in PRECISIONS:
        compute = model if prec == "fp32" else model.astype(precision.PRECISIONS[prec])
        logits, cache = compute.forward_train(x)
        acts = _nbytes(cache) + logits.nbytes
        grads = compute.backward(logits, cache)
        row = {"weights": model.nbytes() + (0 if prec == "fp32" else compute.nbytes()),
               "grads": sum(g.nbytes for g in grads.values()) + (0 if prec == "fp32" else 4 * P),
               "optimizer": 8 * P, "activations": acts}
        row["formula_weights"] = 4 * P + (0 if prec == "fp32" else 2 * P)
        out[prec] = row
    return out


def _nbytes(obj, seen=None) -> int:
    """Bytes of every distinct array inside nested tuples/lists (views counted once per base)."""
    seen = set() if seen is None else seen
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o, seen) for o in obj)
    if isinstance(obj, np.ndarray):
        base = obj if obj.base is None else obj.base
        if id(base) in seen:
            return 0
        seen.add(id(base))
        return base.nbytes
    return 0


# --- 4. speed --------------------------------------------------------------------------------------
def decode_speed(cfg, backend_name: str, n_new: int, repeats: int) -> dict:
    model = mm.GPT(cfg, seed=0).to(backend_name if backend_name == "cupy" else "numpy")
    prompt = np.arange(16)[None] % cfg.vocab_size
    out = {}
    for prec in PRECISIONS:
        m = model if prec == "fp32" else model.astype(precision.PRECISIONS[prec])
        with backend.use(backend_name):
            t = timing.median_time(lambda: m.generate(prompt, n_new, temperature=0), repeats=repeats,
                                   warmup=1)["median_s"]
        nbytes = m.nbytes() - m.params["wpe.weight"].nbytes
        out[prec] = {"tok_s": n_new / t, "weight_bytes": m.nbytes(), "gb_s": nbytes * n_new / t / 1e9}
        print(f"  decode {prec}: {n_new / t:.1f} tok/s", flush=True)
        del m
    return out


def train_speed(preset: str, backend_name: str, repeats: int) -> dict:
    cfg = mm.GPTConfig.preset(preset)
    tr = np.random.default_rng(0).integers(0, cfg.vocab_size, 100_000)
    out = {}
    for prec in PRECISIONS:
        tcfg = TrainConfig(steps=repeats + 1, batch_size=8, seq_len=cfg.block_size, eval_interval=0,
                           precision=prec)
        with backend.use(backend_name):
            res = mm.train(mm.GPT(cfg, seed=0), tr, None, tcfg, progress=False)
        step_ms = float(np.median([8 * cfg.block_size / h["tokens_per_s"] for h in res.history[1:]])) * 1e3
        out[prec] = {"step_ms": step_ms}
    return out


# --- report --------------------------------------------------------------------------------------
def table(res: dict) -> str:
    lines = [f"{res['machine']}; backend {res['backend']}", "",
             "| what | fp32 | fp16 | bf16 |", "|---|---|---|---|"]
    for preset, q in res["quality"].items():
        base = q["fp32"]["val_loss"]
        lines.append(f"| val loss, {preset}, {res['steps'][preset]} steps | "
                     + " | ".join(f"{q[p]['val_loss']:.4f} ({q[p]['val_loss'] / base:.3f}x)" for p in PRECISIONS) + " |")
    m = res["memory"]
    for key in ("weights", "grads", "optimizer", "activations"):
        lines.append(f"| {key} MB, {res['memory_preset']} (B=8) | "
                     + " | ".join(f"{m[p][key] / 1e6:.1f}" for p in PRECISIONS) + " |")
    d = res["decode"]
    lines.append(f"| decode tok/s, {res['decode_shape']} | "
                 + " | ".join(f"{d[p]['tok_s']:.1f} ({d[p]['tok_s'] / d['fp32']['tok_s']:.2f}x)" for p in PRECISIONS) + " |")
    lines.append("| decode GB/s of weights read | " + " | ".join(f"{d[p]['gb_s']:.1f}" for p in PRECISIONS) + " |")
    t = res["train_speed"]
    lines.append(f"| train step ms, {res['train_preset']} | "
                 + " | ".join(f"{t[p]['step_ms']:.1f} ({t[p]['step_ms'] / t['fp32']['step_ms']:.2f}x)" for p in PRECISIONS) + " |")
    f = res["failures"]
    lines += ["", f"Streaming read bandwidth in the same run: {res['stream_gbs']:.1f} GB/s.",
              f"fp16 without loss scaling: {100 * f['flush_share_unscaled']:.1f}% of nonzero gradient "
              f"entries flush to zero; scaled by 2^16: {100 * f['flush_share_scaled_2^16']:.2f}%.",
              f"fp16 without master weights (lr 1e-4, {len(f['loss_with_masters'])} steps): final loss "
              f"{f['loss_without_masters'][-1]:.4f} vs {f['loss_with_masters'][-1]:.4f} with fp32 masters "
              f"(start {f['loss_with_masters'][0]:.4f}).",
              f"Injected overflow (scale 2^40): found_inf={f['overflow']['found_inf']}, skipped="
              f"{f['overflow']['skipped']}, scale after = 2^{np.log2(f['overflow']['scale_after']):.0f}, "
              f"parameters untouched: {f['overflow']['params_untouched']}."]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for preset, q in res["quality"].items():
        for p in PRECISIONS:
            s, v = zip(*q[p]["curve"])
            ax1.plot(s, v, "o-" if p == "fp32" else "--", label=f"{preset} {p}", ms=3)
    ax1.set(xlabel="step", ylabel="val loss", title="quality")
    ax1.legend(fontsize=7)
    f = res["failures"]
    edges = np.array(f["log2_edges"])
    ax2.bar(edges[:-1], f["log2_hist"], width=1, align="edge", color="gray")
    ax2.axvline(-24, color="r", ls="--", label="fp16 smallest subnormal 2^-24")
    ax2.axvline(-24 - 16, color="g", ls=":", label="same, after scaling by 2^16")
    ax2.set(xlabel="log2 |gradient|", ylabel="entries", title="tiny: gradients at init")
    ax2.legend(fontsize=7)
    ax3.plot(f["loss_with_masters"], label="fp32 master weights")
    ax3.plot(f["loss_without_masters"], label="weights kept in fp16")
    ax3.set(xlabel="step", ylabel="train loss", title="lr 1e-4: updates below half an ulp")
    ax3.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    q = args.quick
    steps = {"tiny": 20 if q else 300} | ({} if q else {"small": 60})
    decode_cfg = (mm.GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128) if q
                  else mm.GPTConfig(vocab_size=4096, block_size=128, n_layer=8, n_head=16, n_embd=1024))
    res = {"command": "bench/bench_precision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": timing.machine_line(), "backend": args.backend, "steps": steps,
           "stream_gbs": timing.stream_read_gbs()}
    res["quality"] = {p: quality(p, s, args.backend, 300_000 if p == "tiny" else 2_000_000)
                      for p, s in steps.items()}
    res["failures"] = failures(10 if q else 60)
    res["memory_preset"] = "tiny" if q else "small"
    res["memory"] = memory(res["memory_preset"])
    c = decode_cfg
    res["decode_shape"] = f"L={c.n_layer} C={c.n_embd} V={c.vocab_size}, {mm.GPT(c).num_params() / 1e6:.0f} M params"
    res["decode"] = decode_speed(decode_cfg, args.backend, 16 if q else 32, 2 if q else 5)
    res["train_preset"] = "tiny" if q else "small"
    res["train_speed"] = train_speed(res["train_preset"], args.backend, 2 if q else 4)
    args.out.mkdir(parents=True, exist_ok=True)
    md = table(res)
    print(md)
    from minillm.files import atomic_write_text
    atomic_write_text(args.out / "bench_precision.json", json.dumps(res, indent=1, default=float))
    atomic_write_text(args.out / "bench_precision.md", md + "\n")
    plot(res, args.out / "bench_precision.png")
    print(f"wrote {args.out / 'bench_precision.json'}, .md and .png")


if __name__ == "__main__":
    main()
