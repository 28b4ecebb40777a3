"""LARS where SGD is said to fail even when tuned: a deep network without any normalization.

The claim under test (You, Gitman, Ginsburg 2017, arXiv:1708.03888, AlexNet without BatchNorm): at large
batch, SGD cannot reach the small-batch accuracy at any learning rate, because one global LR cannot suit
layers whose ``||w|| / ||g||`` differ by orders of magnitude; LARS, with a per-layer trust ratio, can.

Task: the distorted 8x8 digits of ``vision_batch_scaling.py``; model: eight weight layers (six conv3x3, two
linear), ReLU, biases, **no normalization**, He init (:func:`_experiment.make_plain_deep_net`).  Same
60-epoch budget at every batch size (64 to 1,024), 5 epochs of gradual warmup from ``B0 / B`` of the peak, then poly(2)
decay to 0, weight decay 5e-4 on conv/linear weights only.

Budget: 60 epochs (the paper's AlexNet runs took 100; 20, part 1's budget, left both optimizers near 30% at
B=1024 in one-seed probes: 22 steps are too few for this network), so B=1024 takes 64 steps.

1. The paper's motivating table: ``||w|| / ||g||`` per layer at initialisation (gradient of the loss on one
   batch of distorted training images), for this network and, for contrast, the BatchNorm convnet of part 1.
2. SGD (momentum 0.9) and LARS (the package default: every layer adapted, trust coefficient 1e-3, momentum
   0.9) with the LR swept **at every batch size** over ``centre * sqrt(B / B0) * 2**k`` (the grid moves
   with the batch so that it brackets the best LR; a best LR at the grid's edge is flagged), every seed at
   every LR; the LR with the best mean *validation* accuracy is chosen and its *test* accuracy reported.
   A best LR at the grid's edge grows the grid by two LRs past that edge (``--extend``, once by default),
   for both optimizers alike; a best LR still at the edge is flagged.

Writes ``no_norm_runs.csv`` (every run), ``no_norm.csv`` (the chosen LR per optimizer and batch),
``no_norm_ratios.csv`` (the table of step 1), ``no_norm.png`` (accuracy vs batch and the sweeps) under
``--out-dir`` and prints the tables.

Regenerate the committed results (about 15 minutes on one core)::

    python recipes/no_norm_lars.py --seeds 3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _experiment import (  # noqa: E402
    RunCache,
    RunConfig,
    augment,
    best_lr,
    experiment_parser,
    load_digits_splits,
    make_model,
    markdown_table,
    mean_std,
    pct,
    progress_bar,
    read_csv,
    run_and_report,
    seed_everything,
    single_thread,
    summarize,
    write_csv,
)

RUN_COLUMNS = [
    "optimizer", "batch_size", "lr", "seed", "val_acc", "test_acc", "train_loss", "diverged", "steps",
    "warmup_steps", "warmup_start", "epochs", "power", "weight_decay", "model", "width", "seconds",
]  # fmt: skip
OPTIMIZERS = ("sgd", "lars")
LABELS = {"sgd": "SGD + momentum", "lars": "LARS (package default)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = experiment_parser(__doc__, "a seconds-long smoke run (tiny grids, 1 epoch, 1 seed)")
    p.add_argument("--epochs", type=float, default=60.0, help="epoch budget, the same for every batch size")
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--sgd-centre", type=float, default=0.08, help="centre of SGD's LR grid at the smallest batch")
    p.add_argument("--lars-centre", type=float, default=6.0, help="centre of LARS's LR grid at the smallest batch")
    p.add_argument("--grid-powers", type=int, nargs="+", default=[-2, -1, 0, 1, 2],
                   help="LR grid at batch B: centre * sqrt(B / B0) * 2**k for these k")  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--ratio-batch", type=int, default=1024, help="images in the gradient of the init table")
    p.add_argument("--tolerance", type=float, default=0.01, help="'holds': mean test accuracy this close to B0")
    p.add_argument("--extend", type=int, default=1, help="times a grid grows by 2 LRs past an edge that wins")
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs in --out-dir's no_norm_runs.csv (from an invocation with the same settings)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.warmup_epochs = 1.0, 0.25
        args.batch_sizes, args.grid_powers = [32, 256], [0, 1]
        args.width, args.ratio_batch = 4, 64
        args.seeds = min(args.seeds, 1)
    args.batch_sizes = sorted(set(args.batch_sizes))
    return args


def lr_grid(args: argparse.Namespace, optimizer: str, batch: int) -> list[float]:
    centre = args.sgd_centre if optimizer == "sgd" else args.lars_centre
    scale = math.sqrt(batch / args.batch_sizes[0])
    return [float(f"{centre * scale * 2.0**k:.4g}") for k in args.grid_powers]


def init_ratios(args: argparse.Namespace, data: dict[str, Any]) -> list[dict[str, Any]]:
    """``||w||``, ``||g||`` and ``||w|| / ||g||`` per weight tensor at init, mean over the seeds, for the network
    of this experiment (``plain_deep``) and the BatchNorm convnet of part 1 (``bn_convnet``)."""
    x_train, y_train = data["train"]
    out = []
    for model_name in ("plain_deep", "bn_convnet"):
        per_seed: dict[str, list[tuple[float, float]]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for seed in range(args.seeds):
            gen = seed_everything(seed)
            model = make_model(model_name, args.width)
            idx = torch.randint(0, x_train.shape[0], (args.ratio_batch,), generator=gen)
            F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx]).backward()
            for name, p in model.named_parameters():
                if p.ndim > 1:  # weights: biases start at 0 and BatchNorm scales at 1
                    shapes[name] = tuple(p.shape)
                    per_seed.setdefault(name, []).append((float(p.detach().norm()), float(p.grad.norm())))
        for layer, (name, pairs) in enumerate(per_seed.items()):
            w, g = mean_std([a for a, _ in pairs])[0], mean_std([b for _, b in pairs])[0]
            ratio = mean_std([a / b for a, b in pairs])
            out.append({"model": model_name, "layer": layer, "name": name, "shape": "x".join(map(str, shapes[name])),
                        "w_norm": w, "g_norm": g, "ratio_mean": ratio[0], "ratio_std": ratio[1]})  # fmt: skip
    return out


def _prior_runs(args: argparse.Namespace) -> dict[tuple[str, int, float, int], dict[str, Any]]:
    """``--resume``: the runs of an earlier invocation with the same settings, keyed (optimizer, batch, lr, seed)."""
    path = os.path.join(args.out_dir, "no_norm_runs.csv")
    if not (args.resume and os.path.exists(path)):
        return {}
    ints, strs = {"batch_size", "seed", "diverged", "steps", "warmup_steps", "width"}, {"optimizer", "model"}
    rows = [{k: v if k in strs else int(v) if k in ints else float(v) for k, v in r.items()} for r in read_csv(path)]
    return {(r["optimizer"], r["batch_size"], r["lr"], r["seed"]): r for r in rows}


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    data = load_digits_splits()
    ratios = init_ratios(args, data)
    write_csv(os.path.join(args.out_dir, "no_norm_ratios.csv"), ratios)
    prior = _prior_runs(args)
    seeds = list(range(args.seeds))
    b0 = args.batch_sizes[0]
    grids = {(o, b): lr_grid(args, o, b) for o in OPTIMIZERS for b in args.batch_sizes}
    bar = progress_bar(len(seeds) * sum(len(g) for g in grids.values()), "no-norm")
    cache = RunCache(data, bar)
    rows: list[dict[str, Any]] = []
    chosen: dict[tuple[str, int], float] = {}

    def run(o: str, b: int, lr: float, seed: int) -> dict[str, Any]:
        if (o, b, lr, seed) in prior:
            bar.update(1)
            return prior[(o, b, lr, seed)]
        cfg = RunConfig(optimizer=o, lr=lr, batch_size=b, seed=seed, epochs=args.epochs,
                        warmup_epochs=args.warmup_epochs, warmup_start=b0 / b, weight_decay=args.weight_decay,
                        width=args.width, model="plain_deep")  # fmt: skip
        return cache.run(cfg)

    for b in sorted(args.batch_sizes, reverse=True):  # the cheap large batches first: early news
        for o in OPTIMIZERS:
            grid = grids[(o, b)]
            mine = [run(o, b, lr, seed) for lr in grid for seed in seeds]
            chosen[(o, b)], _ = best_lr(mine)
            for _ in range(args.extend):  # a best LR at an edge: two more LRs past that edge, once
                if chosen[(o, b)] not in (grid[0], grid[-1]):
                    break
                low = chosen[(o, b)] == grid[0]
                more = [float(f"{(grid[0] / 2**i if low else grid[-1] * 2**i):.4g}") for i in (1, 2)]
                bar.total += len(more) * len(seeds)
                mine += [run(o, b, lr, seed) for lr in more for seed in seeds]
                grid = grids[(o, b)] = sorted(grid + more)
                chosen[(o, b)], _ = best_lr(mine)
            rows += sorted(mine, key=lambda r: (r["lr"], r["seed"]))
    bar.close()
    return {"rows": rows, "chosen": chosen, "grids": grids, "ratios": ratios}


def summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for (o, b), lr in sorted(res["chosen"].items(), key=lambda kv: (OPTIMIZERS.index(kv[0][0]), kv[0][1])):
        picked = [r for r in res["rows"] if r["optimizer"] == o and r["batch_size"] == b and r["lr"] == lr]
        (rec,) = summarize(picked, ["optimizer", "batch_size", "lr", "steps"], ["test_acc", "val_acc", "train_loss"])
        grid = res["grids"][(o, b)]
        rec["lr_at_grid_edge"] = int(lr in (grid[0], grid[-1]))
        out.append(rec)
    return out


def tables(res: dict[str, Any], summary: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = []
    ratios = res["ratios"]
    body = []
    for model_name in ("plain_deep", "bn_convnet"):
        mine = [r for r in ratios if r["model"] == model_name]
        for r in mine:
            body.append([model_name, r["layer"], r["name"], r["shape"], f"{r['w_norm']:.3g}", f"{r['g_norm']:.3g}",
                         f"{r['ratio_mean']:.3g} ± {r['ratio_std']:.2g}"])  # fmt: skip
        spread = max(r["ratio_mean"] for r in mine) / min(r["ratio_mean"] for r in mine)
        body.append([model_name, "", "**max / min**", "", "", "", f"**{spread:.3g}x**"])
    out.append(f"#### ||w|| / ||g|| per weight tensor at init (gradient of one batch of {args.ratio_batch}, "
               f"mean ± std over {args.seeds} seed(s))\n\n"
               + markdown_table(["model", "#", "tensor", "shape", "||w||", "||g||", "||w|| / ||g||"],
                                body))  # fmt: skip
    by = {(r["optimizer"], r["batch_size"]): r for r in summary}
    b0 = args.batch_sizes[0]
    body = []
    for b in args.batch_sizes:
        row = [b, by[("sgd", b)]["steps"]]
        for o in OPTIMIZERS:
            r = by[(o, b)]
            edge = ", grid edge" if r["lr_at_grid_edge"] else ""
            change = 100 * (r["test_acc_mean"] - by[(o, b0)]["test_acc_mean"])
            change_text = "reference" if b == b0 else f"{change:+.1f}"
            row.append(f"{pct(r['test_acc_mean'], r['test_acc_std'])} ({r['lr']:.4g}{edge}; {change_text})")
        body.append(row)
    out.append(f"#### Test accuracy % at the LR chosen on validation (LR; change vs B={b0} in points), mean ± std "
               f"over {args.seeds} seed(s)\n\n"
               + markdown_table(["batch", "steps", *(LABELS[o] for o in OPTIMIZERS)], body))  # fmt: skip
    body = []
    for b in args.batch_sizes:
        n = max(len(res["grids"][(o, b)]) for o in OPTIMIZERS)
        for i in range(n):
            row = [b if i == 0 else "", i]
            for o in OPTIMIZERS:
                grid = res["grids"][(o, b)]
                if i >= len(grid):
                    row.append("")
                    continue
                lr = grid[i]
                runs = [r for r in res["rows"] if r["optimizer"] == o and r["batch_size"] == b and r["lr"] == lr]
                (s,) = summarize(runs, ["lr"], ["val_acc", "test_acc"])
                cell = f"{lr:.4g}: {pct(s['val_acc_mean'], s['val_acc_std'])}"
                if s["diverged"]:
                    cell += f" ({s['diverged']} div.)"
                row.append(f"**{cell}**" if lr == res["chosen"][(o, b)] else cell)
            body.append(row)
    out.append("#### LR sweeps (cells `LR: val acc %`; bold = chosen)\n\n"
               + markdown_table(["batch", "#", *(LABELS[o] for o in OPTIMIZERS)], body))  # fmt: skip
    for o in OPTIMIZERS:
        ref = by[(o, b0)]["test_acc_mean"]
        held = [b for b in args.batch_sizes if ref - by[(o, b)]["test_acc_mean"] <= args.tolerance]
        out.append(f"- {o}: within {100 * args.tolerance:g} point(s) of its B={b0} test accuracy at B = {held}")
    return "\n\n".join(out)


def plot(res: dict[str, Any], summary: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for i, o in enumerate(OPTIMIZERS):
        recs = sorted((r for r in summary if r["optimizer"] == o), key=lambda r: r["batch_size"])
        ax.errorbar([r["batch_size"] for r in recs], [100 * r["test_acc_mean"] for r in recs],
                    yerr=[100 * r["test_acc_std"] for r in recs], marker="os"[i], capsize=3, color=f"C{i}",
                    label=f"{LABELS[o]}, LR tuned per batch")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (same epochs: fewer steps)")
    ax.set_ylabel("test accuracy (%) at the LR chosen on val")
    ax.set_title("8-layer net without normalization")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    cmap = matplotlib.colormaps["viridis"]
    for ax, o in zip(axes[1:], OPTIMIZERS):
        for j, b in enumerate(args.batch_sizes):
            runs = [r for r in res["rows"] if r["optimizer"] == o and r["batch_size"] == b]
            per_lr = sorted(summarize(runs, ["lr"], ["val_acc"]), key=lambda s: s["lr"])
            ax.errorbar([s["lr"] for s in per_lr], [100 * s["val_acc_mean"] for s in per_lr],
                        yerr=[100 * s["val_acc_std"] for s in per_lr], marker="o", capsize=2, label=f"B={b}",
                        color=cmap(j / max(1, len(args.batch_sizes) - 1)))  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{LABELS[o]}: LR swept at every batch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.epochs:g} epochs at every batch; mean ± std over {args.seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "no_norm.png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    single_thread()
    return run_and_report(
        parse_args(argv),
        stem="no_norm",
        run_columns=RUN_COLUMNS,
        run_experiment=run_experiment,
        summary_rows=summary_rows,
        tables=tables,
        plot=plot,
    )


if __name__ == "__main__":
    sys.exit(main())
