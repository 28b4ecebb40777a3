"""``--batch_size_schedule`` / ``--batch_size_noise_k``: Trainer's global batch grows while it trains.

The controller is :class:`hf_lars.scaling.ramp.BatchSizeRamp`; this module runs it inside Trainer's loop.
Trainer fixes the accumulation when ``train()`` starts (it sizes epochs, and ``_run_epoch`` decides where a
step ends by ``(micro-batch index + 1) % gradient_accumulation_steps``), so the ramp keeps Trainer's own
accumulation at 1 and makes each of its "micro-batches" a bundle of the ramp's micro-batches:

- :func:`ramp_batch_samples` (``LarsTrainer.get_batch_samples``): one optimizer step fetches
  ``ramp.accumulation`` micro-batches with Trainer's own ``get_batch_samples`` (which also counts
  ``num_items_in_batch`` over all of them) and returns them as one :class:`MicroBatches`.
- :func:`ramp_training_step` (``LarsTrainer.training_step``): Trainer's ``training_step`` on each, the
  gradient sync (DDP's ``no_sync``) and Accelerate's ``sync_gradients`` off for all but the last, as Trainer
  does for its own accumulation; the loss is divided by the number of micro-batches (or normalised by
  ``num_items_in_batch``) exactly as there.
- :func:`ramp_training_values` (``LarsTrainer.set_initial_training_values``): enough epochs for the
  micro-batches ``max_steps`` consume (the step count, the LR schedule and ``max_steps`` stay optimizer
  steps: see :mod:`hf_lars.scaling.ramp`).
- :class:`BatchRampCallback`: after each optimizer step counts it (``step_done``) and applies the next
  step's LR factor; at each training log adds ``global_batch`` and ``lr_factor`` (of the step just logged) and
  ``train_samples``; the noise-driven ramp reads the ``b_noise`` the noise callback logged just before it
  (from ``--b_noise_start_step`` on: see :func:`~hf_lars.integrations.lr_scaling.b_noise_start_step`).
- The LR: the schedule wrapped in :class:`~hf_lars.schedule.OnlineLrScheduler` with the ramp as its factor, so
  the ramp's state is in the scheduler's ``state_dict`` (``scheduler.pt``) and a resumed run continues it;
  on resume the callback also skips the micro-batches Trainer's own data skip (which counts one per step)
  left out, so the data position is the uninterrupted run's.

Trainer internals relied on (listed in :mod:`.transformers.patches`): ``get_batch_samples``,
``set_initial_training_values``, one optimizer step per fetched item at ``gradient_accumulation_steps=1``,
Accelerate's ``GradientState._set_sync_gradients``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import TrainerState

from hf_lars.integrations.callbacks import TrainingLogCallback
from hf_lars.integrations.deepspeed import set_engine_batch_size
from hf_lars.integrations.distributed import sharding_engine
from hf_lars.integrations.lr_scaling import b_noise_start_step, batch_size_ramp
from hf_lars.integrations.noise_scale import add_noise_scale_callback
from hf_lars.integrations.online_lr import LR_FACTOR_KEY
from hf_lars.scaling.ramp import BatchSizeRamp, count_examples
from hf_lars.schedule import OnlineLrScheduler

__all__ = [
    "GLOBAL_BATCH_KEY",
    "SAMPLES_KEY",
    "MicroBatches",
    "BatchRampCallback",
    "attach_batch_ramp",
    "find_batch_ramp",
    "ramp_batch_samples",
    "ramp_training_step",
    "ramp_training_values",
]

logger = logging.getLogger(__name__)

#: Training-log keys: the global batch of the step logged, and the examples consumed up to it.
GLOBAL_BATCH_KEY = "global_batch"
SAMPLES_KEY = "train_samples"


class MicroBatches(list):
    """One optimizer step's micro-batches, handed through Trainer's loop as one item."""


class BatchRampCallback(TrainingLogCallback):
    """Advance a :class:`BatchSizeRamp` at each optimizer step and log it (module docstring)."""

    def __init__(
        self, scheduler: OnlineLrScheduler, ramp: BatchSizeRamp, engine: Callable[[], Any] | None = None
    ) -> None:
        self.scheduler, self.ramp = scheduler, ramp
        self.engine = engine  # the wrapped model: a DeepSpeed engine is told each new batch
        self.fetched = 0  # micro-batches of the step in flight on this process (set by ramp_batch_samples)
        self.fetched_examples = 0  # and the examples they hold
        self.pending_skip = 0  # micro-batches to drop before the first step of a resumed run
        self._logged = (ramp.batch, ramp.factor)

    def on_train_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        if self.ramp.step != state.global_step:
            raise ValueError(
                f"The batch size ramp stands at step {self.ramp.step} but training at {state.global_step}: the "
                "checkpoint's scheduler state (which carries the ramp) was not restored; resume with the same "
                "--batch_size_* flags from a checkpoint that has it"
            )
        self._tell_engine()
        self.pending_skip = 0
        if state.global_step == 0 or args.ignore_data_skip:
            return
        per_epoch = len(kwargs["train_dataloader"])
        trainer_epoch, trainer_skipped = divmod(state.global_step, per_epoch)
        epoch, done = divmod(self.ramp.micro_batches, per_epoch)
        if epoch != trainer_epoch or done < trainer_skipped:
            raise ValueError(
                f"Resuming a batch size ramp past an epoch boundary is not supported (Trainer resumes epoch "
                f"{trainer_epoch}, the ramp's data is in epoch {epoch}): resume from a checkpoint in the first "
                "epoch, or pass --ignore_data_skip"
            )
        self.pending_skip = done - trainer_skipped

    def on_step_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        fetched = self.fetched or self.ramp.accumulation
        examples = self.fetched_examples or fetched * self.ramp.micro_batch
        self._logged = (self.ramp.batch, self.ramp.factor)
        # every process holds as many (Accelerate evens the shards' batches out)
        if self.ramp.step_done(samples=examples * self.ramp.processes, micro_batches=fetched):
            self._tell_engine()
        self.fetched = self.fetched_examples = 0
        self.scheduler.refresh()  # the next step's LR: Trainer stepped the schedule with this step's factor

    def _tell_engine(self) -> None:
        if self.engine is not None:
            set_engine_batch_size(self.engine(), self.ramp.batch)

    def training_log_stats(self, state: TrainerState, logs: Mapping[str, Any], **kwargs: Any) -> dict[str, float]:
        batch, factor = self._logged
        if self.ramp.noise_k is not None:
            before = self.ramp.batch
            self.ramp.update(logs.get("b_noise"))  # the next step's batch
            if self.ramp.batch != before:
                self._tell_engine()
            self.scheduler.refresh()
        return {GLOBAL_BATCH_KEY: batch, LR_FACTOR_KEY: factor, SAMPLES_KEY: self.ramp.samples}


def find_batch_ramp(trainer: Any) -> BatchRampCallback | None:
    """The trainer's :class:`BatchRampCallback` (``None``: no ramp)."""
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BatchRampCallback)), None)


def attach_batch_ramp(trainer: Any, scheduler: Any, num_training_steps: int) -> Any:
    """``scheduler`` wrapped for the ``--batch_size_*`` ramp (set as ``trainer.lr_scheduler``); as is when off.

    Called by ``create_scheduler`` (both routes).  The ramp's Trainer methods are :class:`~hf_lars.LarsTrainer`'s,
    so a plain ``Trainer`` is refused here, before any step.  The noise-driven ramp waits for
    :func:`~hf_lars.integrations.lr_scaling.b_noise_start_step`.  Idempotent.
    """
    ramp = batch_size_ramp(trainer.args, trainer.args.world_size)
    if ramp is None or isinstance(scheduler, OnlineLrScheduler):
        return scheduler
    if not getattr(trainer, "supports_batch_ramp", False):
        raise ValueError(
            f"--batch_size_* needs LarsTrainer (it fetches each step's micro-batches itself); {type(trainer).__name__}"
            " cannot grow its batch: use hf_lars.LarsTrainer (or subclass it)"
        )
    noise = None
    if ramp.noise_k is not None:  # it waits for the noise estimate to be worth acting on
        noise = add_noise_scale_callback(trainer)
        start = b_noise_start_step(trainer.args, num_training_steps, noise.beta,
                                   deepspeed=sharding_engine(trainer) == "deepspeed")
        ramp = batch_size_ramp(trainer.args, trainer.args.world_size, start)
    wrapped = OnlineLrScheduler(scheduler, ramp)
    trainer.lr_scheduler = wrapped
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [cb for cb in callbacks if not isinstance(cb, BatchRampCallback)]
    callback = BatchRampCallback(wrapped, ramp, engine=lambda: trainer.model_wrapped)
    callbacks.insert(0 if noise is None else callbacks.index(noise) + 1, callback)  # before the report_to ones
    logger.info("hf_lars: batch size ramp %r", ramp)
    return wrapped


def ramp_batch_samples(
    trainer: Any, epoch_iterator: Any, num_batches: int, device: Any, original: Callable[..., Any]
) -> tuple[list[Any], Any]:
    """``get_batch_samples``: the ramp's micro-batches for this step as one :class:`MicroBatches`."""
    callback = find_batch_ramp(trainer)
    if callback is None:
        return original(epoch_iterator, num_batches, device)
    if callback.pending_skip:
        original(epoch_iterator, callback.pending_skip, device)  # fetched and dropped: the resumed data position
        callback.pending_skip = 0
    batches, num_items = original(epoch_iterator, callback.ramp.accumulation, device)
    callback.fetched = len(batches)
    callback.fetched_examples = sum(count_examples(b, callback.ramp.micro_batch) for b in batches)
    return ([MicroBatches(batches)] if batches else []), num_items


def ramp_training_step(
    trainer: Any, model: Any, inputs: Any, num_items_in_batch: Any, original: Callable[..., Any]
) -> torch.Tensor:
    """``training_step`` over a :class:`MicroBatches`: each micro-batch's forward/backward, synced on the last."""
    if not isinstance(inputs, MicroBatches):
        return original(model, inputs, num_items_in_batch)
    from hf_lars.integrations.transformers.patches import set_sync_gradients

    trainer.current_gradient_accumulation_steps = len(inputs)  # Trainer's loss / K when not token-normalised
    losses = []
    for i, micro in enumerate(inputs):
        last = i == len(inputs) - 1
        set_sync_gradients(trainer.accelerator, last)
        context = contextlib.nullcontext() if last else trainer.accelerator.no_sync(model)
        with context:
            losses.append(original(model, micro, num_items_in_batch))
    return torch.stack(losses).sum()


def ramp_training_values(trainer: Any, values: tuple[Any, ...], dataloader: Any) -> tuple[Any, ...]:
    """``set_initial_training_values``' tuple with enough epochs for the ramp's ``max_steps`` micro-batches."""
    ramp = batch_size_ramp(trainer.args, trainer.args.world_size)  # the scheduler (and callback) come later
    if ramp is None or not values:
        return values
    max_steps = int(trainer.args.max_steps)
    if ramp.schedule is not None:
        needed = sum(ramp.batch_at(s) for s in range(max_steps)) // ramp.unit
    else:
        needed = max_steps * (ramp.max_batch // ramp.unit)
    try:
        per_epoch = len(dataloader)
    except TypeError:  # an iterable dataset: Trainer already loops over it as often as needed
        return values
    return (max(int(values[0]), math.ceil(needed / max(per_epoch, 1))), *values[1:])
