"""Accelerate integration: an hf_lars optimizer + warmup/poly schedule for a custom ``Accelerator`` loop.

::

    accelerator = Accelerator(gradient_accumulation_steps=4)
    optimizer, scheduler = create_optimizer_and_scheduler(
        model, "adam_lars", lr=2e-3, weight_decay=0.01, num_training_steps=1000, num_warmup_steps=100)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    trust_log = TrustRatioLogger(accelerator, output_dir)
    for step, batch in ...:
        ...
        if step % 10 == 0:
            stats = trust_log.log(optimizer, step)        # {"trust_ratio_min": ..., ...}; reads tensors only now
            accelerator.log({"loss": loss, **stats}, step=step)

The optimizer is built from the registry (:func:`hf_lars.create_optimizer`: named ``(name, tensor)`` groups,
biases and norm weights in a no-decay group that is not adapted), the schedule by
:func:`hf_lars.schedule.get_warmup_poly_schedule`, which reads ``param_groups`` only (no ``.defaults``) and so
keeps working once DeepSpeed has wrapped the optimizer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_lars.integrations.callbacks import (
    TRUST_RATIO_FILE,
    TrustRatioWriter,
    find_trust_ratio_optimizer,
    summarize_trust_ratios,
    trust_ratio_values,
)
from hf_lars.registry import create_optimizer

__all__ = ["create_optimizer_and_scheduler", "TrustRatioLogger", "is_sharded", "init_cpu_distributed_state"]

logger = logging.getLogger(__name__)


def create_optimizer_and_scheduler(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    weight_decay: float | None = None,
    power: float = 2.0,
    lr_end: float = 0.0,
    warmup: str = "linear",
    warmup_start: float = 0.0,
    **optimizer_kwargs: Any,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """An hf_lars optimizer from the registry and its warmup + poly-decay schedule.

    Args:
        model: the (unwrapped) model; its parameters are split as :func:`hf_lars.build_param_groups` does.
        name: a registry name (``hf-lars list``).
        lr: peak learning rate.
        num_training_steps: optimizer steps in the run (``T`` of the schedule).
        num_warmup_steps: warmup steps (``W``).
        weight_decay: decay of the adapted group (``None``: the class default).
        power, lr_end, warmup, warmup_start: the schedule's shape (see :mod:`hf_lars.schedule`).
        optimizer_kwargs: any other constructor argument (``trust_coefficient=...``, ``betas=...``).
    """
    from hf_lars.schedule import get_warmup_poly_schedule

    kwargs = dict(optimizer_kwargs)
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    optimizer = create_optimizer(model, name, lr=lr, **kwargs)
    scheduler = get_warmup_poly_schedule(
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        power=power,
        lr_end=lr_end,
        warmup=warmup,
        warmup_start=warmup_start,
    )
    return optimizer, scheduler


def is_sharded(accelerator: Any) -> bool:
    """Whether the accelerator shards optimizer state (DeepSpeed or FSDP): trust ratios then need a gather."""
    kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", "")).upper()
    return kind in ("DEEPSPEED", "FSDP")


class TrustRatioLogger:
    """Trust-ratio statistics (and an optional per-layer JSONL) for a custom training loop.

    Call :meth:`log` at logging steps on *every* process (it may gather across ranks under DeepSpeed/FSDP);
    only the main process writes ``output_dir/trust_ratios.jsonl``, the same format
    :class:`~hf_lars.TrustRatioCallback` writes, so ``hf-lars plot-trust`` reads both.

    Args:
        accelerator: the ``Accelerator`` (or ``None`` for a single process).
        output_dir: where to write the JSONL; ``None`` for statistics only.
        start_step: the step training (re)starts from (rows after it are dropped).
        gather: merge layers across ranks; default: when the accelerator shards (DeepSpeed, FSDP).
    """

    def __init__(
        self,
        accelerator: Any = None,
        output_dir: str | os.PathLike[str] | None = None,
        *,
        start_step: int = 0,
        gather: bool | None = None,
    ) -> None:
        self.gather = is_sharded(accelerator) if gather is None else gather
        main = accelerator is None or accelerator.is_main_process
        self.writer = TrustRatioWriter(Path(output_dir) / TRUST_RATIO_FILE) if output_dir and main else None
        if self.writer is not None:
            self.writer.start(start_step)

    def log(self, optimizer: Any, step: int) -> dict[str, float]:
        """``{"trust_ratio_min", "trust_ratio_median", "trust_ratio_max"}`` of the last step (empty if none)."""
        if find_trust_ratio_optimizer(optimizer) is None and not self.gather:
            return {}
        values = trust_ratio_values(optimizer, gather=self.gather)
        if values and self.writer is not None:
            self.writer.write(step, values)
        return summarize_trust_ratios(values)


def init_cpu_distributed_state(deepspeed: bool = False) -> Any:
    """On a multi-process CPU launch, create Accelerate's state over gloo first; otherwise do nothing.

    Under DeepSpeed on CPU, Accelerate (and Trainer) otherwise believe each rank is alone.  Call it before the
    ``Accelerator`` or ``TrainingArguments`` is created; with Trainer also set
    ``accelerator_config={"use_configured_state": True}`` when it returns a state.  GPU runs and single
    processes are left to Accelerate's defaults.

    Args:
        deepspeed: the run uses DeepSpeed (``TrainingArguments(deepspeed=...)``, launched with ``torchrun``):
            the state is then created as a DeepSpeed one, which Trainer requires.  ``accelerate launch`` with a
            DeepSpeed config says so itself (``ACCELERATE_USE_DEEPSPEED``).

    Returns:
        The ``accelerate.PartialState`` it created, or ``None``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return None
    if not deepspeed and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        # Plain multi-process CPU (DDP): Accelerate's CPU state is distributed over gloo by itself; a bare
        # gloo state would leave it "not distributed" and the model would never be wrapped in DDP.
        from accelerate import PartialState

        return PartialState(cpu=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        from hf_lars.integrations.deepspeed import cpu_distributed_state
    except ImportError:  # deepspeed integration unavailable: the same thing by hand
        from accelerate import PartialState

        return PartialState(backend="gloo")
    return cpu_distributed_state()
