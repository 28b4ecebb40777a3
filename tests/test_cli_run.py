"""Route 2: ``hf-lars run SCRIPT.py [args]`` runs an unmodified script with hf_lars registered (in-process and
under ``torchrun -m hf_lars run`` with 2 processes, which must match one process at the same global batch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from dist.hf_common import tiny_cli_args

from hf_lars import cli
from hf_lars.commands.run import run_script
from hf_lars.integrations import transformers as hft

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist" / "hf_trainer_script.py"


@pytest.fixture
def unpatched() -> None:
    was = hft.is_registered()
    hft.unregister()
    yield
    if was:
        hft.register()


def _flags(tmp_path: Path, **overrides: object) -> list[str]:
    return tiny_cli_args(tmp_path / "out", **overrides)


def test_run_registers_then_runs_the_script(unpatched: None, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    argv_before, path_before = sys.argv[:], sys.path[:]
    flags = _flags(tmp_path, optim="adam_lars", lr_scheduler_type="warmup_poly", warmup_steps=1, max_steps=3)
    assert cli.main(["run", str(SCRIPT), "--result", str(result), *flags]) == 0
    data = json.loads(result.read_text())
    assert data["optimizer"] == "AdamLARS" and len(data["losses"]) == 3
    assert all(r is not None for r in data["trust_ratio_max"])
    assert data["pid"] == os.getpid()  # ran in this process, as __main__
    assert sys.argv == argv_before and sys.path == path_before
    assert hft.is_registered()


def test_run_without_registration_would_fail(unpatched: None, tmp_path: Path) -> None:
    """The same script and flags are refused by transformers when hf_lars is not registered."""
    import runpy

    sys_argv = sys.argv[:]
    sys.argv = [str(SCRIPT), "--result", str(tmp_path / "r.json"), *_flags(tmp_path, optim="lars")]
    try:
        with pytest.raises(SystemExit):  # argparse: invalid choice: 'lars'
            runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = sys_argv


def test_run_exit_codes_and_module_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_script([str(tmp_path / "missing.py")]) == 2
    assert "no such script" in capsys.readouterr().err
    assert run_script([]) == 2
    (tmp_path / "exits.py").write_text("import sys\nassert sys.argv[1:] == ['a', '--b']\nsys.exit(3)\n")
    assert run_script([str(tmp_path / "exits.py"), "a", "--b"]) == 3
    (tmp_path / "hf_mod_probe.py").write_text(
        "import sys\nfrom transformers import TrainingArguments\n"
        "if __name__ == '__main__':\n    TrainingArguments(output_dir=sys.argv[1], optim='ranger_lars')\n    sys.exit(7)\n"
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "-m", "hf_mod_probe", str(tmp_path)]) == 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.distributed
def test_torchrun_ddp_matches_one_process(tmp_path: Path) -> None:
    """2 CPU processes (gloo) at per-device batch 4 == 1 process at batch 8: same losses, same weights."""
    common = dict(optim="lars", learning_rate=0.5, max_steps=4, lr_scheduler_type="warmup_poly", warmup_steps=1)
    ddp_result = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "hf_lars", "run", str(SCRIPT), "--result", str(ddp_result),
        *tiny_cli_args(tmp_path / "ddp", per_device_train_batch_size=4, **common),
    ]
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:  # a hang: show where the run got to
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x for x in (err.stdout, err.stderr) if x)
        pytest.fail(f"torchrun did not finish in 300 s; output tail:\n{out[-4000:]}")
    assert proc.returncode == 0 and ddp_result.is_file(), (proc.stdout + proc.stderr)[-4000:]

    one_result = tmp_path / "one.json"
    assert run_script([str(SCRIPT), "--result", str(one_result),
                       *tiny_cli_args(tmp_path / "one", per_device_train_batch_size=8, **common)]) == 0
    ddp, one = json.loads(ddp_result.read_text()), json.loads(one_result.read_text())
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert ddp["optimizer"] == one["optimizer"] == "LARS"
    assert ddp["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert ddp["trust_ratio_max"] == pytest.approx(one["trust_ratio_max"], rel=1e-5)
    for name, value in one["weights"].items():
        assert ddp["weights"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
