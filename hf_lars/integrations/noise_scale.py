"""The gradient noise scale ``B_simple`` in Trainer logs: :class:`GradientNoiseScaleCallback`.

The measurement itself (hooks, norms, what it costs and what it cannot measure) is the framework-free
:class:`~hf_lars.integrations.noise_monitor.GradientNoiseScaleMonitor`, re-exported here; this module adds
the Trainer side: when the big-batch norm is taken, DeepSpeed's logged ``grad_norm``, and the log keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_lars.integrations.callbacks import TrainingLogCallback, add_callback_first
from hf_lars.integrations.distributed import sharding_engine
from hf_lars.integrations.lr_scaling import batch_size_ramp
from hf_lars.integrations.noise_monitor import NOISE_SCALE_KEYS, GradientNoiseScaleMonitor

__all__ = [
    "NOISE_SCALE_KEYS",
    "GradientNoiseScaleMonitor",
    "GradientNoiseScaleCallback",
    "add_noise_scale_callback",
]

logger = logging.getLogger(__name__)


def _sync_gradients() -> bool:
    from accelerate.state import GradientState

    return bool(GradientState().sync_gradients)


class GradientNoiseScaleCallback(TrainingLogCallback, ExportableState):
    r"""Log the gradient noise scale ``B_simple`` at every Trainer logging step (``b_noise`` in the logs).

    Adds ``b_noise`` (``tr(Sigma) / |G|^2``, in examples), ``grad_sq_norm`` (EMA of ``|G|^2``) and
    ``trace_cov`` (EMA of ``tr(Sigma)``) to the training logs, ``trainer_state.json`` included.  ``b`` is the
    per-device batch, ``B`` the global batch (``per_device x gradient_accumulation_steps x processes``), so
    it needs two processes or ``gradient_accumulation_steps >= 2``.  How the norms are obtained, what it
    costs and what it cannot measure: see :mod:`hf_lars.integrations.noise_scale`.

    Trainer (transformers 5.23) clips the gradients *before* ``on_pre_optimizer_step``, so the big-batch norm
    is taken at the end of the step's last backward pass instead (``accelerate``'s ``sync_gradients`` flag
    tells which pass that is).  Under DeepSpeed it comes from Trainer's logged pre-clip ``grad_norm`` (one
    estimate per logging step).

    Add it with :func:`add_noise_scale_callback` so that the ``report_to`` integrations see the new keys.

    Checkpoints: the EMAs are saved in ``trainer_state.json`` (``stateful_callbacks``, transformers'
    ``ExportableState``) and restored in ``on_train_begin`` of a resumed run, so it continues the estimate
    exactly; this does not need ``restore_callback_states_from_checkpoint``.  Steps recorded since the last
    logging step are folded in before a save (every rank, at the step's end), so nothing is lost between the
    last log and the checkpoint.

    Args:
        beta: EMA coefficient (per optimizer step; 0.99 averages over about 100 steps).
        keep_history: keep every step's ``(|G_b|^2, b, |G_B|^2, B)`` in ``callback.monitor.history``.
    """

    def __init__(self, beta: float = 0.99, *, keep_history: bool = False) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta value: {beta!r} (must be in [0, 1))")
        self.beta = beta
        self.keep_history = keep_history
        self.monitor: GradientNoiseScaleMonitor | None = None
        self._deepspeed = False
        # The monitor's state to restore at on_train_begin (set by Trainer's own callback restoring, if enabled).
        self.monitor_state: dict[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        """``ExportableState``: the constructor arguments and the EMAs (``trainer_state.json``)."""
        monitor_state = self.monitor.state_dict() if self.monitor is not None else self.monitor_state
        return {
            "args": {"beta": self.beta, "keep_history": self.keep_history},
            "attributes": {"monitor_state": monitor_state},
        }

    def _saved_monitor_state(self, state: TrainerState) -> dict[str, Any] | None:
        """The EMAs a resumed run's ``TrainerState`` carries for this callback (``None`` on a fresh run)."""
        if self.monitor_state is not None:
            return self.monitor_state
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        if not isinstance(saved, Mapping):
            return None
        return (saved.get("attributes") or {}).get("monitor_state")

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("GradientNoiseScaleCallback needs the model (Trainer passes it to on_train_begin)")
        world = int(args.world_size)
        ramp = batch_size_ramp(args, world)  # a batch-size ramp accumulates itself, from its first batch on
        accum = int(args.gradient_accumulation_steps) if ramp is None else ramp.accumulation
        if world * accum < 2:
            raise ValueError(
                "GradientNoiseScaleCallback needs two batch sizes: run on >= 2 data-parallel processes or with "
                f"gradient_accumulation_steps >= 2 (got {world} process(es) and gradient_accumulation_steps={accum})"
            )
        if getattr(args, "fp16", False):
            logger.warning(
                "GradientNoiseScaleCallback: fp16 loss scaling changes the gradient scale between steps and "
                "biases b_noise; use bf16 or fp32"
            )
        engine = sharding_engine(args)
        if engine == "fsdp":
            raise ValueError(
                "GradientNoiseScaleCallback does not support FSDP: the parameters' gradient hooks see sharded, "
                "already reduce-scattered gradients, not each rank's local micro-batch gradient"
            )
        self._deepspeed = engine == "deepspeed"
        if self.monitor is not None:
            self.monitor.detach()
        self.monitor = GradientNoiseScaleMonitor(
            model,
            args.per_device_train_batch_size,
            world_size=world,
            beta=self.beta,
            accumulation="mean",
            auto_step=_sync_gradients,
            big_norm="external" if self._deepspeed else "grad",
            keep_history=self.keep_history,
        )
        saved = self._saved_monitor_state(state)
        if saved is not None and state.global_step > 0:
            self.monitor.load_state_dict(saved)
            logger.info("GradientNoiseScaleCallback: resumed the EMAs at step %d (%s)", state.global_step, saved)
        self.monitor_state = None
        if self._deepspeed:
            logger.info(
                "GradientNoiseScaleCallback under DeepSpeed: the global gradient norm is only available as "
                "Trainer's logged grad_norm, so b_noise gets one measurement per logging step "
                "(logging_steps=%d)", args.logging_steps,
            )

    def _fold_before_save(self) -> None:
        # Under DeepSpeed the steps between logs have no big-batch norm and would be dropped at the next log
        # anyway, so they are left for it; otherwise fold them now (every rank calls this at the same step).
        if self.monitor is not None and not self._deepspeed and self.monitor.pending_steps:
            self.monitor.compute()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # This callback runs before DefaultFlowCallback sets control.should_save: use its rule for steps.
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        due = strategy == "steps" and state.save_steps > 0 and state.global_step % state.save_steps == 0
        if due or (strategy != "no" and state.global_step >= state.max_steps):
            self._fold_before_save()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "epoch":
            self._fold_before_save()

    def training_log_stats(self, state: TrainerState, logs: Mapping[str, Any], **kwargs: Any) -> dict[str, float]:
        if self.monitor is None:
            return {}
        last_big = None
        if self._deepspeed:
            grad_norm = logs.get("grad_norm")
            last_big = float(grad_norm) ** 2 if grad_norm is not None else None
        return self.monitor.compute(last_big_sq_norm=last_big)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is not None:
            self.monitor.detach()


def add_noise_scale_callback(
    trainer: Any, callback: GradientNoiseScaleCallback | None = None
) -> GradientNoiseScaleCallback:
    """Give ``trainer`` a :class:`GradientNoiseScaleCallback` placed before the ``report_to`` integrations.

    ``Trainer(callbacks=[...])`` appends after them, so they would not see ``b_noise`` (``log_history`` gets it
    either way).  An existing instance is moved to the front instead of adding a second one.
    """
    return add_callback_first(trainer, GradientNoiseScaleCallback, callback)
