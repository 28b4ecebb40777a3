"""An unmodified stock-style script (``tests/dist/stock_clm.py``) under ``hf-lars run`` with every CPU launcher.

Each run starts in a directory outside the repository, loads a tiny local Llama with ``from_pretrained`` and a
local text file with ``datasets``, and passes only command-line flags: single process, ``torchrun`` DDP,
``torchrun`` + ``--deepspeed zero1|zero2|zero3`` (shipped config names, no ``--use_cpu``), the ``deepspeed``
launcher + ZeRO-2, and ``accelerate launch`` with every shipped YAML that runs on CPU.  In each the loss falls
and ``trust_ratios.jsonl`` is written.  All launches run once, in one module-scoped fixture.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dist.launch import REPO, child_env, free_port

SCRIPT = REPO / "tests" / "dist" / "stock_clm.py"
STEPS = 6
# adam_lars at lr 0.1 on a text of 3 repeated paragraphs: the loss falls within 6 steps (5.72 -> 5.57 measured).
FLAGS = ["--optim", "adam_lars", "--learning_rate", "0.1", "--max_steps", str(STEPS), "--per_device_train_batch_size",
         "4", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
         "--seed", "0"]
TIMEOUT_S = 600


def _hf_lars_run(work: Path, out: str, *extra: str) -> list[str]:
    return ["-m", "hf_lars", "run", str(SCRIPT), "--model_name_or_path", str(work / "model"), "--train_file",
            str(work / "train.txt"), "--output_dir", str(work / out), *FLAGS, *extra]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def _accelerate(config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate" / config),
            "--main_process_port", str(free_port()), *args]


def _deepspeed(*args: str) -> list[str]:
    # --no_local_rank: the launcher would put --local_rank=N before `run`; LOCAL_RANK is in the environment.
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            "--no_local_rank", "--module", *args]


def _cases(work: Path) -> dict[str, list[str]]:
    single = [sys.executable, *_hf_lars_run(work, "single", "--use_cpu", "true")]
    return {
        "single": single,
        "torchrun_ddp": _torchrun(*_hf_lars_run(work, "torchrun_ddp")),
        "torchrun_zero1": _torchrun(*_hf_lars_run(work, "torchrun_zero1", "--deepspeed", "zero1")),
        "torchrun_zero2": _torchrun(*_hf_lars_run(work, "torchrun_zero2", "--deepspeed", "zero2")),
        "torchrun_zero3": _torchrun(*_hf_lars_run(work, "torchrun_zero3", "--deepspeed", "zero3")),
        "deepspeed_zero2": _deepspeed(*_hf_lars_run(work, "deepspeed_zero2", "--deepspeed", "zero2")[1:]),
        "accelerate_single_process": _accelerate("single_process.yaml", *_hf_lars_run(work, "accelerate_single_process")),
        "accelerate_ddp": _accelerate("ddp.yaml", *_hf_lars_run(work, "accelerate_ddp")),
        "accelerate_zero2": _accelerate("zero2.yaml", *_hf_lars_run(work, "accelerate_zero2")),
        "accelerate_zero3": _accelerate("zero3.yaml", *_hf_lars_run(work, "accelerate_zero3")),
    }


def _run(cmd: list[str], cwd: Path) -> tuple[int | None, str, float]:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        rc = None
    return rc, log, time.monotonic() - start


def _build_inputs(work: Path) -> None:
    """A tiny Llama + byte-level BPE saved with ``save_pretrained``, and a local text file."""
    from hf_lars.demo import build_model, corpus_paragraphs, tiny_llama_config, train_tokenizer

    texts = corpus_paragraphs()[:200]
    tokenizer = train_tokenizer(texts, vocab_size=300, min_frequency=2)
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                               intermediate_size=32, max_position_embeddings=64)
    build_model(config, seed=0).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    (work / "train.txt").write_text("\n".join(texts[:3] * 20) + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory outside the repository with the model and the text file; every run starts there."""
    path = tmp_path_factory.mktemp("launchers")
    _build_inputs(path)
    return path


@pytest.fixture(scope="module")
def launches(work: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name, cmd in _cases(work).items():
        rc, log, seconds = _run(cmd, cwd=work)
        results[name] = {"rc": rc, "log": log, "seconds": seconds, "out": work / name}
    timings = ", ".join(f"{name} {r['seconds']:.0f}s" for name, r in results.items())
    print(f"\nlauncher matrix: {timings}")
    return results


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


CASES = ["single", "torchrun_ddp", "torchrun_zero1", "torchrun_zero2", "torchrun_zero3", "deepspeed_zero2",
         "accelerate_single_process", "accelerate_ddp", "accelerate_zero2", "accelerate_zero3"]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_stock_script_trains_under_launcher(launches: dict[str, dict[str, Any]], case: str) -> None:
    result = launches[case]
    tail = "\n".join(line for line in result["log"].splitlines() if "Warning" not in line)[-5000:]
    assert result["rc"] == 0, f"{case}: rc={result['rc']}\n{tail}"
    losses = _losses(result["out"])
    assert len(losses) == STEPS, (case, losses)
    assert losses[-1] < losses[0], (case, losses)
    trust_log = (result["out"] / "trust_ratios.jsonl").read_text().splitlines()
    assert len(trust_log) == STEPS and json.loads(trust_log[-1])["step"] == STEPS, case
    # What hf_lars set up (one line per node): DeepSpeed's gloo state, or use_cpu for DDP; nothing otherwise.
    state_line = result["log"].count("created Accelerate's DeepSpeed process state over gloo for 2 processes")
    cpu_line = result["log"].count("use_cpu=True so Trainer runs the 2 processes as one job over gloo")
    assert state_line == (1 if case.startswith(("torchrun_zero", "deepspeed_")) else 0), case
    if case != "accelerate_ddp":  # there Accelerate may have chosen the CPU itself (ACCELERATE_USE_CPU)
        assert cpu_line == (1 if case in ("torchrun_ddp", "accelerate_zero2", "accelerate_zero3") else 0), case


def test_malformed_optim_args_fail_before_the_model_is_loaded(work: Path, tmp_path: Path) -> None:
    """The error names the flag, the bad key and the valid keys; the script never reached ``from_pretrained``
    (with valid flags it would have: the same command trains in ``single``).  Every other flag mistake is
    checked in-process in ``tests/test_launch_flags.py``."""
    cmd = [sys.executable, *_hf_lars_run(work, str(tmp_path / "out"), "--use_cpu", "true")]
    cmd[cmd.index("adam_lars")] = "lars"
    rc, log, _ = _run([*cmd, "--optim_args", "momentum=0.9,trust_coeficient=0.01"], cwd=tmp_path)
    assert rc != 0, log[-3000:]
    assert "Unknown key 'trust_coeficient' in --optim_args for lars (LARS). Valid keys: " in log, log[-3000:]
    assert "trust_coefficient (float, default 0.001)" in log, log[-3000:]
    assert "STOCK: model loaded" not in log
