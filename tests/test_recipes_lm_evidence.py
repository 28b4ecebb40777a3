"""Smoke tests of the language-model evidence recipes behind docs/results.md (parts 2 and 4).

Each recipe runs end to end with ``--quick`` (seconds) and writes its CSVs and PNGs with the expected columns.
Nothing here checks the quality of the numbers (those come from the full runs), except the one thing part 4
exists to show: under ZeRO-2 the run matches the single-process run, and the per-partition-norm negative
control does not.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from recipe_loading import RECIPES, restore_threads  # noqa: F401  (restore_threads: autouse fixture)
from recipe_loading import load_recipe as _load


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_tokens_at_every_batch_size() -> None:
    """The token budget is the same *tokens*: a larger batch regroups the same blocks into fewer steps."""
    lm = _load("lm_batch_scaling")
    data = lm.LMData(train=torch.arange(200 * 3).view(200, 3), val=None, test=None, config=None)
    small = lm.run_batches(data, lm.LMRun("adamw", 1e-3, 4, seed=5, budget_blocks=64))
    large = lm.run_batches(data, lm.LMRun("adamw", 1e-3, 16, seed=5, budget_blocks=64))
    assert small.shape == (16, 4, 3) and large.shape == (4, 16, 3)
    assert torch.equal(small.reshape(-1, 3), large.reshape(-1, 3))
    other = lm.run_batches(data, lm.LMRun("adamw", 1e-3, 16, seed=6, budget_blocks=64))
    assert not torch.equal(other, large)


def test_lm_batch_scaling_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lm = _load("lm_batch_scaling")
    assert lm.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    header, rows = _rows(tmp_path / "lm_batch_scaling_runs.csv")
    assert {"optimizer", "batch_size", "lr", "seed", "steps", "tokens", "val_loss", "test_loss", "test_ppl",
            "diverged"} <= set(header)
    assert len(rows) == 4 * 2 * 2  # 4 optimizers x 2 batches x 2 LRs x 1 seed
    # same token budget at both batch sizes
    assert len({r["tokens"] for r in rows}) == 1
    assert {int(r["steps"]) for r in rows} == {16, 4}
    header, summary = _rows(tmp_path / "lm_batch_scaling.csv")
    assert {"optimizer", "batch_size", "lr", "n", "test_loss_mean", "test_loss_std", "test_ppl_mean",
            "lr_at_grid_edge"} <= set(header)
    assert len(summary) == 8
    assert all(math.isfinite(float(r["test_loss_mean"])) for r in summary)
    header, curves = _rows(tmp_path / "lm_batch_scaling_curves.csv")
    assert {"optimizer", "batch_size", "seed", "tokens", "train_loss"} <= set(header) and curves
    assert _is_png(tmp_path / "lm_batch_scaling.png") and _is_png(tmp_path / "lm_batch_scaling_sweep.png")
    out = capsys.readouterr().out
    assert "#### LR sweep" in out and "Δ large − small" in out and "wall time" in out


def test_zero2_config_is_explicit() -> None:
    z2 = _load("zero2_matches_single")
    cfg = z2.ds_config(str(RECIPES.parent / "ds_configs" / "zero2.json"), 256)
    assert cfg["train_batch_size"] == 256 and cfg["train_micro_batch_size_per_gpu"] == 128
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_allow_untested_optimizer"] is True


@pytest.mark.distributed
def test_zero2_matches_single_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("deepspeed")
    z2 = _load("zero2_matches_single")
    assert z2.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    header, steps = _rows(tmp_path / "zero2_losses.csv")
    assert {"optimizer", "comparison", "step", "loss_a", "loss_b", "abs_diff"} <= set(header)
    # 3 optimizers x (ZeRO-2, half-batch noise floor) + the negative control + RangerLARS's GC-order control
    assert len(steps) == (3 * 2 + 2) * 4
    header, summary = _rows(tmp_path / "zero2_summary.csv")
    assert {"optimizer", "comparison", "max_abs_loss_diff", "max_rel_weight_diff", "first_step_diff_above_1e-4",
            "layers_split_across_ranks"} <= set(header)
    by = {(r["optimizer"], r["comparison"]): r for r in summary}
    assert len(by) == 8
    for opt in ("adam_lars", "ranger_lars", "lars"):  # exact up to float summation order on 4 tiny steps
        r = by[(opt, "hf_lars")]
        assert float(r["max_abs_loss_diff"]) < 1e-5, r
        assert int(r["layers_split_across_ranks"]) >= 1  # the comparison really crosses a layer boundary
        # RangerLARS: under ZeRO, GC runs before DeepSpeed clips the gradient, in one process after; the final
        # weights match the single-process run that centres before clipping (the other one differs slightly)
        exact = by[(opt, "gc_first")] if opt == "ranger_lars" else r
        assert float(exact["max_rel_weight_diff"]) < 1e-5, exact
        assert float(by[(opt, "halves")]["max_rel_weight_diff"]) < 1e-5
    assert float(by[("adam_lars", "naive")]["max_rel_weight_diff"]) > 1e-4  # per-partition norms differ
    assert _is_png(tmp_path / "zero2_loss.png")
    assert "max abs loss diff" in capsys.readouterr().out


def test_lr_robustness_band_and_summary() -> None:
    """The band is the contiguous LRs around the best within 0.05 nats; a diverged LR is never chosen and
    ends a band; the grid is 8 LRs spanning 128x around part 2's best."""
    rob = _load("lm_lr_robustness")
    lrs = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert rob._band(lrs, [5.3, 5.04, 5.0, 5.03, 5.2], 2) == (2.0, 8.0, False)
    assert rob._band(lrs, [5.01, 5.04, 5.0, 5.3, 5.0], 2) == (1.0, 4.0, True)  # reaches the edge; 16 is cut off
    grid = rob.grid(0.16)
    assert len(grid) == 8 and grid[-1] / grid[0] == 128 and 0.16 in grid
    rows = [
        {"optimizer": "adam_lars", "batch_size": b, "lr": lr, "seed": s, "val_loss": v + 0.01 * s,
         "test_loss": v + 0.02 + 0.01 * s}
        for b, lr, v in [(16, 0.04, 4.7), (128, 0.08, 5.2), (128, 0.16, 5.0), (128, 0.32, 5.04), (128, 0.64, math.nan)]
        for s in range(3)
    ]
    (summary,) = rob.summarise(rows)
    assert (summary["best_lr"], summary["val_band_lo"], summary["val_band_hi"]) == (0.16, 0.16, 0.32)
    assert summary["val_band_width"] == 2.0 and summary["diverged_lrs"] == 1 and not summary["val_band_at_edge"]
    assert summary["test_loss_mean"] == pytest.approx(5.03) and summary["small_batch_test_loss"] == pytest.approx(4.73)


def test_lr_robustness_quick(tmp_path: Path) -> None:
    rob = _load("lm_lr_robustness")
    assert rob.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    cols, rows = _rows(tmp_path / "lm_lr_robustness.csv")
    assert {"best_lr", "test_loss_mean", "val_band_width", "test_band_width", "small_batch_test_loss"} <= set(cols)
    assert [r["optimizer"] for r in rows] == ["adamw", "adam_lars", "ranger_lars"]
    assert all(float(r["val_band_width"]) >= 1 for r in rows)
    assert _is_png(tmp_path / "lm_lr_robustness.png")
    # --from-runs redoes the summary from the runs CSV without training, identically
    again = tmp_path / "again"
    assert rob.main(["--from-runs", str(tmp_path / "lm_lr_robustness_runs.csv"), "--out-dir", str(again)]) == 0
    assert (again / "lm_lr_robustness.csv").read_text() == (tmp_path / "lm_lr_robustness.csv").read_text()


def test_lm_batch_ramp_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15's evidence recipe end to end: every arm spends the same tokens its own way, and each way shows.

    The scheduled ramp changes batch at the steps its string names, the noise-driven one never shrinks and stays
    in its bounds, the online arm moves its LR factor within the default bounds, from the default start step on
    (quick: beta 0.5, so the later of the warmup's end, step 1 at B=64, and the EMA's window, 2 steps), and a
    fixed arm keeps factor 1.
    """
    rec = _load("lm_batch_ramp")
    assert rec.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    _, runs = _rows(tmp_path / "lm_batch_ramp_runs.csv")
    assert {r["arm"] for r in runs} == set(rec.ARM_NAMES)
    fixed = {r["arm"]: r for r in runs if not r["arm"].startswith("ramp")}
    assert {int(r["tokens"]) for r in fixed.values()} == {256 * 16}  # quick: 256 blocks of 16 tokens
    assert int(fixed["small"]["steps"]) == 16 and int(fixed["large_tuned"]["steps"]) == 2
    _, logs = _rows(tmp_path / "lm_batch_ramp_log.csv")
    by_arm: dict[str, list[dict[str, str]]] = {}
    for r in logs:
        by_arm.setdefault(r["arm"], []).append(r)
    # "16:4,32:8,64": steps 1-4 at 16, 5-8 at 32, then 64 (a record's batch is that of its last step)
    sched = {int(r["step"]): int(r["batch"]) for r in by_arm["ramp_schedule"]}
    assert sched[2] == sched[4] == 16 and sched[6] == sched[8] == 32 and all(sched[s] == 64 for s in sched if s > 8)
    steps = int(next(r for r in runs if r["arm"] == "ramp_schedule")["steps"])
    assert steps == 4 + 4 + (256 - 4 * 16 - 4 * 32) // 64  # the budget, spent phase by phase
    noise = [int(r["batch"]) for r in by_arm["ramp_noise"]]
    assert noise == sorted(noise) and rec.RAMP_MIN <= noise[0] and noise[-1] <= rec.RAMP_MAX
    assert all(b % 8 == 0 for b in noise)  # whole micro-batches
    online = next(r for r in runs if r["arm"] == "b64_online")
    assert int(online["start_step"]) == 2
    factors = {int(r["step"]): float(r["lr_factor"]) for r in by_arm["b64_online"]}  # what each logged step used
    assert factors[2] == 1.0 != factors[4] and all(0.25 <= f <= 4.0 for f in factors.values())
    assert all(float(r["lr_factor"]) == 1.0 for r in by_arm["b64_surge"])
    _, summary = _rows(tmp_path / "lm_batch_ramp.csv")
    assert [s["arm"] for s in summary] == list(rec.ARM_NAMES)
    assert all(math.isfinite(float(s["test_loss_mean"])) for s in summary)
    assert _is_png(tmp_path / "lm_batch_ramp.png")
    out = capsys.readouterr().out
    assert "launch B_noise" in out and "| arm | optimizer steps |" in out
    assert rec.main(["--replot", "--out-dir", str(tmp_path)]) == 0  # redraws from the CSVs alone
