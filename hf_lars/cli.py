"""The ``hf-lars`` command: ``hf-lars <command> [args]``, one module per command in :mod:`hf_lars.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

# Each module in hf_lars.commands exposes ``register(subparsers)`` which adds its sub-parser and sets
# ``func=run(args) -> int`` as the default.  Modules are imported lazily so ``hf-lars --version`` stays fast.
_COMMANDS: tuple[str, ...] = ("bench", "demo", "run", "plot", "scale", "list")


def build_parser() -> argparse.ArgumentParser:
    from hf_lars import __version__

    parser = argparse.ArgumentParser(
        prog="hf-lars",
        description="Layer-wise trust-ratio optimizers for large-batch training (LARS, AdamLARS/LAMB, RangerLARS).",
    )
    parser.add_argument("--version", action="version", version=f"hf_lars {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in _COMMANDS:
        importlib.import_module(f"hf_lars.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `hf-lars run SCRIPT.py [script args]` hands everything after SCRIPT to the script untouched.
    if argv and argv[0] == "run":
        from hf_lars.commands.run import run_script

        return run_script(argv[1:])
    # `hf-lars bench [args]` runs benchmarks/bench_step.py of the checkout, which parses its own options.
    if argv and argv[0] == "bench":
        from hf_lars.commands.bench import run_bench

        return run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
