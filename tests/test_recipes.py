"""The recipes, run in-process on tiny settings: Trainer pre-training from a local text file, the Accelerate loop on
the embedded corpus, and the Accelerate config files."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from hf_lars import demo as data
from hf_lars.integrations.callbacks import TRUST_RATIO_FILE

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
TINY_MODEL = ["--vocab_size", "300", "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2", "--block_size", "16"]


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(RECIPES))  # train_accelerate imports pretrain_clm, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(RECIPES))


def test_pretrain_clm_from_a_local_text_file(tmp_path: Path) -> None:
    lines = [p.replace("\n", " ") for p in data.corpus_paragraphs()[:240]]
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n".join(lines[:200]) + "\n\n")
    (tmp_path / "val.txt").write_text("\n".join(lines[200:]) + "\n")
    out = tmp_path / "run"
    recipe = _load("pretrain_clm")
    metrics = recipe.main([
        "--output_dir", str(out), "--train_file", str(train_file), "--validation_file", str(tmp_path / "val.txt"),
        *TINY_MODEL, "--optim", "lars", "--learning_rate", "1.0", "--optim_args", "trust_coefficient=0.002",
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_steps", "2",
        "--use_cpu", "true", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
    ])
    assert math.isfinite(metrics["eval_loss"]) and metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["eval_loss"] < math.log(300) + 0.5  # about a uniform guess over the vocabulary, not diverged
    state = json.loads((out / "trainer_state.json").read_text())
    assert [r["step"] for r in state["log_history"] if "loss" in r] == [1, 2, 3]
    assert any("eval_loss" in r for r in state["log_history"])
    assert json.loads((out / "eval_results.json").read_text())["perplexity"] == pytest.approx(metrics["perplexity"])
    assert len((out / TRUST_RATIO_FILE).read_text().splitlines()) == 3
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_pretrain_clm_rejects_an_unknown_file_type(tmp_path: Path) -> None:
    (tmp_path / "train.parquet").write_text("x")
    recipe = _load("pretrain_clm")
    with pytest.raises(ValueError, match=r"use a \.txt, \.json, \.jsonl or \.csv file"):
        recipe.main(["--output_dir", str(tmp_path / "o"), "--train_file", str(tmp_path / "train.parquet"), "--use_cpu", "true"])


def test_train_accelerate_on_the_embedded_corpus(tmp_path: Path) -> None:
    recipe = _load("train_accelerate")
    out = tmp_path / "acc"
    metrics = recipe.main([
        "--output_dir", str(out), "--optimizer", "ranger_lars", "--learning_rate", "0.01", "--optim_args", "k=2",
        "--max_train_samples", "150", "--max_eval_samples", "30", *TINY_MODEL, "--max_steps", "4",
        "--per_device_train_batch_size", "4", "--logging_steps", "2", "--warmup_steps", "1", "--disable_tqdm",
    ])
    assert math.isfinite(metrics["train_loss"]) and metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_rows = [r for r in history if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    assert all(r["trust_ratio_min"] <= r["trust_ratio_median"] <= r["trust_ratio_max"] for r in train_rows)
    # warmup 1 step then poly (power 2) decay over 3: the logged rate is the one the step used
    assert [r["learning_rate"] for r in train_rows] == pytest.approx([0.01, 0.01 * (1 / 3) ** 2])
    assert [json.loads(line)["step"] for line in (out / TRUST_RATIO_FILE).read_text().splitlines()] == [2, 4]


@pytest.mark.parametrize(
    ("name", "kind", "processes"),
    [("single_process", "NO", 1), ("ddp", "MULTI_GPU", 2), ("zero2", "DEEPSPEED", 2), ("zero3", "DEEPSPEED", 2),
     ("fsdp2", "FSDP", 2), ("two_machines", "MULTI_GPU", 16)],
)
def test_accelerate_configs_load(name: str, kind: str, processes: int) -> None:
    path = RECIPES / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == kind and config.num_processes == processes
    text = path.read_text()
    assert text.startswith("#")  # every file explains how to launch it
    if kind == "DEEPSPEED":
        ds_file = config.deepspeed_config["deepspeed_config_file"]
        stage = int(name[-1])
        assert ds_file == f"ds_configs/zero{stage}.json"
        assert json.loads((REPO / ds_file).read_text())["zero_optimization"]["stage"] == stage
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
    if name == "two_machines":
        assert config.num_machines == 2 and config.main_process_ip and config.main_process_port
        for field in ("num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"):
            assert any(line.startswith(f"{field}:") and "# EDIT" in line for line in text.splitlines()), field


@pytest.mark.distributed
def test_pretrain_clm_under_deepspeed_zero2_matches_one_process(tmp_path: Path) -> None:
    """Trainer + DeepSpeed ZeRO-2 on 2 CPU processes (the optimizer wrapped, no ``.defaults``): warmup_poly runs,
    trust ratios are gathered across the shards, and the losses match one process at the same global batch."""
    import os
    import socket
    import subprocess

    common = [*TINY_MODEL, "--optim", "lars", "--learning_rate", "1.0", "--lr_scheduler_type", "warmup_poly",
              "--warmup_steps", "1", "--max_train_samples", "120", "--max_eval_samples", "20", "--max_steps", "3",
              "--logging_steps", "1", "--eval_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
              "--dataloader_pin_memory", "false"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(RECIPES / "pretrain_clm.py"), "--output_dir", str(tmp_path / "z2"),
           "--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--per_device_train_batch_size", "4", *common]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _load("pretrain_clm").main(["--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8", *common])

    def rows(run: str) -> list[dict]:
        state = json.loads((tmp_path / run / "trainer_state.json").read_text())
        return [r for r in state["log_history"] if "loss" in r]

    zero, one = rows("z2"), rows("one")
    assert [r["learning_rate"] for r in zero] == pytest.approx([0.0, 1.0, 0.25])  # lr the step used
    assert [r["loss"] for r in zero] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    for key in ("trust_ratio_min", "trust_ratio_median", "trust_ratio_max"):  # gathered from both ranks' layers
        assert [r[key] for r in zero] == pytest.approx([r[key] for r in one], rel=1e-4)
