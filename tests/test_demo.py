"""``hf-lars demo --quick``: every optimizer trains, the table is printed and the loss PNG written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from hf_lars import cli
from hf_lars.demo import run as demo_run
from hf_lars.demo import settings as demo_settings


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("optimizer "):]
    for name in demo_settings.DEMO_OPTIMIZERS:
        row = next(line for line in table.splitlines() if line.startswith(name + " "))
        train_loss, eval_loss, perplexity, seconds = map(float, row.split()[2:6])
        assert all(math.isfinite(v) for v in (train_loss, eval_loss, perplexity, seconds))
        assert perplexity == pytest.approx(math.exp(eval_loss), rel=1e-3)
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        assert [r["step"] for r in state["log_history"] if "loss" in r][-1] == 4
    assert (tmp_path / "lars" / "trust_ratios.jsonl").is_file()
    assert not (tmp_path / "adamw" / "trust_ratios.jsonl").exists()
    image = mpimg.imread(tmp_path / "loss.png")
    assert image.shape[1] >= 800 and image[..., :3].std() > 0.05
    assert (tmp_path / "results.txt").read_text().strip() in out


def test_demo_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo optimizer"):
        demo_run.run_demo(tmp_path, optimizers=["sgd"], quick=True)
    with pytest.raises(ValueError, match="need --steps >= 2"):
        demo_run.run_demo(tmp_path, steps=1, quick=True)


def test_choose_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import torch

    assert demo_run.choose_threads(3) == 3
    with pytest.raises(ValueError, match="Invalid --threads: 0"):
        demo_run.choose_threads(0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert demo_run.choose_threads() == 1  # busy: threads would wait on each other
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert demo_run.choose_threads() == torch.get_num_threads()
