"""Ablations at the largest batch: warmup (SGD, LARS) and the parts of RangerLARS.

Same task, model, epoch budget and schedule as ``vision_batch_scaling.py`` (distorted 8x8 digits, small
convnet, 20 epochs, poly(2) decay), at one large batch (default 1024 of 1,078 training images: 21 steps).

Warmup ablation, for SGD + momentum, LARS (package default: every layer adapted, biases and BatchNorm
parameters without weight decay) and ``lars_all`` (the same, spelt ``adapt_excluded=True``); weight decay
5e-4 as in the batch-scaling recipe:

- ``none``: the peak LR from the first step;
- ``constant``: ``B0/B`` of the peak LR for the warmup epochs, then the peak (Goyal et al.'s constant warmup,
  at the base-batch LR);
- ``linear``: gradual warmup from ``B0/B`` of the peak to the peak (Goyal et al.).

RangerLARS ablation (weight decay 0 for *every* variant: the "no trust ratio" variant puts every layer in
an ``excluded=True`` group, and excluded layers take no weight decay, so decay is off everywhere to compare
like with like); all with gradual warmup + poly(2):

- ``ranger_lars``: full (RAdam + Lookahead k=6, alpha=0.5 + Gradient Centralization + trust ratio);
- ``no_gc``: ``use_gc=False``;
- ``no_lookahead``: ``k=1, alpha=1.0``: the code syncs every step (``t % k == 0``) with
  ``slow += 1.0 * (w - slow)``, i.e. ``slow = w``, then ``w = slow``: Lookahead is the identity
  (``tests/test_recipes_evidence.py`` checks this bit for bit);
- ``no_trust``: one group with ``excluded=True, adapt_excluded=False``: no layer takes the trust ratio;
- ``adam_lars`` (LAMB) for reference;
- ``ranger_lars`` and ``adam_lars`` with every layer adapted (the defaults exclude biases and BatchNorm
  parameters, which then take a plain RAdam/Adam step at the global LR).

Every variant gets its own LR sweep (removing the trust ratio changes the meaning of the LR entirely), every
seed at every LR; the LR with the best mean *validation* accuracy is reported with its *test* accuracy.

Writes ``ablation_runs.csv`` (every run), ``ablation.csv`` (the chosen LR per variant, mean/std),
``ablation.png`` and ``ablation_sweep.png`` under ``--out-dir`` and prints the tables.

Regenerate the committed results (about 12 minutes on 2 busy CPU cores)::

    python recipes/ranger_ablation.py --seeds 3
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
    "group", "variant", "optimizer", "warmup", "batch_size", "lr", "seed", "val_acc", "test_acc", "train_loss",
    "diverged", "steps", "warmup_steps", "warmup_start", "epochs", "power", "weight_decay", "seconds",
]  # fmt: skip


@dataclass(frozen=True)
class Variant:
    group: str  # "warmup" or "ranger"
    name: str
    optimizer: str
    warmup: str
    weight_decay: float
    grid: tuple[float, ...]


def _grid(start: float, n: int) -> tuple[float, ...]:
    return tuple(start * 2.0**i for i in range(n))


def variants(args: argparse.Namespace) -> list[Variant]:
    sgd, lars = _grid(*args.sgd_grid), _grid(*args.lars_grid)
    trust, plain, ranger = _grid(*args.trust_grid), _grid(*args.no_trust_grid), _grid(*args.ranger_grid)
    wd = args.weight_decay
    out = [
        Variant("warmup", f"{opt}/{w}", opt, w, wd, grid)
        for opt, grid in (("sgd", sgd), ("lars_plain_excluded", lars), ("lars_all", lars))
        for w in ("none", "constant", "linear")
    ]
    out += [
        Variant("ranger", "ranger_lars (full)", "ranger_lars", "linear", 0.0, ranger),
        Variant("ranger", "no GC", "ranger_lars_no_gc", "linear", 0.0, ranger),
        Variant("ranger", "no Lookahead (k=1, alpha=1)", "ranger_lars_no_lookahead", "linear", 0.0, ranger),
        Variant("ranger", "no trust ratio (all excluded, not adapted)", "ranger_lars_no_trust", "linear", 0.0, plain),
        Variant("ranger", "adam_lars (LAMB)", "adam_lars", "linear", 0.0, trust),
        Variant("ranger", "ranger_lars, all layers adapted", "ranger_lars_all", "linear", 0.0, ranger),
        Variant("ranger", "adam_lars, all layers adapted", "adam_lars_all", "linear", 0.0, trust),
    ]
    return [v for v in out if args.only in ("all", v.group)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = experiment_parser(__doc__, "a seconds-long smoke run (2 LRs, 1 epoch)")
    p.add_argument("--only", choices=["all", "warmup", "ranger"], default="all", help="run one half of the ablation")
    p.add_argument("--batch", type=int, default=1024, help="the (large) batch size of every run")
    p.add_argument("--base-batch", type=int, default=32, help="warmup starts at base_batch/batch of the peak LR")
    p.add_argument("--epochs", type=float, default=20.0)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="for the warmup ablation (RangerLARS: 0)")
    # LR grids: START * 2**i for i < N.  Ranges from a one-seed probe at B=1024 (documented in docs/results.md).
    p.add_argument("--sgd-grid", type=float, nargs=2, default=[0.4, 6], metavar=("START", "N"))
    p.add_argument("--lars-grid", type=float, nargs=2, default=[4.0, 7], metavar=("START", "N"))
    p.add_argument("--trust-grid", type=float, nargs=2, default=[0.08, 6], metavar=("START", "N"))
    p.add_argument("--no-trust-grid", type=float, nargs=2, default=[0.256, 6], metavar=("START", "N"))
    p.add_argument("--ranger-grid", type=float, nargs=2, default=[0.08, 11], metavar=("START", "N"),
                   help="RangerLARS with the trust ratio (AdamLARS: --trust-grid): 11 points, since RangerLARS is "
                   "silent while RAdam is unrectified its best LR sits far above AdamLARS's (10-20 at B=1024)")
    args = p.parse_args(argv)
    for name in ("sgd_grid", "lars_grid", "trust_grid", "no_trust_grid", "ranger_grid"):
        start, n = getattr(args, name)
        setattr(args, name, (start, int(n)))
    if args.quick:
        args.epochs, args.warmup_epochs, args.batch = 1.0, 0.25, 256
        for name in ("sgd_grid", "lars_grid", "trust_grid", "no_trust_grid", "ranger_grid"):
            setattr(args, name, (getattr(args, name)[0] * 4, 1))
        args.seeds = min(args.seeds, 1)
    return args


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    data = load_digits_splits()
    seeds = list(range(args.seeds))
    vs = variants(args)
    bar = progress_bar(len(seeds) * sum(len(v.grid) for v in vs), "ablation")
    cache = RunCache(data, bar)
    rows: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    for v in vs:
        mine = []
        for lr in v.grid:
            for seed in seeds:
                cfg = RunConfig(
                    optimizer=v.optimizer,
                    lr=lr,
                    batch_size=args.batch,
                    seed=seed,
                    epochs=args.epochs,
                    warmup=v.warmup,
                    warmup_epochs=args.warmup_epochs,
                    warmup_start=args.base_batch / args.batch,
                    power=2.0,
                    weight_decay=v.weight_decay,
                )
                mine.append({"group": v.group, "variant": v.name, **cache.run(cfg)})
        chosen[v.name], _ = best_lr(mine)
        rows += mine
    bar.close()
    return {"rows": rows, "chosen": chosen, "variants": vs}


def summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for v in res["variants"]:
        picked = [r for r in res["rows"] if r["variant"] == v.name and r["lr"] == res["chosen"][v.name]]
        by = ["group", "variant", "optimizer", "warmup", "weight_decay", "lr"]
        (rec,) = summarize(picked, by, ["test_acc", "val_acc", "train_loss"])
        rec["lr_at_grid_edge"] = int(rec["lr"] in (v.grid[0], v.grid[-1]))
        out.append(rec)
    return out


def tables(res: dict[str, Any], summary: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = []
    header = ["group", "variant", "chosen LR", "val acc %", "test acc %", "train loss", "diverged"]
    body = []
    for r in summary:
        edge = " (grid edge)" if r["lr_at_grid_edge"] else ""
        loss = f"{r['train_loss_mean']:.3f} ± {r['train_loss_std']:.3f}"
        body.append([r["group"], r["variant"], f"{r['lr']:.4g}{edge}", pct(r["val_acc_mean"], r["val_acc_std"]),
                     pct(r["test_acc_mean"], r["test_acc_std"]), loss, f"{r['diverged']}/{r['n']}"])  # fmt: skip
    title = f"### Chosen LR per variant (B={args.batch}, mean ± std over {args.seeds} seed(s))"
    out.append(title + "\n\n" + markdown_table(header, body))
    for group in ("warmup", "ranger"):
        vs = [v for v in res["variants"] if v.group == group]
        if not vs:
            continue
        # rows: LR index in the grid (grids differ per variant), cells: "LR: test acc"
        n = max(len(v.grid) for v in vs)
        body = []
        for i in range(n):
            row = [str(i)]
            for v in vs:
                if i >= len(v.grid):
                    row.append("")
                    continue
                lr = v.grid[i]
                runs = [r for r in res["rows"] if r["variant"] == v.name and r["lr"] == lr]
                (s,) = summarize(runs, ["lr"], ["test_acc"])
                cell = f"{lr:.4g}: {pct(s['test_acc_mean'], s['test_acc_std'])}"
                if s["diverged"]:
                    cell += f" ({s['diverged']} div.)"
                row.append(f"**{cell}**" if lr == res["chosen"][v.name] else cell)
            body.append(row)
        out.append(
            f"### LR sweep, {group} ablation (cells: `LR: test acc %`; bold = chosen on val accuracy)\n\n"
            + markdown_table(["#"] + [v.name for v in vs], body)
        )
    return "\n\n".join(out)


def plot(res: dict[str, Any], summary: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    groups = [g for g in ("warmup", "ranger") if any(v.group == g for v in res["variants"])]
    # 1. bars: test accuracy at each variant's chosen LR, seeds as dots
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        recs = [r for r in summary if r["group"] == group]
        xs = range(len(recs))
        colors = [f"C{i}" for i in xs]
        ax.bar(xs, [100 * r["test_acc_mean"] for r in recs], yerr=[100 * r["test_acc_std"] for r in recs],
               color=colors, alpha=0.6, capsize=4)  # fmt: skip
        for x, r in zip(xs, recs):
            seeds = [s["test_acc"] for s in res["rows"] if s["variant"] == r["variant"] and s["lr"] == r["lr"]]
            ax.scatter([x] * len(seeds), [100 * s for s in seeds], color="black", s=12, zorder=3)
            ax.annotate(f"lr={r['lr']:.3g}", (x, 1), textcoords="offset points", xytext=(0, 4), ha="center",
                        fontsize=7, rotation=90, va="bottom")  # fmt: skip
        ax.set_xticks(list(xs), [r["variant"].replace(" (", "\n(") for r in recs], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy (%) at the LR chosen on val")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title("Warmup ablation (SGD, LARS)" if group == "warmup" else "RangerLARS ablation (weight decay 0)")
    fig.suptitle(f"B={args.batch}, {args.epochs:g} epochs; bars: mean ± std, dots: seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "ablation.png"), dpi=110)
    plt.close(fig)
    # 2. the LR sweeps behind the bars
    panels = [("warmup", "sgd"), ("warmup", "lars_plain_excluded"), ("warmup", "lars_all"), ("ranger", None)]
    panels = [p for p in panels if p[0] in groups]
    ncols = 2 if len(panels) > 2 else len(panels)
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (group, opt) in zip(axes.flat, panels):
        for i, v in enumerate(x for x in res["variants"] if x.group == group and (opt is None or x.optimizer == opt)):
            (per_lr) = summarize([r for r in res["rows"] if r["variant"] == v.name], ["lr"], ["val_acc"])
            per_lr.sort(key=lambda s: s["lr"])
            ax.errorbar([s["lr"] for s in per_lr], [100 * s["val_acc_mean"] for s in per_lr],
                        yerr=[100 * s["val_acc_std"] for s in per_lr], marker="o", capsize=3, label=v.name,
                        color=f"C{i}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("peak learning rate" + ("" if opt else " (no trust ratio: an absolute step)"))
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(0, 110 if opt is None else 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower left" if opt else "upper left", ncol=1 if opt else 2)
        ax.set_title(
            f"{opt}: warmup (none / constant / linear)" if opt else "RangerLARS variants + AdamLARS (weight decay 0)"
        )
    fig.suptitle(
        f"LR sweeps at B={args.batch}; mean ± std over {args.seeds} seed(s); diverged runs score 10%", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "ablation_sweep.png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    single_thread()
    return run_and_report(
        parse_args(argv),
        stem="ablation",
        run_columns=RUN_COLUMNS,
        run_experiment=run_experiment,
        summary_rows=summary_rows,
        tables=tables,
        plot=plot,
    )


if __name__ == "__main__":
    sys.exit(main())
