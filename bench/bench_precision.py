"""Mixed precision: what fp16 / bf16 cost and buy on our model (quality, failures, memory, speed).

    export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
    .venv/bin/python bench/bench_precision.py --parts quality failures memory   # no clock read
    flock /tmp/minillm-bench.lock .venv/bin/python bench/bench_precision.py --parts speed
    .venv/bin/python bench/bench_precision.py --quick            # ~1 min: small sizes, all parts

Each part saves ``bench_precision_<part>.json``; the table (``bench_precision.md``)
and the plot are rebuilt from every part saved so far. Only ``speed`` reads a clock,
so only it needs the machine to itself (the bench lock).

Sections (one run, one JSON + markdown table + PNG in bench/results/):
1. quality  - `tiny` and `small` trained for the same steps and batches in fp32,
              fp16 + loss scaler and bf16: final validation loss and its ratio to fp32;
              a control run (fp32 from the init rounded to fp16) shows how far one
              run's final loss moves by chance;
2. failures - fp16 without loss scaling (share of gradient entries that flush to
              zero, log2|g| histogram against fp16's range), fp16 without master
              weights (weights rounded to fp16 after every update: small updates
              vanish), an injected overflow (skipped, scale halved, weights untouched);
3. memory   - weights, gradients, optimizer state and activations per precision,
              measured from the arrays, beside the formula;
4. speed    - batch-1 greedy decode with the KV cache on a memory-bound random model
              (L=8, C=1024, V=4096: 105 M parameters), fp32 vs fp16 vs bf16 weights
              (numba: the half twin streams 2-byte weights; the precisions take
              turns, repeat by repeat), GB/s against this
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
from minillm.files import atomic_write_text  # noqa: E402
from minillm.train import TrainConfig, TrainHook  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PRECISIONS = ("fp32", "fp16", "bf16")
CONTROL = "fp32_init_fp16"      # fp32 trained from the init rounded to fp16: the noise of one run


# --- 1. quality --------------------------------------------------------------------------
def corpus_ids(vocab: int, chars: int):
    """Byte ids (vocab 256) of the first ``chars`` characters, or the tour's BPE ids
    (vocab 4096, its cached tokenizer), split 90/10."""
    if vocab == 256:
        return data.split(data.encode_corpus(mm.BPETokenizer(), data.load_corpus()[:chars]), 0.1)
    base = tour_baseline()
    return base.train_ids, base.val_ids


def tour_baseline():
    """The tour's trained `small` model and its data (minillm.baseline's cache)."""
    from minillm import baseline
    return baseline.get_baseline(baseline.tour_settings(), data.load_corpus(), progress=False,
                                 log=lambda m: print(m, flush=True))


def quality(preset: str, steps: int, backend_name: str, chars: int) -> dict:
    """Train ``preset`` in each precision from the same init on the same batches; and a control:
    fp32 again from the init rounded to fp16 (a change at fp16's rounding level, nothing else),
    whose distance to fp32 is how much one run's final loss moves by chance."""
    cfg = mm.GPTConfig.preset(preset)
    tr, va = corpus_ids(cfg.vocab_size, chars)
    out = {}
    for run in PRECISIONS + (CONTROL,):
        tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=min(cfg.block_size, 128), lr=3e-3,
                           warmup_steps=max(1, steps // 20), eval_interval=max(1, steps // 5),
                           eval_batches=4, precision="fp32" if run == CONTROL else run, seed=0)
        model = mm.GPT(cfg, seed=0)
        if run == CONTROL:
            for p in model.params.values():
                p[...] = p.astype(np.float16).astype(p.dtype)
        with backend.use(backend_name):
            res = mm.train(model, tr, va, tcfg, progress=False)
        out[run] = {"val_loss": res.val_loss, "curve": [(e["step"], e["val_loss"]) for e in res.evals],
                    "train_loss": res.losses,
                    "skipped": sum(bool(h.get("skipped", False)) for h in res.history),
                    "loss_scale": [h.get("loss_scale", 1.0) for h in res.history]}
        print(f"  quality {preset} {run}: val loss {res.val_loss:.4f}", flush=True)
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
    """Bytes per precision, measured from the arrays a training step holds: fp32 masters
    and the AdamW moments (``optim.AdamW``'s own arrays), the half compute copy and its
    gradients, the fp32 gradients the optimizer sees, and the activations the backward
    pass keeps (one B=8 batch of full blocks). The formula (P parameters) beside it:
    fp32 4P + 4P + 8P; fp16/bf16 adds the 2P copy and 2P half gradients."""
    from minillm.optim import AdamW
    cfg = mm.GPTConfig.preset(preset)
    model = mm.GPT(cfg, seed=0)
    x = np.zeros((8, cfg.block_size), dtype=np.int64)
    P = model.num_params()
    opt = AdamW(model.params)
    out = {"preset": preset, "T": cfg.block_size, "params": P}
    for prec in PRECISIONS:
        half = prec != "fp32"
        compute = model.astype(precision.PRECISIONS[prec]) if half else model
        logits, cache = compute.forward_train(x)
        acts = _nbytes(cache) + logits.nbytes
        grads = compute.backward(logits, cache)
        grad_bytes = sum(g.nbytes for g in grads.values())
        fp32_grad_bytes = sum(g.astype(np.float32).nbytes for g in grads.values()) if half else 0
        row = {"weights": model.nbytes() + (compute.nbytes() if half else 0),
               "grads": grad_bytes + fp32_grad_bytes,
               "optimizer": sum(a.nbytes for a in list(opt.m.values()) + list(opt.v.values())),
               "activations": acts}
        row["formula_states"] = 16 * P + (4 * P if half else 0)
        row["measured_states"] = row["weights"] + row["grads"] + row["optimizer"]
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
    """Greedy decode of ``n_new`` tokens after a 16-token prompt, per weight precision.
    The repeats take turns (fp32, fp16, bf16, fp32, ...), so a change in the machine's
    memory bandwidth during the run (other tenants) reaches every precision alike."""
    model = mm.GPT(cfg, seed=0).to(backend_name if backend_name == "cupy" else "numpy")
    prompt = np.arange(16)[None] % cfg.vocab_size
    models = {p: model if p == "fp32" else model.astype(precision.PRECISIONS[p]) for p in PRECISIONS}
    times = {p: [] for p in PRECISIONS}
    with backend.use(backend_name):
        for r in range(repeats + 1):                   # round 0 is the warm-up (compiles, caches)
            for prec, m in models.items():
                t = timing.median_time(lambda: m.generate(prompt, n_new, temperature=0), repeats=1,
                                       warmup=0)["median_s"]
                if r > 0:
                    times[prec].append(t)
    out = {}
    for prec, m in models.items():
        t = float(np.median(times[prec]))
        nbytes = m.nbytes() - m.params["wpe.weight"].nbytes
        out[prec] = {"tok_s": n_new / t, "weight_bytes": m.nbytes(), "gb_s": nbytes * n_new / t / 1e9,
                     "times_s": times[prec]}
        print(f"  decode {prec}: {n_new / t:.1f} tok/s", flush=True)
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
        print(f"  train step {preset} {prec}: {step_ms:.0f} ms", flush=True)
    return out


def tour_perplexity(backend_name: str, quick: bool) -> dict:
    """Validation perplexity of the tour's trained model with its weights in each precision
    (fixed windows; the half models compute in half, as ``model.astype`` makes them)."""
    from minillm import tour
    base = tour_baseline()
    out = {}
    for prec in PRECISIONS:
        m = base.model if prec == "fp32" else base.model.astype(precision.PRECISIONS[prec])
        with backend.use(backend_name):
            out[prec] = tour.val_perplexity(m, base.val_ids, 4, 64 if quick else 256, 2 if quick else 8, seed=0)
        print(f"  tour model perplexity {prec}: {out[prec]:.3f}", flush=True)
    return out


def speed(args) -> dict:
    q = args.quick
    c = (mm.GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128) if q
         else mm.GPTConfig(vocab_size=4096, block_size=128, n_layer=8, n_head=16, n_embd=1024))
    from backends import numba_precision
    return {"machine": timing.machine_line(), "threads": timing.thread_settings(),
            "stream_gbs": timing.stream_read_gbs(), "f16_widening": "F16C" if numba_precision.HAS_F16C else "bit ops",
            "decode_shape": f"L={c.n_layer} C={c.n_embd} V={c.vocab_size}, {mm.GPT(c).num_params() / 1e6:.0f} M params",
            "decode": decode_speed(c, args.backend, 16 if q else 32, 2 if q else 7),
            "tour_ppl": None if q else tour_perplexity(args.backend, q),
            "train_preset": "tiny" if q else "small",
            "train_speed": train_speed("tiny" if q else "small", args.backend, 2 if q else 4)}


# --- report --------------------------------------------------------------------------------------
def table(res: dict) -> str:
    """Markdown from whichever parts are in ``res`` (``quality``, ``failures``, ``memory``, ``speed``)."""
    lines = ["| what | fp32 | fp16 | bf16 |", "|---|---|---|---|"]
    for preset, q in res.get("quality", {}).get("presets", {}).items():
        base = q["fp32"]["val_loss"]
        lines.append(f"| val loss, {preset}, {res['quality']['steps'][preset]} steps | "
                     + " | ".join(f"{q[p]['val_loss']:.4f} ({q[p]['val_loss'] / base:.4f}x)" for p in PRECISIONS) + " |")
    controls = [(preset, q) for preset, q in res.get("quality", {}).get("presets", {}).items() if CONTROL in q]
    if "memory" in res:
        m = res["memory"]
        for key in ("weights", "grads", "optimizer", "activations"):
            lines.append(f"| {key} MB, {m['preset']} (B=8, T={m['T']}) | "
                         + " | ".join(f"{m[p][key] / 1e6:.2f}" for p in PRECISIONS) + " |")
        lines.append("| weights+grads+optimizer MB, formula | "
                     + " | ".join(f"{m[p]['formula_states'] / 1e6:.2f}" for p in PRECISIONS) + " |")
    if "speed" in res:
        sp = res["speed"]
        d = sp["decode"]
        lines.append(f"| decode tok/s, {sp['decode_shape']}, batch 1 | "
                     + " | ".join(f"{d[p]['tok_s']:.1f} ({d[p]['tok_s'] / d['fp32']['tok_s']:.2f}x)" for p in PRECISIONS) + " |")
        lines.append("| decode GB/s of weights read | " + " | ".join(f"{d[p]['gb_s']:.1f}" for p in PRECISIONS) + " |")
        if sp.get("tour_ppl"):
            t = sp["tour_ppl"]
            lines.append("| tour model val perplexity | " + " | ".join(f"{t[p]:.3f}" for p in PRECISIONS) + " |")
        t = sp["train_speed"]
        lines.append(f"| train step ms, {sp['train_preset']} (B=8), CPU emulation | "
                     + " | ".join(f"{t[p]['step_ms']:.0f} ({t[p]['step_ms'] / t['fp32']['step_ms']:.2f}x)" for p in PRECISIONS) + " |")
        lines += ["", f"Speed rows: {sp['machine']}; {sp['threads']}; backend {res['backend']}; fp16 widening: "
                  f"{sp['f16_widening']}; streaming read bandwidth in the same run: {sp['stream_gbs']:.1f} GB/s."]
    if controls:
        lines += ["", "Control (how far one run moves by chance): fp32 again, from the initial weights rounded "
                  "to fp16, otherwise the fp32 run: " + ", ".join(
                      f"{preset} {q[CONTROL]['val_loss']:.4f} ({q[CONTROL]['val_loss'] / q['fp32']['val_loss']:.4f}x)"
                      for preset, q in controls) + "."]
    if "failures" in res:
        f = res["failures"]
        lines += ["", f"fp16 without loss scaling (tiny, at init): {100 * f['flush_share_unscaled']:.1f}% of nonzero gradient "
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
    for preset, q in res["quality"]["presets"].items():
        for p in PRECISIONS + (CONTROL,):
            if p in q:
                s, v = zip(*q[p]["curve"])
                ax1.plot(s, v, "o-" if p == "fp32" else ":" if p == CONTROL else "--", label=f"{preset} {p}", ms=3)
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


PARTS = ("quality", "failures", "memory", "speed")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--steps-tiny", type=int, default=300)
    ap.add_argument("--steps-small", type=int, default=100)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    q = args.quick
    suffix = "_quick" if q else ""
    command = "bench/bench_precision.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        if part == "quality":
            steps = {"tiny": 20} if q else {"tiny": args.steps_tiny, "small": args.steps_small}
            got = {"steps": steps, "presets": {p: quality(p, s, args.backend, 300_000) for p, s in steps.items()}}
        elif part == "failures":
            got = failures(10 if q else 60)
        elif part == "memory":
            got = memory("tiny" if q else "small")
        else:
            got = speed(args)
        got["command"] = command
        atomic_write_text(args.out / f"bench_precision_{part}{suffix}.json", json.dumps(got, indent=1, default=float))
    res = {"backend": args.backend}
    for part in PARTS:
        path = args.out / f"bench_precision_{part}{suffix}.json"
        if path.exists():
            res[part] = json.loads(path.read_text())
    md = table(res)
    print(md)
    atomic_write_text(args.out / f"bench_precision{suffix}.md", md + "\n")
    if {"quality", "failures"} <= res.keys():
        plot(res, args.out / f"bench_precision{suffix}.png")
    print(f"wrote {args.out}/bench_precision_*{suffix}.json, bench_precision{suffix}.md and .png")


if __name__ == "__main__":
    main()
