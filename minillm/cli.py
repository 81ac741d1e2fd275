"""minillm: train, sample and measure a NumPy GPT (`minillm COMMAND --help` for each).

Each subcommand is one ``add_<name>(subparsers)`` function that declares its
arguments and sets ``func``; ``main`` collects them.
"""
from __future__ import annotations

import argparse
import sys


def add_info(sub) -> None:
    p = sub.add_parser("info", help="config, parameter count, weight bytes, available backends",
                       description="Print a model's config, parameter count and weight bytes "
                                   "(a preset or a checkpoint directory) and which backends can run here.")
    p.add_argument("--preset", default="small", help="config preset (default: small)")
    p.add_argument("--model", default=None, help="checkpoint directory (overrides --preset)")
    p.set_defaults(func=run_info)


def run_info(args) -> int:
    import minillm as mm
    from minillm import backend
    model = mm.GPT.load(args.model) if args.model else None
    cfg = model.config if model else mm.GPTConfig.preset(args.preset)
    print(f"minillm {mm.__version__}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    if model is not None:       # counted from the arrays (a technique may store int8, fewer heads, ...)
        n, nbytes = model.num_params(), model.nbytes()
    else:
        n = cfg.num_params()
        nbytes = n * cfg.np_dtype.itemsize
    print(f"parameters: {n:,}  weight bytes: {nbytes:,}")
    print(f"backend: {backend.current()}")
    for name, (ok, reason) in backend.available().items():
        print(f"  {name:6s} {'yes' if ok else 'no ':3s}  {reason}")
    return 0


TRAIN_EXAMPLES = """examples:
  minillm train --preset tiny --steps 200 --out runs/tiny
  minillm train --preset small --vocab-size 4096 --steps 2000 --out runs/small
  minillm train --out runs/small --resume --steps 3000     # continue, same settings
  minillm train --preset tiny --corpus my.txt --max-chars 200000 --steps 50 --out runs/mine
"""


def add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a GPT on the embedded corpus (or --corpus), with checkpoints and resume",
        description="Train a byte-level BPE tokenizer on the corpus (vocab 256 = plain bytes), "
                    "then a GPT of the given preset with AdamW, warmup + cosine LR and gradient "
                    "clipping. The checkpoint directory --out gets model.safetensors, config.json, "
                    "optimizer.safetensors, meta.json and tokenizer.model; --resume continues "
                    "from it exactly (the remaining losses equal those of an uninterrupted run). "
                    "On --resume the model and tokenizer come from the checkpoint (model and "
                    "tokenizer options are ignored) and training options left out are taken "
                    "from it.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint directory (created or replaced atomically)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--preset", default="tiny", help="model preset: tiny, small, gpt2 (default: tiny)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="BPE vocabulary trained on the corpus; 256 = bytes (default: the preset's)")
    p.add_argument("--block-size", type=int, default=None, help="override the preset's block_size")
    p.add_argument("--n-layer", type=int, default=None, help="override the preset's n_layer")
    p.add_argument("--n-head", type=int, default=None, help="override the preset's n_head")
    p.add_argument("--n-embd", type=int, default=None, help="override the preset's n_embd")
    p.add_argument("--attention", default=None,
                   help="attention kind: dense (default), window, strided, block, linear "
                        "(minillm.sparse_attention, minillm.linear_attention)")
    p.add_argument("--window", type=int, default=None, help="window: its width; strided: the local width")
    p.add_argument("--stride", type=int, default=None, help="strided attention's stride")
    p.add_argument("--block", type=int, default=None, help="block attention's block size")
    p.add_argument("--n-global", type=int, default=None, help="block attention's global tokens")
    p.add_argument("--corpus", default=None, help="UTF-8 text file (default: the embedded KJV)")
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N characters")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="last fraction of the ids held out for validation (default: 0.1)")
    p.add_argument("--memory-budget", default=None,
                   help="e.g. 1GiB: fit the batch to it by the memory model (a step that does not "
                        "fit accumulates micro-batches; an out-of-memory error halves them)")
    _add_train_flags(p)
    _add_parallel_flags(p, data=True)
    p.set_defaults(func=run_train)


def _add_parallel_flags(p, data: bool) -> None:
    """--tensor-parallel (and --data-parallel): split the run over MPI ranks (minillm.parallel)."""
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="split every layer over N ranks, Megatron-style (run under mpiexec -n N; "
                        "needs mpi4py: pip install mpi4py mpich)")
    if data:
        p.add_argument("--data-parallel", type=int, default=None, metavar="M",
                       help="split each batch over M model replicas (mpiexec -n N*M in all)")


def _add_train_flags(p) -> None:
    """The TrainConfig flags, --seed and --no-progress (shared by train and distill)."""
    from minillm.train import TrainConfig
    group = p.add_argument_group("training (minillm.train.TrainConfig; on --resume: the checkpoint's)")
    for flag, kind, help_text in _TRAIN_FLAGS:
        default = getattr(TrainConfig, flag.lstrip("-").replace("-", "_"))
        if default is not None:
            help_text += f" (default: {default})"
        group.add_argument(flag, type=kind, default=None, help=help_text)
    p.add_argument("--seed", type=int, default=None, help="seeds model init and batches (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


_ATTENTION_ARGS = ("attention", "window", "stride", "block", "n_global")   # GPTConfig fields

def _batch_size(text: str):
    """--batch-size: an int, or "auto" (the largest that fits --memory-budget)."""
    return "auto" if text == "auto" else int(text)


# flag -> TrainConfig field (dashes become underscores)
_TRAIN_FLAGS = [
    ("--steps", int, "optimizer steps in the whole run"),
    ("--batch-size", _batch_size, "sequences per step, or 'auto': the largest that fits "
                                  "--memory-budget (minillm.batching)"),
    ("--seq-len", int, "tokens per sequence (default: block_size)"),
    ("--lr", float, "peak learning rate"),
    ("--min-lr", float, "final learning rate of the cosine (default: lr / 10)"),
    ("--warmup-steps", int, "linear warmup steps"),
    ("--weight-decay", float, "AdamW decoupled weight decay (2-D weights only)"),
    ("--grad-clip", float, "max global gradient norm (0: no clipping)"),
    ("--eval-interval", int, "evaluate every N steps and at the end (0: only at the end)"),
    ("--eval-batches", int, "validation batches per evaluation"),
    ("--checkpoint-interval", int, "save every N steps and at the end (0: only at the end)"),
    ("--precision", str, "fp32, or fp16 / bf16 compute on fp32 master weights (minillm.precision)"),
    ("--micro-batch-size", int, "rows per forward/backward; gradients accumulated (default: whole batch)"),
]


def _train_config(args, saved: dict | None):
    """TrainConfig from the flags given; the rest from the checkpoint (resume) or defaults."""
    from minillm.train import TrainConfig
    given = {f.lstrip("-").replace("-", "_"): getattr(args, f.lstrip("-").replace("-", "_"))
             for f, _, _ in _TRAIN_FLAGS + [("--seed", int, "")]}
    given = {k: v for k, v in given.items() if v is not None}
    base = TrainConfig.from_dict(saved).to_dict() if saved else {}
    return TrainConfig.from_dict(base | given)


def run_train(args) -> int:
    from pathlib import Path

    import minillm as mm
    from minillm import checkpoint, data
    from minillm.tokenizer import BPETokenizer
    from minillm.train import TOKENIZER_FILE, train

    out = Path(args.out)
    comms = None                        # a parallel run: this rank's (tensor, data) groups, checked first
    if args.tensor_parallel or args.data_parallel:
        from minillm import parallel
        comms = parallel.cli_grid(args.tensor_parallel, args.data_parallel)
        args.no_progress |= bool(comms[0].rank or comms[1].rank)        # one progress bar
    text = _corpus_text(args)
    auto = args.batch_size == "auto"
    if auto:
        args.batch_size = None               # chosen below, once the model's shape is known
    if args.memory_budget is not None:       # a malformed budget fails before any work
        from minillm.batching import parse_bytes
        parse_bytes(args.memory_budget, "--memory-budget")
    if args.resume:
        meta = checkpoint.load_meta(out) if out.is_dir() else None
        if meta is None:
            raise ValueError(f"--resume: {str(out)!r} holds no training checkpoint (meta.json)")
        model, tok = mm.GPT.load(out), BPETokenizer.load(out / TOKENIZER_FILE)
        for k in _ATTENTION_ARGS:           # a checkpoint's attention is its own
            if getattr(args, k) is not None and getattr(args, k) != getattr(model.config, k):
                raise ValueError(f"--{k.replace('_', '-')}={getattr(args, k)!r}: the checkpoint "
                                 f"{str(out)!r} was trained with {k}={getattr(model.config, k)!r}")
        tcfg = _train_config(args, meta.get("train_config"))
    else:
        tcfg = _train_config(args, None)
        overrides = {k: getattr(args, k) for k in ("block_size", "n_layer", "n_head", "n_embd")
                     + _ATTENTION_ARGS if getattr(args, k) is not None}
        mm.GPTConfig.preset(args.preset, **overrides)          # bad settings fail before BPE training
        vocab = args.vocab_size or mm.GPTConfig.preset(args.preset).vocab_size
        print(f"training a BPE tokenizer (vocab {vocab}) on {len(text):,} characters ...")
        tok = BPETokenizer.train(text, vocab, progress=not args.no_progress)
        cfg = mm.GPTConfig.preset(args.preset, vocab_size=tok.vocab_size, **overrides)
        model = mm.GPT(cfg, seed=tcfg.seed)
    fit_hooks = []
    if auto or args.memory_budget is not None:
        tcfg, fit_hooks = _fit_batch(tcfg, model, args.memory_budget, auto)
    ids = data.encode_corpus(tok, text)
    train_ids, val_ids = data.split(ids, args.val_fraction)
    print(f"{model}; {len(train_ids):,} train / {len(val_ids):,} val tokens; {tcfg}")
    hooks = ()
    if comms:                           # rank 0 gathers and writes one unsharded checkpoint
        model, hooks = parallel.parallel_training(model, tcfg, *comms)
    hooks = list(hooks) + fit_hooks     # the out-of-memory backoff (--memory-budget), last
    res = train(model, train_ids, val_ids, tcfg, out_dir=out, resume=args.resume,
                progress=not args.no_progress, tokenizer=tok, hooks=hooks)
    _print_train_summary(res, out)
    return 0


def _fit_batch(tcfg, model, budget, auto: bool):
    """(train config, hooks) for --memory-budget: the batch (auto) or micro-batch that fits,
    and the out-of-memory backoff (minillm.batching)."""
    import dataclasses

    from minillm import batching
    if budget is None:
        raise ValueError("--batch-size auto needs --memory-budget (e.g. --memory-budget 1GiB)")
    budget = batching.parse_bytes(budget, "--memory-budget")
    seq_len = tcfg.seq_len or model.config.block_size
    B, micro = batching.plan_batch(model.config, seq_len, budget, None if auto else tcfg.batch_size)
    need = batching.memory_model(model.config, micro or B, seq_len, accumulating=micro is not None)
    print(f"batch {B}" + (f" in micro-batches of {micro}" if micro else "") + f" at seq_len {seq_len}: "
          f"predicted peak {batching.format_bytes(need['total'])} of {batching.format_bytes(budget)}")
    tcfg = dataclasses.replace(tcfg, batch_size=B, micro_batch_size=micro)
    return tcfg, [batching.OOMBackoff(micro or B)]


def _corpus_text(args) -> str:
    """--corpus (default: the embedded KJV), cut to --max-chars (shared by train and distill)."""
    from minillm import data
    text = data.load_corpus(args.corpus)
    if args.max_chars is not None:
        if args.max_chars < 1:
            raise ValueError(f"--max-chars={args.max_chars} must be >= 1")
        text = text[:args.max_chars]
    return text


def _print_train_summary(res, out) -> None:
    new = res.history[res.start_step:]
    if new:
        print(f"steps {res.start_step + 1}..{new[-1]['step']}: loss {new[0]['loss']:.4f} -> "
              f"{new[-1]['loss']:.4f}, median {res.tokens_per_s:,.0f} tokens/s, "
              f"{res.wall_time_s:.1f} s")
    else:
        print(f"nothing to do: the checkpoint is already at step {res.start_step}")
    if res.evals:
        e = res.evals[-1]
        print(f"val loss {e['val_loss']:.4f}  val perplexity {e['val_ppl']:.2f}  (step {e['step']})")
    print(f"checkpoint: {out}")


GENERATE_EXAMPLES = """examples:
  minillm generate --model runs/tiny --prompt "And God said" --max-new-tokens 40
  minillm generate --model runs/small --temperature 0.8 --top-k 50 --seed 1
  minillm generate --model runs/small --temperature 0          # greedy
  minillm generate --hf path/to/gpt2 --prompt "Hello" --top-p 0.9
"""


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt with a trained model (minillm or Hugging Face GPT-2)",
        description="Encode --prompt with the model's tokenizer, sample --max-new-tokens ids "
                    "(temperature 0 = greedy; top-k / top-p filtering; seeded) and print the "
                    "prompt with its continuation.",
        epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="minillm checkpoint directory (with tokenizer.model)")
    src.add_argument("--hf", help="Hugging Face GPT-2 directory (config.json, model.safetensors, "
                                  "vocab.json, merges.txt)")
    p.add_argument("--prompt", default="In the beginning", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="ids to sample (default: 100, or fewer so the text fits block_size)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely ids")
    p.add_argument("--top-p", type=float, default=None, help="nucleus: keep the smallest set reaching p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--no-cache", action="store_true",
                   help="re-run the whole prefix per token instead of using the KV cache")
    _add_parallel_flags(p, data=False)
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from pathlib import Path

    import numpy as np

    import minillm as mm
    from minillm.tokenizer import BPETokenizer
    from minillm.train import TOKENIZER_FILE

    comms = None
    if args.tensor_parallel:
        from minillm import parallel
        comms = parallel.cli_grid(args.tensor_parallel)
    if args.model:
        model, tok = mm.GPT.load(args.model), BPETokenizer.load(Path(args.model) / TOKENIZER_FILE)
    else:
        model, tok = mm.GPT.from_hf(args.hf), BPETokenizer.from_hf(args.hf)
    if comms:                           # this rank's heads; the KV cache holds only those
        model = parallel.ParallelGPT(model, *comms)
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError(f"--prompt={args.prompt!r} encodes to no tokens; give some text")
    idx = np.asarray([ids], dtype=np.int64)                               # (1, T)
    new = args.max_new_tokens
    if new is None:
        new = max(0, min(100, model.config.block_size - idx.shape[1]))
    out = model.generate(idx, max_new_tokens=new, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         use_cache=not args.no_cache)                      # (1, T + new)
    print(tok.decode(out[0].tolist()))
    return 0



# One line per subcommand; a new command adds its add_<name> here.
COMMANDS = [add_info, add_train, add_generate]

SERVE_EXAMPLES = """examples:
  minillm serve --model runs/tour-model --port 8000 --max-batch 16 --memory-budget 512MiB
  curl -s localhost:8000/v1/completions -d '{"prompt": "And God said", "max_tokens": 40, "temperature": 0}'
  curl -sN localhost:8000/v1/completions -d '{"prompt": "And God said", "max_tokens": 40, "stream": true}'
"""


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a checkpoint over HTTP (OpenAI /v1/completions), continuous batching",
        description="Answer POST /v1/completions (prompt, max_tokens, temperature, top_p, seed, "
                    "stream) from one scheduler that admits waiting requests into free KV cache "
                    "rows at every decode step (minillm.batching.Server). Logs each request's "
                    "latency and time to first token.",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="minillm checkpoint directory (with tokenizer.model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: any free)")
    p.add_argument("--max-batch", type=int, default=16, help="KV cache rows (default: %(default)s)")
    p.add_argument("--memory-budget", default=None,
                   help="e.g. 512MiB: fewer rows if weights + KV cache would not fit")
    p.add_argument("--policy", default="continuous", choices=("continuous", "static"),
                   help="static: admit a new batch only when the last one has finished")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import logging
    from pathlib import Path

    import minillm as mm
    from minillm import batching
    from minillm.tokenizer import BPETokenizer
    from minillm.train import TOKENIZER_FILE

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    budget = None if args.memory_budget is None else batching.parse_bytes(args.memory_budget,
                                                                          "--memory-budget")
    model, tok = mm.GPT.load(args.model), BPETokenizer.load(Path(args.model) / TOKENIZER_FILE)
    server = batching.Server(model, args.max_batch, budget, policy=args.policy)
    httpd = batching.make_http_server(server, tok, args.host, args.port, Path(args.model).name)
    host, port = httpd.server_address[:2]
    print(f"serving {args.model} at http://{host}:{port}/v1/completions: {server.slots} rows, "
          f"KV cache {batching.format_bytes(server.kv_bytes)} ({args.policy} batching)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        server.stop()
    return 0


COMMANDS.append(add_serve)


def add_tour(sub) -> None:
    p = sub.add_parser(
        "tour", help="train (or reuse) the small model, run every technique, print the trade-off table",
        description="Train the small GPT on the embedded KJV corpus (or reuse it from the cache), "
                    "measure the baseline (params, weight bytes, validation perplexity, train and "
                    "decode tokens/s), run every registered technique and print one trade-off "
                    "table with ratios to the baseline. Writes report.md, report.json, loss.png "
                    "and ratios.png to --out. Uses the fastest CPU backend available (numba, else "
                    "numpy) unless --backend or $MINILLM_BACKEND says otherwise.")
    p.add_argument("--out", default="runs/tour", help="output directory (default: runs/tour)")
    p.add_argument("--cache-dir", default=None,
                   help="where trained baselines are kept (default: $MINILLM_CACHE/tour or "
                        "~/.cache/minillm/tour); one subdirectory per settings hash")
    p.add_argument("--no-cache", action="store_true",
                   help="train from scratch and neither read nor write the cache")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model and a few steps (seconds; for tests, not for reading numbers)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the tour's setting)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batches and sampling (default: 0)")
    p.add_argument("--techniques", default=None,
                   help="comma-separated techniques to run (default: all registered); "
                        "'none' runs only the baseline")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage messages")
    p.set_defaults(func=run_tour_command)


def run_tour_command(args) -> int:
    from minillm import tour
    names = args.techniques
    if names is not None and names.strip().lower() == "none":
        names = []
    # the command line as the report will quote it
    flags = ([f"--backend {args.backend}"] if args.backend else []) + ["tour", f"--out {args.out}"]
    for flag, value in (("--cache-dir", args.cache_dir), ("--steps", args.steps),
                        ("--seed", args.seed or None), ("--techniques", args.techniques)):
        if value is not None:
            flags.append(f"{flag} {value}")
    flags += [f for f, on in (("--quick", args.quick), ("--no-cache", args.no_cache)) if on]
    command = "minillm " + " ".join(flags)
    tour.run_tour(out_dir=args.out, cache_dir=args.cache_dir, quick=args.quick, steps=args.steps,
                  seed=args.seed, techniques=names, progress=not args.no_progress,
                  use_cache=not args.no_cache, backend_name=args.backend, command=command)
    return 0


COMMANDS.append(add_tour)


TOKENIZER_EXAMPLES = """examples:
  minillm tokenizer train --vocab-size 4096 -o kjv.bpe minillm/data/kjv.txt
  minillm tokenizer encode -t kjv.bpe input.txt > ids.txt
  echo "In the beginning" | minillm tokenizer encode -t kjv.bpe
  minillm tokenizer decode -t kjv.bpe ids.txt
  minillm tokenizer info -t kjv.bpe --text minillm/data/kjv.txt
"""


def add_tokenizer(sub) -> None:
    p = sub.add_parser(
        "tokenizer", help="train / use a byte-level BPE tokenizer (train|encode|decode|info)",
        description="Byte-level BPE: learn merges on a text, encode text to ids, decode ids "
                    "to text, or show a tokenizer's size and compression. Input is a file "
                    "or stdin ('-' or nothing).",
        epilog=TOKENIZER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = actions.add_parser("train", help="learn merges on a text and save the tokenizer")
    t.add_argument("input", nargs="?", default="-", help="training text file (default: stdin)")
    t.add_argument("-o", "--output", required=True, help="tokenizer file to write (+ .vocab listing)")
    t.add_argument("--vocab-size", type=int, default=4096, help="ids incl. specials (default: 4096)")
    t.add_argument("--pattern", default="gpt2", help="gpt2 | gpt4 | a regex (default: gpt2)")
    t.add_argument("--special", action="append", default=[], metavar="TOKEN",
                   help="a special token, e.g. '<|endoftext|>' (repeatable)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, text in (("encode", "text to ids (space-separated) on stdout"),
                       ("decode", "ids (whitespace-separated) to text on stdout"),
                       ("info", "vocab size, merges, pattern, specials; compression of --text")):
        q = actions.add_parser(name, help=text)
        q.add_argument("-t", "--tokenizer", required=True, help="tokenizer file (from 'train')")
        if name != "info":
            q.add_argument("input", nargs="?", default="-", help="input file (default: stdin)")
        if name == "encode":
            q.add_argument("--allow-special", action="store_true",
                           help="encode special-token text as the special id (else: error)")
        if name == "info":
            q.add_argument("--text", default=None, help="measure bytes/token on this file")
    p.set_defaults(func=run_tokenizer)


def _read_input(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    from pathlib import Path
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"input file {name!r} does not exist")
    return path.read_text(encoding="utf-8")


def run_tokenizer(args) -> int:
    import time

    from minillm.tokenizer import BPETokenizer
    if args.action == "train":
        text = _read_input(args.input)
        t0 = time.perf_counter()
        tok = BPETokenizer.train(text, args.vocab_size, pattern=args.pattern,
                                 special_tokens=args.special or None, progress=not args.no_progress)
        tok.save(args.output)
        print(f"{tok!r} trained in {time.perf_counter() - t0:.2f} s -> {args.output} "
              f"(+ {args.output}.vocab)", file=sys.stderr)
        return 0
    tok = BPETokenizer.load(args.tokenizer)
    if args.action == "encode":
        ids = tok.encode(_read_input(args.input), allowed_special="all" if args.allow_special else set())
        print(" ".join(map(str, ids)))
    elif args.action == "decode":
        words = _read_input(args.input).split()
        if not all(w.isdigit() for w in words):
            bad = next(w for w in words if not w.isdigit())
            raise ValueError(f"decode input must be whitespace-separated ids >= 0, got {bad[:20]!r}")
        sys.stdout.write(tok.decode([int(w) for w in words]))
    else:
        print(repr(tok))
        print(f"pattern: {tok.pattern}")
        print(f"special tokens: {tok.special_tokens or 'none'}")
        if args.text:
            text = _read_input(args.text)
            t0 = time.perf_counter()
            n = len(tok.encode(text, disallowed_special=()))
            dt = time.perf_counter() - t0
            size = len(text.encode("utf-8"))
            print(f"{args.text}: {size:,} bytes -> {n:,} tokens, {size / max(n, 1):.3f} bytes/token, "
                  f"encoded in {dt:.3f} s ({size / dt / 1e6:.1f} MB/s)")
    return 0


COMMANDS.append(add_tokenizer)


DISTILL_EXAMPLES = """examples:
  minillm distill --teacher runs/small --preset tiny --steps 300 --out runs/student
  minillm distill --teacher runs/small --n-layer 2 --n-embd 128 --temperature 4 --alpha 0.9 --out runs/s
  minillm distill --teacher runs/small --kind reverse --steps 300 --out runs/rkl
  minillm distill --teacher runs/small --out runs/student --resume --steps 600
"""


def add_distill(sub) -> None:
    p = sub.add_parser(
        "distill", help="train a small student on a trained teacher's soft targets (KD)",
        description="Knowledge distillation (minillm.distillation): a student GPT of --preset "
                    "(with the teacher's vocabulary and block size unless overridden) learns "
                    "alpha * T^2 * KL(teacher || student) at temperature T plus (1 - alpha) * "
                    "cross-entropy, on the corpus encoded with the teacher's tokenizer "
                    "(--teacher DIR holds tokenizer.model, as written by 'minillm train'). "
                    "Checkpoints, progress bar and an exact --resume as 'minillm train'; on "
                    "--resume the student and the KD settings come from --out.",
        epilog=DISTILL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory (with tokenizer.model)")
    p.add_argument("--out", required=True, help="student checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--preset", default="tiny", help="student preset: tiny, small, gpt2 (default: tiny)")
    for name in ("block-size", "n-layer", "n-head", "n-embd"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name.replace('-', '_')}")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature T (default: 2.0)")
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of the KD term; 1 - alpha weighs cross-entropy (default: 0.5)")
    p.add_argument("--kind", default=None, choices=["forward", "reverse"],
                   help="KL(teacher || student) or KL(student || teacher) (default: forward)")
    p.add_argument("--top-k", type=int, default=None,
                   help="precompute the teacher's top-k logits once and train from them")
    p.add_argument("--corpus", default=None, help="UTF-8 text file (default: the embedded KJV)")
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N characters")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="last fraction of the ids held out for validation (default: 0.1)")
    _add_train_flags(p)
    p.set_defaults(func=run_distill)


def run_distill(args) -> int:
    from pathlib import Path

    import minillm as mm
    from minillm import checkpoint, data, distillation
    from minillm.tokenizer import BPETokenizer
    from minillm.train import TOKENIZER_FILE

    teacher_dir, out = Path(args.teacher), Path(args.out)
    if not (teacher_dir / TOKENIZER_FILE).is_file():
        raise ValueError(f"--teacher={str(teacher_dir)!r} holds no {TOKENIZER_FILE} (a directory "
                         f"written by 'minillm train'): the student must share its tokenizer")
    teacher, tok = mm.GPT.load(teacher_dir), BPETokenizer.load(teacher_dir / TOKENIZER_FILE)
    kd = {"temperature": 2.0, "alpha": 0.5, "kind": "forward", "top_k": None}
    if args.resume:
        meta = checkpoint.load_meta(out) if out.is_dir() else None
        if meta is None:
            raise ValueError(f"--resume: {str(out)!r} holds no training checkpoint (meta.json)")
        if (out / TOKENIZER_FILE).read_bytes() != (teacher_dir / TOKENIZER_FILE).read_bytes():
            raise ValueError(f"--teacher={str(teacher_dir)!r} has another tokenizer than the "
                             f"student in --out={str(out)!r}: resume with the same teacher")
        kd |= distillation.settings_of({k.split(".", 1)[1]: v for k, v in
                                        (checkpoint.load_extra(out, "hooks") or {}).items()
                                        if k.startswith("distill.")})
        scfg, tcfg = mm.GPT.load(out).config, _train_config(args, meta.get("train_config"))
    else:
        overrides = {k: getattr(args, k) for k in ("block_size", "n_layer", "n_head", "n_embd")
                     if getattr(args, k) is not None}
        scfg = mm.GPTConfig.preset(args.preset, **{"vocab_size": teacher.config.vocab_size,
                                                   "block_size": teacher.config.block_size,
                                                   **overrides})
        tcfg = _train_config(args, None)
    kd |= {k: getattr(args, k) for k in kd if getattr(args, k) is not None}
    train_ids, val_ids = data.split(data.encode_corpus(tok, _corpus_text(args)), args.val_fraction)
    print(f"teacher {teacher} -> student L={scfg.n_layer} H={scfg.n_head} C={scfg.n_embd} "
          f"({scfg.num_params():,} params); KD {kd}; {tcfg}")
    res = distillation.distill_run(teacher, scfg, tcfg.steps, seed=tcfg.seed, tokenizer=tok,
                                   train_ids=train_ids, val_ids=val_ids, train_config=tcfg,
                                   out_dir=out, resume=args.resume,
                                   progress=not args.no_progress, **kd)
    _print_train_summary(res, out)
    return 0


COMMANDS.append(add_distill)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None,
                        help="numpy | numba | cupy (default: $MINILLM_BACKEND or numpy)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _call(args):
    """Run the command; in a parallel run a failing rank reports and ends the whole job."""
    if not (getattr(args, "tensor_parallel", None) or getattr(args, "data_parallel", None)):
        return args.func(args)
    from minillm import parallel
    if parallel.launched_size() == 1:   # no mpiexec: errors are reported as usual
        return args.func(args)
    with parallel.abort_on_error(parallel.world(), f"minillm {args.command}"):
        return args.func(args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.backend:
            from minillm import backend
            backend.use(args.backend)
        return int(_call(args) or 0)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"minillm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
