"""Smoke tests of the evidence recipes behind docs/results.md.

Each recipe runs end to end with ``--quick`` (seconds) and writes its CSVs and PNGs with the expected
columns.  Nothing here checks accuracy: the numbers in docs/results.md come from the full runs.  Two claims
the ablation relies on are checked against the optimizer code: RangerLARS with ``k=1, alpha=1.0`` is
exactly RangerLARS without Lookahead, and the "no trust ratio" variant refuses weight decay.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the recipes train on scikit-learn's bundled digits")
pytest.importorskip("matplotlib")

from recipe_loading import RECIPES, restore_threads  # noqa: F401  (restore_threads: autouse fixture)
from recipe_loading import load_recipe as _load


def _header(path: Path) -> tuple[list[str], int]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], len(rows) - 1


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vision_batch_scaling_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _load("vision_batch_scaling").main(["--quick", "--out-dir", str(tmp_path)]) == 0
    header, n = _header(tmp_path / "batch_scaling_runs.csv")
    expected = {"phase", "series", "optimizer", "batch_size", "lr", "seed", "val_acc", "test_acc", "train_loss"}
    assert expected <= set(header)
    assert n >= 8
    header, n = _header(tmp_path / "batch_scaling.csv")
    assert {"lr_choice", "series", "optimizer", "batch_size", "lr", "n", "test_acc_mean", "test_acc_std"} <= set(header)
    assert n == 4 * 2 + 3  # 4 series x 2 batch sizes with their rule's LR, + 3 optimizers re-tuned
    assert _is_png(tmp_path / "batch_scaling.png") and _is_png(tmp_path / "batch_scaling_sweep.png")
    out = capsys.readouterr().out
    assert "| batch | steps | sgd | lars | lars_all | lars_all_sqrt |" in out and "wall time" in out


def test_ranger_ablation_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _load("ranger_ablation").main(["--quick", "--out-dir", str(tmp_path)]) == 0
    header, n = _header(tmp_path / "ablation_runs.csv")
    expected = {"group", "variant", "optimizer", "warmup", "lr", "seed", "val_acc", "test_acc", "weight_decay"}
    assert expected <= set(header)
    assert n == 16  # 16 variants x 1 LR x 1 seed
    header, n = _header(tmp_path / "ablation.csv")
    assert {"variant", "lr", "test_acc_mean", "test_acc_std", "lr_at_grid_edge"} <= set(header)
    assert n == 16
    assert _is_png(tmp_path / "ablation.png") and _is_png(tmp_path / "ablation_sweep.png")
    assert "no Lookahead" in capsys.readouterr().out


def _train_ranger(steps: int, **kwargs) -> list[torch.Tensor]:
    from hf_lars import RangerLARS

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = RangerLARS(model.parameters(), lr=0.05, **kwargs)
    data = torch.randn(steps, 8, 6)
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_lookahead_k1_alpha1_is_the_identity() -> None:
    """k=1, alpha=1: every step syncs with slow = w, then w = slow, so the weights equal a run whose
    Lookahead never syncs (k larger than the number of steps), bit for bit."""
    no_sync = _train_ranger(12, k=1000, alpha=0.5)
    k1 = _train_ranger(12, k=1, alpha=1.0)
    assert all(torch.equal(a, b) for a, b in zip(no_sync, k1))
    lookahead = _train_ranger(12, k=3, alpha=0.5)  # and Lookahead with k=3 does change them
    assert not all(torch.equal(a, b) for a, b in zip(no_sync, lookahead))


def test_no_trust_variant_refuses_weight_decay() -> None:
    experiment = _load("_experiment")
    with pytest.raises(ValueError, match="weight_decay=0"):
        experiment.build_optimizer(experiment.make_convnet(4), "ranger_lars_no_trust", lr=0.01, weight_decay=1e-4)


@pytest.mark.parametrize("unreachable", ["val", "test"])
def test_train_run_scores_each_split_on_its_own_data(unreachable: str) -> None:
    """``val_acc`` comes from the validation split and ``test_acc`` from the test split (the LR is chosen on
    validation, test accuracy only reported): with one split's labels set to an impossible class, that
    split's accuracy is exactly 0 and the other's is not.  Independent of how well the two steps train."""
    experiment = _load("_experiment")
    data = experiment.load_digits_splits()
    x, y = data[unreachable]
    data = {**data, unreachable: (x, torch.full_like(y, -1))}
    cfg = experiment.RunConfig("sgd", lr=1e-3, batch_size=64, seed=0, epochs=0.01, width=4, augment=False)
    row = experiment.train_run(cfg, data)
    other = "test" if unreachable == "val" else "val"
    assert row[f"{unreachable}_acc"] == 0.0
    assert row[f"{other}_acc"] > 0.0
