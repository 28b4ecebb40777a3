"""DeepSpeed checkpoints of hf_lars optimizers (2 CPU processes, gloo; ``tests/dist/ckpt.py``).

* ``save_checkpoint`` / ``load_checkpoint`` under ZeRO-2 and ZeRO-3: a fresh engine (differently initialised
  model) that loads the checkpoint continues bitwise like the engine that saved it, for LARS (momentum),
  AdamLARS and RangerLARS (Lookahead slow weights; k=3 so a synchronisation falls after the save).
* Universal checkpoints (``python -m deepspeed.checkpoint.ds_to_universal``) to a different world size:
  DeepSpeed 0.19's converter knows only Adam's state keys (``exp_avg``, ``exp_avg_sq``, ``step``; see
  ``deepspeed/checkpoint/ds_to_universal.py``, ``extract_zero_shards``).  So AdamLARS converts and resumes
  on 1 process from a 2-process checkpoint; LARS (``momentum_buffer``) fails to convert; RangerLARS
  converts but its Lookahead ``slow_buffer`` is dropped without a word (the resumed run diverges).  The
  last two tests pin that behaviour so that a DeepSpeed change is noticed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.distributed

OPTIMIZERS = ("lars", "adam_lars", "ranger_lars")


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def resume_run(ckpt_dir: Path) -> dict[str, Any]:
    from dist.launch import torchrun

    return torchrun("ckpt.py", "--mode", "resume", "--ckpt-dir", str(ckpt_dir))


@pytest.fixture(scope="module")
def converted(resume_run: dict[str, Any], ckpt_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    from dist.launch import child_env

    out = {}
    for name in OPTIMIZERS:
        src = ckpt_dir / f"zero2_{name}" / "mid"
        out[name] = subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(src),
                "--output_folder",
                str(src.parent / "mid_universal"),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=child_env(),
        )
    return out


@pytest.fixture(scope="module")
def universal_run(converted: dict[str, subprocess.CompletedProcess], ckpt_dir: Path) -> dict[str, Any]:
    from dist.launch import torchrun

    return torchrun(
        "ckpt.py", "--mode", "universal", "--optimizers", "adam_lars,ranger_lars", "--ckpt-dir", str(ckpt_dir), nproc=1
    )


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_resume_continues_identically(resume_run: dict[str, Any], stage: int, opt: str) -> None:
    r = resume_run["cases"][f"zero{stage}/{opt}"]
    assert "error" not in r, r.get("error")
    assert r["same_keys"]
    assert r["max_abs_diff"] == 0.0  # weights and every optimizer state tensor, bitwise
    assert r["global_steps"] == [8, 4]
    expected = {
        "lars": {"momentum_buffer"},
        "adam_lars": {"exp_avg", "exp_avg_sq", "step"},
        "ranger_lars": {"exp_avg", "exp_avg_sq", "step", "slow_buffer"},
    }[opt]
    assert set(r["state_keys"]) == expected


def _rel_err(got: dict[str, list], ref: dict[str, list]) -> float:
    return max(
        (torch.tensor(got[k]) - torch.tensor(v)).norm().item() / torch.tensor(v).norm().item() for k, v in ref.items()
    )


def test_universal_checkpoint_adam_lars_to_one_process(
    resume_run: dict[str, Any], universal_run: dict[str, Any], converted: dict
) -> None:
    assert converted["adam_lars"].returncode == 0, converted["adam_lars"].stderr[-2000:]
    r = universal_run["cases"]["adam_lars"]
    assert "error" not in r, r.get("error")
    assert universal_run["world"] == 1
    # 4 steps on 2 ranks, save, convert, 4 steps on 1 rank  ==  8 steps on 2 ranks
    assert _rel_err(r["weights"], resume_run["cases"]["zero2/adam_lars"]["final_weights"]) <= 1e-6


def test_universal_checkpoint_cannot_convert_lars(converted: dict[str, subprocess.CompletedProcess]) -> None:
    result = converted["lars"]
    assert result.returncode != 0 and "KeyError: 'exp_avg'" in result.stderr + result.stdout


def test_universal_checkpoint_drops_ranger_lookahead_state(
    resume_run: dict[str, Any], universal_run: dict[str, Any], converted: dict, ckpt_dir: Path
) -> None:
    assert converted["ranger_lars"].returncode == 0
    files = {p.name for p in (ckpt_dir / "zero2_ranger_lars" / "mid_universal" / "zero" / "fc1.weight").iterdir()}
    assert files == {"exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"}  # no slow_buffer.pt
    r = universal_run["cases"]["ranger_lars"]
    assert "error" not in r, r.get("error")
    assert _rel_err(r["weights"], resume_run["cases"]["zero2/ranger_lars"]["final_weights"]) > 1e-2
