"""Launch-time LR scaling (``hf_lars.integrations.lr_scaling``): ``--lr_scaling``, ``--lr_scaling_ref_batch``,
``--b_noise``.

The expected LRs are written out from the laws (docs/design.md, "Schedules and scaling laws"), not computed with
``hf_lars.scaling.scaled_lr``, so a mistake there shows up here too.
"""

from __future__ import annotations

import logging
import json
import math
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from dist.ns_common import GaussianData, GaussianGradModel
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_lars.integrations.lr_scaling import (
    LR_SCALING_CHOICES,
    LrScalingArguments,
    apply_lr_scaling,
    global_batch_size,
)
from hf_lars.scaling.laws import RULES, scaled_lr

REF_LR, REF_BATCH, B_NOISE = 1e-3, 64, 512.0


def _surge(b: float) -> float:
    return 1.0 / (0.5 * (math.sqrt(B_NOISE / b) + math.sqrt(b / B_NOISE)))


def _sgd(b: float) -> float:
    return 1.0 / (1.0 + B_NOISE / b)


EXPECTED = {
    "linear": lambda b: REF_LR * b / REF_BATCH,
    "sqrt": lambda b: REF_LR * math.sqrt(b / REF_BATCH),
    "none": lambda b: REF_LR,
    "surge": lambda b: REF_LR * _surge(b) / _surge(REF_BATCH),
    "adam": lambda b: REF_LR * _surge(b) / _surge(REF_BATCH),
    "sgd": lambda b: REF_LR * _sgd(b) / _sgd(REF_BATCH),
}


def _args(rule: str, per_device: int = 16, accum: int = 1, **kw: object) -> SimpleNamespace:
    fields = dict(
        lr_scaling=rule, lr_scaling_ref_batch=REF_BATCH, b_noise=B_NOISE, learning_rate=REF_LR,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=accum,
    )
    fields.update(kw)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize("rule", sorted(EXPECTED))
@pytest.mark.parametrize(("world", "per_device", "accum"), [(1, 16, 1), (2, 16, 1), (4, 8, 4), (8, 64, 2), (1, 4, 4)])
def test_lr_per_rule_world_size_and_accumulation(rule: str, world: int, per_device: int, accum: int) -> None:
    args = _args(rule, per_device, accum)
    batch = world * per_device * accum
    assert global_batch_size(args, world) == batch
    lr = apply_lr_scaling(args, world)
    assert lr == pytest.approx(EXPECTED[rule](batch), rel=1e-12)
    assert args.learning_rate == lr


def test_surge_peaks_at_b_noise_and_falls_after() -> None:
    lrs = [apply_lr_scaling(_args("surge", per_device=b), 1) for b in (128, 512, 2048)]
    assert lrs[1] > lrs[0] and lrs[1] > lrs[2]
    assert lrs[0] == pytest.approx(lrs[2])  # symmetric in ln B around B_noise = 512


def test_choices_match_the_library_rules() -> None:
    assert set(LR_SCALING_CHOICES) == set(RULES)


def test_apply_is_idempotent_and_a_new_learning_rate_is_a_new_reference() -> None:
    args = _args("linear", per_device=32, accum=4)  # B = 128 -> 2x
    assert apply_lr_scaling(args, 1) == pytest.approx(2e-3)
    assert apply_lr_scaling(args, 1) == pytest.approx(2e-3)  # not 4e-3
    args.learning_rate = 5e-4  # changed by the user after scaling: the new reference
    assert apply_lr_scaling(args, 1) == pytest.approx(1e-3)


def test_logs_once_on_the_main_process(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    with caplog.at_level(logging.INFO, logger="hf_lars.integrations.lr_scaling"):
        apply_lr_scaling(_args("linear", per_device=64, accum=2), 2)
    assert "lr scaled from 0.001 at batch 64 to 0.004 at batch 256 (rule linear)" in caplog.text
    caplog.clear()
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.INFO, logger="hf_lars.integrations.lr_scaling"):
        apply_lr_scaling(_args("linear", per_device=64, accum=2), 2)
    assert "lr scaled" not in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr_scaling="cubic"), r"Unknown lr_scaling rule 'cubic'; valid rules: none, surge, adam, sgd, linear"),
        (dict(lr_scaling="surge", b_noise=None), r"lr_scaling='surge' needs b_noise"),
        (dict(lr_scaling="sgd", b_noise=None), r"lr_scaling='sgd' needs b_noise"),
        (dict(lr_scaling="surge", b_noise=-3.0), r"Invalid b_noise: -3.0"),
        (dict(lr_scaling="linear", lr_scaling_ref_batch=None), r"needs lr_scaling_ref_batch"),
        (dict(lr_scaling="sqrt", lr_scaling_ref_batch=0), r"Invalid lr_scaling_ref_batch: 0"),
        (dict(lr_scaling="linear", learning_rate=0.0), r"Invalid learning_rate: 0.0"),
        (dict(lr_scaling="linear", per_device_train_batch_size=0), r"Invalid per_device_train_batch_size: 0"),
    ],
)
def test_errors(kwargs: dict[str, object], message: str) -> None:
    args = _args("linear")
    vars(args).update(kwargs)
    with pytest.raises(ValueError, match=message):
        apply_lr_scaling(args, 1)


def test_world_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="Invalid world_size: 0"):
        global_batch_size(_args("linear"), 0)


def test_none_needs_nothing_and_keeps_the_lr() -> None:
    args = _args("none", lr_scaling_ref_batch=None, b_noise=None)
    assert apply_lr_scaling(args, 8) == REF_LR


def test_plain_api_for_loops() -> None:
    lr = scaled_lr("sgd", ref_batch=256, ref_lr=0.1, batch=1024, b_noise=256)
    assert lr == pytest.approx(0.1 * (1 / (1 + 256 / 1024)) / (1 / (1 + 1)))
    with pytest.raises(ValueError, match="valid rules"):
        scaled_lr("lars", ref_batch=256, ref_lr=0.1, batch=1024)


def test_argument_parser_fields_help_and_choices() -> None:
    parser = HfArgumentParser(LrScalingArguments)
    argv = ["--lr_scaling", "surge", "--lr_scaling_ref_batch", "256", "--b_noise", "900"]
    (parsed,) = parser.parse_args_into_dataclasses(argv)
    assert (parsed.lr_scaling, parsed.lr_scaling_ref_batch, parsed.b_noise) == ("surge", 256, 900.0)
    help_text = parser.format_help()
    assert "needs --b_noise" in help_text and "--lr_scaling_ref_batch" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--lr_scaling", "cubic"])


@dataclass
class _ScaledTrainingArguments(LrScalingArguments, TrainingArguments):
    """How LarsTrainingArguments composes the fields: scale once the distributed state is known."""

    def __post_init__(self) -> None:
        super().__post_init__()
        apply_lr_scaling(self, self.world_size)


def test_trainer_optimizer_uses_the_scaled_lr(tmp_path) -> None:
    args = _ScaledTrainingArguments(
        output_dir=str(tmp_path), lr_scaling="sqrt", lr_scaling_ref_batch=2, learning_rate=1e-3,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, lr_scheduler_type="constant",
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, log_level="error",
    )
    expected = 1e-3 * math.sqrt(8 / 2)  # B = 1 process x 4 x 2
    assert args.learning_rate == pytest.approx(expected)
    trainer = Trainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(16))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.AdamW)
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([expected] * len(groups))
    logged = [row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row]
    assert logged == pytest.approx([expected, expected])
    assert TrainingArguments.to_dict(args)["learning_rate"] == pytest.approx(expected)


def test_deepspeed_auto_lr_is_refilled(tmp_path) -> None:
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
        "zero_optimization": {"stage": 2},
    }
    args = _ScaledTrainingArguments(
        output_dir=str(tmp_path), lr_scaling="linear", lr_scaling_ref_batch=4, learning_rate=1e-3,
        per_device_train_batch_size=8, deepspeed=config, use_cpu=True, report_to="none",
    )
    filled = args.hf_deepspeed_config.config
    assert args.learning_rate == pytest.approx(2e-3)
    assert filled["optimizer"]["params"]["lr"] == pytest.approx(2e-3)
    assert filled["scheduler"]["params"]["warmup_max_lr"] == pytest.approx(2e-3)
    assert args.deepspeed_plugin.hf_ds_config is args.hf_deepspeed_config


# ------------------------------------------------------------- the two Trainer front doors of --lr_scaling
_ARGS_PROBE = """
import json, sys
from transformers import HfArgumentParser, TrainingArguments
out = sys.argv[1]
(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(sys.argv[2:])
json.dump({"lr": args.learning_rate, "optim": getattr(args.optim, "value", args.optim)}, open(out, "w"))
"""


def test_hf_lars_run_takes_lr_scaling_flags_for_plain_training_arguments(tmp_path: Path) -> None:
    """An unmodified script with plain TrainingArguments gets --learning_rate rescaled via `hf-lars run`."""
    from hf_lars.commands.run import run_script
    from hf_lars.integrations.transformers import is_registered, register, unregister
    from hf_lars.integrations.transformers.launch import _LAUNCH_LR_SCALING

    was_registered = is_registered()

    script = tmp_path / "probe.py"
    script.write_text(_ARGS_PROBE)
    out = tmp_path / "out.json"
    common = ["--output_dir", str(tmp_path / "o"), "--learning_rate", "0.1", "--per_device_train_batch_size", "4",
              "--gradient_accumulation_steps", "8", "--optim", "lars", "--use_cpu", "true"]
    try:
        assert run_script([str(script), str(out), *common, "--lr_scaling", "sqrt", "--lr_scaling_ref_batch=8"]) == 0
        got = json.loads(out.read_text())
        assert got["lr"] == pytest.approx(0.1 * math.sqrt(32 / 8))  # global batch 1 x 4 x 8 = 32
        assert got["optim"] == "lars"
        assert not _LAUNCH_LR_SCALING, "the launch setting must not leak past the script"
        assert run_script([str(script), str(out), *common]) == 0  # without the flags: untouched
        assert json.loads(out.read_text())["lr"] == pytest.approx(0.1)
        with pytest.raises(SystemExit, match="invalid value for --lr_scaling_ref_batch"):
            run_script([str(script), str(out), *common, "--lr_scaling", "linear", "--lr_scaling_ref_batch", "x"])
        # surge without --b_noise: the error names what is missing, before the script runs
        with pytest.raises(SystemExit, match="hf-lars run: lr_scaling='surge' needs b_noise"):
            run_script([str(script), str(out), *common, "--lr_scaling", "surge", "--lr_scaling_ref_batch", "8"])
    finally:
        if not was_registered:
            unregister()
        else:
            register()


def test_lars_training_arguments_scale_at_launch(tmp_path: Path) -> None:
    from hf_lars import LarsTrainingArguments

    args = LarsTrainingArguments(
        output_dir=str(tmp_path), learning_rate=3e-4, per_device_train_batch_size=16, gradient_accumulation_steps=4,
        lr_scaling="surge", lr_scaling_ref_batch=16, b_noise=64.0, use_cpu=True,
    )
    from hf_lars.scaling import adam_optimal_lr

    expected = 3e-4 * adam_optimal_lr(64, 1.0, 64.0) / adam_optimal_lr(16, 1.0, 64.0)
    assert args.learning_rate == pytest.approx(expected)
    with pytest.raises(ValueError, match="lr_scaling"):
        LarsTrainingArguments(output_dir=str(tmp_path), lr_scaling="cubic", lr_scaling_ref_batch=16, use_cpu=True)
