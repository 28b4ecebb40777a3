#!/usr/bin/env python
"""Acting on the gradient noise scale while training: online LR adaptation and batch-size ramps, same token budget.

Two claims under test (issue 15, docs/scaling.md "Acting on B_noise while training"):

1. **Online LR adaptation** (``--lr_scaling_online``; Li et al. 2024, arXiv 2405.14578: the batch size at which
   Adam's best LR peaks moves up as ``B_noise`` grows).  At a batch above ``B_noise`` the surge law lowers the
   LR; as ``B_noise`` grows towards the batch, the online factor raises it again.  Compared: the same launch LR
   (the surge law from the reference batch, with the ``B_noise`` a pilot measured) with and without the online
   factor, and the grid-tuned LR at that batch as the yardstick.
2. **Batch-size ramp** (Critical Batch Size Revisited, arXiv 2505.23971: a batch warmup reaches the same loss in
   fewer steps).  Fixed small batch vs fixed large batch vs a scheduled ramp vs a noise-driven ramp
   (``k * B_noise`` within bounds), each at the same tokens: final test loss and optimizer steps.

Setup: part 2 of docs/results.md (``lm_batch_scaling.py``): the embedded corpus, a 1,024-token BPE, blocks of 32
tokens, a 0.1M-parameter ``LlamaForCausalLM`` from random init; ``torch.optim.AdamW`` (betas 0.9/0.999, eps
1e-8), weight decay 0.01 on matrices, gradient clipping at 1.0; every run sees the same 6,144 blocks (196,608
tokens) of a seeded permutation.  The reference is part 2's tuned small-batch run: ``B=16`` at LR ``4e-3``.
Gradients are accumulated over micro-batches of ``--micro-batch`` blocks (the noise monitor's small batch), so
every run measures ``B_simple`` (:class:`~hf_lars.integrations.noise_monitor.GradientNoiseScaleMonitor`, EMA
coefficient ``--noise-beta``) at every ``--log-every`` optimizer steps; the online factor and the noise-driven
ramp move only then, and only from the default start step on (the later of the LR warmup's end and the EMA's
window ``1/(1 - beta)``, :func:`hf_lars.scaling.online.default_start_step`, as Trainer's default).

Outputs in ``--out-dir`` (default ``docs/results``): ``lm_batch_ramp_runs.csv`` (every run),
``lm_batch_ramp_log.csv`` (per logging step: batch, LR, ``b_noise``, ``lr_factor``, training loss),
``lm_batch_ramp.csv`` (mean +- std per arm), ``lm_batch_ramp.png``.  ``--replot`` redraws from the CSVs.

    python recipes/lm_batch_ramp.py            # all arms, 3 seeds
    python recipes/lm_batch_ramp.py --quick    # seconds: the tests' smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _experiment import default_out_dir, markdown_table, mean_std, progress_bar, read_csv, single_thread, write_csv  # noqa: E402
from lm_batch_scaling import FULL, QUICK, LMData, batch_order, build_lm_optimizer, eval_loss, lm_loss, load_lm_data, make_model  # noqa: E402

#: Part 2's tuned AdamW runs (docs/results.md, "Language-model pre-training"): the reference batch and its LR, and
#: the best LR its grid found at B=128.
REF_BATCH, REF_LR, TUNED_LR_128 = 16, 4e-3, 1.6e-2


@dataclass(frozen=True)
class Arm:
    """One way to spend the token budget.

    ``batch``: a fixed global batch, or ``None`` with ``ramp`` set.  ``lr``: the peak LR (before the schedule);
    ``None``: ``scaled_lr(rule, REF_BATCH, REF_LR, batch, b_noise)``.  ``online``: multiply by the online factor.
    """

    name: str
    label: str
    batch: int | None
    lr: float | None = None
    rule: str = "surge"
    online: bool = False
    ramp: str | None = None  # a --batch_size_schedule string, or "noise"
    color: str = "k"


def peak_lr(arm: Arm, batch: int, b_noise: float) -> float:
    """The arm's LR before the schedule and any factor, at the batch it starts with."""
    from hf_lars.scaling import scaled_lr

    if arm.lr is not None:
        return arm.lr
    return float(scaled_lr(arm.rule, REF_BATCH, REF_LR, batch, b_noise))


def launch_batch(arm: Arm) -> int:
    """The batch the arm's first step takes."""
    from hf_lars.scaling.ramp import parse_batch_size_schedule

    if arm.ramp is None:
        return int(arm.batch)
    return RAMP_MIN if arm.ramp == "noise" else parse_batch_size_schedule(arm.ramp)[0][0]


def make_ramp(arm: Arm, micro_batch: int, b_noise0: float, start_step: int = 0) -> Any:
    """The arm's :class:`~hf_lars.scaling.ramp.BatchSizeRamp` (``None`` for a fixed batch): LR by ``arm.rule``
    from the reference batch, relative to the batch the ramp starts at; the noise-driven one acts on estimates
    from ``start_step`` on."""
    from hf_lars.scaling.ramp import BatchSizeRamp

    if arm.ramp is None:
        return None
    law = {"rule": arm.rule, "ref_batch": REF_BATCH, "b_noise": b_noise0}
    if arm.ramp == "noise":
        return BatchSizeRamp(micro_batch=micro_batch, noise_k=NOISE_K, min_batch=RAMP_MIN, max_batch=RAMP_MAX,
                             start_step=start_step, **law)
    return BatchSizeRamp(micro_batch=micro_batch, schedule=arm.ramp, **law)


def train_arm(
    arm: Arm,
    data: LMData,
    seed: int,
    *,
    budget_blocks: int,
    micro_batch: int,
    log_every: int,
    b_noise0: float,
    noise_beta: float = 0.95,
    warmup_fraction: float = 0.1,
    power: float = 2.0,
    stop_blocks: int | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one arm until its next batch would exceed the budget; the model and a summary.

    The LR is ``peak x schedule(samples / budget) x factor``: warmup over the first ``warmup_fraction`` of the
    budget's samples, then poly decay to 0 at the budget, the same for every arm (for a fixed batch it is the
    step-based schedule of part 2).  ``factor`` is the online LR factor or the ramp's rule factor (1 otherwise).
    ``stop_blocks`` ends the run early (the schedule still spans the budget): the pilot.  The noise monitor's
    EMA has coefficient ``noise_beta``; the online factor and the noise-driven ramp act on its estimates from
    :func:`~hf_lars.scaling.online.default_start_step` on (the later of the warmup's end and the EMA's window),
    the default Trainer uses.
    """
    from hf_lars.integrations.noise_monitor import GradientNoiseScaleMonitor
    from hf_lars.scaling.online import OnlineLrFactor, default_start_step
    from hf_lars.schedule import warmup_poly_factor

    model = make_model(data.config, seed)
    model.train()
    warmup_blocks = round(warmup_fraction * budget_blocks)
    batch = launch_batch(arm)
    start = default_start_step(math.ceil(warmup_blocks / batch), noise_beta)  # in optimizer steps
    ramp = make_ramp(arm, micro_batch, b_noise0, start_step=start)
    lr0 = peak_lr(arm, batch, b_noise0)
    opt = build_lm_optimizer(model, "adamw", lr0, 0.01)
    online = (OnlineLrFactor(arm.rule, ref_batch=REF_BATCH, batch=batch, b_noise=b_noise0, start_step=start)
              if arm.online else None)
    monitor = GradientNoiseScaleMonitor(model, micro_batch_size=micro_batch, beta=noise_beta)
    order = batch_order(data.train.shape[0], budget_blocks, seed)
    seen, step, window = 0, 0, []
    stop = budget_blocks if stop_blocks is None else stop_blocks
    while seen + batch <= stop:
        mult = warmup_poly_factor(seen, warmup_blocks, budget_blocks, 1.0, power=power)
        factor = online.factor if online is not None else ramp.factor if ramp is not None else 1.0
        lr = lr0 * mult * factor
        for g in opt.param_groups:
            g["lr"] = lr
        x = data.train[order[seen : seen + batch]]
        value = 0.0
        for chunk in x.split(micro_batch):
            loss = lm_loss(model, chunk)
            (loss * (chunk.shape[0] / batch)).backward()  # the mean over the batch, as Trainer accumulates
            value += float(loss.detach()) * chunk.shape[0] / batch
        monitor.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += batch
        step += 1
        window.append(value)
        if not math.isfinite(value):
            break
        if ramp is not None:
            ramp.step_done(samples=batch)
        if step % log_every == 0:
            b_noise = monitor.compute().get("b_noise", math.nan)
            if online is not None:
                online.update(b_noise, step=step)
            if ramp is not None:
                ramp.update(b_noise)
            if on_log is not None:
                on_log({"arm": arm.name, "seed": seed, "step": step, "tokens": seen * data.train.shape[1],
                        "batch": batch, "lr": lr, "lr_factor": factor, "b_noise": b_noise,
                        "train_loss": sum(window) / len(window)})
            window = []
        if ramp is not None:
            batch = ramp.batch
    monitor.detach()
    return model, {"steps": step, "tokens": seen * data.train.shape[1],
                   "start_step": start if (online is not None or arm.ramp == "noise") else ""}


#: The ramps: 16 -> 128 blocks in four phases of 1,536 blocks each (96, 48, 24 and 12 steps: 180 in all), and
#: the noise-driven ramp ``k x B_noise`` rounded down to micro-batches, within [RAMP_MIN, RAMP_MAX].  ``--quick``
#: ramps within its 256 blocks.
RAMP_SCHEDULE, QUICK_RAMP_SCHEDULE = "16:96,32:144,64:168,128", "16:4,32:8,64"
NOISE_K, RAMP_MIN, RAMP_MAX = 1.0, 16, 128

#: The LR grid of the B=64 yardstick (factor 2 around the sqrt rule's 8e-3).
GRID_64 = (4e-3, 8e-3, 1.6e-2, 3.2e-2)


def make_arms(ramp_schedule: str = RAMP_SCHEDULE) -> tuple[Arm, ...]:
    """Every arm, the reference (B=16, the pilot's run) first."""
    return (
        Arm("small", "fixed B=16 (LR 4e-3, tuned)", 16, lr=REF_LR, color="tab:blue"),
        Arm("large_tuned", "fixed B=128 (LR 1.6e-2, tuned)", 128, lr=TUNED_LR_128, color="tab:gray"),
        Arm("b128_surge", "fixed B=128, surge-law LR", 128, color="tab:orange"),
        Arm("b128_online", "B=128, surge-law LR + online factor", 128, online=True, color="tab:red"),
        Arm("b64_surge", "fixed B=64, surge-law LR", 64, color="tab:olive"),
        Arm("b64_online", "B=64, surge-law LR + online factor", 64, online=True, color="tab:pink"),
        *(Arm(f"b64_lr{lr:g}", f"fixed B=64, LR {lr:g}", 64, lr=lr, color="tab:gray") for lr in GRID_64),
        Arm("ramp_schedule", f"ramp {ramp_schedule}, sqrt rule", None, rule="sqrt", ramp=ramp_schedule,
            color="tab:green"),
        Arm("ramp_noise", f"ramp {NOISE_K:g} x B_noise in [{RAMP_MIN}, {RAMP_MAX}], sqrt rule", None, rule="sqrt",
            ramp="noise", color="tab:purple"),
    )


ARM_NAMES = tuple(a.name for a in make_arms())


def pilot_b_noise(data: LMData, args: argparse.Namespace) -> float:
    """The launch ``B_noise`` (blocks): what a short pilot of the reference run measures.

    The reference arm (B=16, LR 4e-3, seed 0) for the first 10% of the budget (at least four estimates); the
    median of its online estimates (robust to the first ones, which average only a few steps of the EMA).
    """
    pilot = max(args.budget_blocks // 10, 4 * args.log_every * REF_BATCH)
    estimates: list[float] = []
    train_arm(args.arms_all[0], data, 0, budget_blocks=args.budget_blocks, micro_batch=args.micro_batch,
              log_every=args.log_every, b_noise0=1.0, noise_beta=args.noise_beta, stop_blocks=pilot,
              on_log=lambda rec: estimates.append(rec["b_noise"]))
    finite = sorted(v for v in estimates if math.isfinite(v) and v > 0)
    if not finite:
        raise RuntimeError("the pilot measured no positive B_noise estimate: lengthen it or pass --b-noise")
    return finite[len(finite) // 2]


def run_arms(arms: Sequence[Arm], data: LMData, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Every arm with every seed: one CSV row per run, and the logging steps' records."""
    rows: list[dict] = []
    logs: list[dict] = []
    bar = progress_bar(len(arms) * args.seeds, "ramp runs")
    for arm in arms:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            model, info = train_arm(arm, data, seed, budget_blocks=args.budget_blocks, micro_batch=args.micro_batch,
                                    log_every=args.log_every, b_noise0=args.b_noise, noise_beta=args.noise_beta,
                                    on_log=logs.append)
            ok = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            val = eval_loss(model, data.val) if ok else math.nan
            test = eval_loss(model, data.test) if ok else math.nan
            rows.append({"arm": arm.name, "seed": seed, **info, "val_loss": round(val, 5),
                         "test_loss": round(test, 5), "diverged": int(not (ok and math.isfinite(test))),
                         "seconds": round(time.perf_counter() - t0, 1)})
            bar.update(1)
            bar.set_postfix_str(f"{arm.name} seed={seed} test={test:.3f}")
    bar.close()
    return rows, logs


def summary_rows(arms: Sequence[Arm], rows: list[dict], b_noise0: float) -> list[dict]:
    """Per arm: steps, tokens, test loss mean +- std over seeds, diverged runs, the launch B_noise."""
    out = []
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm.name]
        if not rs:
            continue
        m, s = mean_std([float(r["test_loss"]) for r in rs])
        steps = sorted({int(r["steps"]) for r in rs})
        out.append({"arm": arm.name, "label": arm.label, "n": len(rs), "steps": "/".join(map(str, steps)),
                    "tokens": int(rs[0]["tokens"]), "test_loss_mean": round(m, 5), "test_loss_std": round(s, 5),
                    "diverged": sum(int(r["diverged"]) for r in rs), "b_noise0": round(b_noise0, 2)})
    return out


def tables(summary: list[dict]) -> str:
    body = [[s["label"], s["steps"], f"{int(s['tokens']):,}", f"{float(s['test_loss_mean']):.3f} ± "
             f"{float(s['test_loss_std']):.3f}", s["diverged"]] for s in summary]
    return markdown_table(["arm", "optimizer steps", "tokens", "test loss (mean ± std)", "diverged"], body)


def plot(arms: Sequence[Arm], summary: list[dict], logs: list[dict], out_dir: str) -> str:
    """Four panels: training loss vs tokens, batch vs tokens, B_noise and LR factor vs tokens, test loss per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = {a.name: a for a in arms}
    shown = [s["arm"] for s in summary if not s["arm"].startswith("b64_lr")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_loss, ax_batch), (ax_noise, ax_bar) = axes
    ax_factor = ax_noise.twinx()
    ax_factor.set_ylabel("online LR factor (dotted)")
    for name in shown:
        arm = by_arm[name]
        recs: dict[int, list[dict]] = {}
        for r in logs:
            if r["arm"] == name:
                recs.setdefault(int(r["tokens"]), []).append(r)
        toks = sorted(recs)
        if not toks:
            continue
        style = "--" if arm.online else "-"

        def mean(key: str) -> list[float]:  # over seeds, at each logged token count
            return [sum(float(r[key]) for r in recs[t]) / len(recs[t]) for t in toks]

        ax_loss.plot(toks, mean("train_loss"), style, color=arm.color, label=arm.label)
        ax_batch.plot(toks, mean("batch"), style, color=arm.color, drawstyle="steps-post", label=arm.label)
        ax_noise.plot(toks, mean("b_noise"), style, color=arm.color, label=f"B_noise: {arm.label}")
        if arm.online:
            ax_factor.plot(toks, mean("lr_factor"), ":", color=arm.color, label=f"lr_factor: {arm.label}")
    ax_loss.set(xlabel="tokens", ylabel="training loss (window mean, seeds averaged)", title="Same token budget")
    ax_loss.set_ylim(top=7.0)
    ax_batch.set(xlabel="tokens", ylabel="global batch (blocks of 32 tokens)", yscale="log", title="Batch size")
    ax_noise.set(xlabel="tokens", ylabel="online B_simple (blocks)", yscale="log",
                 title="Measured noise scale (solid/dashed) and online LR factor (dotted)")
    labels = [s["label"] for s in summary]
    means = [float(s["test_loss_mean"]) for s in summary]
    stds = [float(s["test_loss_std"]) for s in summary]
    colors = [by_arm[s["arm"]].color for s in summary]
    ax_bar.barh(range(len(labels)), means, xerr=stds, color=colors, alpha=0.85, capsize=3)
    ax_bar.set_yticks(range(len(labels)), [f"{lab} ({s['steps']} steps)" for lab, s in zip(labels, summary)], fontsize=7)
    ax_bar.invert_yaxis()
    finite = [m for m in means if math.isfinite(m)]
    if finite:
        ax_bar.set_xlim(min(finite) - 0.1, max(finite) + 0.1)
    ax_bar.set(xlabel="test loss (nats/token), mean ± std over seeds", title="Final test loss")
    for ax in (ax_loss, ax_batch, ax_noise):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=7)
    ax_noise.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path = os.path.join(out_dir, "lm_batch_ramp.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=default_out_dir(), help="where CSVs and the PNG go (default docs/results)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny model and budget, 1 seed)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every arm (default 3)")
    p.add_argument("--budget-blocks", type=int, default=6144, help="training blocks per run (default 6144)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="blocks per micro-batch: the noise monitor's small batch (default 8)")
    p.add_argument("--log-every", type=int, default=4, help="optimizer steps between noise estimates (default 4)")
    p.add_argument("--noise-beta", type=float, default=0.95,
                   help="the noise monitor's EMA coefficient (default 0.95: a 20-step window, which the 48-step B=128 "
                   "runs can wait for; 0.99, Trainer's, would outlast them)")
    p.add_argument("--b-noise", type=float, default=None,
                   help="the launch B_noise in blocks (default: measured by a pilot, pilot_b_noise)")
    p.add_argument("--arms", nargs="+", default=None, choices=ARM_NAMES, help="a subset of the arms")
    p.add_argument("--replot", action="store_true", help="redo the table and PNG from the CSVs in --out-dir")
    args = p.parse_args(argv)
    if args.quick:
        args.budget_blocks, args.seeds, args.micro_batch, args.log_every, args.noise_beta = 256, 1, 8, 2, 0.5
    args.arms_all = make_arms(QUICK_RAMP_SCHEDULE if args.quick else RAMP_SCHEDULE)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    single_thread()
    arms = [a for a in args.arms_all if args.arms is None or a.name in args.arms]
    summary_path = os.path.join(args.out_dir, "lm_batch_ramp.csv")
    log_path = os.path.join(args.out_dir, "lm_batch_ramp_log.csv")
    if args.replot:
        summary, logs = read_csv(summary_path), read_csv(log_path)
    else:
        data = load_lm_data(QUICK if args.quick else FULL)
        if args.b_noise is None:
            args.b_noise = pilot_b_noise(data, args)
        print(f"launch B_noise: {args.b_noise:.1f} blocks")
        rows, logs = run_arms(arms, data, args)
        summary = summary_rows(arms, rows, args.b_noise)
        write_csv(os.path.join(args.out_dir, "lm_batch_ramp_runs.csv"), rows)
        write_csv(log_path, logs)
        write_csv(summary_path, summary)
    print(tables(summary))
    print(plot(args.arms_all, summary, logs, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
