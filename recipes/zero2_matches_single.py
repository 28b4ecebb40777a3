#!/usr/bin/env python
"""The large-batch LM run of ``lm_batch_scaling.py`` under DeepSpeed ZeRO-2 on 2 processes matches one process.

For each optimizer (default: AdamLARS, RangerLARS, LARS) the same run is trained twice:

- **single**: one process, the whole global batch (``B=128`` blocks of 32 tokens, 48 steps), the training loop of
  :mod:`lm_batch_scaling` (``clip_grad_norm_(1.0)``, warmup + poly(2) schedule);
- **ZeRO-2**: ``torchrun --nproc_per_node 2`` (CPU, gloo), ``deepspeed.initialize(model, optimizer=<hf_lars
  optimizer>, config=...)`` with ``ds_configs/zero2.json`` and its ``"auto"`` values made explicit
  (``train_batch_size`` 128, ``train_micro_batch_size_per_gpu`` 64, ``gradient_accumulation_steps`` 1,
  ``gradient_clipping`` 1.0, fp32).  Each rank takes its half of every global batch; the logged loss is the
  mean of the two ranks' losses (= the loss of the whole batch).  The same schedule
  (``hf_lars.get_warmup_poly_schedule`` on ``engine.optimizer``) is stepped after every ``engine.step()``.

Same initial weights (the single run's seed; the launcher ships its state dict), same batches, same LR (the
LR chosen for ``B=128`` in ``lm_batch_scaling.py``), same seed: the single run *is* that recipe's run with
``--seed`` (default 1).  Under ZeRO-2 every optimizer sees one flat fp32 partition per param group, holding
pieces of many layers, some split across the two ranks; hf_lars computes per-layer norms from the pieces with
one all-reduce.

Controls, to give a difference its scale:

- noise floor (every optimizer): one process, each batch's gradient accumulated over its two halves, i.e. the
  same arithmetic summed in another order, which is what the two ranks change;
- negative control (``--no-naive`` to skip): AdamLARS under ZeRO-2 with the norms computed per flat partition
  (what LAMB implementations that ignore the sharding do);
- RangerLARS only: one process with Gradient Centralization applied *before* the gradient clipping, the order
  under ZeRO while GC ran in gradient hooks before DeepSpeed reduced and clipped.  GC now runs inside
  ``step()`` in every mode, after clipping, so ZeRO-2 should match ``single`` and this is a control.

Reported per comparison: the max over steps of ``|loss_a - loss_b|``, the first step where it exceeds 1e-4,
the max relative difference of the final weights (per tensor ``||w_a - w_b|| / ||w_a||``), both test losses.

Outputs in ``--out-dir`` (default ``docs/results``): ``zero2_losses.csv`` (per step), ``zero2_summary.csv``,
``zero2_loss.png``.

Regenerate the committed results (about 1 minute on 2 CPU cores)::

    python recipes/zero2_matches_single.py

``--quick`` is a seconds-long smoke run (tiny model, 4 steps).  ``--worker PAYLOAD`` is the torchrun entry point.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import lm_batch_scaling as lm  # noqa: E402
from _experiment import default_out_dir, markdown_table, single_thread, write_csv  # noqa: E402

#: LRs chosen at B=128 by ``python recipes/lm_batch_scaling.py`` (docs/results/lm_batch_scaling.csv).
DEFAULT_LRS = {"adam_lars": 0.16, "ranger_lars": 4.0, "lars": 64.0, "adamw": 0.016}
WORLD = 2
CASE_TIMEOUT_S = 900


# ----------------------------------------------------------------------------------------------- launcher
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=default_out_dir(), help="where CSVs and the PNG go (default docs/results)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny model, 4 steps)")
    p.add_argument("--optimizers", nargs="+", default=["adam_lars", "ranger_lars", "lars"],
                   choices=lm.OPTIMIZERS)
    p.add_argument("--lr", action="append", default=[], metavar="OPT=LR", help="override a default LR")
    p.add_argument("--batch-size", type=int, default=128, help="global batch in blocks (default 128)")
    p.add_argument("--budget-blocks", type=int, default=6144, help="as in lm_batch_scaling.py (default 6144)")
    p.add_argument("--seed", type=int, default=1, help="init and data order (default 1: a final seed of part 2)")
    p.add_argument("--no-naive", action="store_true", help="skip the per-partition-norm negative control")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.budget_blocks = 16, 64
    if args.batch_size % WORLD:
        p.error(f"--batch-size must be a multiple of {WORLD}")
    args.lrs = dict(DEFAULT_LRS)
    for spec in args.lr:
        name, _, value = spec.partition("=")
        args.lrs[name] = float(value)
    return args


def ds_config(path: str, batch_size: int) -> dict[str, Any]:
    """``ds_configs/zero2.json`` with every ``"auto"`` made explicit for a raw ``deepspeed.initialize``."""
    cfg = json.loads(Path(path).read_text())
    cfg.update({
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // WORLD,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,  # DeepSpeed's default too; the single-process run clips at 1.0 as well
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    })
    assert cfg["zero_optimization"]["stage"] == 2
    assert "auto" not in json.dumps(cfg), cfg
    return cfg


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(payload_path: str, out_path: str) -> None:
    """``torchrun --nproc_per_node 2`` this script as a worker; output streams through (tqdm on rank 0)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([*filter(None, [env.get("PYTHONPATH")]), str(REPO)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", payload_path,
           "--out", out_path]
    proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=CASE_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"the ZeRO-2 run failed (rc={proc.returncode}): {' '.join(cmd)}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    data = lm.load_lm_data(lm.QUICK if args.quick else lm.FULL)
    cases = [(opt, False) for opt in args.optimizers]
    if not args.no_naive and "adam_lars" in args.optimizers:
        cases.append(("adam_lars", True))
    runs = {opt: lm.LMRun(opt, args.lrs[opt], args.batch_size, args.seed, args.budget_blocks)
            for opt in args.optimizers}
    batches = lm.run_batches(data, runs[args.optimizers[0]])  # the same for every optimizer (same seed)
    init_model = lm.make_model(data.config, args.seed)
    init_state = {k: v.detach().clone() for k, v in init_model.state_dict().items()}

    # the single-process run, and two single-process controls: the same run with each batch's gradient summed
    # over its two halves (what the two ranks compute; only the floating-point summation order changes: the
    # noise floor), and, for RangerLARS, Gradient Centralization applied before the gradient clipping (a
    # control: the order under ZeRO while GC ran in gradient hooks; now GC runs in step(), after clipping)
    variants = [(opt, v) for opt in args.optimizers for v in ("single", "halves")]
    variants += [("ranger_lars", "gc_first")] if "ranger_lars" in args.optimizers else []
    single: dict[str, Any] = {}
    for opt, variant in tqdm(variants, desc="single-process runs", unit="run"):
        t0 = time.perf_counter()
        model = copy.deepcopy(init_model)
        norms: list[float] = []

        def before_clip(m: torch.nn.Module, variant: str = variant, norms: list[float] = norms) -> None:
            if variant == "gc_first":
                _centralize_all(m)
            norms.append(_grad_norm(m))  # what clip_grad_norm_ will see

        model, losses = lm.train_lm(runs[opt], data, model=model, micro_batches=2 if variant == "halves" else 1,
                                    before_clip=before_clip)
        single[_key(opt, variant)] = {
            "losses": losses,
            "grad_norms": norms,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "test_loss": lm.eval_loss(model, data.test),
            "seconds": time.perf_counter() - t0,
        }

    with tempfile.TemporaryDirectory() as tmp:
        payload = os.path.join(tmp, "payload.pt")
        torch.save({"config": data.config, "init_state": init_state, "batches": batches, "test": data.test,
                    "runs": {k: asdict(v) for k, v in runs.items()}, "cases": cases,
                    "ds_config": ds_config(args.ds_config, args.batch_size)}, payload)
        out = os.path.join(tmp, "zero2.pt")
        t0 = time.perf_counter()
        launch(payload, out)
        zero2 = torch.load(out, weights_only=False)
        zero2_seconds = time.perf_counter() - t0
    return {"runs": runs, "single": single, "zero2": zero2, "cases": cases, "zero2_seconds": zero2_seconds}


def _key(opt: str, variant: bool | str) -> str:
    """``opt`` for the main runs; ``opt/naive`` (ZeRO-2 negative control), ``opt/halves``, ``opt/gc_first``."""
    if variant is True:
        return f"{opt}/naive"
    return opt if variant in (False, "single") else f"{opt}/{variant}"


def _centralize_all(model: torch.nn.Module) -> None:
    """Gradient Centralization of every matrix's gradient in place (idempotent: the step centres again)."""
    from hf_lars.optim.ranger_lars import centralize_gradient

    for p in model.parameters():
        if p.grad is not None and p.ndim > 1:
            p.grad.copy_(centralize_gradient(p.grad))


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm())


def _first_above(diffs: list[float], threshold: float = 1e-4) -> int | str:
    return next((t + 1 for t, d in enumerate(diffs) if d > threshold), "none")


def _weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-30)) for n in a)


VARIANT_LABELS = {
    "hf_lars": "ZeRO-2 (hf_lars) vs 1 process",
    "naive": "ZeRO-2, norms per flat partition (negative control) vs 1 process",
    "halves": "1 process, gradient summed over 2 halves (noise floor) vs 1 process",
    "gc_first": "1 process, GC before clipping vs ZeRO-2 (hf_lars)",
}


def results(res: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-step losses of every comparison, and one summary row per comparison."""
    per_step, summary = [], []
    single = res["single"]
    pairs = []  # (optimizer, variant, losses a, losses b, params a, params b, test a, test b)
    for opt, naive in res["cases"]:
        s, z = single[opt], res["zero2"][_key(opt, naive)]
        pairs.append((opt, "naive" if naive else "hf_lars", s, z))
    for opt in dict.fromkeys(o for o, _ in res["cases"]):
        pairs.append((opt, "halves", single[opt], single[_key(opt, "halves")]))
        if _key(opt, "gc_first") in single:
            pairs.append((opt, "gc_first", res["zero2"][opt], single[_key(opt, "gc_first")]))
    for opt, variant, a, b in pairs:
        run_ = res["runs"][opt]
        diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
        norms = a.get("grad_norms", [])
        for t, (x, y) in enumerate(zip(a["losses"], b["losses"])):
            per_step.append({"optimizer": opt, "comparison": variant, "step": t + 1, "loss_a": x, "loss_b": y,
                             "abs_diff": abs(x - y),
                             "grad_norm_before_clip_a": norms[t] if t < len(norms) else float("nan")})
        summary.append({
            "optimizer": opt, "comparison": variant, "description": VARIANT_LABELS[variant],
            "lr": run_.lr, "batch_size": run_.batch_size, "seed": run_.seed, "steps": len(diffs),
            "max_abs_loss_diff": max(diffs), "max_abs_loss_diff_step": 1 + diffs.index(max(diffs)),
            "first_step_diff_above_1e-4": _first_above(diffs),
            "final_loss_a": a["losses"][-1], "final_loss_b": b["losses"][-1],
            "max_rel_weight_diff": _weight_diff(a["params"], b["params"]),
            "test_loss_a": a["test_loss"], "test_loss_b": b["test_loss"],
            "layers": res["zero2"][opt]["layers"], "layers_split_across_ranks": res["zero2"][opt]["split_layers"],
        })
    return per_step, summary


def table(summary: list[dict[str, Any]]) -> str:
    body = [[lm.LABELS[r["optimizer"]], f"{r['lr']:g}", VARIANT_LABELS[r["comparison"]],
             f"{r['max_abs_loss_diff']:.2e} (step {r['max_abs_loss_diff_step']})", r["first_step_diff_above_1e-4"],
             f"{r['max_rel_weight_diff']:.1e}", f"{r['test_loss_a']:.4f} / {r['test_loss_b']:.4f}"]
            for r in summary]
    return markdown_table(["optimizer", "LR", "comparison (a vs b)", "max abs loss diff over all steps (at step)",
                           "first step with diff > 1e-4", "max rel weight diff (final)", "test loss a / b"], body)


DIFF_STYLES = {  # comparison -> (colour, line style, marker, legend label)
    "hf_lars": ("tab:orange", "-", "x", "ZeRO-2 vs 1 process"),
    "halves": ("tab:blue", "--", ".", "1 process, 2 half-batch gradients\nvs 1 process (noise floor)"),
    "naive": ("tab:red", ":", "o", "ZeRO-2 per-partition norms vs 1 process"),
    "gc_first": ("tab:green", "-.", "^", "1 process with GC before clipping\nvs ZeRO-2"),
}


def plot(per_step: list[dict[str, Any]], summary: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = args.optimizers
    fig, axes = plt.subplots(2, len(opts), figsize=(5.0 * len(opts), 8.0), squeeze=False,
                             gridspec_kw={"height_ratios": [1.6, 1]}, sharex="col")
    for j, opt in enumerate(opts):
        ax, axd = axes[0][j], axes[1][j]

        def rows(comparison: str) -> list[dict[str, Any]]:
            return [r for r in per_step if r["optimizer"] == opt and r["comparison"] == comparison]

        ours, naive = rows("hf_lars"), rows("naive")
        steps = [r["step"] for r in ours]
        ax.plot(steps, [r["loss_a"] for r in ours], "-", color="0.2", lw=3.5, alpha=0.4,
                label="1 process, whole batch")
        ax.plot(steps, [r["loss_b"] for r in ours], "--", color="tab:orange", marker="x", ms=6, lw=1.3,
                label="ZeRO-2, 2 processes (hf_lars)")
        if naive:
            ax.plot([r["step"] for r in naive], [r["loss_b"] for r in naive], ":", color="tab:red", marker="o",
                    ms=3.5, mfc="none", lw=1.2, label="ZeRO-2, norms per flat partition\n(negative control)")
        values = [r["loss_a"] for r in ours] + [r["loss_b"] for r in ours]
        if max(values) > 3 * min(values):
            ax.set_yscale("log")
        ax.set_title(f"{lm.LABELS[opt]}, B={args.batch_size}, lr={args.lrs[opt]:g}")
        ax.set_ylabel("training loss (nats/token)" + (", log scale" if ax.get_yscale() == "log" else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        floor = 1e-9  # an exact 0 (identical float32 losses) is drawn at this floor of the log axis
        for comparison, (color, style, marker, label) in DIFF_STYLES.items():
            rs = rows(comparison)
            if rs:
                axd.semilogy([r["step"] for r in rs], [max(r["abs_diff"], floor) for r in rs], style, color=color,
                             marker=marker, ms=4, mfc="none" if marker == "o" else None, lw=1.1, label=label)
        axd.set_xlabel("optimizer step")
        axd.set_ylabel("|loss a − loss b| (exact 0 drawn at 1e-9)")
        axd.grid(alpha=0.3, which="both")
        lo, hi = axd.get_ylim()
        axd.set_ylim(lo, hi * 1e4)  # headroom: the legend sits above the data
        axd.legend(fontsize=7, loc="upper right", ncol=2 if len(opts) < 3 else 1)
    fig.suptitle(f"Same run (seed {args.seed}), 1 process vs DeepSpeed ZeRO-2 on 2 processes (CPU, gloo, fp32)")
    fig.tight_layout()
    path = os.path.join(args.out_dir, "zero2_loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.out)
    single_thread()
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    res = run(args)
    per_step, summary = results(res)
    write_csv(os.path.join(args.out_dir, "zero2_losses.csv"), per_step)
    write_csv(os.path.join(args.out_dir, "zero2_summary.csv"), summary)
    plot(per_step, summary, args)
    print(table(summary))
    print(f"\nZeRO-2 launch (all cases, incl. start-up): {res['zero2_seconds']:.0f} s")
    print(f"wall time: {(time.perf_counter() - t0) / 60:.1f} min; results in {args.out_dir}")
    return 0


# ------------------------------------------------------------------------------------------------- worker
def worker(payload_path: str, out_path: str) -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import deepspeed
    from tqdm.auto import tqdm

    from _naive_layout import naive_layouts  # recipes/ is this script's directory

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    payload = torch.load(payload_path, weights_only=False)
    batches, cfg = payload["batches"], payload["ds_config"]
    micro = batches.shape[1] // world
    results: dict[str, Any] = {}
    for opt_name, naive in payload["cases"]:
        t0 = time.perf_counter()
        run_ = lm.LMRun(**payload["runs"][opt_name])
        model = lm.make_model(payload["config"], run_.seed)
        model.load_state_dict(payload["init_state"])
        optimizer = lm.build_lm_optimizer(model, opt_name, run_.lr, run_.weight_decay)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(cfg))
        assert engine.zero_optimization_stage() == 2
        sched = lm.make_schedule(engine.optimizer, run_)
        params = list(engine.module.parameters())
        has = torch.tensor([float(getattr(p, "_hp_mapping", None) is not None) for p in params])
        dist.all_reduce(has)
        losses = []
        with naive_layouts(naive):
            bar = tqdm(batches, desc=f"ZeRO-2 {_key(opt_name, naive)}", unit="step", disable=rank != 0)
            for batch in bar:
                x = batch[rank * micro : (rank + 1) * micro]
                loss = engine(input_ids=x, labels=x).loss
                engine.backward(loss)
                engine.step()
                sched.step()
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                losses.append(float(mean) / world)
                bar.set_postfix_str(f"loss={losses[-1]:.4f}")
        full = {n: p.get_full_hp_param().detach().float().clone() for n, p in engine.module.named_parameters()}
        test_loss = float("nan")
        if rank == 0:
            check = lm.make_model(payload["config"], run_.seed)
            with torch.no_grad():
                for n, p in check.named_parameters():
                    p.copy_(full[n].view_as(p))
            test_loss = lm.eval_loss(check, payload["test"])
        results[_key(opt_name, naive)] = {
            "losses": losses, "params": full, "test_loss": test_loss, "layers": len(params),
            "split_layers": int((has == world).sum()), "seconds": time.perf_counter() - t0,
        }
        if hasattr(engine, "destroy"):  # release DeepSpeed's hooks and buffers before the next case
            engine.destroy()
        dist.barrier()
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
