"""Vision-style batch scaling: SGD + linear scaling + gradual warmup vs LARS + warmup + poly(2).

The claims under test:

- Goyal et al. 2017 (arXiv:1706.02677): with the linear scaling rule (``lr = base_lr * B / B0``) and gradual
  warmup, SGD with momentum keeps its small-batch accuracy up to large batches.
- You, Gitman, Ginsburg 2017 (arXiv:1708.03888): LARS (a per-layer trust ratio) with warmup and
  polynomial decay of power 2 keeps accuracy at batches where that rule breaks down.

Four series: ``sgd``; ``lars``, the package default (``hf_lars.create_optimizer(model, "lars")``: biases
and BatchNorm parameters are excluded from the trust ratio and take plain momentum SGD at the global LR);
``lars_all``, every layer adapted as in the paper's Algorithm 1 (biases and BatchNorm without weight
decay); ``lars_all_sqrt``, the same optimizer with the square-root LR rule (You et al. 2019 scale LAMB's
LR that way).

Protocol (fixed epoch budget, so a larger batch means fewer steps):

1. LR sweep at the base batch (the smallest) for each optimizer over a grid, every seed; the LR with the
   best mean *validation* accuracy is kept.
2. Each series' rule carries the base LR to the other batch sizes: linear for SGD; for ``lars`` and
   ``lars_all`` one global LR with the trust coefficient (``--lars-rule none``), for ``lars_all_sqrt``
   ``lr * sqrt(B / B0)``.  Gradual warmup starts at the base-batch LR (``warmup_start =
   B0 / B``, Goyal et al.) in every series; all then decay with poly(2) to 0.
3. At the largest batch, each optimizer's LR is re-tuned over ``rule_lr * 2**k`` (same seeds) to separate
   "the rule picked a bad LR" from "the optimizer cannot do better at this batch".

Test accuracy is only reported, never used for a choice.  Writes ``batch_scaling_runs.csv`` (every run),
``batch_scaling.csv`` (mean and std per series and batch, and re-tuned per optimizer), ``batch_scaling.png`` and
``batch_scaling_sweep.png`` under ``--out-dir`` and prints the tables.

Regenerate the committed results (about 10 minutes on 2 busy CPU cores)::

    python recipes/vision_batch_scaling.py --seeds 3
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _experiment import (  # noqa: E402
    RunCache,
    RunConfig,
    best_lr,
    experiment_parser,
    load_digits_splits,
    markdown_table,
    pct,
    progress_bar,
    run_and_report,
    single_thread,
    summarize,
)

RUN_COLUMNS = [
    "phase", "series", "optimizer", "batch_size", "lr", "seed", "val_acc", "test_acc", "train_loss", "diverged",
    "steps", "warmup_steps", "warmup", "warmup_start", "epochs", "power", "weight_decay", "seconds",
]  # fmt: skip


@dataclass(frozen=True)
class Series:
    """An optimizer (a name of :func:`_experiment.build_optimizer`) with its batch-size LR rule."""

    name: str
    optimizer: str
    rule: str  # "linear", "sqrt" or "none" (hf_lars.scaling.scaled_lr)
    label: str


def series_list(args: argparse.Namespace) -> list[Series]:
    return [
        Series("sgd", "sgd", "linear", "SGD + momentum, linear rule"),
        Series("lars", "lars", args.lars_rule, f"LARS default (1-D layers excluded), rule: {args.lars_rule}"),
        Series("lars_all", "lars_all", args.lars_rule, f"LARS, all layers adapted, rule: {args.lars_rule}"),
        Series("lars_all_sqrt", "lars_all", "sqrt", "LARS, all layers adapted, rule: sqrt"),
    ]


def _optimizers(series: list[Series]) -> list[str]:
    return list(dict.fromkeys(s.optimizer for s in series))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = experiment_parser(__doc__, "a seconds-long smoke run (tiny grids, 1 epoch)")
    p.add_argument("--epochs", type=float, default=20.0, help="epoch budget, the same for every batch size")
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--sgd-lrs", type=float, nargs="+", default=[0.025, 0.05, 0.1, 0.2, 0.4, 0.8])
    p.add_argument("--lars-lrs", type=float, nargs="+", default=[2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    p.add_argument("--lars-rule", choices=["none", "linear", "sqrt"], default="none",
                   help="LR rule of the 'lars' and 'lars_all' series ('lars_all_sqrt' uses sqrt)")  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--retune-powers", type=int, nargs="+", default=[-3, -2, -1, 0, 1, 2, 3, 4, 5],
                   help="re-tune at the largest batch over rule_lr * 2**k for these k")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=0.01, help="'breaks down': mean test accuracy this far below B0")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.warmup_epochs = 1.0, 0.25
        args.batch_sizes = [32, 256]
        args.sgd_lrs, args.lars_lrs = [0.05, 0.1], [2.0, 4.0]
        args.retune_powers = [0, 1]
        args.seeds = min(args.seeds, 1)
    args.batch_sizes = sorted(set(args.batch_sizes))
    return args


def _config(args: argparse.Namespace, optimizer: str, lr: float, batch: int, seed: int) -> RunConfig:
    return RunConfig(
        optimizer=optimizer,
        lr=lr,
        batch_size=batch,
        seed=seed,
        epochs=args.epochs,
        warmup="linear",
        warmup_epochs=args.warmup_epochs,
        warmup_start=args.batch_sizes[0] / batch,
        power=2.0,
        weight_decay=args.weight_decay,
    )


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    from hf_lars.scaling import scaled_lr

    data = load_digits_splits()
    seeds = list(range(args.seeds))
    series = series_list(args)
    optimizers = _optimizers(series)
    base, largest = args.batch_sizes[0], args.batch_sizes[-1]
    grids = {"sgd": args.sgd_lrs, "lars": args.lars_lrs, "lars_all": args.lars_lrs}
    n_configs = sum(len(grids[o]) + len(args.retune_powers) for o in optimizers) + len(series) * len(args.batch_sizes)
    bar = progress_bar(len(seeds) * n_configs, "batch scaling")  # an upper bound: repeated configs run once
    cache = RunCache(data, bar)
    rows: list[dict[str, Any]] = []

    def run(phase: str, series_name: str, cfg: RunConfig) -> None:
        rows.append({"phase": phase, "series": series_name, **cache.run(cfg)})

    def pick(phase: str, opt: str) -> float:
        return best_lr([r for r in rows if r["phase"] == phase and r["optimizer"] == opt])[0]

    best: dict[str, float] = {}
    for opt in optimizers:  # 1. LR sweep at the base batch, per optimizer
        for lr in grids[opt]:
            for seed in seeds:
                run("sweep_base", "", _config(args, opt, lr, base, seed))
        best[opt] = pick("sweep_base", opt)
    rule_lr = {s.name: {b: float(scaled_lr(s.rule, base, best[s.optimizer], b)) for b in args.batch_sizes} for s in series}
    for s in series:  # 2. each series' rule at every batch size
        for b in args.batch_sizes:
            for seed in seeds:
                run("scaling", s.name, _config(args, s.optimizer, rule_lr[s.name][b], b, seed))
    retuned: dict[str, float] = {}
    for opt in optimizers:  # 3. re-tune at the largest batch, around the first rule of the optimizer
        center = rule_lr[next(s.name for s in series if s.optimizer == opt)][largest]
        for k in args.retune_powers:
            for seed in seeds:
                run("retune_largest", "", _config(args, opt, center * 2.0**k, largest, seed))
        retuned[opt] = pick("retune_largest", opt)
        for seed in seeds:
            run("retuned_final", "", _config(args, opt, retuned[opt], largest, seed))
    bar.close()
    return {
        "rows": rows, "series": series, "optimizers": optimizers, "best": best, "rule_lr": rule_lr,
        "retuned": retuned, "base": base, "largest": largest,
    }  # fmt: skip


def summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean/std per (series, batch) with the rule's LR, plus the re-tuned largest-batch result per optimizer."""
    metrics = ["test_acc", "val_acc", "train_loss"]
    out = []
    scaling = [r for r in res["rows"] if r["phase"] == "scaling"]
    for rec in summarize(scaling, ["series", "optimizer", "batch_size", "lr"], metrics):
        out.append({"lr_choice": "rule", **rec})
    retuned = [r for r in res["rows"] if r["phase"] == "retuned_final"]
    for rec in summarize(retuned, ["optimizer", "batch_size", "lr"], metrics):
        out.append({"lr_choice": "retuned", "series": "", **rec})
    return out


def _rule_rows(summary: list[dict[str, Any]], series: str) -> list[dict[str, Any]]:
    rows = [r for r in summary if r["series"] == series and r["lr_choice"] == "rule"]
    return sorted(rows, key=lambda r: r["batch_size"])


def breakdown(summary: list[dict[str, Any]], series: str, tolerance: float) -> int | None:
    """The smallest batch whose mean test accuracy is more than ``tolerance`` below the base batch's."""
    rule = _rule_rows(summary, series)
    base_acc = rule[0]["test_acc_mean"]
    for r in rule[1:]:
        if r["test_acc_mean"] < base_acc - tolerance:
            return r["batch_size"]
    return None


def _mean_loss(rows: list[dict[str, Any]]) -> str:
    finite = [r["train_loss"] for r in rows if r["train_loss"] == r["train_loss"]]
    return f"{sum(finite) / len(finite):.3f}" if finite else "nan"


def tables(res: dict[str, Any], summary: list[dict[str, Any]], args: argparse.Namespace) -> str:
    base, largest, series = res["base"], res["largest"], res["series"]
    out = []
    for phase, batch in (("sweep_base", base), ("retune_largest", largest)):
        header = ["optimizer", "LR", f"val acc % (B={batch})", "test acc %", "train loss", "diverged"]
        body = []
        for opt in res["optimizers"]:
            chosen = res["best"][opt] if phase == "sweep_base" else res["retuned"][opt]
            mine = [r for r in res["rows"] if r["phase"] == phase and r["optimizer"] == opt]
            for s in best_lr(mine)[1]:
                lr = s["lr"]
                note = " **(chosen)**" if lr == chosen else ""
                if phase == "retune_largest":
                    rules = [x.name for x in series if x.optimizer == opt and res["rule_lr"][x.name][largest] == lr]
                    note += "".join(f" (rule: {name})" for name in rules)
                loss = _mean_loss([r for r in mine if r["lr"] == lr])
                val, test = pct(s["val_acc_mean"], s["val_acc_std"]), pct(s["test_acc_mean"], s["test_acc_std"])
                body.append([opt, f"{lr:.4g}{note}", val, test, loss, f"{s['diverged']}/{s['n']}"])
        title = "LR sweep at the base batch" if phase == "sweep_base" else "LR re-tuned at the largest batch"
        out.append(f"### {title} (B={batch}; chosen on mean val accuracy)\n\n" + markdown_table(header, body))
    by = {(r["series"], r["batch_size"]): r for r in summary if r["lr_choice"] == "rule"}
    tuned = {r["optimizer"]: r for r in summary if r["lr_choice"] == "retuned"}
    steps = {r["batch_size"]: r["steps"] for r in res["rows"]}
    for metric, title in (("test_acc", "Test accuracy % (LR)"), ("train_loss", "Training loss, last epoch (LR)")):

        def cell(r: dict[str, Any]) -> str:
            m, sd = r[f"{metric}_mean"], r[f"{metric}_std"]
            return (pct(m, sd) if metric == "test_acc" else f"{m:.3f} ± {sd:.3f}") + f" ({r['lr']:.3g})"

        body = [[b, steps[b]] + [cell(by[(s.name, b)]) for s in series] for b in args.batch_sizes]
        body.append([f"{largest}, LR re-tuned", steps[largest]] + [cell(tuned[s.optimizer]) for s in series])
        table = markdown_table(["batch", "steps"] + [s.name for s in series], body)
        out.append(f"### {title} per batch size, mean ± std over seeds\n\n" + table)
    lines = []
    for s in series:
        b = breakdown(summary, s.name, args.tolerance)
        where = f"first at B={b}" if b else f"not up to B={largest}"
        points = f"{100 * args.tolerance:.0f} point(s)"
        lines.append(f"- {s.name}: mean test accuracy more than {points} below its B={base} value {where}")
    out.append("\n".join(lines))
    return "\n\n".join(out)


def plot(res: dict[str, Any], summary: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    colors = {"sgd": "tab:blue", "lars": "tab:orange", "lars_all": "tab:green", "lars_all_sqrt": "tab:red"}
    base, largest, series = res["base"], res["largest"], res["series"]
    paths = []
    # 1. accuracy and train loss vs batch size
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for s in series:
        rule = _rule_rows(summary, s.name)
        for ax, metric, scale in ((axes[0], "test_acc", 100.0), (axes[1], "train_loss", 1.0)):
            ax.errorbar([r["batch_size"] for r in rule], [scale * r[f"{metric}_mean"] for r in rule],
                        yerr=[scale * r[f"{metric}_std"] for r in rule], marker="o", capsize=3, color=colors[s.name],
                        label=s.label)  # fmt: skip
    for i, opt in enumerate(res["optimizers"]):
        tuned = next(r for r in summary if r["optimizer"] == opt and r["lr_choice"] == "retuned")
        for ax, metric, scale in ((axes[0], "test_acc", 100.0), (axes[1], "train_loss", 1.0)):
            ax.errorbar([largest * 1.12 ** (i + 1)], [scale * tuned[f"{metric}_mean"]],
                        yerr=[scale * tuned[f"{metric}_std"]], marker="*", markersize=12, capsize=3, linestyle="none",
                        color=colors[opt], markerfacecolor="white",
                        label=f"{opt}: LR re-tuned at B={largest}")  # fmt: skip
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title(f"Test accuracy, {args.epochs:g} epochs at every batch size")
    axes[1].set_ylabel("training loss (last epoch, augmented)")
    axes[1].set_title("Training loss")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.batch_sizes, [str(b) for b in args.batch_sizes])
        ax.set_xlabel("batch size (1,078 training images)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7.5, loc="lower left")
    fig.suptitle(
        f"Distorted 8x8 digits, small convnet with BatchNorm; mean ± std over {args.seeds} seed(s)", fontsize=10
    )
    fig.tight_layout()
    paths.append(os.path.join(args.out_dir, "batch_scaling.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # 2. the LR sweeps
    opts = res["optimizers"]
    fig, axes = plt.subplots(1, len(opts), figsize=(5.2 * len(opts), 4.4), squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for phase, batch, style in (("sweep_base", base, "-o"), ("retune_largest", largest, "--s")):
            per_lr = best_lr([r for r in res["rows"] if r["phase"] == phase and r["optimizer"] == opt])[1]
            ax.errorbar([s["lr"] for s in per_lr], [100 * s["val_acc_mean"] for s in per_lr],
                        yerr=[100 * s["val_acc_std"] for s in per_lr], fmt=style, capsize=3, color=colors[opt],
                        alpha=1.0 if phase == "sweep_base" else 0.7, label=f"B={batch}")  # fmt: skip
        for j, s in enumerate(x for x in series if x.optimizer == opt):
            ax.axvline(res["rule_lr"][s.name][largest], color="gray", linestyle=[":", "-."][j % 2],
                       label=f"{s.rule} rule: LR at B={largest}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{opt}: LR sweeps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Mean ± std over {args.seeds} seed(s); diverged runs score 10%", fontsize=10)
    fig.tight_layout()
    paths.append(os.path.join(args.out_dir, "batch_scaling_sweep.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    single_thread()
    return run_and_report(
        parse_args(argv),
        stem="batch_scaling",
        run_columns=RUN_COLUMNS,
        run_experiment=run_experiment,
        summary_rows=summary_rows,
        tables=tables,
        plot=plot,
    )


if __name__ == "__main__":
    sys.exit(main())
