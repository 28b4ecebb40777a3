"""``hf-lars bench``: time ``optimizer.step()`` of ours against torch's SGD/AdamW and peer optimizers.

The benchmark itself lives in :mod:`hf_lars.bench`; ``benchmarks/bench_step.py`` runs the same code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``hf-lars bench`` and ``benchmarks/bench_step.py``."""
    parser.add_argument(
        "--params-millions", type=float, default=25.0,
        help="size of the GPT-2-like parameter set, in millions (default: 25, which gives d=512, 6 layers, 23.6M)",
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="timed steps per optimizer; the median is reported (default: 30)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    parser.add_argument(
        "--optimizers", default=None,
        help="comma-separated subset of ours (LARS,AdamLARS,RangerLARS; registry aliases such as lamb work); their "
        "baselines and peers come along (default: all)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip timm and pytorch-optimizer")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="also write the report as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark optimizer.step() against torch and peer optimizers",
        description="Time optimizer.step() of LARS, AdamLARS and RangerLARS against torch's SGD/AdamW (the "
        "baselines, both foreach settings) and peer optimizers (timm, pytorch-optimizer) on a GPT-2-like parameter "
        "set, interleaved in one process; print a table of medians and ratios.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_lars.bench import builtin_contenders, load_peer_contenders, run_benchmark, select_contenders

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    contenders = builtin_contenders()
    notes: list[str] = []
    if not args.no_peers:
        peers, notes = load_peer_contenders(log=log)
        contenders += peers
    wanted = None if args.optimizers is None else [s.strip() for s in args.optimizers.split(",")]
    try:
        contenders = select_contenders(contenders, wanted)
        report = run_benchmark(
            params_millions=args.params_millions,
            steps=args.steps,
            warmup=args.warmup,
            contenders=contenders,
            threads=args.threads,
            progress=not args.no_progress,
            notes=notes,
        )
    except ValueError as err:
        log(f"hf-lars bench: error: {err}")
        return 2
    print(report.render())
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report.render(markdown=True))
        log(f"Markdown written to {args.markdown}")
    return 0
