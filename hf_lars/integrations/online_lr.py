"""``--lr_scaling_online``: the Trainer's LR follows the gradient noise scale measured while it trains.

The math is :mod:`hf_lars.scaling.online`; this module connects it to Trainer:

- :func:`attach_online_lr_scaling` (called by ``create_scheduler``, both the patched ``Trainer``'s and
  :class:`~hf_lars.LarsTrainer`'s, with any scheduler): wraps ``trainer.lr_scheduler`` in an
  :class:`~hf_lars.schedule.OnlineLrScheduler`, adds a
  :class:`~hf_lars.integrations.noise_scale.GradientNoiseScaleCallback` if the trainer has none, and an
  :class:`OnlineLrScalingCallback` right after it.
- :class:`OnlineLrScalingCallback`: at each training log, the ``b_noise`` the noise callback has just added
  updates the factor (applied from the next optimizer step) and ``lr_factor`` is logged beside it.  Estimates
  logged before ``--b_noise_start_step`` (default: the later of the LR warmup's end and the noise EMA's window,
  :func:`~hf_lars.integrations.lr_scaling.b_noise_start_step`) leave the factor at 1.

Checkpoints: the factor is part of the scheduler's ``state_dict`` (``scheduler.pt``, or DeepSpeed's
checkpoint when DeepSpeed steps the scheduler), the noise scale's EMAs part of ``trainer_state.json``; a
resumed run continues both.  Under DeepSpeed ZeRO ``b_noise`` comes once per logging step (see
:mod:`hf_lars.integrations.noise_monitor`), which is also when the factor moves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from transformers import TrainerState

from hf_lars.integrations.callbacks import TrainingLogCallback
from hf_lars.integrations.distributed import sharding_engine
from hf_lars.integrations.lr_scaling import b_noise_start_step, online_lr_factor
from hf_lars.integrations.noise_scale import add_noise_scale_callback
from hf_lars.schedule import OnlineLrScheduler

__all__ = ["LR_FACTOR_KEY", "OnlineLrScalingCallback", "attach_online_lr_scaling"]

logger = logging.getLogger(__name__)

#: The key added to the training logs: what the schedule's LR is multiplied by.
LR_FACTOR_KEY = "lr_factor"


class OnlineLrScalingCallback(TrainingLogCallback):
    """Update an :class:`~hf_lars.schedule.OnlineLrScheduler` from each training log's ``b_noise``.

    Must come after the :class:`GradientNoiseScaleCallback` that adds ``b_noise`` (what
    :func:`attach_online_lr_scaling` arranges).  Logs ``lr_factor``; a log without a usable ``b_noise``
    (none yet, or a non-positive estimate) leaves the factor as it was.
    """

    def __init__(self, scheduler: OnlineLrScheduler) -> None:
        self.scheduler = scheduler

    def training_log_stats(self, state: TrainerState, logs: Mapping[str, Any], **kwargs: Any) -> dict[str, float]:
        return {LR_FACTOR_KEY: self.scheduler.update(logs.get("b_noise"), state.global_step)}


def attach_online_lr_scaling(trainer: Any, scheduler: Any, num_training_steps: int) -> Any:
    """``scheduler`` wrapped for ``--lr_scaling_online`` (set as ``trainer.lr_scheduler``); as is when it is off.

    The factor waits for :func:`~hf_lars.integrations.lr_scaling.b_noise_start_step` (``ValueError`` if that is
    not before ``num_training_steps``).  Idempotent: a scheduler already wrapped is returned unchanged.
    """
    if not getattr(trainer.args, "lr_scaling_online", False) or isinstance(scheduler, OnlineLrScheduler):
        return scheduler
    noise = add_noise_scale_callback(trainer)
    start = b_noise_start_step(trainer.args, num_training_steps, noise.beta,
                               deepspeed=sharding_engine(trainer) == "deepspeed")
    factor = online_lr_factor(trainer.args, trainer.args.world_size, start)
    wrapped = OnlineLrScheduler(scheduler, factor)
    trainer.lr_scheduler = wrapped
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [cb for cb in callbacks if not isinstance(cb, OnlineLrScalingCallback)]
    callbacks.insert(callbacks.index(noise) + 1, OnlineLrScalingCallback(wrapped))
    logger.info("hf_lars: the LR follows the measured B_noise from optimizer step %d on (%r)", start, factor)
    return wrapped
