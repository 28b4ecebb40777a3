#!/usr/bin/env python
"""Does the optimal Adam learning rate surge (rise, then fall) with batch size?  A (batch x LR) sweep on CPU.

Li et al. 2024 (arXiv 2405.14578) predict for Adam-style optimizers ``eps_opt(B) = eps_max / (0.5 (sqrt(B_noise/B)
+ sqrt(B/B_noise)))``: the best LR rises like ``sqrt(B)``, peaks at ``B = B_noise`` and then falls.  This recipe
trains a small Llama (:mod:`hf_lars.demo`: the embedded corpus, a byte-level BPE, random init) with
``torch.optim.AdamW`` at every (batch size, LR) pair of a grid and records the validation loss; the best LR per
batch size (:func:`~hf_lars.scaling.best_lr_from_grid`) is fitted with :func:`~hf_lars.scaling.fit_surge`, and
the fitted ``B_noise`` is compared with the gradient noise scale measured online in the same runs
(:class:`~hf_lars.integrations.noise_scale.GradientNoiseScaleMonitor`, micro-batches of ``B/8`` against the
full batch).

Protocol (defaults): every run takes the same number of optimizer steps (``--steps 200``, ``--warmup 20`` linear
warmup then a constant LR), sequences of ``--block-size 16`` tokens drawn at random from the training split with a
per-batch-size seed (every LR of a batch size sees the same batches), the same initial weights for every run, and
the loss is the mean token cross-entropy on ``--eval-blocks`` fixed validation blocks after the last step.
Fixed steps rather than fixed tokens: the surge law is a statement about the best step size for a given gradient
noise (McCandlish et al.'s per-step analysis), and with a fixed step count the batch size changes only the noise
of each step; under a fixed token budget the large batches would get a handful of steps and their best LR would
be pushed up by the short run, not by the noise.  A fixed step count also keeps the whole grid inside the CPU
budget (cost grows with the sum of the batch sizes).

Outputs in ``--out-dir`` (default ``docs/results``):

- ``surge_grid.csv``: ``batch_size,lr,loss`` (+ ``train_loss``, ``b_noise`` at the end of the run, ``seconds``);
  ``hf-lars scale fit surge_grid.csv`` refits it;
- ``surge_best.csv``: the best LR per batch size (vertex of the quadratic in ln LR; ``on_edge`` flags);
- ``surge_noise.csv``: the online noise scale every ``--log-every`` steps of every run;
- ``surge_fit.png``: the best LRs, the fitted surge law and its rivals (:func:`~hf_lars.scaling.plot_surge_fit`);
- ``surge_noise.png``: the online ``B_simple`` along the best-LR run of each batch size, and the fitted ``B_noise``.

``--replot`` redoes the fit, the tables and the PNGs from the two CSVs without training.

Regenerate the committed results (about 15 min on 2 free CPU cores)::

    python recipes/surge_sweep.py --workers 2

``--quick`` runs a seconds-long smoke test of the whole pipeline (tiny grid, few steps) for the tests.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from hf_lars import demo as hf_data  # noqa: E402
from hf_lars.integrations.noise_scale import GradientNoiseScaleMonitor  # noqa: E402
from hf_lars.scaling import best_lr_from_grid, fit_surge, plot_surge_fit  # noqa: E402

logger = logging.getLogger("surge_sweep")

DEFAULT_BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines one sweep (one per invocation)."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    lrs: tuple[float, ...] = DEFAULT_LRS
    steps: int = 200
    warmup: int = 20
    block_size: int = 16
    vocab_size: int = 512
    hidden: int = 32
    layers: int = 2
    eval_blocks: int = 2048
    log_every: int = 20
    ref_batch: int = 128
    seed: int = 0
    beta: float = 0.95  # EMA of the online noise scale (about 20 steps)
    max_paragraphs: int | None = None  # corpus subset (quick mode)


@dataclass
class RunResult:
    batch_size: int
    lr: float
    loss: float
    train_loss: float
    b_noise: float
    seconds: float
    noise: list[dict[str, float]]


# Data are loaded once per process (the workers inherit them when forked, or load them again when spawned).
_DATA: dict[str, Any] = {}


def _cache_dir() -> Path:
    root = os.environ.get("HF_LARS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_lars")
    return Path(root)


def load_blocks(cfg: SweepConfig) -> dict[str, Any]:
    """``{"train", "validation"}`` token blocks (int64 tensors) and ``"vocab"``; the tokenizer is cached on disk."""
    key = (cfg.vocab_size, cfg.block_size, cfg.eval_blocks, cfg.max_paragraphs)
    if _DATA.get("key") == key:
        return _DATA
    import datasets

    datasets.disable_progress_bars()
    splits = hf_data.corpus_datasets()
    if cfg.max_paragraphs is not None:
        splits = datasets.DatasetDict(
            {name: split.select(range(min(len(split), cfg.max_paragraphs))) for name, split in splits.items()}
        )
    cache = _cache_dir() / f"surge_tokenizer_{cfg.vocab_size}_{cfg.max_paragraphs or 'all'}"
    tokenizer = hf_data.train_tokenizer(splits["train"]["text"], vocab_size=cfg.vocab_size, cache_dir=cache)
    grouped = hf_data.tokenize_and_group(splits, tokenizer, block_size=cfg.block_size)
    _DATA.clear()
    _DATA.update(
        key=key,
        train=torch.tensor(grouped["train"]["input_ids"], dtype=torch.long),
        validation=torch.tensor(grouped["validation"]["input_ids"], dtype=torch.long)[: cfg.eval_blocks],
        vocab=len(tokenizer),
    )
    return _DATA


def micro_batch_size(batch_size: int) -> int:
    """Micro-batch of the online noise measurement: ``B / 8`` (at least 1 example, at most ``B / 2``)."""
    return max(1, min(batch_size // 2, max(8, batch_size // 8)))


def _model(cfg: SweepConfig, vocab: int) -> torch.nn.Module:
    config = hf_data.tiny_llama_config(
        vocab, hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=max(1, cfg.hidden // 16),
        max_position_embeddings=max(32, cfg.block_size),
    )
    return hf_data.build_model(config, seed=cfg.seed)


def train_one(cfg: SweepConfig, batch_size: int, lr: float) -> RunResult:
    """One run: ``cfg.steps`` AdamW steps at ``batch_size`` and peak ``lr``; validation loss at the end."""
    torch.set_num_threads(1)
    blocks = load_blocks(cfg)
    train, val = blocks["train"], blocks["validation"]
    model = _model(cfg, int(blocks["vocab"]))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(1, cfg.warmup)))
    micro = micro_batch_size(batch_size)
    accum = batch_size // micro
    monitor = GradientNoiseScaleMonitor(model, micro, beta=cfg.beta)
    gen = torch.Generator().manual_seed(1000 * cfg.seed + batch_size)  # same batches for every LR
    noise: list[dict[str, float]] = []
    losses: list[float] = []
    start = time.perf_counter()
    diverged = False
    for step in range(cfg.steps):
        batch = train[torch.randint(0, len(train), (micro * accum,), generator=gen)]
        step_loss = torch.zeros(())
        for k in range(accum):
            ids = batch[k * micro : (k + 1) * micro]
            loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            step_loss += loss.detach()
        monitor.step()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(step_loss))
        if not math.isfinite(losses[-1]):
            diverged = True
            break
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            stats = monitor.compute()
            noise.append({"batch_size": batch_size, "lr": lr, "step": step + 1, "train_loss": losses[-1], **stats})
    monitor.detach()
    if diverged:
        val_loss = train_loss = math.nan
    else:
        model.eval()
        with torch.no_grad():
            val_loss = float(
                statistics.fmean(
                    float(model(input_ids=chunk, labels=chunk).loss) for chunk in torch.split(val, 256)
                )
            )
        tail = losses[-max(1, cfg.steps // 10) :]
        train_loss = statistics.fmean(tail)
    b_noise = noise[-1].get("b_noise", math.nan) if noise else math.nan
    return RunResult(batch_size, lr, val_loss, train_loss, b_noise, time.perf_counter() - start, noise)


def _worker_init() -> None:
    torch.set_num_threads(1)
    logging.getLogger("hf_lars").setLevel(logging.WARNING)


def run_grid(cfg: SweepConfig, workers: int) -> list[RunResult]:
    """Every (batch, LR) run; the largest batches first so that parallel workers finish together."""
    load_blocks(cfg)  # once here: forked workers inherit it
    jobs = [(b, lr) for b in sorted(cfg.batch_sizes, reverse=True) for lr in cfg.lrs]
    results: list[RunResult] = []
    total = len(jobs)
    if workers <= 1:
        for i, (b, lr) in enumerate(jobs, 1):
            results.append(train_one(cfg, b, lr))
            _progress(i, total, results[-1])
        return results
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_worker_init) as pool:
        futures = [pool.submit(train_one, cfg, b, lr) for b, lr in jobs]
        for i, fut in enumerate(futures, 1):
            results.append(fut.result())
            _progress(i, total, results[-1])
    return results


def _progress(i: int, total: int, r: RunResult) -> None:
    logger.info(
        "[%d/%d] batch %4d  lr %.3g  val loss %.4f  train loss %.4f  b_noise %s  (%.1fs)",
        i, total, r.batch_size, r.lr, r.loss, r.train_loss,
        f"{r.b_noise:.1f}" if math.isfinite(r.b_noise) else "n/a", r.seconds,
    )


def write_outputs(
    cfg: SweepConfig, results: Sequence[RunResult], out_dir: Path, *, n_bootstrap: int = 1000
) -> dict[str, Any]:
    """The CSVs, the fit and the PNG; returns a summary dict (also printed by :func:`main`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = sorted(results, key=lambda r: (r.batch_size, r.lr))
    with (out_dir / "surge_grid.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["batch_size", "lr", "loss", "train_loss", "b_noise", "seconds"])
        for r in results:
            w.writerow([r.batch_size, f"{r.lr:.6g}", f"{r.loss:.6f}", f"{r.train_loss:.6f}", f"{r.b_noise:.4g}",
                        f"{r.seconds:.2f}"])
    with (out_dir / "surge_noise.csv").open("w", newline="") as f:
        w = csv.writer(f)
        keys = ["batch_size", "lr", "step", "train_loss", "b_noise", "grad_sq_norm", "trace_cov"]
        w.writerow(keys)
        for r in results:
            for row in r.noise:
                w.writerow([_fmt(row.get(k, math.nan)) for k in keys])

    grid = best_lr_from_grid([(r.batch_size, r.lr, r.loss) for r in results])
    with (out_dir / "surge_best.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["batch_size", "best_lr", "best_loss", "grid_lr", "on_edge", "method"])
        for g in grid:
            w.writerow([int(g.batch_size), f"{g.best_lr:.6g}", f"{g.best_loss:.6f}", f"{g.grid_lr:.6g}",
                        int(g.on_edge), g.method])
    summary: dict[str, Any] = {"config": asdict(cfg), "best": [asdict(g) for g in grid]}
    ref_runs = [r for r in results if r.batch_size == cfg.ref_batch and math.isfinite(r.loss)]
    if ref_runs:
        best_ref = min(ref_runs, key=lambda r: r.loss)
        summary["online_b_noise_ref"] = {
            "batch_size": cfg.ref_batch,
            "at_best_lr": best_ref.lr,
            "final": best_ref.b_noise,
            "run_mean": _mean([row.get("b_noise", math.nan) for row in best_ref.noise]),
            "final_over_lrs": [(r.lr, r.b_noise) for r in ref_runs],
        }
    fit = None
    if len(grid) >= 3:
        fit = fit_surge([g.batch_size for g in grid], [g.best_lr for g in grid], "adam", n_bootstrap=n_bootstrap)
        summary["fit"] = fit.summary()
        summary["b_noise_fit"] = fit.b_noise
        summary["eps_max_fit"] = fit.eps_max
        summary["identifiable"] = fit.identifiable
        summary["best_model"] = fit.best_model
        plot_surge_fit(
            fit, out_dir / "surge_fit.png", grid=grid,
            title=f"AdamW, tiny Llama ({cfg.layers}x{cfg.hidden}), {cfg.steps} steps of {cfg.block_size}-token blocks",
        )
    if grid:
        plot_online_noise(results, grid, fit, out_dir / "surge_noise.png", cfg)
    online = {}
    for g in grid:
        run = next((r for r in results if r.batch_size == g.batch_size and math.isclose(r.lr, g.grid_lr)), None)
        if run is not None:
            online[int(g.batch_size)] = {
                "lr": run.lr,
                "final": run.b_noise,
                "run_mean": _mean([row.get("b_noise", math.nan) for row in run.noise]),
            }
    summary["online_b_noise_at_best_lr"] = online
    return summary


def plot_online_noise(
    results: Sequence[RunResult], grid: Sequence[Any], fit: Any, path: Path, cfg: SweepConfig
) -> Path:
    """``surge_noise.png``: the online ``B_simple`` along the run at each batch size's best grid LR, against the
    ``B_noise`` fitted to the best LRs (with its bootstrap interval when the fit has one)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    best_lr = {int(g.batch_size): g.grid_lr for g in grid}
    cmap = matplotlib.colormaps["viridis"]
    batches = sorted(best_lr)
    for i, b in enumerate(batches):
        run = next((r for r in results if r.batch_size == b and math.isclose(r.lr, best_lr[b])), None)
        if run is None:
            continue
        pts = [(row["step"], row["b_noise"]) for row in run.noise if math.isfinite(row.get("b_noise", math.nan))]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, color=cmap(i / max(1, len(batches) - 1)),
                    label=f"B = {b} (lr {run.lr:g})")
    if fit is not None:
        ax.axhline(fit.b_noise, color="k", linewidth=1.5, label=f"fitted B_noise = {fit.b_noise:.0f} (best LRs)")
        ci = fit.b_noise_ci_bootstrap
        if ci is not None:
            ax.axhspan(ci[0], ci[1], color="k", alpha=0.08, linewidth=0)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("online B_simple (sequences)")
    ax.set_title(f"Online gradient noise scale at each batch's best LR (EMA beta {cfg.beta})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def read_results(out_dir: Path) -> list[RunResult]:
    """The runs back from ``surge_grid.csv`` and ``surge_noise.csv`` (for ``--replot``)."""
    noise: dict[tuple[int, float], list[dict[str, float]]] = {}
    with (out_dir / "surge_noise.csv").open() as f:
        for row in csv.DictReader(f):
            key = (int(row["batch_size"]), float(row["lr"]))
            values = {k: float(v) for k, v in row.items() if k not in ("batch_size", "lr")}
            values["step"] = int(values["step"])
            noise.setdefault(key, []).append({"batch_size": key[0], "lr": key[1], **values})
    results = []
    with (out_dir / "surge_grid.csv").open() as f:
        for row in csv.DictReader(f):
            key = (int(row["batch_size"]), float(row["lr"]))
            results.append(RunResult(key[0], key[1], float(row["loss"]), float(row["train_loss"]),
                                     float(row["b_noise"]), float(row["seconds"]), noise.get(key, [])))
    return results


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def markdown_table(results: Sequence[RunResult], cfg: SweepConfig) -> str:
    """Validation loss per (batch size, LR), the best of each row in bold, for docs/scaling.md."""
    lrs = sorted(cfg.lrs)
    by = {(r.batch_size, r.lr): r.loss for r in results}
    lines = ["| batch \\ LR | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for b in sorted(cfg.batch_sizes):
        row = [by.get((b, lr), math.nan) for lr in lrs]
        finite = [v for v in row if math.isfinite(v)]
        best = min(finite) if finite else None
        cells = [("**%.4f**" if v == best else "%.4f") % v if math.isfinite(v) else "div." for v in row]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> tuple[SweepConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="surge_sweep.py", description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--batch-sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=None)
    p.add_argument("--lrs", type=lambda s: tuple(float(x) for x in s.split(",")), default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--eval-blocks", type=int, default=None)
    p.add_argument("--ref-batch", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=1, help="parallel runs (one CPU thread each)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of the fit")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke test (tiny grid, few steps)")
    p.add_argument("--replot", action="store_true",
                   help="no training: refit and redraw from surge_grid.csv and surge_noise.csv in --out-dir")
    args = p.parse_args(argv)
    base = SweepConfig()
    if args.quick:
        base = SweepConfig(
            batch_sizes=(4, 8, 16), lrs=(3e-3, 1e-2, 3e-2), steps=3, warmup=1, block_size=8, vocab_size=300,
            hidden=16, layers=1, eval_blocks=16, log_every=1, ref_batch=8, max_paragraphs=300,
        )
    overrides = {
        k: v for k, v in {
            "batch_sizes": args.batch_sizes, "lrs": args.lrs, "steps": args.steps, "warmup": args.warmup,
            "block_size": args.block_size, "vocab_size": args.vocab_size, "hidden": args.hidden,
            "layers": args.layers, "eval_blocks": args.eval_blocks, "ref_batch": args.ref_batch, "seed": args.seed,
        }.items() if v is not None
    }
    cfg = SweepConfig(**{**asdict(base), **overrides})
    if len(set(cfg.batch_sizes)) < 3:
        p.error("--batch-sizes needs at least 3 distinct values (the fit has 2 parameters)")
    if any(b < 2 for b in cfg.batch_sizes):
        p.error("--batch-sizes must be >= 2 (the online noise scale needs a micro-batch smaller than the batch)")
    if cfg.ref_batch not in cfg.batch_sizes:
        p.error(f"--ref-batch {cfg.ref_batch} is not one of --batch-sizes {cfg.batch_sizes}")
    return cfg, args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg, args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("hf_lars").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = read_results(args.out_dir) if args.replot else run_grid(cfg, args.workers)
    summary = write_outputs(cfg, results, args.out_dir, n_bootstrap=0 if args.quick else args.bootstrap)
    summary["wall_seconds"] = time.perf_counter() - start
    logger.info("\n%s", markdown_table(results, cfg))
    for g in summary["best"]:
        logger.info(
            "batch %5d: best lr %.4g (%s%s)", g["batch_size"], g["best_lr"], g["method"],
            ", on the grid's edge" if g["on_edge"] else "",
        )
    if "fit" in summary:
        logger.info("\n%s", summary["fit"])
    for b, online in summary["online_b_noise_at_best_lr"].items():
        logger.info("online B_simple at batch %5d, lr %.3g: %.1f at the end, %.1f averaged over the run",
                    b, online["lr"], online["final"], online["run_mean"])
    if "online_b_noise_ref" in summary:
        ref = summary["online_b_noise_ref"]
        logger.info(
            "online B_simple at the reference batch %d (best LR %.3g): %.1f at the end, %.1f averaged over the run",
            ref["batch_size"], ref["at_best_lr"], ref["final"], ref["run_mean"],
        )
    logger.info("wall time %.0f s (%d runs, %d worker(s)); outputs in %s", summary["wall_seconds"], len(results),
                args.workers, args.out_dir)
    return summary


if __name__ == "__main__":
    main()
