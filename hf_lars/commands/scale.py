"""``hf-lars scale``: fit the batch-size -> LR law to runs, or predict the LR for a new batch size.

::

    hf-lars scale fit RUNS.csv [--rule adam|sgd] [--out PNG] [--bootstrap N]
    hf-lars scale predict --rule adam --batch-size 4096 --ref-batch 512 --ref-lr 3e-4 --b-noise 2e5

``RUNS.csv`` holds either a sweep (``batch_size,lr,loss``, one row per run; best LRs come from
:func:`~hf_lars.scaling.grid.best_lr_from_grid`) or ``batch_size,best_lr`` pairs.  A bad file is reported as
``PATH:LINE: problem`` on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from hf_lars.scaling.fit import fit_surge
from hf_lars.scaling.grid import GridBest, best_lr_from_grid
from hf_lars.scaling.laws import RULES, canonical_rule, scaled_lr
from hf_lars.scaling.runs import MIN_BATCH_SIZES, RunsFileError, read_runs_csv

__all__ = ["register", "run_fit", "run_predict"]

_EXIT_USAGE = 2


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``scale`` with its ``fit`` and ``predict`` sub-commands to the ``hf-lars`` parser."""
    parser = subparsers.add_parser(
        "scale",
        help="batch size -> learning rate: fit the surge/SGD law to runs, predict the LR for a batch size",
        description="Batch size -> learning rate laws: the Adam surge law (Li et al. 2024) and McCandlish's SGD law.",
    )
    sub = parser.add_subparsers(dest="scale_command", metavar="<subcommand>")

    fit = sub.add_parser(
        "fit",
        help="fit eps_max and B_noise to a CSV of runs",
        description="Fit eps_opt(B) to a CSV of runs: columns batch_size,lr,loss (a sweep) or batch_size,best_lr. "
        "Prints the fit with intervals, an AIC comparison with the other law and the linear and sqrt rules, and "
        "whether B_noise is identifiable; writes a PNG.",
    )
    fit.add_argument("runs", metavar="RUNS.csv", help="CSV with batch_size,lr,loss or batch_size,best_lr")
    fit.add_argument("--rule", choices=("adam", "surge", "sgd"), default="adam", help="law to fit (default: adam)")
    fit.add_argument("--out", metavar="PNG", default=None, help="plot path (default: RUNS_scale_fit.png by RUNS.csv)")
    fit.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    fit.add_argument(
        "--bootstrap", metavar="N", type=_non_negative_int, default=1000, help="bootstrap replicates (0: none)"
    )
    fit.add_argument("--bootstrap-method", choices=("residuals", "pairs"), default="residuals")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    fit.add_argument("--confidence", type=float, default=0.95, help="interval level (default: 0.95)")
    fit.add_argument("--window", type=int, default=1, help="sweep: neighbours per side in the quadratic (default: 1)")
    fit.add_argument(
        "--drop-edge", action="store_true", help="sweep: leave out batch sizes whose best LR is on the grid's edge"
    )
    fit.set_defaults(func=run_fit)

    predict = sub.add_parser(
        "predict",
        help="the LR for a new global batch size from a reference run",
        description="lr(B) = ref_lr * f(B) / f(ref_batch) for the chosen rule.",
    )
    predict.add_argument("--rule", choices=RULES, default="adam", help="scaling rule (default: adam)")
    predict.add_argument(
        "--batch-size", type=_positive_float, nargs="+", required=True, metavar="B", help="new global batch size(s)"
    )
    predict.add_argument("--ref-batch", type=_positive_float, required=True, help="global batch size of the reference")
    predict.add_argument("--ref-lr", type=_positive_float, required=True, help="learning rate of the reference run")
    predict.add_argument("--b-noise", type=_positive_float, default=None, help="B_noise (needed by adam/surge and sgd)")
    predict.set_defaults(func=run_predict)

    parser.set_defaults(func=_help_of(parser))
    return parser


def _help_of(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show_help(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return _EXIT_USAGE

    return show_help


def _error(command: str, message: str) -> int:
    print(f"hf-lars scale {command}: error: {message}", file=sys.stderr)
    return _EXIT_USAGE


@contextlib.contextmanager
def _library_warnings_printed_here() -> Iterator[None]:
    """The command prints edge flags and the identifiability verdict itself; do not log them twice."""
    lib = logging.getLogger("hf_lars.scaling")
    old = lib.level
    lib.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lib.setLevel(old)


def _print_grid(records: list[GridBest]) -> None:
    print("Best LR per batch size (quadratic in ln lr around each batch's best run):")
    print(f"  {'batch':>10}{'best_lr':>12}{'loss':>11}  {'method':<7}{'runs':>5}{'diverged':>9}  note")
    for r in records:
        note = "on the grid's edge: extend the LR range" if r.on_edge else ""
        print(
            f"  {r.batch_size:>10g}{r.best_lr:>12.4g}{r.best_loss:>11.4g}  {r.method:<7}{r.n_points:>5}"
            f"{r.n_diverged:>9}  {note}"
        )


def _best_lrs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[GridBest] | None]:
    table = read_runs_csv(args.runs)
    if table.kind == "best":
        return table.batch_sizes, table.lrs, None
    records = best_lr_from_grid(table.grid_rows(), window=args.window)
    _print_grid(records)
    used = [r for r in records if not (args.drop_edge and r.on_edge)]
    if len(used) < MIN_BATCH_SIZES:
        why = "on the grid's edge or " if args.drop_edge else ""
        raise RunsFileError(
            args.runs,
            f"only {len(used)} batch size(s) have a usable best LR (the others are {why}fully diverged); "
            f"need at least {MIN_BATCH_SIZES} to fit",
        )
    return np.array([r.batch_size for r in used]), np.array([r.best_lr for r in used]), records


def run_fit(args: argparse.Namespace) -> int:
    """``hf-lars scale fit``: returns the exit code (2 for a bad CSV or bad arguments)."""
    with _library_warnings_printed_here():
        try:
            batch, best_lr, records = _best_lrs(args)
            result = fit_surge(
                batch, best_lr, args.rule, confidence=args.confidence, n_bootstrap=args.bootstrap,
                bootstrap=args.bootstrap_method, seed=args.seed,
            )
        except RunsFileError as err:
            return _error("fit", str(err))
        except ValueError as err:  # bad option values (--confidence, --window)
            return _error("fit", str(err))
    print(result.summary())
    if args.no_plot:
        return 0
    out = Path(args.out) if args.out else Path(args.runs).with_name(Path(args.runs).stem + "_scale_fit.png")
    try:
        from hf_lars.scaling.plot import plot_surge_fit

        plot_surge_fit(result, out, grid=records)
    except ImportError:
        print("hf-lars scale fit: matplotlib is not installed; no plot (pip install 'hf_lars[plot]')", file=sys.stderr)
        return 0
    except OSError as err:
        return _error("fit", f"cannot write {out}: {err.strerror or err}")
    print(f"Plot written to {out}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``hf-lars scale predict``: prints the LR (one per line as ``batch lr`` for several batch sizes)."""
    if canonical_rule(args.rule) in ("adam", "sgd") and args.b_noise is None:
        return _error("predict", f"--b-noise is required for rule {args.rule!r}")
    try:
        lrs = [scaled_lr(args.rule, args.ref_batch, args.ref_lr, b, args.b_noise) for b in args.batch_size]
    except ValueError as err:
        return _error("predict", str(err))
    if len(lrs) == 1:
        print(f"{lrs[0]:.6g}")
    else:
        for b, lr in zip(args.batch_size, lrs):
            print(f"{b:g}\t{lr:.6g}")
    return 0
