"""Every front door builds the same param groups and passes the same hyper-parameters (fast, one process).

The one param-group builder (``hf_lars.registry.build_param_groups``, Trainer's own decay rule) gives its
no-decay group ``{"weight_decay": 0.0, "excluded": True}`` and nothing about adaptation; ``adapt_excluded``
reaches the optimizer by the same name through ``create_optimizer``, ``--optim_args`` and DeepSpeed JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist.hf_common import tiny_args, tiny_model
from transformers import Trainer, TrainingArguments

import hf_lars
from hf_lars.integrations import transformers as hft


def _groups(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """What a front door decided: names, weight decay, exclusion and adaptation of each group."""
    return [
        {
            "names": list(g["param_names"]),
            "weight_decay": g["weight_decay"],
            "excluded": g["excluded"],
            "adapt_excluded": g["adapt_excluded"],
        }
        for g in opt.param_groups
    ]


def _trainer_optimizer(tmp_path: Path, trainer_cls: type = Trainer, **overrides: Any) -> torch.optim.Optimizer:
    args_cls = hft.LarsTrainingArguments if trainer_cls is hft.LarsTrainer else TrainingArguments
    args = args_cls(**tiny_args(str(tmp_path), **overrides))
    trainer = trainer_cls(model=tiny_model(), args=args)
    opt = trainer.create_optimizer()
    return getattr(opt, "optimizer", opt)


@pytest.mark.parametrize("route", ["patched Trainer", "LarsTrainer"])
@pytest.mark.parametrize("optim", ["adam_lars", "ranger_lars"])
def test_trainer_passes_adam_betas_and_epsilon_in_order(
    registered: None, tmp_path: Path, route: str, optim: str
) -> None:
    """``--adam_beta1/2`` become ``betas`` in that order and ``--adam_epsilon`` becomes ``eps``, in the optimizer
    Trainer really builds (not only in the kwargs)."""
    cls = Trainer if route == "patched Trainer" else hft.LarsTrainer
    opt = _trainer_optimizer(tmp_path, cls, optim=optim, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-5)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-5 for g in opt.param_groups)


def test_every_front_door_groups_a_llama_alike(registered: None, tmp_path: Path) -> None:
    """The same tiny Llama grouped by ``create_optimizer``, the Accelerate helper and Trainer's ``--optim``:
    same names, the no-decay group excluded (RMSNorm weights, by Trainer's rule), adaptation left to the
    optimizer."""
    from hf_lars.integrations.accelerate import create_optimizer_and_scheduler

    via_trainer = _groups(_trainer_optimizer(tmp_path, optim="lars", weight_decay=0.05))
    via_registry = _groups(hf_lars.create_optimizer(tiny_model(), "lars", lr=1e-2, weight_decay=0.05))
    opt, _ = create_optimizer_and_scheduler(tiny_model(), "lars", lr=1e-2, num_training_steps=10, weight_decay=0.05)
    assert via_trainer == via_registry == _groups(opt)
    decay, no_decay = via_registry
    assert decay["weight_decay"] == 0.05 and decay["excluded"] is False
    assert no_decay["weight_decay"] == 0.0 and no_decay["excluded"] is True
    assert no_decay["names"] and all("norm" in n for n in no_decay["names"])
    assert decay["adapt_excluded"] is no_decay["adapt_excluded"] is True  # LARS's default, not forced off


@pytest.mark.parametrize(("optim", "default"), [("lars", True), ("adam_lars", False), ("ranger_lars", False)])
def test_adapt_excluded_reaches_the_optimizer_by_one_name(
    registered: None, tmp_path: Path, optim: str, default: bool
) -> None:
    assert all(g["adapt_excluded"] is default for g in _groups(hf_lars.create_optimizer(tiny_model(), optim, lr=0.1)))
    flipped = not default
    opt = hf_lars.create_optimizer(tiny_model(), optim, lr=0.1, adapt_excluded=flipped)
    assert all(g["adapt_excluded"] is flipped for g in _groups(opt))
    opt = _trainer_optimizer(tmp_path, optim=optim, optim_args=f"adapt_excluded={flipped}")
    assert all(g["adapt_excluded"] is flipped for g in _groups(opt))
    # DeepSpeed JSON "params" go through the same factory (hf_lars.integrations.deepspeed.register()).
    from hf_lars.integrations import deepspeed as hf_ds

    hf_ds.register()
    try:
        factory = getattr(torch.optim, next(s for s, n in hf_ds.registered_names().items() if n == optim))
        opt = factory(list(tiny_model().parameters()), lr=0.1, adapt_excluded=flipped)
        assert opt.defaults["adapt_excluded"] is flipped
    finally:
        hf_ds.unregister()
