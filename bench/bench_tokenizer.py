"""BPE tokenizer: training time and encode throughput vs tiktoken and HF tokenizers.

    .venv/bin/python bench/bench_tokenizer.py                  # the whole KJV corpus
    .venv/bin/python bench/bench_tokenizer.py --quick          # 400 kB, to check it runs

One table: training time at vocab 4096 and 32000 (reference = numpy backend,
fast = numba backend, HF ``tokenizers`` BpeTrainer), encode MB/s single-thread
on the whole text and batched on 2 threads (reference, fast, tiktoken and HF
``tokenizers`` loaded with *our* merges, so all give the same ids; checked).
Medians over ``--repeats`` after one warm-up run (the reference runs once: it
is slow). Writes bench/results/tokenizer.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

import minillm as mm
from minillm import backend, timing
from minillm.data import load_corpus

RESULTS = Path(__file__).parent / "results" / "tokenizer.json"


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs; and its result."""
    last = []

    def run():
        last[:] = [fn()]
        return last[0]
    return timing.median_time(run, repeats=repeats, warmup=warmup)["median_s"], last[0]


def train_ours(text, vocab, name):
    with backend.use(name), warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # "not reachable" at 32000 is reported
        return mm.BPETokenizer.train(text, vocab)


def train_hf(text, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return tok


def bench_training(text, vocabs, repeats, skip_reference_above):
    rows = []
    for vocab in vocabs:
        t_hf, hf = timed(lambda: train_hf(text, vocab), repeats)
        t_fast, fast = timed(lambda: train_ours(text, vocab, "numba"), repeats)
        rows.append(dict(task=f"train vocab {vocab}", impl="HF tokenizers", seconds=t_hf,
                         vocab=hf.get_vocab_size()))
        rows.append(dict(task=f"train vocab {vocab}", impl="minillm fast (numba)", seconds=t_fast,
                         vocab=fast.vocab_size, ratio_vs_peer=t_fast / t_hf))
        if vocab <= skip_reference_above:
            t_ref, ref = timed(lambda: train_ours(text, vocab, "numpy"), 1, warmup=0)
            assert ref.merges == fast.merges, "reference and fast path learned different merges"
            rows.append(dict(task=f"train vocab {vocab}", impl="minillm reference (numpy)",
                             seconds=t_ref, vocab=ref.vocab_size, ratio_vs_peer=t_ref / t_hf))
    return rows


def bench_encoding(text, vocab, repeats):
    """Single-thread whole text, then 2 threads over 64 pieces; same merges for everyone."""
    tok = train_ours(text, vocab, "numba")
    enc = tok.to_tiktoken()
    from tokenizers import Tokenizer
    with tempfile.TemporaryDirectory() as d:
        tok.save_hf(d)
        hf = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    mb = len(text.encode("utf-8")) / 1e6
    step = len(text) // 64 + 1
    pieces = [text[i:i + step] for i in range(0, len(text), step)]

    def fast(fn):
        with backend.use("numba"):
            return fn()
    runs = {
        ("encode 1 thread", "minillm fast (numba)"): lambda: fast(lambda: tok.encode(text)),
        ("encode 1 thread", "tiktoken"): lambda: enc.encode_ordinary(text),
        ("encode 1 thread", "HF tokenizers"): lambda: hf.encode(text).ids,
        ("encode 2 threads", "minillm fast (numba)"):
            lambda: fast(lambda: tok.encode_batch(pieces, num_threads=2)),
        ("encode 2 threads", "tiktoken"): lambda: enc.encode_ordinary_batch(pieces, num_threads=2),
        ("encode 2 threads", "HF tokenizers"): lambda: [e.ids for e in hf.encode_batch(pieces)],
    }
    rows, peer, want = [], {}, {}
    for (task, impl), fn in runs.items():
        seconds, ids = timed(fn, repeats)
        flat = ids if task.endswith("1 thread") else [i for part in ids for i in part]
        want.setdefault(task, flat)                                   # ours first: the ids to match
        rows.append(dict(task=f"{task} (vocab {tok.vocab_size})", impl=impl, seconds=seconds,
                         mb_s=mb / seconds, same_ids=flat == want[task]))
        if impl == "tiktoken":
            peer[task] = mb / seconds
    t_ref, ids = timed(lambda: tok.encode(text), 1, warmup=0)        # numpy backend
    rows.append(dict(task=f"encode 1 thread (vocab {tok.vocab_size})", impl="minillm reference (numpy)",
                     seconds=t_ref, mb_s=mb / t_ref, same_ids=ids == want["encode 1 thread"]))
    for r in rows:
        task = r["task"].split(" (")[0]
        r["ratio_vs_peer"] = r["mb_s"] / peer[task] if task in peer else None
    return rows, mb, tok.vocab_size, mb * 1e6 / len(want["encode 1 thread"])


def print_table(rows):
    print("| task | implementation | median s | MB/s | ratio vs peer | note |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        mbs = f"{r['mb_s']:.1f}" if "mb_s" in r else ""
        ratio = f"{r['ratio_vs_peer']:.2f}x" if r.get("ratio_vs_peer") else ""
        note = []
        if "vocab" in r:
            note.append(f"vocab reached {r['vocab']}")
        if "same_ids" in r:
            note.append("same ids" if r["same_ids"] else "IDS DIFFER")
        print(f"| {r['task']} | {r['impl']} | {r['seconds']:.3f} | {mbs} | {ratio} | {', '.join(note)} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="400 kB of the corpus, vocab 1024 only")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-reference-above", type=int, default=4096,
                    help="train the (slow) reference only up to this vocab (default: 4096)")
    args = ap.parse_args(argv)
    text = load_corpus()
    vocabs = [4096, 32000]
    if args.quick:
        text, vocabs = text[:400_000], [1024]
    with backend.use("numba"):                                        # compile / load the cache
        mm.BPETokenizer.train(text[:20_000], 300).encode(text[:20_000])
    rows = bench_training(text, vocabs, args.repeats, args.skip_reference_above)
    enc_rows, mb, vocab, bpt = bench_encoding(text, vocabs[0], args.repeats)
    rows += enc_rows
    import tiktoken
    import tokenizers
    print(f"\ncorpus {mb:.2f} MB, {timing.machine_line()}; "
          f"tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}; "
          f"{bpt:.2f} bytes/token at vocab {vocab}; ratio: train = ours / HF time (lower is better), "
          f"encode = ours / tiktoken MB/s (higher is better)\n")
    print_table(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"corpus_mb": mb, "quick": args.quick, "repeats": args.repeats,
                               "bytes_per_token": bpt, "cores": os.cpu_count(),
                               "cpu": timing.cpu_name(), "threads": timing.thread_settings(),
                               "rows": rows}, indent=1))
    os.replace(tmp, RESULTS)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
