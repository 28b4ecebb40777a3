"""``hf-lars plot-trust`` / ``plot-loss`` / ``list`` and the plotting functions behind them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from hf_lars import cli, plotting
from hf_lars.integrations.callbacks import TRUST_RATIO_FILE
from hf_lars.registry import get_optimizer_info, list_optimizers

LAYERS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]


def _write_trust(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    good = {step: {n: 10.0 ** (-3 + i + step / 40) for i, n in enumerate(LAYERS)} for step in (10, 20, 30, 40)}
    good[20][LAYERS[1]] = 0.0  # nothing to show on a log scale
    rows = [
        {"step": 10, "trust_ratios": good[10]},
        {"step": 20, "trust_ratios": {LAYERS[0]: 99.0}},  # an interrupted run's row, superseded by the next one
        {"step": 20, "trust_ratios": good[20]},
        {"step": 30, "trust_ratios": good[30]},
        {"step": 40, "trust_ratios": good[40]},
    ]
    (run / TRUST_RATIO_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_state(run: Path, scale: float, in_checkpoint: bool = False) -> None:
    log = []
    for step in range(5, 55, 5):
        log.append({"loss": scale * (4 + 3 * math.exp(-step / 15)), "learning_rate": 1e-3, "step": step})
        if step % 25 == 0:
            log.append({"eval_loss": scale * (4.2 + 3 * math.exp(-step / 15)), "step": step})
    target = run / "checkpoint-50" if in_checkpoint else run
    target.mkdir(parents=True, exist_ok=True)
    (target / "trainer_state.json").write_text(json.dumps({"log_history": log}))


def _assert_png(path: Path, min_width: int = 600) -> np.ndarray:
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[1] >= min_width and image.shape[0] >= 300
    assert image[..., :3].std() > 0.05  # not a blank canvas
    return image


def test_load_trust_ratios(tmp_path: Path) -> None:
    _write_trust(tmp_path)
    history = plotting.load_trust_ratios(tmp_path)
    assert history.steps == [10, 20, 30, 40]
    assert history.layers == LAYERS
    assert history.values.shape == (3, 4)
    assert history.values[0, 1] == pytest.approx(10 ** (-3 + 0.5))  # the later row for step 20 wins
    assert math.isnan(history.values[1, 1])  # the zero ratio is masked
    assert plotting.TRUST_RATIO_FILE == TRUST_RATIO_FILE


def test_plot_trust_cli_writes_a_heatmap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_trust(tmp_path / "run")
    assert cli.main(["plot-trust", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "trust_ratios.png"
    assert f"wrote {out}" in capsys.readouterr().out
    image = _assert_png(out)
    assert image.shape[1] > image.shape[0]  # wide: steps along x
    assert cli.main(["plot-trust", str(tmp_path / "nothing")]) == 2
    assert "trust_ratios.jsonl not found" in capsys.readouterr().err


def test_plot_loss_cli_overlays_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_state(tmp_path / "adamw", 1.0)
    _write_state(tmp_path / "lars", 1.1, in_checkpoint=True)  # only a checkpoint's trainer_state.json
    out = tmp_path / "loss.png"
    assert cli.main(["plot-loss", str(tmp_path / "adamw"), str(tmp_path / "lars"), "--labels", "AdamW", "LARS",
                     "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    _assert_png(out)
    history = plotting.load_loss_history(tmp_path / "lars")
    assert history.train_steps[0] == 5 and history.eval_steps == [25, 50]
    assert cli.main(["plot-loss", str(tmp_path / "adamw"), "--labels", "a", "b"]) == 2
    assert "got 2 labels for 1 runs" in capsys.readouterr().err
    assert cli.main(["plot-loss", str(tmp_path / "empty")]) == 2
    assert "no trainer_state.json" in capsys.readouterr().err


def test_list_prints_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in list_optimizers():
        row = next(line for line in lines if line.split() and line.split()[0] == name)
        assert get_optimizer_info(name).cls.__name__ in row
    assert "trust_clip=True" in out and "AdamLARS" in out
