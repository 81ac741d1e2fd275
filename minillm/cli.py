"""The ``minillm`` command: ``minillm {info,train,generate,tour,tokenizer} --help``.

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
    n = cfg.num_params()
    print(f"parameters: {n:,}  weight bytes: {n * cfg.np_dtype.itemsize:,}")
    print(f"backend: {backend.current()}")
    for name, (ok, reason) in backend.available().items():
        print(f"  {name:6s} {'yes' if ok else 'no ':3s}  {reason}")
    return 0


# One line per subcommand; a new command adds its add_<name> here.
COMMANDS = [add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None,
                        help="numpy | numba | cupy (default: $MINILLM_BACKEND or numpy)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


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
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"minillm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
