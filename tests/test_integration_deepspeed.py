"""``hf_lars.integrations.deepspeed`` and ``ds_configs/``: names in DeepSpeed JSON, config checks, offload."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hf_lars import LARS, AdamLARS, RangerLARS
from hf_lars.integrations import deepspeed as hf_ds

from dist.launch import backend_params

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))
EXPECTED = {"zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero2_bf16", "zero3_bf16"}


@pytest.fixture
def registered() -> Any:
    hf_ds.register()
    yield
    hf_ds.unregister()


def test_shipped_configs() -> None:
    assert EXPECTED <= {p.stem for p in CONFIGS}
    for path in CONFIGS:
        cfg = json.loads(path.read_text())
        assert "optimizer" not in cfg, f"{path.name}: the optimizer comes from --optim or the client"
        for key in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
        ):
            assert cfg[key] == "auto", (path.name, key)
        assert cfg["zero_allow_untested_optimizer"] is True
        offload = "offload_optimizer" in cfg["zero_optimization"]
        assert offload == path.stem.endswith("offload")
        if offload:
            assert cfg["zero_force_ds_cpu_optimizer"] is False
        if path.stem.endswith("bf16"):
            assert cfg["bf16"]["enabled"] is True
        hf_ds.check_config(path)  # a client optimizer (no optimizer section) is kept


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_fill_through_trainer(path: Path, tmp_path: Path) -> None:
    """Trainer's own "auto" filling leaves nothing unresolved, and DeepSpeed accepts the result."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    cfg = json.loads(path.read_text())
    ds = HfTrainerDeepSpeedConfig(copy.deepcopy(cfg))
    bf16 = path.stem.endswith("bf16")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        bf16=bf16,
        use_cpu=True,
        report_to=[],
    )
    ds.trainer_config_process(args)
    ds.trainer_config_finalize(args, nn.Linear(2, 2), num_training_steps=10)
    text = json.dumps(ds.config)
    assert '"auto"' not in text, text
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(ds.config)
    assert parsed.zero_optimization_stage == int(path.stem[4])
    assert parsed.gradient_clipping == 1.0


def test_offload_without_the_key_is_refused_with_the_fix() -> None:
    cfg = json.loads((CONFIGS[0].parent / "zero2_offload.json").read_text())
    del cfg["zero_force_ds_cpu_optimizer"]
    with pytest.raises(ValueError, match=r'"zero_force_ds_cpu_optimizer": false'):
        hf_ds.check_config(cfg)
    cfg["zero_force_ds_cpu_optimizer"] = True
    with pytest.raises(ValueError, match="DeepSpeedCPUAdam"):
        hf_ds.check_config(cfg)
    # With the optimizer built by DeepSpeed from the config, nothing is swapped.
    cfg["optimizer"] = {"type": "LARS", "params": {"lr": 0.1}}
    hf_ds.register()
    try:
        hf_ds.check_config(cfg)
    finally:
        hf_ds.unregister()


def test_register_is_idempotent_and_reversible() -> None:
    assert not hasattr(torch.optim, "AdamLARS")
    first = hf_ds.register()
    factory = torch.optim.AdamLARS
    assert hf_ds.register() == first and torch.optim.AdamLARS is factory
    assert {"LARS", "AdamLARS", "RangerLARS", "lars", "adam_lars", "ranger_lars", "larc"} <= set(first)
    assert not {"lamb", "LAMB", "Lamb"} & set(first), "DeepSpeed resolves 'lamb' to its own FusedLamb"
    hf_ds.unregister()
    assert not hasattr(torch.optim, "AdamLARS") and hasattr(torch.optim, "SGD")


def test_register_never_replaces_torch_optimizers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.optim, "LARS", torch.optim.SGD, raising=False)
    with caplog.at_level(logging.WARNING):
        names = hf_ds.register()
    try:
        assert torch.optim.LARS is torch.optim.SGD and "LARS" not in names
        assert "already exists" in caplog.text
    finally:
        hf_ds.unregister()


def test_factories_build_registry_entries(registered: None) -> None:
    params = [nn.Parameter(torch.zeros(3, 2))]
    assert type(torch.optim.LARS(params, lr=0.1)) is LARS
    assert type(torch.optim.AdamLARS(params, lr=0.1)) is AdamLARS
    assert type(torch.optim.RangerLARS(params, lr=0.1)) is RangerLARS
    larc = torch.optim.larc(params, lr=0.1)
    assert type(larc) is LARS and larc.defaults["trust_clip"] is True  # the variant's defaults apply
    assert torch.optim.AdamLARS(params, lr=0.1, weight_decay=0.5).defaults["weight_decay"] == 0.5


@pytest.mark.parametrize(
    ("opt_type", "message"),
    [
        ("LRAS", r'Did you mean "LARS"\?.*LARS, larc, nlars, AdamLARS, RangerLARS'),
        ("Rangerlars", r"write \"RangerLARS\""),
        ("adam-lars", r"write \"AdamLARS\""),
    ],
)
def test_bad_type_names_list_the_valid_ones(registered: None, opt_type: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hf_ds.check_config({"optimizer": {"type": opt_type, "params": {"lr": 0.1}}})


def test_registered_spellings_pass_and_unregistered_names_say_how(registered: None) -> None:
    for spelling in ("LARS", "lars", "AdamLARS", "adamlars", "RangerLARS", "RANGER_LARS", "larc"):
        hf_ds.check_config({"optimizer": {"type": spelling, "params": {"lr": 0.1}}})
    hf_ds.unregister()
    with pytest.raises(ValueError, match=r"call hf_lars.integrations.deepspeed.register\(\)"):
        hf_ds.check_config({"optimizer": {"type": "AdamLARS"}})


def test_params_the_optimizer_does_not_take(registered: None) -> None:
    cfg = {"optimizer": {"type": "LARS", "params": {"lr": "auto", "betas": "auto", "weight_decay": "auto"}}}
    with pytest.raises(ValueError, match=r"\['betas'\] which LARS does not take"):
        hf_ds.check_config(cfg)


def test_zero_needs_untested_optimizer_flag_for_config_optimizers(registered: None) -> None:
    cfg = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamLARS", "params": {"lr": 0.1}}}
    with pytest.raises(ValueError, match='"zero_allow_untested_optimizer": true'):
        hf_ds.check_config(cfg)
    cfg["zero_allow_untested_optimizer"] = True
    hf_ds.check_config(cfg)


def test_lamb_is_deepspeeds_and_says_so(registered: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        hf_ds.check_config({"optimizer": {"type": "Lamb", "params": {"lr": 0.1}}})
    assert "FusedLamb" in caplog.text and "AdamLARS" in caplog.text


def test_check_config_reads_paths(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hf_ds.check_config(bad)


# ---------------------------------------------------------------------------- 2 processes, one launch


@pytest.fixture(scope="module", params=backend_params("gloo", "nccl"))
def integration_run(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One launch per backend: gloo on 2 CPU processes; NCCL on 2 GPUs (marked gpu, skipped without them)."""
    from dist.launch import torchrun

    return torchrun("integration.py", backend=request.param)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_config_type_builds_hf_lars_in_raw_deepspeed(integration_run: dict[str, Any], stage: int) -> None:
    r = integration_run[f"config_type_{stage}"]
    assert r["built"] == "RangerLARS"
    assert r["max_abs_diff_vs_client"] == 0.0  # same training as passing the optimizer in


@pytest.mark.distributed
def test_misspelt_type(integration_run: dict[str, Any]) -> None:
    r = integration_run["misspelt"]
    # after register(), deepspeed.initialize itself gives check_config's message, not DeepSpeed's bare assertion
    assert r["deepspeed"].startswith("ValueError: hf_lars: this DeepSpeed config needs changes")
    assert 'Did you mean "RangerLARS"' in r["deepspeed"]
    assert 'Did you mean "RangerLARS"' in r["check_config"] and "AdamLARS" in r["check_config"]


@pytest.mark.distributed
def test_offload_keeps_the_client_optimizer(integration_run: dict[str, Any]) -> None:
    refused = integration_run["offload_default"]
    assert refused["initialize"].startswith("ZeRORuntimeException")
    assert "zero_force_ds_cpu_optimizer" in refused["check_config"]
    for name in ("offload_zero2_offload", "offload_zero3_offload"):
        r = integration_run[name]
        assert r["check_config"] == "ok" and r["initialize"] == "ok", r
        assert r["basic_optimizer"] == "AdamLARS" and r["offload"] is True
        assert r["max_rel_diff_vs_no_offload"] <= 1e-6


@pytest.mark.distributed
def test_accelerate_paths(integration_run: dict[str, Any]) -> None:
    r = integration_run["accelerate"]
    assert r["num_processes"] == 2  # cpu_distributed_state(): Accelerate sees both processes
    assert r["dummy"] == {"basic_optimizer": "AdamLARS", "num_processes": 2, "stepped": 1}
    # A client optimizer under the shipped offload config is not swapped for DeepSpeedCPUAdam.
    assert r["client_offload"]["basic_optimizer"] == "AdamLARS"


@pytest.mark.distributed
@pytest.mark.parametrize("route", ["client", "config_type"])
def test_stage0_initialize_counts_no_step_and_leaves_weights(integration_run: dict[str, Any], route: str) -> None:
    """DeepSpeed's stage-0 bf16 wrapper steps once with zero gradients at initialize; routed to
    initialize_state(), AdamLARS counts no step and takes no weight decay there; the first real step is 1."""
    r = integration_run[f"stage0_{route}"]
    assert r["wrapper"] == "FP16_UnfusedOptimizer" and r["patch_installed"]
    assert r["steps_after_initialize"] == [0.0]
    assert r["weights_unchanged"] is True
    assert r["steps_after_one_step"] == [1.0]
    control = integration_run["stage0_unpatched"]  # DeepSpeed's own method: the bug the patch removes
    assert control["steps_after_initialize"] == [1.0] and control["weights_unchanged"] is False


def test_deepspeed_patches_list_their_private_names() -> None:
    from hf_lars.integrations import deepspeed_patches

    assert deepspeed_patches.PATCHED_PRIVATE_NAMES == (
        ("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer", "initialize_optimizer_states"),
    )
    assert deepspeed_patches.install() == [".".join(deepspeed_patches.PATCHED_PRIVATE_NAMES[0])]
    assert deepspeed_patches.installed()
    assert deepspeed_patches.install() == deepspeed_patches.install()  # idempotent: wrapped once
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    original = FP16_UnfusedOptimizer.initialize_optimizer_states._hf_lars_original
    assert not hasattr(original, "_hf_lars_original")
