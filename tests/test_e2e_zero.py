"""End to end on 2 CPU processes: Trainer and Accelerate under DeepSpeed ZeRO-2/3 (and FSDP2's prepare) match DDP.

Two launches, each shared by the tests below (cached on first use):

* ``torchrun tests/dist/e2e_trainer.py``: Trainer with ``--deepspeed ds_configs/zero3.json`` and ``--optim
  adam_lars`` / ``ranger_lars``; Trainer with ``ds_configs/zero2.json`` plus ``"optimizer": {"type": "AdamLARS",
  "params": {"lr": "auto", "weight_decay": "auto"}}``; plain DDP references.
* ``accelerate launch --config_file recipes/accelerate/zero3.yaml tests/dist/e2e_accelerate.py`` (the real launcher
  on CPU): ``recipes/train_accelerate.py`` under the yaml's ZeRO-3 and under ZeRO-2, a custom loop with
  ``DummyOptim`` and a JSON-named optimizer under ZeRO-2, DDP references, and Accelerate's FSDP2 ``prepare``.

"Matches" means the same global batch (2 x 4) on both sides, and the tolerances below.  Measured (CPU, fp32):
logged per-step losses identical to DDP's under ZeRO-2/3 (relative difference 0; FSDP2 vs unsharded 1.2e-7), final
weights within 4e-9 (Trainer), 1.2e-7 (DummyOptim), 6e-8 (FSDP2), logged trust ratios within 3e-7 relative.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

pytestmark = pytest.mark.distributed

STEPS = 4
LOSS_RTOL = 1e-6  # relative, per logged step
WEIGHT_ATOL = 1e-6  # absolute, final fp32 weights (of size ~1; training moves them by 1e-3 to 4e-2)
RATIO_RTOL = 1e-5  # relative, trust ratios / gradient norms (float32 norms reduced in another order)
MIN_MOVED = 1e-4  # training must move the weights far more than the tolerance, or the comparison proves nothing


@functools.cache
def trainer_runs() -> dict[str, Any]:
    from dist.launch import torchrun

    return torchrun("e2e_trainer.py", partial=True)


@functools.cache
def accelerate_runs() -> dict[str, Any]:
    from dist.e2e_launch import accelerate_launch

    return accelerate_launch("recipes/accelerate/zero3.yaml", "e2e_accelerate.py")


def _case(runs: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in runs, f"case {name!r} did not run: {runs.get('_failure', sorted(runs))}"
    result = runs[name]
    assert "error" not in result, f"{name}: {result['error']}\n{result.get('traceback', '')}"
    return result


# ------------------------------------------------------------------------------------------------- Trainer
TRAINER_STEPS = {"adam_lars": STEPS, "lars": STEPS, "ranger_lars": 8}  # tests/dist/e2e_trainer.py
MAX_GRAD_NORM = 0.1  # tests/dist/e2e_trainer.py: Trainer's max_grad_norm, DeepSpeed's gradient_clipping


def _matches_ddp(zero: dict[str, Any], ddp: dict[str, Any], optim: str) -> None:
    """Clip-then-step under ZeRO equals DDP's: losses, logged norms and ratios, final weights."""
    assert zero["gradient_clipping"] == MAX_GRAD_NORM  # "auto" filled from max_grad_norm, as DDP clips
    assert min(ddp["grad_norms"]) > MAX_GRAD_NORM, "clipping never clipped: the comparison does not cover it"
    assert len(zero["losses"]) == TRAINER_STEPS[optim]
    assert zero["losses"] == pytest.approx(ddp["losses"], rel=LOSS_RTOL)
    assert zero["learning_rates"] == pytest.approx(ddp["learning_rates"])
    # DeepSpeed logs the norm of the raw gradient, as DDP does: Gradient Centralization runs in the step
    assert zero["grad_norms"] == pytest.approx(ddp["grad_norms"], rel=RATIO_RTOL)
    assert None not in zero["trust_ratio_max"]
    assert zero["trust_ratio_max"] == pytest.approx(ddp["trust_ratio_max"], rel=RATIO_RTOL)
    assert zero["moved"] > MIN_MOVED
    assert zero["max_abs_diff"] <= WEIGHT_ATOL


@pytest.mark.parametrize(("optim", "cls"), [("adam_lars", "AdamLARS"), ("ranger_lars", "RangerLARS")])
def test_trainer_zero3_matches_ddp(optim: str, cls: str) -> None:
    runs = trainer_runs()
    assert _case(runs, "state") == {"num_processes": 2, "distributed_type": "DistributedType.DEEPSPEED"}
    zero, ddp = _case(runs, f"zero3_{optim}"), _case(runs, f"ddp_{optim}")
    assert zero["engine"] == "DeepSpeedEngine" and zero["zero_stage"] == 3
    assert zero["zero_optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and zero["optimizer"] == cls
    assert zero["world_size"] == 2 and zero["distributed_type"] == "DistributedType.DEEPSPEED"
    assert zero["zero3_init"], "the model was built after TrainingArguments, inside deepspeed.zero.Init"
    assert zero["init_max_abs_diff"] == 0.0  # every run started from the same weights
    if optim == "ranger_lars":  # sub_group_size 1000: DeepSpeed calls step() once per sub-group
        assert zero["sub_groups"] > 2, zero["sub_groups"]
    assert ddp["engine"] == "DistributedDataParallel" and ddp["distributed_type"] == "DistributedType.MULTI_CPU"
    assert ddp["world_size"] == 2 and ddp["optimizer"] == cls
    _matches_ddp(zero, ddp, optim)


@pytest.mark.parametrize(("optim", "cls"), [("ranger_lars", "RangerLARS"), ("lars", "LARS")])
def test_trainer_zero2_with_clipping_matches_ddp(optim: str, cls: str) -> None:
    runs = trainer_runs()
    zero, ddp = _case(runs, f"zero2_{optim}"), _case(runs, f"ddp_{optim}")
    assert zero["zero_stage"] == 2 and zero["zero_optimizer"] == "DeepSpeedZeroOptimizer"
    assert zero["optimizer"] == cls == ddp["optimizer"]
    _matches_ddp(zero, ddp, optim)


@pytest.mark.parametrize("optim", ["adam_lars", "ranger_lars"])
def test_trainer_zero3_under_zero_init_excludes_by_real_shape(optim: str) -> None:
    """Under ``deepspeed.zero.Init`` every parameter is a 1-D placeholder; the groups (Trainer's split, the
    no-decay one ``excluded``) and the adapted layers (AdamLARS/RangerLARS: exactly the 2-D ones, from
    ``ds_shape``) are the same as in DDP."""
    runs = trainer_runs()
    zero, ddp = _case(runs, f"zero3_{optim}"), _case(runs, f"ddp_{optim}")
    assert zero["placeholder_1d"] is True and ddp["placeholder_1d"] is False
    assert zero["groups"] == ddp["groups"]
    assert [g["excluded"] for g in zero["groups"]] == [False, True] and zero["groups"][1]["weight_decay"] == 0.0
    assert zero["ratio_layers"] == ddp["ratio_layers"] == zero["two_d_layers"]


def test_trainer_zero3_logs_the_trust_ratios_of_every_sub_group() -> None:
    runs = trainer_runs()
    zero, ddp = _case(runs, "zero3_ranger_lars"), _case(runs, "ddp_ranger_lars")
    assert zero["sub_groups"] > 2  # the weights match DDP's (test above); the logged ratios should too
    assert zero["trust_ratio_max"] == pytest.approx(ddp["trust_ratio_max"], rel=RATIO_RTOL)


def test_trainer_zero2_deepspeed_json_named_optimizer_matches_ddp() -> None:
    runs = trainer_runs()
    json_run, ddp = _case(runs, "zero2_json"), _case(runs, "ddp_adam_lars")
    # DeepSpeed built hf_lars's AdamLARS from "type": "AdamLARS" (Trainer's optimizer is a DummyOptim)
    assert json_run["optimizer"] == "AdamLARS" and json_run["zero_optimizer"] == "DeepSpeedZeroOptimizer"
    assert json_run["zero_stage"] == 2 and json_run["world_size"] == 2
    assert json_run["eps"] == ddp["eps"] == 1e-6  # no "eps" key: the class default (--adam_epsilon set to match)
    assert json_run["losses"] == pytest.approx(ddp["losses"], rel=LOSS_RTOL)
    assert json_run["grad_norms"] == pytest.approx(ddp["grad_norms"], rel=RATIO_RTOL)
    # (Its logged learning_rate is the next step's: Trainer reads DeepSpeed's scheduler after the engine stepped it.)
    assert json_run["moved"] > MIN_MOVED
    assert json_run["max_abs_diff"] <= WEIGHT_ATOL


# ---------------------------------------------------------------------------------------------- Accelerate
def _recipe_matches(zero: dict[str, Any], ddp: dict[str, Any]) -> None:
    assert ddp["distributed_type"] == "DistributedType.MULTI_CPU" and ddp["num_processes"] == 2
    assert zero["distributed_type"] == "DistributedType.DEEPSPEED" and zero["num_processes"] == 2
    assert zero["steps"] == ddp["steps"] == list(range(1, STEPS + 1))
    assert zero["losses"] == pytest.approx(ddp["losses"], rel=LOSS_RTOL)
    assert zero["learning_rates"] == pytest.approx(ddp["learning_rates"])
    for z_row, d_row in zip(zero["trust_ratio"], ddp["trust_ratio"]):  # min, median, max over all layers
        assert None not in z_row and z_row == pytest.approx(d_row, rel=RATIO_RTOL)
    assert zero["eval_loss"] == pytest.approx(ddp["eval_loss"], rel=LOSS_RTOL)


def test_accelerate_launch_zero3_yaml_recipe_matches_ddp() -> None:
    """recipes/train_accelerate.py as ``accelerate launch --config_file recipes/accelerate/zero3.yaml`` runs it."""
    runs = accelerate_runs()
    assert runs["launch_env"]["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert runs["launch_env"]["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "ds_configs/zero3.json"
    assert runs["launch_env"]["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    zero, ddp = _case(runs, "recipe_zero3"), _case(runs, "recipe_ddp_adam_lars")
    assert zero["zero_stage"] == 3
    assert runs["built_in_zero_init"][0] is True  # zero3_init_flag: the recipe's model was built partitioned
    assert zero["gradient_clipping"] == 0.0  # "auto" filled from the recipe's --max_grad_norm (0: off), not 1.0
    _recipe_matches(zero, ddp)


def test_accelerate_recipe_zero2_with_clipping_matches_ddp() -> None:
    """ds_configs/zero2.json (what zero2.yaml sets) with LARS and --max_grad_norm 0.05, which clips every step."""
    runs = accelerate_runs()
    zero, ddp = _case(runs, "recipe_zero2"), _case(runs, "recipe_ddp_lars")
    assert zero["zero_stage"] == 2 and zero["gradient_clipping"] == 0.05
    _recipe_matches(zero, ddp)


def test_accelerate_dummy_optim_deepspeed_json_named_optimizer_matches_ddp() -> None:
    runs = accelerate_runs()
    dummy, ddp = _case(runs, "dummy_zero2"), _case(runs, "custom_ddp")
    assert dummy["engine"] == "DeepSpeedEngine" and dummy["zero_stage"] == 2 and dummy["num_processes"] == 2
    assert dummy["optimizer"] == "AdamLARS"  # built by DeepSpeed from "type": "AdamLARS"
    assert ddp["engine"] == "DistributedDataParallel" and ddp["optimizer"] == "AdamLARS"
    assert len(dummy["losses"]) == STEPS
    assert dummy["losses"] == pytest.approx(ddp["losses"], rel=LOSS_RTOL)
    assert dummy["moved"] > MIN_MOVED
    assert dummy["max_abs_diff"] <= WEIGHT_ATOL


@pytest.mark.parametrize("optim", ["adam_lars", "ranger_lars", "lars"])
def test_accelerate_fsdp2_prepare_on_cpu_matches_unsharded(optim: str) -> None:
    """Accelerate's FSDP2 ``prepare`` (state switched to FSDP by hand: Accelerate 1.15 enables it only on GPUs)."""
    runs = _case(accelerate_runs(), "fsdp2_forced_cpu")
    assert runs["is_fsdp2"] and runs["fsdp_version"] == 2 and runs["num_processes"] == 2
    got = runs[optim]
    assert got["model_class"].startswith("FSDP") and got["dtensor_params"]
    assert got["placements"] == ["(Shard(dim=0),)"]
    assert got["optimizer_swapped"], "prepare should have swapped the optimizer's tensors for the DTensors"
    assert got["names_match"] and got["ratio_layers"] and got["ratio_layers"] == got["ref_ratio_layers"]
    assert got["losses"] == pytest.approx(got["ref_losses"], rel=LOSS_RTOL)
    assert got["ratio_max_rel_diff"] <= RATIO_RTOL
    assert got["moved"] > MIN_MOVED
    assert got["max_abs_diff"] <= WEIGHT_ATOL
