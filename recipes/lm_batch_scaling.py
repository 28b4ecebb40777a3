#!/usr/bin/env python
"""Language-model pre-training at a small and a large batch, same token budget: AdamW vs AdamLARS vs RangerLARS vs LARS.

The claim under test (You et al. 2019, LAMB): a layer-wise trust ratio on top of Adam ("AdamLARS" here) keeps
the quality of a small-batch run when the batch grows, where plain AdamW loses it.

Setup (all offline, CPU, one thread): the embedded corpus (:mod:`hf_lars.demo`, CPython docstrings), a byte-level
BPE of 1,024 tokens trained on the train split, blocks of 32 tokens, a tiny ``LlamaForCausalLM`` (2 layers,
hidden 48, tied embeddings, 0.10M parameters) from random init.  Every run sees **the same tokens**: the first
``--budget-blocks`` blocks of a seeded permutation of the training blocks (6,144 blocks = 196,608 tokens, 0.31 of
an epoch, so nothing is seen twice), grouped into batches of ``B`` blocks: ``B=16`` (512 tokens, 384 steps) and
``B=128`` (4,096 tokens, 48 steps; beyond this model's critical batch, which ``surge_sweep.py`` puts at about
100-200 sequences of 16 tokens early in training).  The schedule is linear warmup from 0 over the first 10% of
the steps, then poly decay with power 2 to 0 (``hf_lars.get_warmup_poly_schedule``); gradients are clipped to
norm 1.0; weight decay 0.01 on matrices (embeddings included), none on the RMSNorm weights (Trainer's split,
:func:`hf_lars.build_param_groups`).

- ``adamw``: ``torch.optim.AdamW`` (betas 0.9/0.999, eps 1e-8).
- ``adam_lars``, ``ranger_lars``, ``lars``: ``hf_lars.create_optimizer(model, name, lr=..., weight_decay=0.01)``,
  the package defaults (LARS: momentum 0.9, trust coefficient 1e-3).  The RMSNorm weights get no trust ratio.

Protocol (part 1's): every LR of a grid (factor 2, 4 points per optimizer and batch) with every seed
(``--seeds``, default 3: seeds 0, 1, 2; the seed sets the init and the data order); the LR with the lowest
**mean validation** loss wins; the **test** loss of its runs is reported (mean +- sample std).  Validation and
test are the two halves of the blocks of the held-out paragraphs; test is never used to choose.

Perplexity is ``exp(mean token cross-entropy)`` per run, then mean +- std over runs.  A run whose loss turns
non-finite stops and is reported as diverged (its losses are ``nan``; it can never be chosen).

Outputs in ``--out-dir`` (default ``docs/results``): ``lm_batch_scaling_runs.csv`` (every run),
``lm_batch_scaling.csv`` (chosen LR per optimizer and batch), ``lm_batch_scaling_curves.csv`` (training loss vs
tokens of every run), ``lm_batch_scaling.png`` and ``lm_batch_scaling_sweep.png``.  Prints the markdown tables.
``--replot`` redoes the tables and PNGs from the CSVs without training.

Regenerate the committed results (96 runs: 8 minutes on 2 quiet CPU cores, about 20 when they are busy)::

    python recipes/lm_batch_scaling.py

``--quick`` is a seconds-long smoke run (tiny model and corpus, 2 LRs, 1 seed) for the tests.
:mod:`zero2_matches_single` imports the data, model, optimizer and training loop from here.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _experiment import (  # noqa: E402
    default_out_dir,
    markdown_table,
    mean_std,
    progress_bar,
    single_thread,
    write_csv,
)

OPTIMIZERS = ("adamw", "adam_lars", "ranger_lars", "lars")
LABELS = {"adamw": "AdamW", "adam_lars": "AdamLARS (LAMB)", "ranger_lars": "RangerLARS", "lars": "LARS"}
COLORS = {"adamw": "tab:blue", "adam_lars": "tab:orange", "ranger_lars": "tab:green", "lars": "tab:red"}
MARKERS = {"adamw": "o", "adam_lars": "s", "ranger_lars": "^", "lars": "D"}

#: LR grids (factor 2, 4 points) per (optimizer, batch), placed from one-seed probes (seed 0) over wider grids:
#: 7 points at B=16; 6 points at B=128, RangerLARS also at 8 and 16 (16 diverged).  RangerLARS's grids were
#: widened to 6 points when it became silent while RAdam is unrectified (its best LR could move either way).
#: The choice uses the mean over all seeds; ``lm_batch_scaling.csv`` flags a chosen LR at the edge of its grid
#: (``lr_at_grid_edge``).
DEFAULT_GRIDS: dict[tuple[str, int], list[float]] = {
    ("adamw", 16): [2e-3, 4e-3, 8e-3, 1.6e-2],
    ("adamw", 128): [8e-3, 1.6e-2, 3.2e-2, 6.4e-2],
    ("adam_lars", 16): [2e-2, 4e-2, 8e-2, 0.16],
    ("adam_lars", 128): [8e-2, 0.16, 0.32, 0.64],
    ("ranger_lars", 16): [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0],
    ("ranger_lars", 128): [0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
    ("lars", 16): [8.0, 16.0, 32.0, 64.0],
    ("lars", 128): [16.0, 32.0, 64.0, 128.0],
}
QUICK_GRIDS: dict[str, list[float]] = {
    "adamw": [4e-3, 1.6e-2], "adam_lars": [2e-2, 8e-2], "ranger_lars": [0.25, 1.0], "lars": [4.0, 16.0]
}


# ------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class LMSize:
    """Corpus, tokenizer and model sizes."""

    paragraphs: int | None  # training paragraphs used (None: all)
    vocab_size: int
    block_size: int
    hidden_size: int
    num_layers: int
    num_heads: int


FULL = LMSize(paragraphs=None, vocab_size=1024, block_size=32, hidden_size=48, num_layers=2, num_heads=4)
QUICK = LMSize(paragraphs=300, vocab_size=300, block_size=16, hidden_size=16, num_layers=1, num_heads=2)


@dataclass
class LMData:
    """Token blocks (``[n, block_size]`` int64) of the three splits and the model config."""

    train: Tensor
    val: Tensor
    test: Tensor
    config: Any  # transformers.LlamaConfig

    def unigram_loss(self) -> float:
        """Test cross-entropy of the unigram model of the training tokens (add-one): what a model that ignores
        the context can reach, a reference line for the plots."""
        counts = torch.bincount(self.train.flatten(), minlength=self.config.vocab_size).double() + 1.0
        logp = (counts / counts.sum()).log()
        return float(-logp[self.test[:, 1:].flatten()].mean())


def load_lm_data(size: LMSize = FULL) -> LMData:
    """Embedded corpus -> BPE -> blocks; the held-out blocks are split in two contiguous halves (val, test)."""
    import datasets
    import transformers

    from hf_lars import demo as data

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    raw = data.corpus_datasets()  # 5% of the paragraphs held out, fixed seed
    if size.paragraphs is not None:
        raw["train"] = raw["train"].select(range(min(size.paragraphs, len(raw["train"]))))
        raw["validation"] = raw["validation"].select(range(min(max(size.paragraphs // 5, 40), len(raw["validation"]))))
    tokenizer = data.train_tokenizer(raw["train"]["text"], vocab_size=size.vocab_size)  # deterministic
    lm = data.tokenize_and_group(raw, tokenizer, block_size=size.block_size)
    train = torch.tensor(lm["train"]["input_ids"], dtype=torch.long)
    held = torch.tensor(lm["validation"]["input_ids"], dtype=torch.long)
    half = held.shape[0] // 2
    config = data.tiny_llama_config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        max_position_embeddings=max(64, size.block_size),
    )
    return LMData(train=train, val=held[:half], test=held[half:], config=config)


def make_model(config: Any, seed: int) -> nn.Module:
    from hf_lars import demo as data

    return data.build_model(config, seed=seed)


def batch_order(n_train: int, budget_blocks: int, seed: int) -> Tensor:
    """The training blocks a run sees, in order: the first ``budget_blocks`` of a seeded permutation."""
    if budget_blocks > n_train:
        raise ValueError(f"budget of {budget_blocks} blocks exceeds the {n_train} training blocks")
    gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
    return torch.randperm(n_train, generator=gen)[:budget_blocks]


# -------------------------------------------------------------------------------------------- optimizers
def build_lm_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adamw`` (torch) or an hf_lars optimizer with the package defaults, over Trainer's decay/no-decay split."""
    import hf_lars

    if name == "adamw":
        groups = [
            {"params": [p for _, p in g["params"]], "weight_decay": g["weight_decay"]}
            for g in hf_lars.build_param_groups(model, weight_decay)
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if name in ("adam_lars", "ranger_lars", "lars"):
        return hf_lars.create_optimizer(model, name, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


# ------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class LMRun:
    """One pre-training run."""

    optimizer: str
    lr: float
    batch_size: int
    seed: int
    budget_blocks: int
    warmup_fraction: float = 0.1
    power: float = 2.0
    weight_decay: float = 0.01
    clip: float = 1.0

    @property
    def steps(self) -> int:
        return self.budget_blocks // self.batch_size

    @property
    def warmup_steps(self) -> int:
        return min(self.steps - 1, max(1, round(self.warmup_fraction * self.steps)))


def make_schedule(optimizer: Any, run: LMRun) -> Any:
    from hf_lars.schedule import get_warmup_poly_schedule

    return get_warmup_poly_schedule(
        optimizer, num_warmup_steps=run.warmup_steps, num_training_steps=run.steps, power=run.power
    )


def run_batches(data: LMData, run: LMRun) -> Tensor:
    """``[steps, batch_size, block_size]``: the run's global batches in order."""
    order = batch_order(data.train.shape[0], run.budget_blocks, run.seed)[: run.steps * run.batch_size]
    return data.train[order].view(run.steps, run.batch_size, -1)


def lm_loss(model: nn.Module, x: Tensor) -> Tensor:
    """Mean next-token cross-entropy of the blocks ``x`` (the model shifts the labels)."""
    return model(input_ids=x, labels=x).loss


@torch.no_grad()
def eval_loss(model: nn.Module, blocks: Tensor, chunk: int = 256) -> float:
    """Mean token cross-entropy over ``blocks`` (every block has the same length, so block means average)."""
    model.eval()
    total = 0.0
    for start in range(0, blocks.shape[0], chunk):
        x = blocks[start : start + chunk]
        total += float(lm_loss(model, x)) * x.shape[0]
    model.train()
    return total / blocks.shape[0]


def train_lm(
    run: LMRun,
    data: LMData,
    *,
    model: nn.Module | None = None,
    on_step: Callable[[int, float], None] | None = None,
    micro_batches: int = 1,
    before_clip: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train one run in one process; returns the model and the loss of every step (before its update).

    The loss of step ``t`` is measured on batch ``t``, which the model has never seen (the budget is under one
    epoch), so the per-step losses are also an unbiased estimate of held-out loss along the run.  Stops early
    (with a ``nan`` appended) when the loss turns non-finite.

    ``micro_batches > 1`` accumulates the gradient of each batch over that many equal chunks (the same
    gradient, summed in another order: :mod:`zero2_matches_single` uses it to measure the floating-point
    noise floor); ``before_clip(model)`` runs after the backward pass and before gradient clipping.
    """
    model = make_model(data.config, run.seed) if model is None else model
    model.train()
    opt = build_lm_optimizer(model, run.optimizer, run.lr, run.weight_decay)
    sched = make_schedule(opt, run)
    losses: list[float] = []
    for t, x in enumerate(run_batches(data, run)):
        value = 0.0
        for chunk in x.chunk(micro_batches):
            loss = lm_loss(model, chunk)
            (loss / micro_batches if micro_batches > 1 else loss).backward()
            value += float(loss.detach()) / micro_batches
        losses.append(value)
        if not math.isfinite(value):
            break
        if before_clip is not None:
            before_clip(model)
        if run.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(t, value)
    return model, losses


def run_row(run: LMRun, data: LMData) -> tuple[dict[str, Any], list[float]]:
    """Train and evaluate ``run``; a flat CSV row and the per-step losses."""
    t0 = time.perf_counter()
    model, losses = train_lm(run, data)
    diverged = not all(math.isfinite(v) for v in losses) or not all(
        bool(torch.isfinite(p).all()) for p in model.parameters()
    )
    val = test = float("nan")
    if not diverged:
        val, test = eval_loss(model, data.val), eval_loss(model, data.test)
        diverged = not (math.isfinite(val) and math.isfinite(test))
    tail = losses[-max(1, len(losses) // 10) :]
    row = {
        **asdict(run),
        "steps": run.steps,
        "warmup_steps": run.warmup_steps,
        "tokens": run.steps * run.batch_size * data.train.shape[1],
        "val_loss": round(val, 5),
        "test_loss": round(test, 5),
        "test_ppl": round(math.exp(test), 3) if math.isfinite(test) else float("nan"),
        "train_loss_last10pct": round(sum(tail) / len(tail), 5),
        "diverged": int(diverged),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return row, losses


RUN_COLUMNS = [
    "optimizer", "batch_size", "lr", "seed", "steps", "warmup_steps", "tokens", "val_loss", "test_loss",
    "test_ppl", "train_loss_last10pct", "diverged", "seconds", "budget_blocks", "warmup_fraction", "power",
    "weight_decay", "clip",
]


# ------------------------------------------------------------------------------------------------ experiment
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=default_out_dir(), help="where CSVs and PNGs go (default docs/results)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny model, 2 LRs, 1 seed)")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--batch-sizes", type=int, nargs=2, default=[16, 128], metavar=("SMALL", "LARGE"),
                   help="global batch sizes in blocks of 32 tokens (default 16 128)")
    p.add_argument("--budget-blocks", type=int, default=6144,
                   help="training blocks per run, the same at every batch size (default 6144 = 196,608 tokens)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 at every LR of every grid (default 3)")
    p.add_argument("--grid", action="append", default=[], metavar="OPT:B=LR,LR,...",
                   help="override one LR grid, e.g. adamw:128=4e-3,8e-3 (repeatable)")
    p.add_argument("--replot", action="store_true",
                   help="redo the tables and PNGs from the CSVs in --out-dir, without training")
    args = p.parse_args(argv)
    if args.quick:
        args.budget_blocks = 64
        args.batch_sizes = [4, 16]
        args.seeds = 1
    args.grids = {}
    for opt in args.optimizers:
        for b in args.batch_sizes:
            args.grids[(opt, b)] = list(QUICK_GRIDS[opt] if args.quick else DEFAULT_GRIDS.get((opt, b), []))
    for spec in args.grid:
        key, _, lrs = spec.partition("=")
        opt, _, b = key.partition(":")
        args.grids[(opt, int(b))] = [float(v) for v in lrs.split(",")]
    missing = [k for k, v in args.grids.items() if not v]
    if missing:
        p.error(f"no LR grid for {missing}: pass --grid OPT:B=LR,...")
    if args.budget_blocks % args.batch_sizes[1]:
        p.error("--budget-blocks must be a multiple of the large batch size")
    return args


def run_experiment(args: argparse.Namespace, data: LMData) -> dict[str, Any]:
    """Every (optimizer, batch, LR, seed); the LR with the lowest mean validation loss wins per (optimizer, batch)."""
    seeds = list(range(args.seeds))
    bar = progress_bar(sum(len(v) for v in args.grids.values()) * len(seeds), "lm runs")
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for (opt, b), grid in args.grids.items():
        for lr in grid:
            for seed in seeds:
                run = LMRun(opt, lr, b, seed, args.budget_blocks)
                row, losses = run_row(run, data)
                rows.append(row)
                curves.extend(_curve_rows(run, losses, data.train.shape[1], args.batch_sizes[1]))
                bar.update(1)
                bar.set_postfix_str(f"{opt} B={b} lr={lr:g} seed={seed} val={row['val_loss']:.3f} "
                                    f"({row['seconds']:.0f}s)")
    bar.close()
    res = {"rows": rows, "curves": curves, "vocab_size": data.config.vocab_size, "unigram": data.unigram_loss()}
    res["chosen"] = choose(res, args)
    return res


def per_lr(res: dict[str, Any], opt: str, b: int) -> dict[float, list[dict[str, Any]]]:
    out: dict[float, list[dict[str, Any]]] = {}
    for r in res["rows"]:
        if r["optimizer"] == opt and r["batch_size"] == b:
            out.setdefault(r["lr"], []).append(r)
    return out


def choose(res: dict[str, Any], args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """Lowest mean validation loss over seeds; an LR where any seed diverged is never chosen (ties: smaller LR)."""
    chosen = {}
    for opt, b in args.grids:
        ok = {lr: rs for lr, rs in per_lr(res, opt, b).items() if not any(r["diverged"] for r in rs)}
        chosen[(opt, b)] = (min(ok, key=lambda lr: (round(mean_std([r["val_loss"] for r in ok[lr]])[0], 6), lr))
                            if ok else float("nan"))
    return chosen


def _curve_rows(run: LMRun, losses: list[float], block: int, large_batch: int) -> list[dict[str, Any]]:
    """Training loss averaged over windows of one large batch of tokens (one step of the large batch)."""
    per = max(1, large_batch // run.batch_size)
    out = []
    for i in range(0, len(losses), per):
        window = losses[i : i + per]
        out.append({
            "optimizer": run.optimizer, "batch_size": run.batch_size, "lr": run.lr, "seed": run.seed,
            "tokens": (i + len(window)) * run.batch_size * block, "train_loss": round(sum(window) / len(window), 5),
        })
    return out


def summary_rows(res: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (optimizer, batch): the chosen LR and its runs' mean and std."""
    out = []
    for (opt, b), lr in res["chosen"].items():
        runs = per_lr(res, opt, b).get(lr, [])
        grid = args.grids[(opt, b)]
        rec: dict[str, Any] = {"optimizer": opt, "batch_size": b, "lr": lr, "steps": args.budget_blocks // b,
                               "n": len(runs), "diverged": sum(r["diverged"] for r in runs),
                               "lr_at_grid_edge": int(lr in (min(grid), max(grid))),
                               "unigram_test_loss": round(res["unigram"], 5)}
        for metric in ("test_loss", "test_ppl", "val_loss"):
            m, s = mean_std([r[metric] for r in runs])
            rec[f"{metric}_mean"], rec[f"{metric}_std"] = round(m, 5), round(s, 5)
        out.append(rec)
    return out


def _pm(values: list[float], digits: int) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def tables(res: dict[str, Any], summary: list[dict[str, Any]], args: argparse.Namespace) -> str:
    small, large = args.batch_sizes
    parts = []
    keys = list(args.grids)
    depth = max(len(args.grids[k]) for k in keys)
    header = ["#"] + [f"{LABELS[k[0]]} B={k[1]}" for k in keys]
    body = []
    for i in range(depth):
        cells: list[Any] = [i]
        for k in keys:
            grid = args.grids[k]
            if i >= len(grid):
                cells.append("")
                continue
            lr = grid[i]
            rs = per_lr(res, *k)[lr]
            bad = sum(r["diverged"] for r in rs)
            text = (f"{bad}/{len(rs)} diverged" if bad else _pm([r["val_loss"] for r in rs], 3))
            cell = f"{lr:g}: {text}"
            cells.append(f"**{cell}**" if res["chosen"].get(k) == lr else cell)
        body.append(cells)
    parts.append(f"#### LR sweep (cells `LR: validation loss`, mean ± std over {args.seeds} seed(s); bold = chosen)"
                 "\n\n" + markdown_table(header, body))
    by = {(s["optimizer"], s["batch_size"]): s for s in summary}

    def cell(s: dict[str, Any], metric: str, digits: int) -> str:
        if not s["n"] or s["diverged"]:
            return f"{s['diverged']}/{s['n']} diverged"
        return f"{s[metric + '_mean']:.{digits}f} ± {s[metric + '_std']:.{digits}f}"

    body = []
    for opt in args.optimizers:
        a, b = by[(opt, small)], by[(opt, large)]
        delta = b["test_loss_mean"] - a["test_loss_mean"]
        body.append([LABELS[opt], f"{a['lr']:g} / {b['lr']:g}", cell(a, "test_loss", 3), cell(b, "test_loss", 3),
                     f"{delta:+.3f}", cell(a, "test_ppl", 1), cell(b, "test_ppl", 1)])
    parts.append(
        f"#### Test loss at the chosen LR (mean ± std over {args.seeds} seed(s))\n\n" + markdown_table(
            ["optimizer", f"LR (B={small} / B={large})", f"test loss B={small} ({args.budget_blocks // small} steps)",
             f"test loss B={large} ({args.budget_blocks // large} steps)", "Δ large − small",
             f"perplexity B={small}", f"perplexity B={large}"], body)
    )
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------------ plots
def plot(res: dict[str, Any], summary: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small, large = args.batch_sizes
    paths = []
    # 1. sweep: one panel per optimizer, mean val loss (± std) vs LR at both batch sizes
    opts = args.optimizers
    ncols = 2 if len(opts) > 1 else 1
    nrows = math.ceil(len(opts) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(opts):]:
        ax.set_visible(False)
    cap = math.log(res["vocab_size"]) + 0.3  # a little above the loss of a uniform guess
    for ax, opt in zip(axes.flat, opts):
        for b, style, marker in ((small, "-", "o"), (large, "--", "s")):
            groups = sorted(per_lr(res, opt, b).items())
            lrs = [lr for lr, _ in groups]
            stats = [mean_std([r["val_loss"] if not r["diverged"] else float("inf") for r in rs]) for _, rs in groups]
            means = [m if math.isfinite(m) else float("nan") for m, _ in stats]
            stds = [s if math.isfinite(s) else 0.0 for _, s in stats]
            ax.errorbar(lrs, [min(m, cap) for m in means], yerr=stds, fmt=style, marker=marker, color=COLORS[opt],
                        capsize=3, label=f"B={b} ({args.budget_blocks // b} steps)")
            for lr_, (m, _) in zip(lrs, stats):
                if not math.isfinite(m) or m > cap:
                    ax.annotate("diverged" if not math.isfinite(m) else f"{m:.1f}↑", (lr_, cap), fontsize=7,
                                ha="center", va="top", xytext=(0, -6), textcoords="offset points")
            lr = res["chosen"].get((opt, b))
            if lr is not None and math.isfinite(lr):
                ax.plot([lr], [means[lrs.index(lr)]], marker="*", ms=14, color="k", ls="none")
        ax.set_ylim(top=cap)
        ax.set_xscale("log")
        ticks = sorted({lr for b in (small, large) for lr in per_lr(res, opt, b)})
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=45 if len(ticks) > 6 else 0, fontsize=8)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(LABELS[opt])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="★ = chosen", title_fontsize=8)
    fig.suptitle(f"LR sweep: mean ± std over {args.seeds} seed(s), "
                 f"{args.budget_blocks * res_block(res, args):,} tokens per run")
    fig.tight_layout()
    path = os.path.join(args.out_dir, "lm_batch_scaling_sweep.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    # 2. test loss per optimizer at both batches (error bars), and training curves vs tokens at the chosen LR
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.5]})
    by = {(s["optimizer"], s["batch_size"]): s for s in summary}
    width = 0.8 / len(opts)
    for j, opt in enumerate(opts):
        xs = [i + (j - (len(opts) - 1) / 2) * width for i in range(2)]
        ms = [by[(opt, b)]["test_loss_mean"] for b in (small, large)]
        ss = [by[(opt, b)]["test_loss_std"] for b in (small, large)]
        ax1.bar(xs, ms, width, yerr=ss, capsize=3, color=COLORS[opt], label=LABELS[opt], alpha=0.85)
    ax1.set_xticks([0, 1], [f"B={small}\n({args.budget_blocks // small} steps)",
                            f"B={large}\n({args.budget_blocks // large} steps)"])
    finite = [s for s in summary if math.isfinite(s["test_loss_mean"])]
    uni = res["unigram"]
    if finite:
        lo = min(s["test_loss_mean"] - s["test_loss_std"] for s in finite)
        hi = max([s["test_loss_mean"] + s["test_loss_std"] for s in finite] + [uni])
        pad = 0.15 * (hi - lo + 1e-3)
        ax1.set_ylim(lo - pad, hi + pad)
    ax1.axhline(uni, color="k", ls=":", lw=1.2, label=f"unigram model ({uni:.2f})")
    ax1.set_ylabel(f"test loss (nats/token), mean ± std, {args.seeds} seed(s)")
    ax1.set_title("Same token budget, each at its chosen LR")
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    for opt in opts:
        for b, style in ((small, "-"), (large, "--")):
            lr = res["chosen"].get((opt, b))
            pts: dict[int, list[float]] = {}
            for c in res["curves"]:
                if c["optimizer"] == opt and c["batch_size"] == b and c["lr"] == lr:
                    pts.setdefault(c["tokens"], []).append(c["train_loss"])
            if not pts:
                continue
            toks = sorted(pts)
            ax2.plot([t / 1e3 for t in toks], [sum(pts[t]) / len(pts[t]) for t in toks], style, color=COLORS[opt],
                     marker=MARKERS[opt], ms=3, markevery=3, label=f"{LABELS[opt]}, B={b}")
    ax2.set_xlabel("training tokens seen (thousands)")
    ax2.set_ylabel("training loss on unseen batches (nats/token)")
    ax2.set_title(f"Training loss at the chosen LR, mean over seeds (solid B={small}, dashed B={large})", fontsize=10)
    ax2.axhline(uni, color="k", ls=":", lw=1.2, label=f"unigram model ({uni:.2f})")
    lows = [c["train_loss"] for c in res["curves"] if c["lr"] == res["chosen"].get((c["optimizer"], c["batch_size"]))]
    ax2.set_ylim(min(lows + [uni]) - 0.15, cap)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = os.path.join(args.out_dir, "lm_batch_scaling.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def res_block(res: dict[str, Any], args: argparse.Namespace) -> int:
    r = res["rows"][0]
    return r["tokens"] // (r["steps"] * r["batch_size"])


def _num(value: str) -> Any:
    try:
        f = float(value)
    except ValueError:
        return value
    return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() else f


def load_results(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The results of an earlier run, read back from the CSVs in ``args.out_dir`` (for ``--replot``)."""
    from _experiment import read_csv

    def rows_of(name: str) -> list[dict[str, Any]]:
        return [{k: _num(v) for k, v in r.items()} for r in read_csv(os.path.join(args.out_dir, name))]

    rows = rows_of("lm_batch_scaling_runs.csv")
    summary = rows_of("lm_batch_scaling.csv")
    args.optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    args.batch_sizes = sorted({r["batch_size"] for r in rows})
    args.budget_blocks = rows[0]["budget_blocks"]
    args.seeds = len({r["seed"] for r in rows})
    args.grids = {}
    for r in rows:
        grid = args.grids.setdefault((r["optimizer"], r["batch_size"]), [])
        if r["lr"] not in grid:
            grid.append(r["lr"])
    vocab = (QUICK if args.quick else FULL).vocab_size
    res = {"rows": rows, "curves": rows_of("lm_batch_scaling_curves.csv"), "vocab_size": vocab,
           "unigram": summary[0]["unigram_test_loss"],
           "chosen": {(s["optimizer"], s["batch_size"]): s["lr"] for s in summary}}
    return res, summary


def main(argv: Sequence[str] | None = None) -> int:
    single_thread()
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    if args.replot:
        res, summary = load_results(args)
        plot(res, summary, args)
        print(tables(res, summary, args))
        return 0
    data = load_lm_data(QUICK if args.quick else FULL)
    n_params = sum(p.numel() for p in make_model(data.config, 0).parameters())
    print(f"{data.train.shape[0]} train / {data.val.shape[0]} val / {data.test.shape[0]} test blocks of "
          f"{data.train.shape[1]} tokens; {n_params / 1e6:.3f}M parameters; {args.budget_blocks} blocks per run",
          flush=True)
    res = run_experiment(args, data)
    summary = summary_rows(res, args)
    write_csv(os.path.join(args.out_dir, "lm_batch_scaling_runs.csv"), res["rows"], RUN_COLUMNS)
    write_csv(os.path.join(args.out_dir, "lm_batch_scaling.csv"), summary)
    write_csv(os.path.join(args.out_dir, "lm_batch_scaling_curves.csv"), res["curves"])
    plot(res, summary, args)
    print(tables(res, summary, args))
    print(f"\nwall time: {(time.perf_counter() - t0) / 60:.1f} min; results in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
