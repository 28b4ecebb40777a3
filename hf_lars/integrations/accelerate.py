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

A batch-size ramp (:class:`hf_lars.scaling.ramp.BatchSizeRamp`: the global batch grows by accumulation) in
the same loop, with :class:`RampedAccumulation` instead of ``accelerator.accumulate`` (which fixes the
accumulation when the ``Accelerator`` is built)::

    ramp = BatchSizeRamp(micro_batch=8, processes=accelerator.num_processes, schedule="64:1000,128",
                         rule="surge", ref_batch=256, b_noise=900, launch_batch=64)
    online = OnlineLrScheduler(scheduler, ramp)              # the LR follows the ramp's batch by the rule
    model, optimizer, train_dl, prepared = accelerator.prepare(model, optimizer, train_dl, online)
    ramped, batches = RampedAccumulation(accelerator, model, ramp, online), iter(train_dl)
    for step in range(max_steps):
        for batch in ramped.micro_batches(batches):           # ramp.accumulation of them
            accelerator.backward(model(**batch).loss / ramped.fetched)
        optimizer.step(); prepared.step(); optimizer.zero_grad()
        ramped.step_done()                                    # counts the step, next batch's LR (and engine)

The optimizer is built from the registry (:func:`hf_lars.create_optimizer`: named ``(name, tensor)`` groups,
biases and norm weights in a no-decay group marked ``excluded``: no weight decay, and the trust ratio only if
the optimizer's ``adapt_excluded`` says so), the schedule by
:func:`hf_lars.schedule.get_warmup_poly_schedule`, which reads ``param_groups`` only (no ``.defaults``) and so
keeps working once DeepSpeed has wrapped the optimizer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hf_lars.integrations.deepspeed import resolve_accelerate_config_env, set_engine_batch_size
from hf_lars.integrations.distributed import init_cpu_distributed_state, is_sharded, refuse_fsdp1
from hf_lars.integrations.trust_ratios import TrustRatioLogger
from hf_lars.registry import create_optimizer
from hf_lars.scaling.ramp import count_examples

__all__ = [
    "create_optimizer_and_scheduler",
    "RampedAccumulation",
    "TrustRatioLogger",
    "is_sharded",
    "init_cpu_distributed_state",
    "resolve_accelerate_config_env",
]

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
        weight_decay: decay of the decay group (``None``: the class default).
        power, lr_end, warmup, warmup_start: the schedule's shape (see :mod:`hf_lars.schedule`).
        optimizer_kwargs: any other constructor argument (``trust_coefficient=...``, ``betas=...``).

    Raises:
        ValueError: ``model`` is wrapped in FSDP1 (use FSDP2, see
            :func:`~hf_lars.integrations.distributed.refuse_fsdp1`).
    """
    from hf_lars.schedule import get_warmup_poly_schedule

    refuse_fsdp1(model)
    kwargs = dict(optimizer_kwargs)
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    optimizer = create_optimizer(model, name, lr=lr, **kwargs)
    scheduler = get_warmup_poly_schedule(
        optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps, power=power,
        lr_end=lr_end, warmup=warmup, warmup_start=warmup_start,
    )
    return optimizer, scheduler


class RampedAccumulation:
    """Gradient accumulation that follows a :class:`~hf_lars.scaling.ramp.BatchSizeRamp` in an Accelerate loop.

    :meth:`micro_batches` takes the step's ``ramp.accumulation`` micro-batches from an iterator (fewer at its
    end: :attr:`fetched` says how many) and yields them with the gradient sync off (``accelerator.no_sync``)
    and Accelerate's ``sync_gradients`` false for all but the last, as ``accelerator.accumulate`` does for a
    fixed count (so a prepared optimizer and scheduler step once, and DeepSpeed sees the step's end).
    :meth:`step_done` counts the step in the ramp, tells a DeepSpeed engine a new batch
    (:func:`~hf_lars.integrations.deepspeed.set_engine_batch_size`) and applies the next step's LR factor to
    ``scheduler`` (the :class:`~hf_lars.schedule.OnlineLrScheduler` around the ramp, before ``prepare``).
    """

    def __init__(self, accelerator: Any, model: nn.Module, ramp: Any, scheduler: Any = None) -> None:
        self.accelerator, self.model, self.ramp, self.scheduler = accelerator, model, ramp, scheduler
        self.fetched = self.fetched_examples = 0  # the step's micro-batches on this process, their examples

    def micro_batches(self, batches: Iterator[Any]) -> Iterator[Any]:
        from hf_lars.integrations.transformers.patches import set_sync_gradients

        step = list(itertools.islice(batches, self.ramp.accumulation))
        self.fetched = len(step)
        self.fetched_examples = sum(count_examples(b, self.ramp.micro_batch) for b in step)
        for i, batch in enumerate(step):
            last = i == len(step) - 1
            set_sync_gradients(self.accelerator, last)
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                yield batch

    def step_done(self) -> bool:
        """Count the step (its :attr:`fetched` micro-batches on each process); whether the batch changed."""
        fetched = self.fetched or self.ramp.accumulation
        examples = self.fetched_examples or fetched * self.ramp.micro_batch
        changed = self.ramp.step_done(samples=examples * self.ramp.processes, micro_batches=fetched)
        if changed:
            wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
            set_engine_batch_size(getattr(wrapped, "engine", None), self.ramp.batch)
        if self.scheduler is not None:
            self.scheduler.refresh()
        self.fetched = self.fetched_examples = 0
        return changed
