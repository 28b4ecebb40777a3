"""The surge, past the peak and moving: Adam's best LR against the batch size on a task where batches far
beyond the gradient noise scale are cheap.

Li et al. 2024 (arXiv:2405.14578) predict for Adam ``eps_opt(B) = eps_max / (0.5 (sqrt(B_noise/B) +
sqrt(B/B_noise)))``: the best LR rises like ``sqrt(B)``, peaks at ``B = B_noise`` and falls past it (their
FashionMNIST/CNN experiment), and the peak moves to larger batches as training proceeds (``B_noise`` grows
as the loss falls).  ``surge_sweep.py`` (a tiny LM) could not reach far past its ``B_noise``; here a small
CNN on the distorted 8x8 digits trains at batches from 4 to 1024 for the same number of steps.

Protocol: model ``convnet`` of ``_experiment`` (three conv3x3 layers, ReLU, no normalization: BatchNorm
would make the batch size change the model), ``torch.optim.Adam`` (betas 0.9/0.999, no weight decay), linear
warmup over ``--warmup`` steps then a **constant** LR, ``--steps`` steps at every (batch, LR), a fresh
distortion of every image at every step.  Every LR of a (batch, seed) starts from the same weights and sees
the same batches.  The validation loss (1,080 fixed distorted images) is taken at 1/4, 1/2 and all of the
steps; with a constant LR the first ``S/4`` steps of a run *are* an ``S/4``-step run, so one sweep gives the
three budgets.  Per budget the best LR of each batch is the vertex of a quadratic in ``ln LR`` through the
best grid point of the **seed-mean validation loss** and its neighbours (:func:`hf_lars.scaling.best_lr_from_grid`,
what ``hf-lars scale fit`` does with the budget's ``digits_surge_grid_<steps>.csv``), and the surge law is
fitted with :func:`hf_lars.scaling.fit_surge`; the test loss at the chosen grid LR is reported.

Online ``B_noise``: :class:`hf_lars.integrations.noise_scale.GradientNoiseScaleMonitor` in every run
(two micro-batches of ``B/2`` per step; EMA ``beta``), read at the three budgets.

Writes under ``--out-dir``: ``digits_surge_runs.csv`` (every run at every budget: losses and online
``b_noise``), ``digits_surge_grid_<steps>.csv`` (``batch_size,lr,loss``: one row per run, the input of
``hf-lars scale fit``), ``digits_surge_best.csv`` (best LR per budget and batch), ``digits_surge_fit.csv``
(the fit per budget beside the online noise scale) and ``digits_surge.png``.

Regenerate the committed results (about 10 minutes on one free core)::

    python recipes/digits_surge.py
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _experiment import (  # noqa: E402
    _sample_stream,
    augment,
    default_out_dir,
    load_digits_splits,
    make_model,
    markdown_table,
    read_csv,
    seed_everything,
    single_thread,
    write_csv,
)

RUN_COLUMNS = ["seed", "batch_size", "lr", "step", "val_loss", "test_loss", "train_loss", "b_noise", "diverged",
               "seconds"]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 0.128])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of every run (the full budget)")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps, then a constant LR")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 at every (batch, LR)")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.95, help="EMA of the online noise scale (about 20 steps)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of each fit")
    p.add_argument("--out-dir", default=default_out_dir(), help="where CSVs and PNGs go (default docs/results)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny grid, few steps)")
    p.add_argument("--replot", action="store_true", help="fit and plot again from digits_surge_runs.csv")
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs in digits_surge_runs.csv (same settings), train only the missing ones")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.lrs = [4, 16, 64], [1e-3, 4e-3, 1.6e-2]
        args.steps, args.warmup, args.seeds, args.width, args.bootstrap = 24, 4, 1, 4, 20
    args.batch_sizes, args.lrs = sorted(set(args.batch_sizes)), sorted(set(args.lrs))
    return args


def budgets(steps: int) -> list[int]:
    """The three training budgets: 1/4, 1/2 and all of the steps."""
    return sorted({max(1, steps // 4), max(1, steps // 2), steps})


def micro_batch_size(batch_size: int) -> int:
    """Micro-batch of the online noise measurement: ``B / 2`` (two backward passes per step, the cheapest
    split; the EMA over steps averages the estimator's noise)."""
    if batch_size < 2:
        raise ValueError(f"the online noise scale needs a batch of at least 2 (two micro-batches), got {batch_size}")
    return batch_size // 2


@torch.no_grad()
def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cross_entropy(model(x), y))


def train_one(args: argparse.Namespace, data: dict[str, Any], batch: int, lr: float, seed: int) -> list[dict[str, Any]]:
    """One run; a row per budget (``step``) with the validation and test losses and the online ``b_noise``."""
    from hf_lars.integrations.noise_scale import GradientNoiseScaleMonitor

    t0 = time.perf_counter()
    x_train, y_train = data["train"]
    seed_everything(seed)
    model = make_model("convnet", args.width)
    gen = torch.Generator().manual_seed(10_007 * seed + batch)  # the same batches for every LR
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(1, args.warmup)))
    micro = micro_batch_size(batch)
    monitor = GradientNoiseScaleMonitor(model, micro, beta=args.beta)
    marks = set(budgets(args.steps))
    rows: list[dict[str, Any]] = []
    recent: list[float] = []
    diverged = False
    for step, idx in enumerate(_sample_stream(x_train.shape[0], batch, args.steps, gen), start=1):
        xb, yb = augment(x_train[idx], gen), y_train[idx]
        step_loss = 0.0
        for k in range(0, batch, micro):
            loss = F.cross_entropy(model(xb[k : k + micro]), yb[k : k + micro]) * (min(micro, batch - k) / batch)
            loss.backward()
            step_loss += float(loss.detach())
        monitor.step()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [step_loss])[-max(1, args.steps // 10) :]
        diverged = diverged or not math.isfinite(step_loss)
        if step in marks or diverged:
            stats = monitor.compute()
            model.eval()
            val = math.nan if diverged else _loss(model, *data["val"])
            test = math.nan if diverged else _loss(model, *data["test"])
            model.train()
            for mark in sorted(m for m in marks if m >= step) if diverged else [step]:
                rows.append({"seed": seed, "batch_size": batch, "lr": lr, "step": mark, "val_loss": val,
                             "test_loss": test, "train_loss": statistics.fmean(recent),
                             "b_noise": stats.get("b_noise", math.nan), "diverged": int(diverged),
                             "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
            if diverged:
                break
    monitor.detach()
    return rows


def _read_runs(path: str) -> list[dict[str, Any]]:
    ints = ("seed", "batch_size", "step", "diverged")
    return [{k: int(v) if k in ints else float(v) for k, v in r.items()} for r in read_csv(path)]


def run_grid(args: argparse.Namespace, prior: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (seed, batch, LR) run, the largest batches first; runs found in ``prior`` are reused."""
    data = load_digits_splits()
    done: dict[tuple[int, int, float], list[dict[str, Any]]] = {}
    for r in prior:
        done.setdefault((r["seed"], r["batch_size"], r["lr"]), []).append(r)
    jobs = [(b, lr, s) for s in range(args.seeds) for b in sorted(args.batch_sizes, reverse=True) for lr in args.lrs]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, (b, lr, s) in enumerate(jobs, 1):
        if (s, b, lr) in done:
            rows += done[(s, b, lr)]
            continue
        mine = train_one(args, data, b, lr, s)
        rows += mine
        last = mine[-1]
        print(f"[{i}/{len(jobs)}] seed {s} B={b:4d} lr={lr:.3g} val loss {last['val_loss']:.4f} "
              f"b_noise {last['b_noise']:.1f} ({last['seconds']:.1f}s, {time.perf_counter() - t0:.0f}s total)",
              file=sys.stderr, flush=True)  # fmt: skip
    return rows


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def analyse(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per budget: the grid CSV, the best LR per batch, the surge fit and the online noise scale."""
    from hf_lars.scaling import best_lr_from_grid, fit_surge

    out: dict[str, Any] = {"best": [], "fits": [], "fit_objects": {}}
    for steps in budgets(args.steps):
        at = [r for r in rows if int(r["step"]) == steps]
        grid_rows = [{"batch_size": r["batch_size"], "lr": r["lr"], "loss": r["val_loss"], "seed": r["seed"]}
                     for r in at]
        write_csv(os.path.join(args.out_dir, f"digits_surge_grid_{steps}.csv"), grid_rows)
        grid = best_lr_from_grid([(r["batch_size"], r["lr"], r["val_loss"]) for r in at])
        for g in grid:
            chosen = [r for r in at if r["batch_size"] == g.batch_size and math.isclose(r["lr"], g.grid_lr)]
            out["best"].append({
                "steps": steps, "batch_size": int(g.batch_size), "best_lr": g.best_lr, "grid_lr": g.grid_lr,
                "on_edge": int(g.on_edge), "val_loss": _mean([r["val_loss"] for r in chosen]),
                "test_loss": _mean([r["test_loss"] for r in chosen]),
                "test_loss_std": statistics.stdev([r["test_loss"] for r in chosen]) if len(chosen) > 1 else 0.0,
                "online_b_noise": _mean([r["b_noise"] for r in chosen]),
            })  # fmt: skip
        fit = fit_surge([g.batch_size for g in grid], [g.best_lr for g in grid], "adam", n_bootstrap=args.bootstrap)
        out["fit_objects"][steps] = (fit, grid)
        mine = [b for b in out["best"] if b["steps"] == steps]
        online = sorted(b["online_b_noise"] for b in mine if math.isfinite(b["online_b_noise"]))
        peak_batch = max(mine, key=lambda b: b["best_lr"])["batch_size"]
        largest = max(mine, key=lambda b: b["batch_size"])
        ci = fit.b_noise_ci_bootstrap or (math.nan, math.nan)
        out["fits"].append({
            "steps": steps, "eps_max": fit.eps_max, "b_noise_fit": fit.b_noise, "b_noise_ci_low": ci[0],
            "b_noise_ci_high": ci[1], "identifiable": int(fit.identifiable), "best_model": fit.best_model,
            "daic_sgd_minus_adam": fit.aic["sgd"] - fit.aic["adam"], "residual_sd": fit.residual_sd,
            "batch_of_highest_best_lr": peak_batch,
            "largest_over_peak_lr": largest["best_lr"] / max(b["best_lr"] for b in mine),
            "online_b_noise_median": statistics.median(online) if online else math.nan,
            "online_b_noise_min": online[0] if online else math.nan,
            "online_b_noise_max": online[-1] if online else math.nan,
        })  # fmt: skip
        out.setdefault("summaries", {})[steps] = fit.summary()
    write_csv(os.path.join(args.out_dir, "digits_surge_best.csv"), out["best"])
    write_csv(os.path.join(args.out_dir, "digits_surge_fit.csv"), out["fits"])
    return out


def tables(args: argparse.Namespace, res: dict[str, Any]) -> str:
    parts = []
    steps_list = budgets(args.steps)
    header = ["batch", *(f"best LR @ {s} steps" for s in steps_list), f"test loss @ {args.steps}",
              f"online B_simple @ {args.steps}"]  # fmt: skip
    body = []
    for b in args.batch_sizes:
        row: list[Any] = [b]
        for s in steps_list:
            rec = next(r for r in res["best"] if r["steps"] == s and r["batch_size"] == b)
            row.append(f"{rec['best_lr']:.3g}" + (" (edge)" if rec["on_edge"] else ""))
        rec = next(r for r in res["best"] if r["steps"] == args.steps and r["batch_size"] == b)
        row += [f"{rec['test_loss']:.4f} ± {rec['test_loss_std']:.4f}", f"{rec['online_b_noise']:.0f}"]
        body.append(row)
    parts.append(f"#### Best LR per batch (seed-mean validation loss over {args.seeds} seed(s))\n\n"
                 + markdown_table(header, body))  # fmt: skip
    body = []
    for f in res["fits"]:
        body.append([f["steps"], f"{f['b_noise_fit']:.0f} [{f['b_noise_ci_low']:.0f}, {f['b_noise_ci_high']:.0f}]",
                     "yes" if f["identifiable"] else "no", f"{f['eps_max']:.3g}",
                     f"{f['daic_sgd_minus_adam']:+.1f}", f["batch_of_highest_best_lr"],
                     f"{f['largest_over_peak_lr']:.2f}",
                     f"{f['online_b_noise_median']:.0f} "
                     f"({f['online_b_noise_min']:.0f} .. {f['online_b_noise_max']:.0f})"])
    parts.append("#### Surge fit per training budget vs the online noise scale\n\n" + markdown_table(
        ["steps", "fitted B_noise [95% bootstrap]", "identifiable", "eps_max", "AIC(sgd) - AIC(surge)",
         "batch with the highest best LR", "best LR at B_max / highest", "online B_simple: median (range)"], body))
    for steps, text in res["summaries"].items():
        parts.append(f"#### fit_surge at {steps} steps\n\n```\n{text}\n```")
    return "\n\n".join(parts)


def _log_log(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """Batch size on a log2 axis, the y values on a log axis, grid and legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def plot(args: argparse.Namespace, res: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    steps_list = budgets(args.steps)
    ax = axes[0]
    for i, s in enumerate(steps_list):
        fit, grid = res["fit_objects"][s]
        xs = [g.batch_size for g in grid]
        ax.plot(xs, [g.best_lr for g in grid], "o", color=f"C{i}", label=f"best LR, {s} steps")
        ax.scatter([g.batch_size for g in grid if g.on_edge], [g.best_lr for g in grid if g.on_edge],
                   facecolors="none", edgecolors="k", s=90, zorder=3)  # fmt: skip
        bb = np.geomspace(min(xs), max(xs), 200)
        ax.plot(bb, fit.predict(bb), "-", color=f"C{i}", alpha=0.8,
                label=f"surge fit: B_noise = {fit.b_noise:.0f}" + ("" if fit.identifiable else " (not identifiable)"))
        ax.axvline(fit.b_noise, color=f"C{i}", linestyle=":", alpha=0.7)
    _log_log(ax, "batch size", "best Adam LR (vertex in ln LR)",
             "Best LR vs batch at three budgets (open circle: grid edge)")
    ax = axes[1]
    cmap = matplotlib.colormaps["viridis"]
    at = [r for r in rows if int(r["step"]) == args.steps]
    for j, b in enumerate(args.batch_sizes):
        per_lr = [(lr, _mean([r["val_loss"] for r in at if r["batch_size"] == b and r["lr"] == lr])) for lr in args.lrs]
        ax.plot(*zip(*per_lr), marker="o", color=cmap(j / max(1, len(args.batch_sizes) - 1)), label=f"B={b}")
    ax.set_xscale("log")
    ax.set_xlabel("LR")
    ax.set_ylabel(f"validation loss after {args.steps} steps (seed mean)")
    finite = [r["val_loss"] for r in at if math.isfinite(r["val_loss"])]
    ax.set_ylim(min(finite) * 0.95, min(max(finite), 2.4))
    ax.set_title("LR sweeps, full budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax = axes[2]
    for i, s in enumerate(steps_list):
        mine = sorted((b for b in res["best"] if b["steps"] == s), key=lambda b: b["batch_size"])
        ax.plot([b["batch_size"] for b in mine], [b["online_b_noise"] for b in mine], "o-", color=f"C{i}",
                label=f"online B_simple at the best LR, step {s}")  # fmt: skip
        ax.axhline(res["fit_objects"][s][0].b_noise, color=f"C{i}", linestyle="--", alpha=0.8,
                   label=f"fitted B_noise, {s} steps")  # fmt: skip
    _log_log(ax, "batch size of the run", "B_noise (examples)", "Online vs fitted noise scale")
    fig.suptitle(f"Adam, convnet without normalization, distorted digits; {args.seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "digits_surge.png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    single_thread()
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    runs_path = os.path.join(args.out_dir, "digits_surge_runs.csv")
    if args.replot:
        rows = _read_runs(runs_path)
    else:
        prior = _read_runs(runs_path) if args.resume and os.path.exists(runs_path) else []
        rows = run_grid(args, prior)
        write_csv(runs_path, rows, RUN_COLUMNS)
    res = analyse(args, rows)
    plot(args, res, rows)
    print(tables(args, res))
    print(f"\nwall time: {(time.perf_counter() - t0) / 60:.1f} min; results in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
