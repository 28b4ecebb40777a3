"""``hf-lars plot-trust OUTPUT_DIR`` and ``hf-lars plot-loss OUTPUT_DIR [MORE_DIRS ...]``: PNGs of a run.

::

    hf-lars plot-trust runs/lars                 # runs/lars/trust_ratios.png (layers x steps, log colours)
    hf-lars plot-loss runs/adamw runs/lars --labels AdamW LARS -o loss.png
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run_plot_trust", "run_plot_loss"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``plot-trust`` and ``plot-loss`` to the ``hf-lars`` parser."""
    trust = subparsers.add_parser(
        "plot-trust",
        help="heatmap PNG of per-layer trust ratios (layers x steps) from OUTPUT_DIR/trust_ratios.jsonl",
        description="Draw OUTPUT_DIR/trust_ratios.jsonl (written by TrustRatioCallback) as a layers x steps "
        "heatmap with a log colour scale.",
    )
    trust.add_argument("output_dir", help="the run's output directory (or the trust_ratios.jsonl file)")
    trust.add_argument("-o", "--out", default=None, help="PNG path (default: OUTPUT_DIR/trust_ratios.png)")
    trust.add_argument("--title", default=None, help="figure title")
    trust.add_argument("--max-layer-labels", type=int, default=60, help="label at most this many layers")
    trust.set_defaults(func=run_plot_trust)

    loss = subparsers.add_parser(
        "plot-loss",
        help="loss-curve PNG (train and eval loss vs step) from trainer_state.json, several runs overlaid",
        description="Plot train and eval loss vs step from each run's trainer_state.json (or its latest "
        "checkpoint's), overlaid with one colour per run.",
    )
    loss.add_argument("output_dirs", nargs="+", help="run output directories")
    loss.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: dir names)")
    loss.add_argument("-o", "--out", default=None, help="PNG path (default: FIRST_DIR/loss.png)")
    loss.add_argument("--title", default=None, help="figure title")
    loss.add_argument("--log-y", action="store_true", help="log-scale loss axis")
    loss.set_defaults(func=run_plot_loss)


def run_plot_trust(args: argparse.Namespace) -> int:
    from hf_lars.plotting import plot_trust_ratios

    try:
        out = plot_trust_ratios(args.output_dir, args.out, title=args.title, max_layer_labels=args.max_layer_labels)
    except (FileNotFoundError, ValueError) as err:
        print(f"hf-lars plot-trust: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def run_plot_loss(args: argparse.Namespace) -> int:
    from hf_lars.plotting import plot_loss_curves

    try:
        out = plot_loss_curves(args.output_dirs, args.out, labels=args.labels, title=args.title, log_y=args.log_y)
    except (FileNotFoundError, ValueError) as err:
        print(f"hf-lars plot-loss: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
