#!/usr/bin/env python
"""LAMB's learning-rate robustness at large batch: loss over a 128x LR grid for AdamW, AdamLARS and RangerLARS.

The claim under test (You et al. 2019, LAMB): with a layer-wise trust ratio the range of learning rates that
trains well at large batch is wider than Adam's.  The runs are ``lm_batch_scaling.py``'s (same tiny Llama,
same 196,608 tokens per run, warmup + poly(2) schedule, clipping at 1.0, weight decay 0.01; see its
docstring) at its large batch ``B=128`` (48 steps), with 8 LRs spaced by 2 (128x) per optimizer, centred on
each optimizer's best LR of part 2, and 3 seeds.  That recipe also needs a small batch; one LR per optimizer
(part 2's best) at ``B=16`` is run and reported as the small-batch reference.

Per optimizer: the LR with the lowest **mean validation** loss, its **test** loss (mean +- std), and the
*band*: the contiguous LRs around the best whose mean loss is within 0.05 nats of the best (on validation,
and separately on test), reported as its width ``max LR / min LR`` (1 = only the best LR; a band that
reaches the grid's edge is flagged, its width is then a lower bound).

Outputs in ``--out-dir`` (default ``docs/results``): ``lm_lr_robustness_runs.csv`` (every run),
``lm_lr_robustness.csv`` (the summary above), ``lm_lr_robustness.png`` (mean validation loss +- std against
each optimizer's LR relative to its own best, the bands shaded).  ``--from-runs CSV`` redoes the summary and plot from a runs CSV without training;
``--quick`` is a seconds-long smoke run.

    python recipes/lm_lr_robustness.py                 # ~9 min on one core
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import mean, stdev
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_batch_scaling  # noqa: E402

BAND_NATS = 0.05
LARGE, SMALL = 128, 16
QUICK_LARGE, QUICK_SMALL = 4, 2  # --quick trains a tiny budget: batches it divides into several steps
# Part 2's best LR per optimizer (docs/results.md, "LM pre-training"): the small-batch reference and the
# centre of the large-batch grid (8 LRs, factor 2: 1/16x .. 8x the best).
BEST = {"adamw": (4e-3, 1.6e-2), "adam_lars": (4e-2, 0.16), "ranger_lars": (0.25, 4.0)}


def grid(centre: float) -> list[float]:
    return [centre * 2.0**k for k in range(-4, 4)]


def batches(quick: bool) -> tuple[int, int]:
    """(small, large) batch sizes in blocks."""
    return (QUICK_SMALL, QUICK_LARGE) if quick else (SMALL, LARGE)


def sweep_argv(out_dir: str, quick: bool, seeds: int) -> list[str]:
    small_b, large_b = batches(quick)
    argv = ["--batch-sizes", str(small_b), str(large_b), "--optimizers", *BEST, "--out-dir", out_dir,
            "--seeds", str(seeds)]
    for opt, (small, large) in BEST.items():
        lrs = grid(large)[2:5] if quick else grid(large)
        argv += ["--grid", f"{opt}:{small_b}={small:g}",
                 "--grid", f"{opt}:{large_b}=" + ",".join(f"{x:g}" for x in lrs)]
    return argv + (["--quick"] if quick else [])


def read_runs(path: str) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [{k: lm_batch_scaling._num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _band(lrs: list[float], losses: list[float], best: int) -> tuple[float, float, bool]:
    """The contiguous LRs around ``best`` within BAND_NATS of its loss: (lo, hi, reaches a grid edge)."""
    limit = losses[best] + BAND_NATS
    lo = best
    while lo > 0 and losses[lo - 1] <= limit:
        lo -= 1
    hi = best
    while hi < len(lrs) - 1 and losses[hi + 1] <= limit:
        hi += 1
    return lrs[lo], lrs[hi], lo == 0 or hi == len(lrs) - 1


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per optimizer: best LR (validation), its test loss, the bands (module docstring), at the
    larger of the two batch sizes in ``rows`` (the smaller one is the small-batch reference)."""
    sizes = sorted({int(r["batch_size"]) for r in rows})
    small_b, large_b = sizes[0], sizes[-1]
    out = []
    for opt in BEST:
        by_lr: dict[float, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r["optimizer"] == opt and int(r["batch_size"]) == large_b:
                by_lr[float(r["lr"])].append(r)
        if not by_lr:
            continue
        lrs = sorted(by_lr)

        def loss(lr: float, key: str) -> float:
            values = [float(r[key]) for r in by_lr[lr]]
            return mean(values) if all(math.isfinite(v) for v in values) else math.inf  # diverged: never chosen

        val = [loss(lr, "val_loss") for lr in lrs]
        test = [loss(lr, "test_loss") for lr in lrs]
        best = min(range(len(lrs)), key=val.__getitem__)
        v_lo, v_hi, v_edge = _band(lrs, val, best)
        t_best = min(range(len(lrs)), key=test.__getitem__)
        t_lo, t_hi, t_edge = _band(lrs, test, t_best)
        tests = [float(r["test_loss"]) for r in by_lr[lrs[best]]]
        small = [float(r["test_loss"]) for r in rows if r["optimizer"] == opt and int(r["batch_size"]) == small_b]
        out.append({
            "optimizer": opt, "batch_size": large_b, "n_lrs": len(lrs), "lr_min": lrs[0], "lr_max": lrs[-1],
            "seeds": len(by_lr[lrs[best]]), "best_lr": lrs[best], "best_val_loss": round(val[best], 5),
            "test_loss_mean": round(mean(tests), 5), "test_loss_std": round(stdev(tests), 5) if len(tests) > 1 else 0.0,
            "val_band_lo": v_lo, "val_band_hi": v_hi, "val_band_width": round(v_hi / v_lo, 3), "val_band_at_edge": int(v_edge),
            "test_band_lo": t_lo, "test_band_hi": t_hi, "test_band_width": round(t_hi / t_lo, 3), "test_band_at_edge": int(t_edge),
            "diverged_lrs": sum(1 for v in val if not math.isfinite(v)),
            "small_batch_test_loss": round(mean(small), 5) if small else None,
        })
    return out


def plot(rows: list[dict[str, Any]], summary: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lowest = min((s["best_val_loss"] for s in summary), default=0.0)
    for s, color in zip(summary, ("tab:gray", "tab:blue", "tab:green")):
        opt = s["optimizer"]
        by_lr: dict[float, list[float]] = defaultdict(list)
        for r in rows:
            if (r["optimizer"] == opt and int(r["batch_size"]) == s["batch_size"]
                    and math.isfinite(float(r["val_loss"]))):
                by_lr[float(r["lr"])].append(float(r["val_loss"]))
        lrs = sorted(by_lr)
        rel = [x / s["best_lr"] for x in lrs]  # each optimizer's LR relative to its own best: widths compare
        means = [mean(by_lr[x]) for x in lrs]
        stds = [stdev(by_lr[x]) if len(by_lr[x]) > 1 else 0.0 for x in lrs]
        ax.errorbar(rel, means, yerr=stds, marker="o", ms=4, capsize=2, color=color,
                    label=f"{opt}: best {s['best_val_loss']:.3f} at lr {s['best_lr']:g}, band {s['val_band_width']:g}x")
        ax.axvspan(s["val_band_lo"] / s["best_lr"] / 1.08, s["val_band_hi"] / s["best_lr"] * 1.08, color=color, alpha=0.12)
    ax.set_ylim(lowest - 0.1, lowest + 1.2)  # points above are off scale (diverging LRs)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate / the optimizer's own best learning rate")
    ax.set_ylabel("validation loss (nats), mean +- std over seeds")
    batch = summary[0]["batch_size"] if summary else LARGE
    ax.set_title(f"LR robustness at B={batch}, same tokens: shaded = within {BAND_NATS} nats of each best",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out_dir: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = summarise(rows)
    lm_batch_scaling.write_csv(os.path.join(out_dir, "lm_lr_robustness.csv"), summary)
    plot(rows, summary, os.path.join(out_dir, "lm_lr_robustness.png"))
    for s in summary:
        print(f"{s['optimizer']:12s} best lr {s['best_lr']:g}: test {s['test_loss_mean']:.3f} +- {s['test_loss_std']:.3f}; "
              f"band {s['val_band_lo']:g}-{s['val_band_hi']:g} = {s['val_band_width']:g}x (val), "
              f"{s['test_band_width']:g}x (test){' (at the grid edge)' if s['val_band_at_edge'] else ''}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out-dir", default="docs/results")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--from-runs", help="summarise this runs CSV instead of training")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    runs_csv = os.path.join(args.out_dir, "lm_lr_robustness_runs.csv")
    if args.from_runs:
        if os.path.abspath(args.from_runs) != os.path.abspath(runs_csv):
            shutil.copyfile(args.from_runs, runs_csv)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            lm_batch_scaling.main(sweep_argv(tmp, args.quick, 1 if args.quick else args.seeds))
            shutil.copyfile(os.path.join(tmp, "lm_batch_scaling_runs.csv"), runs_csv)
    write(args.out_dir, read_runs(runs_csv))
    print(f"wall time: {(time.perf_counter() - t0) / 60:.1f} min; results in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
