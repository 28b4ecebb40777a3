"""``hf-lars demo``: large-batch pre-training on CPU with AdamW, AdamLARS, RangerLARS and LARS, side by side.

A small Llama-style causal LM (the recipe's architecture, :func:`hf_lars.demo.model.tiny_llama_config`, scaled down
to fit a CPU budget) is pre-trained from scratch on the embedded corpus with ``Trainer``, once per optimizer,
at the same large global batch with warmup + poly decay (``--lr_scheduler_type warmup_poly``).  Each
optimizer gets a learning rate tuned for it at :data:`REFERENCE_BATCH` and scaled to ``--batch-size`` with
its rule (square root for the Adam forms, linear for LARS; :func:`hf_lars.scaling.scaled_lr`).  The defaults
(batch 128 x 32 tokens, 120 steps, a 0.1M-parameter model) took 128 s on 2 CPU cores shared with other jobs
(load average 5); on a busy machine it trains with one intra-op thread (see :func:`hf_lars.demo.run.choose_threads`).
Prints a results table and writes ``loss.png`` (plus each run's ``trainer_state.json`` and
``trust_ratios.jsonl``) under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hf_lars.demo.run import run_demo
from hf_lars.demo.settings import DEFAULT_STEPS, DEMO_OPTIMIZERS, REFERENCE_BATCH

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``demo`` to the ``hf-lars`` parser."""
    parser = subparsers.add_parser(
        "demo",
        help="large-batch CPU pre-training: AdamW vs AdamLARS vs RangerLARS vs LARS (about 2 minutes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", default="hf_lars_demo", help="where runs, loss.png and results go")
    parser.add_argument(
        "--steps", type=int, default=None, help=f"optimizer steps per run (default {DEFAULT_STEPS}; quick: 4)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help=f"global batch (default {REFERENCE_BATCH})")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=list(DEMO_OPTIMIZERS),
        choices=list(DEMO_OPTIMIZERS),
        metavar="NAME",
        help=f"which to run (default: all of {', '.join(DEMO_OPTIMIZERS)})",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds; for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 if the CPU is busy, else torch's default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    results = run_demo(
        args.output_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        optimizers=args.optimizers,
        quick=args.quick,
        seed=args.seed,
        threads=args.threads,
        echo=lambda line: print(line, flush=True),
    )
    out = Path(args.output_dir)
    print()
    print((out / "results.txt").read_text().rstrip())
    print(f"\nloss curves: {out / 'loss.png'}   trust ratios: hf-lars plot-trust {results[-1].output_dir}")
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    return 0
