"""What ``register()`` adds for unmodified scripts, in-process: flags at parsing, shipped configs, DeepSpeed's
``"type"``, FSDP1.  The launchers themselves run in ``tests/test_launchers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import HfArgumentParser, TrainingArguments

from hf_lars.commands.run import run_script
from hf_lars.integrations import deepspeed as hf_deepspeed
from hf_lars.integrations import register
from hf_lars.integrations.accelerate import create_optimizer_and_scheduler
from hf_lars.integrations.distributed import refuse_fsdp1
from hf_lars.integrations.transformers import patches, unregister
from hf_lars.integrations.transformers.launch import LR_SCALING_FIELDS, prepare_cpu_process_state


@pytest.fixture
def registered():
    register()
    yield
    unregister()


def _parse(*flags: str) -> TrainingArguments:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/unused", "--report_to", "none", "--use_cpu", "true", *flags]
    )
    return args


def test_lr_scaling_flags_on_plain_training_arguments(registered: None) -> None:
    args = _parse("--lr_scaling", "linear", "--lr_scaling_ref_batch", "4", "--per_device_train_batch_size", "8",
                  "--learning_rate", "0.1")
    assert args.learning_rate == pytest.approx(0.2)
    assert (args.lr_scaling, args.lr_scaling_ref_batch, args.b_noise) == ("linear", 4, None)
    assert _parse("--learning_rate", "0.1").learning_rate == 0.1  # default: none
    unregister()
    assert not set(LR_SCALING_FIELDS) & set(TrainingArguments.__dataclass_fields__)
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--lr_scaling'"):
        _parse("--lr_scaling", "linear")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--optim", "lars", "--optim_args", "trust_coeficient=0.01"],
         r"Unknown key 'trust_coeficient' in --optim_args for lars.*Valid keys: .*trust_coefficient \(float"),
        (["--optim", "lars", "--optim_args", "momentum=fast"], r"Invalid value 'fast' for 'momentum'.*expected a number"),
        (["--optim", "lars", "--optim_args", "momentum=1.5"], r"--optim lars --optim_args 'momentum=1.5': Invalid momentum"),
        (["--optim", "adam_lars", "--optim_args", "lr=3"], r"'lr' cannot be set in --optim_args.*use --learning_rate"),
        (["--lr_scaling", "surge", "--lr_scaling_ref_batch", "8"], r"lr_scaling='surge' needs b_noise"),
        (["--lr_scaling", "linear"], r"needs lr_scaling_ref_batch"),
    ],
    ids=["unknown_key", "bad_type", "out_of_range", "reserved_key", "surge_without_b_noise", "no_ref_batch"],
)
def test_flag_mistakes_fail_at_argument_parsing(registered: None, flags: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _parse(*flags)


def test_run_checks_its_lr_scaling_flags_before_the_script(tmp_path: Path) -> None:
    script = tmp_path / "never.py"
    script.write_text("raise RuntimeError('the script ran')\n")
    try:
        with pytest.raises(SystemExit, match="hf-lars run: lr_scaling='sgd' needs b_noise"):
            run_script([str(script), "--lr_scaling", "sgd", "--lr_scaling_ref_batch", "8"])
    finally:
        unregister()


def test_deepspeed_names_a_shipped_config(registered: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # outside the repository
    shipped = hf_deepspeed.shipped_configs()
    assert {"zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"} <= set(shipped)
    for name in ("zero3", "zero3.json", "ds_configs/zero3.json"):
        assert hf_deepspeed.resolve_config(name) == str(shipped["zero3"])
    own = tmp_path / "zero3"
    own.write_text("{}")
    assert hf_deepspeed.resolve_config("zero3") == "zero3"  # a file of that name wins
    with pytest.raises(ValueError, match=r"'zero4' is neither an existing DeepSpeed config file.*shipped: zero1"):
        hf_deepspeed.resolve_config("zero4")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero2.json")
    assert hf_deepspeed.resolve_accelerate_config_env() == str(shipped["zero2"])
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(shipped["zero2"])


def test_cpu_process_state_only_for_a_multi_process_deepspeed_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing changes for one process or when a state exists (the launchers test the multi-process runs)."""
    from accelerate.state import PartialState

    args = TrainingArguments(output_dir="/tmp/unused", report_to="none")
    args.use_cpu, args.deepspeed = False, "zero2"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not prepare_cpu_process_state(args)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert PartialState._shared_state  # TrainingArguments above created Accelerate's state already
    assert not prepare_cpu_process_state(args)
    assert args.accelerator_config.use_configured_state is False and args.use_cpu is False


def test_patched_names_are_listed_and_checked() -> None:
    names = {name for name, _ in patches.PRIVATE_NAMES}
    assert {"transformers.TrainingArguments.__init__", "transformers.TrainingArguments.__dataclass_fields__",
            "transformers.TrainingArguments.accelerator_config"} <= names
    patches.check_transformers_version()


def test_deepspeed_initialize_unknown_type_gets_check_config_message(registered: None) -> None:
    import deepspeed

    config = {"train_batch_size": 1, "optimizer": {"type": "LARSS", "params": {"lr": 0.1}}}
    with pytest.raises(ValueError, match=r"'LARSS', which is neither an hf_lars optimizer.*Did you mean \"LARS\""):
        deepspeed.initialize(model=nn.Linear(2, 2), config=config)
    hf_deepspeed.check_optimizer_type({"optimizer": {"type": "AdamW"}})  # DeepSpeed's own: left alone
    hf_deepspeed.check_optimizer_type({"optimizer": {"type": "LARS"}})  # ours, registered
    hf_deepspeed.unregister()
    assert not hasattr(deepspeed.initialize, "__hf_lars_original__")


def test_fsdp1_is_refused() -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = FullyShardedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                                         device_id=torch.device("cpu"), use_orig_params=True)
        with pytest.raises(ValueError, match="does not support FSDP1.*Use FSDP2"):
            create_optimizer_and_scheduler(model, "lars", lr=0.1, num_training_steps=2)
    finally:
        dist.destroy_process_group()
    refuse_fsdp1(nn.Linear(2, 2))  # an ordinary module passes
