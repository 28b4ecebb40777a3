"""Tests of ``hf-lars scale fit`` and ``hf-lars scale predict``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hf_lars
from hf_lars.cli import main
from hf_lars.scaling import adam_optimal_lr, scaled_lr

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCHES = [64, 256, 1024, 4096, 16384, 65536]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _best_csv(tmp_path: Path, b_noise: float = 2048.0, batches: list[int] = BATCHES) -> Path:
    rng = np.random.default_rng(0)
    lines = ["batch_size,best_lr"]
    for b in batches:
        lines.append(f"{b},{adam_optimal_lr(b, 3e-3, b_noise) * math.exp(0.05 * rng.standard_normal()):.6g}")
    return _write(tmp_path / "best.csv", "\n".join(lines) + "\n")


def _grid_csv(tmp_path: Path) -> Path:
    lines = ["# a sweep; nan marks diverged runs", "batch_size,lr,loss,seed"]
    for b in BATCHES:
        best = adam_optimal_lr(b, 3e-3, 2048.0)
        for lr in 2.0 ** np.arange(-14, -5):
            loss = 2.0 + 0.05 * math.log(lr / best) ** 2
            lines.append(f"{b},{lr:.8g},{'nan' if lr > 8 * best else f'{loss:.6f}'},0")
    return _write(tmp_path / "grid.csv", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- predict


def test_predict_prints_the_scaled_lr(capsys) -> None:
    rc = main(["scale", "predict", "--rule", "adam", "--batch-size", "4096", "--ref-batch", "512",
               "--ref-lr", "3e-4", "--b-noise", "2e5"])
    assert rc == 0
    printed = float(capsys.readouterr().out.strip())
    assert printed == pytest.approx(scaled_lr("adam", 512, 3e-4, 4096, 2e5), rel=1e-5)


def test_predict_several_batch_sizes_and_simple_rules(capsys) -> None:
    assert main(["scale", "predict", "--rule", "linear", "--batch-size", "1024", "2048",
                 "--ref-batch", "256", "--ref-lr", "0.1"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [(float(b), float(lr)) for b, lr in rows] == [(1024.0, pytest.approx(0.4)), (2048.0, pytest.approx(0.8))]


def test_predict_errors(capsys) -> None:
    rc = main(["scale", "predict", "--rule", "sgd", "--batch-size", "4096", "--ref-batch", "512", "--ref-lr", "3e-4"])
    assert rc == 2 and "--b-noise is required for rule 'sgd'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["scale", "predict", "--rule", "cubic", "--batch-size", "1", "--ref-batch", "1", "--ref-lr", "1"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["scale", "predict", "--batch-size", "-4", "--ref-batch", "1", "--ref-lr", "1", "--b-noise", "5"])
    assert exc.value.code == 2 and "must be a positive number" in capsys.readouterr().err


def test_scale_without_subcommand_shows_help(capsys) -> None:
    assert main(["scale"]) == 2
    assert "predict" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- fit


def test_fit_best_lr_csv_prints_fit_and_writes_png(tmp_path, capsys) -> None:
    csv = _best_csv(tmp_path)
    out = tmp_path / "plots" / "fit.png"
    assert main(["scale", "fit", str(csv), "--out", str(out), "--bootstrap", "100"]) == 0
    text = capsys.readouterr().out
    assert "B_noise =" in text and "eps_max =" in text and "bootstrap [" in text
    assert "AIC" in text and "<- best" in text and "Identifiability: B_noise is identifiable" in text
    b_noise = float(text.split("B_noise =")[1].split()[0])
    assert 2048 / 1.5 < b_noise < 2048 * 1.5
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_fit_grid_csv_uses_vertices_and_default_png(tmp_path, capsys) -> None:
    csv = _grid_csv(tmp_path)
    assert main(["scale", "fit", str(csv), "--bootstrap", "0", "--rule", "adam"]) == 0
    text = capsys.readouterr().out
    assert "Best LR per batch size" in text and "vertex" in text
    b_noise = float(text.split("B_noise =")[1].split()[0])
    assert b_noise == pytest.approx(2048.0, rel=0.05)  # noise-free sweep: the vertices are exact
    assert (tmp_path / "grid_scale_fit.png").read_bytes()[:8] == PNG_MAGIC


def test_fit_reports_unidentifiable_and_no_plot(tmp_path, capsys) -> None:
    csv = _best_csv(tmp_path, b_noise=1e6, batches=[64, 128, 256, 512])
    assert main(["scale", "fit", str(csv), "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert "Identifiability: B_noise is not identifiable" in text and "unbounded" in text
    assert not list(tmp_path.glob("*.png"))


def test_fit_sgd_rule(tmp_path, capsys) -> None:
    csv = _best_csv(tmp_path)
    assert main(["scale", "fit", str(csv), "--rule", "sgd", "--no-plot", "--bootstrap", "0"]) == 0
    assert "SGD law (McCandlish" in capsys.readouterr().out


BAD_CSVS = [
    ("batch_size,lr\n64,0.1\n", "bad.csv:1: missing column(s) loss"),
    ("batch_size,loss\n64,0.1\n", "bad.csv:1: missing column(s) lr;"),
    ("batch_size,learning_rate\n64,0.1\n", "bad.csv:1: missing column(s) best_lr (or lr and loss)"),
    ("lr,best_lr\n0.1,0.1\n", "bad.csv:1: missing column(s) batch_size"),
    ("batch_size,best_lr\n64,1e-3\n128,abc\n256,1e-3\n", "bad.csv:3: non-numeric best_lr value 'abc'"),
    ("batch_size,best_lr\n64,1e-3\n-128,1e-3\n256,1e-3\n",
     "bad.csv:3: batch_size must be a positive number, got '-128'"),
    ("batch_size,lr,loss\n64,0,1.0\n128,1e-3,1.0\n256,1e-3,1.0\n", "bad.csv:2: lr must be a positive number, got '0'"),
    ("batch_size,lr,loss\n64,1e-3,high\n128,1e-3,1.0\n256,1e-3,1.0\n", "bad.csv:2: non-numeric loss value 'high'"),
    ("batch_size,best_lr\n64,1e-3\n\n128,\n", "bad.csv:4: empty best_lr value"),
    ("batch_size,lr,loss\n64,1e-3\n", "bad.csv:2: expected at least 3 values, got 2"),
    ("batch_size,best_lr\n64,1e-3\n128,1e-3\n64,2e-3\n",
     "bad.csv: only 2 distinct batch size(s) (64, 128); need at least 3"),
    ("batch_size,best_lr\n", "bad.csv: no data rows"),
    ("", "bad.csv:1: empty file"),
    ("batch_size,lr,loss\n64,1e-3,nan\n128,1e-3,1.0\n256,1e-3,1.0\n",
     "bad.csv: only 2 batch size(s) have a usable best LR"),
]


@pytest.mark.parametrize(("content", "message"), BAD_CSVS)
def test_fit_bad_csv_names_line_and_problem(tmp_path, capsys, content, message) -> None:
    path = _write(tmp_path / "bad.csv", content)
    assert main(["scale", "fit", str(path), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert message.replace("bad.csv", str(path)) in err, err
    assert "Traceback" not in err


def test_fit_missing_file(tmp_path, capsys) -> None:
    assert main(["scale", "fit", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv: cannot read the file" in capsys.readouterr().err


def test_module_entry_point_bad_csv_exit_code_without_traceback(tmp_path) -> None:
    path = _write(tmp_path / "bad.csv", "batch_size,best_lr\n64,1e-3\n128,zero\n")
    env = dict(os.environ)
    package_root = str(Path(hf_lars.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "hf_lars", "scale", "fit", str(path)], capture_output=True, text=True, cwd=tmp_path,
        env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert f"{path}:3: non-numeric best_lr value 'zero'" in proc.stderr
    assert "Traceback" not in proc.stderr
