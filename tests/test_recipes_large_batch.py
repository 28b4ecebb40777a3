"""Smoke tests of the two large-batch evidence recipes: ``no_norm_lars.py`` (LARS vs SGD without
normalization) and ``digits_surge.py`` (Adam's best LR vs batch at three budgets, online noise scale).

Each runs end to end in a tiny configuration (seconds) and the tests assert on what it writes; the
numbers in docs/results.md and docs/scaling.md come from the full runs.  Two claims the recipes rest on are
checked directly: the plain network has no normalization and eight weight layers, and with a constant LR
the first ``S/4`` steps of a run are an ``S/4``-step run (one sweep serves the three budgets).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the recipes train on scikit-learn's bundled digits")
pytest.importorskip("matplotlib")

from recipe_loading import restore_threads  # noqa: F401  (autouse fixture)
from recipe_loading import load_recipe as _load


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_deep_net_has_no_normalization_and_eight_weight_layers() -> None:
    experiment = _load("_experiment")
    net = experiment.make_model("plain_deep", 4)
    weights = [p for p in net.parameters() if p.ndim > 1]
    assert len(weights) == 8
    assert not any(isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm))
                   for m in net.modules())  # fmt: skip
    assert all(torch.count_nonzero(p) == 0 for p in net.parameters() if p.ndim == 1)  # zero biases
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match="valid: bn_convnet, convnet, plain_deep"):
        experiment.make_model("resnet")


def test_no_norm_lars_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _load("no_norm_lars")
    assert recipe.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    runs = _rows(tmp_path / "no_norm_runs.csv")
    # 2 optimizers x 2 batch sizes x 1 seed x 4 LRs: a 2-LR grid always wins at an edge, which adds 2 LRs
    assert len(runs) == 2 * 2 * 4
    assert {r["model"] for r in runs} == {"plain_deep"}
    summary = _rows(tmp_path / "no_norm.csv")
    assert sorted((r["optimizer"], int(r["batch_size"])) for r in summary) == [
        ("lars", 32), ("lars", 256), ("sgd", 32), ("sgd", 256)
    ]  # fmt: skip
    args = recipe.parse_args(["--quick"])
    for r in summary:  # the chosen LR has the best validation accuracy of its extended grid
        grid = recipe.lr_grid(args, r["optimizer"], int(r["batch_size"]))
        mine = [x for x in runs if x["optimizer"] == r["optimizer"] and x["batch_size"] == r["batch_size"]]
        lrs = sorted(float(x["lr"]) for x in mine)
        assert set(grid) < set(lrs) and len(lrs) == 4
        below, above = [grid[0] / 4, grid[0] / 2, *grid], [*grid, grid[-1] * 2, grid[-1] * 4]  # (4 digits)
        assert lrs == pytest.approx(below, rel=1e-3) or lrs == pytest.approx(above, rel=1e-3)
        assert float(r["val_acc_mean"]) == max(float(x["val_acc"]) for x in mine)
        assert int(r["lr_at_grid_edge"]) == int(float(r["lr"]) in (lrs[0], lrs[-1]))
    # --resume reuses every run: same rows, nothing trained again
    before = (tmp_path / "no_norm_runs.csv").read_text()
    assert recipe.main(["--quick", "--out-dir", str(tmp_path), "--resume"]) == 0
    assert (tmp_path / "no_norm_runs.csv").read_text() == before
    ratios = _rows(tmp_path / "no_norm_ratios.csv")
    models = [r["model"] for r in ratios]
    assert models.count("plain_deep") == 8 and models.count("bn_convnet") == 4
    assert all(math.isfinite(float(r["ratio_mean"])) and float(r["ratio_mean"]) > 0 for r in ratios)
    for r in ratios:  # the ratio is ||w|| / ||g|| of the same tensor
        assert float(r["ratio_mean"]) == pytest.approx(float(r["w_norm"]) / float(r["g_norm"]), rel=1e-6)
    assert _is_png(tmp_path / "no_norm.png")
    out = capsys.readouterr().out
    assert "| batch | steps | SGD + momentum | LARS (package default) |" in out and "**max / min**" in out


def test_digits_surge_budgets_are_prefixes_of_one_run() -> None:
    """Constant LR after warmup: the losses and online noise scale at step S/4 of an S-step run equal those of
    an S/4-step run, bit for bit."""
    recipe = _load("digits_surge")
    data = _load("_experiment").load_digits_splits()
    short, long = recipe.parse_args(["--quick"]), recipe.parse_args(["--quick"])
    short.steps, long.steps = 20, 80  # budgets 5, 10, 20 and 20, 40, 80
    (end_of_short,) = [r for r in recipe.train_one(short, data, 64, 1.6e-2, 0) if r["step"] == 20]
    (at_20,) = [r for r in recipe.train_one(long, data, 64, 1.6e-2, 0) if r["step"] == 20]
    for key in ("val_loss", "test_loss", "b_noise"):
        assert end_of_short[key] == at_20[key]
    assert math.isfinite(at_20["b_noise"]) and at_20["b_noise"] > 0


def test_digits_surge_quick_matches_the_cli_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hf_lars.cli import main as cli

    recipe = _load("digits_surge")
    assert recipe.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    budgets = recipe.budgets(24)
    assert budgets == [6, 12, 24]
    runs = _rows(tmp_path / "digits_surge_runs.csv")
    assert len(runs) == 3 * 3 * len(budgets)  # 3 batch sizes x 3 LRs x 1 seed, a row per budget
    assert _is_png(tmp_path / "digits_surge.png")
    fits = _rows(tmp_path / "digits_surge_fit.csv")
    assert [int(f["steps"]) for f in fits] == budgets
    out = capsys.readouterr().out
    assert "Surge fit per training budget vs the online noise scale" in out
    # `hf-lars scale fit` on the budget's grid CSV gives the recipe's B_noise
    grid_csv = tmp_path / "digits_surge_grid_24.csv"
    assert cli(["scale", "fit", str(grid_csv), "--bootstrap", "20", "--no-plot"]) == 0
    cli_out = capsys.readouterr().out
    b_noise = float(fits[-1]["b_noise_fit"])
    assert f"B_noise = {b_noise:.4g}" in cli_out
    # --replot refits from the runs CSV and writes the same fit table; --resume trains nothing again
    before = (tmp_path / "digits_surge_fit.csv").read_text()
    runs_before = (tmp_path / "digits_surge_runs.csv").read_text()
    assert recipe.main(["--quick", "--out-dir", str(tmp_path), "--replot"]) == 0
    assert (tmp_path / "digits_surge_fit.csv").read_text() == before
    assert recipe.main(["--quick", "--out-dir", str(tmp_path), "--resume"]) == 0
    assert (tmp_path / "digits_surge_runs.csv").read_text() == runs_before
    assert (tmp_path / "digits_surge_fit.csv").read_text() == before
