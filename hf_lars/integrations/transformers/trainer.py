"""The no-patching route: :class:`LarsTrainingArguments` + :class:`LarsTrainer`, public hooks only.

They accept every transformers name and every hf_lars one without :func:`~hf_lars.integrations.register`,
and build optimizers and the ``warmup_poly`` schedule with the same functions the patched ``Trainer`` uses
(:mod:`.factory`, :mod:`.scheduler`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from hf_lars.integrations import batch_ramp
from hf_lars.integrations.lr_scaling import LrScalingArguments, apply_lr_scaling
from hf_lars.integrations.trust_ratios import find_trust_ratio_optimizer
from hf_lars.integrations.transformers import factory, launch
from hf_lars.integrations.transformers.names import (
    SCHEDULER_NAME,
    HfLarsName,
    hf_lars_optim_name,
    is_warmup_poly,
    name_value,
    valid_optim_names,
    valid_scheduler_names,
)
from hf_lars.integrations.transformers.scheduler import check_scheduler_kwargs, create_scheduler, scheduler_kwargs
from hf_lars.registry import list_optimizers

__all__ = ["LarsTrainingArguments", "LarsTrainer"]

_HAS_WARMUP_RATIO = "warmup_ratio" in {f.name for f in dataclasses.fields(TrainingArguments)}
_PLACEHOLDER_OPTIM = "adamw_torch"
_PLACEHOLDER_SCHEDULER = "linear"


@dataclass
class LarsTrainingArguments(LrScalingArguments, TrainingArguments):
    """``TrainingArguments`` that accept hf_lars names without patching transformers; use with :class:`LarsTrainer`.

    ``optim`` accepts every transformers name and every registry name (default ``adam_lars``);
    ``lr_scheduler_type`` every transformers scheduler and ``warmup_poly`` (default).  ``optim_args`` are
    validated here, so a bad value fails at argument parsing rather than when training starts.
    ``--lr_scaling surge|sgd|linear|sqrt|none`` with ``--lr_scaling_ref_batch`` (and ``--b_noise``) rescales
    ``--learning_rate`` to this run's global batch (processes x per-device batch x accumulation) here, at
    launch: before Trainer builds the Accelerator, so DeepSpeed's ``"auto"`` learning rate gets the scaled one.
    """

    optim: str = field(
        default="adam_lars",
        metadata={
            "help": f"The optimizer to use: a transformers name or an hf_lars one ({', '.join(list_optimizers())}).",
            "choices": valid_optim_names(),
        },
    )
    lr_scheduler_type: str = field(
        default=SCHEDULER_NAME,
        metadata={
            "help": "The learning rate scheduler: a transformers name or 'warmup_poly' (warmup then poly decay; "
            'set power/lr_end/warmup/warmup_start with --lr_scheduler_kwargs \'{"power": 2.0}\').',
            "choices": valid_scheduler_names(),
        },
    )
    trust_ratio_jsonl: bool = field(
        default=True,
        metadata={"help": "Write per-layer trust ratios to output_dir/trust_ratios.jsonl at each logging step."},
    )
    if not _HAS_WARMUP_RATIO:  # removed in transformers 5 (--warmup_steps < 1 is a ratio); kept here for scripts
        warmup_ratio: float | None = field(
            default=None,
            metadata={"help": "Fraction of the training steps used for warmup (same as --warmup_steps < 1)."},
        )

    def __post_init__(self) -> None:
        launch.before_post_init(self)  # --deepspeed NAME, the CPU process state (as after register())
        optim = name_value(self.optim)
        ours = hf_lars_optim_name(optim)
        if ours is None and optim not in valid_optim_names():
            raise ValueError(f"Unknown optim {optim!r}. Valid names: {', '.join(valid_optim_names())}")
        warmup_poly = is_warmup_poly(self.lr_scheduler_type)
        scheduler = name_value(self.lr_scheduler_type)
        if not warmup_poly and scheduler not in valid_scheduler_names():
            raise ValueError(
                f"Unknown lr_scheduler_type {scheduler!r}. Valid names: {', '.join(valid_scheduler_names())}"
            )
        ratio = getattr(self, "warmup_ratio", None)
        if ratio is not None and not _HAS_WARMUP_RATIO:
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"Invalid warmup_ratio: {ratio} (must be in [0, 1))")
            if self.warmup_steps:
                raise ValueError("Set either warmup_steps or warmup_ratio, not both")
            self.warmup_steps = ratio
        # TrainingArguments validates `optim` and `lr_scheduler_type` against its enums: give it a placeholder
        # it knows, then put our name back.
        if ours is not None:
            self.optim = _PLACEHOLDER_OPTIM
        if warmup_poly:
            self.lr_scheduler_type = _PLACEHOLDER_SCHEDULER
        super().__post_init__()
        if ours is not None:
            self.optim = HfLarsName(ours)
            cls, kwargs = factory.optimizer_cls_and_kwargs(self, ours)
            cls([torch.zeros(2, 2, requires_grad=True)], **kwargs)  # range checks now, not at train time
        if warmup_poly:
            self.lr_scheduler_type = HfLarsName(SCHEDULER_NAME)
            check_scheduler_kwargs(scheduler_kwargs(self))
        apply_lr_scaling(self, self.world_size)


class LarsTrainer(Trainer):
    """``Trainer`` that builds hf_lars optimizers and the ``warmup_poly`` schedule itself (no patching).

    With an hf_lars ``args.optim`` (from :class:`LarsTrainingArguments`, or plain ``TrainingArguments`` after
    :func:`~hf_lars.integrations.register`) it creates the optimizer like the patched ``Trainer``: Trainer's
    decay / no-decay split as named groups, the no-decay group not adapted.  A ``TrustRatioCallback`` is added
    whenever the optimizer is an hf_lars one, including one passed in ``optimizers=(optimizer, scheduler)``.
    Any other ``optim``/scheduler behaves exactly as in ``Trainer``.  With ``--batch_size_schedule`` or
    ``--batch_size_noise_k`` it runs the batch-size ramp (:mod:`hf_lars.integrations.batch_ramp`: each step's
    micro-batches through ``get_batch_samples``/``training_step`` as one item); without, those methods are
    Trainer's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if find_trust_ratio_optimizer(self.optimizer) is not None:
            factory.attach_trust_ratio_callback(self)

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model: Any = None) -> tuple[Any, Any]:
        return factory.get_optimizer_cls_and_kwargs(args, model, Trainer.get_optimizer_cls_and_kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return factory.create_optimizer(self, super().create_optimizer, *args, **kwargs)

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        return create_scheduler(self, num_training_steps, optimizer, super().create_scheduler)

    # The batch-size ramp (--batch_size_schedule, --batch_size_noise_k): each optimizer step's micro-batches
    # travel through Trainer's loop as one item (hf_lars.integrations.batch_ramp); without a ramp these are
    # Trainer's own methods.
    supports_batch_ramp = True

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list[Any], Any]:
        return batch_ramp.ramp_batch_samples(self, epoch_iterator, num_batches, device, super().get_batch_samples)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        return batch_ramp.ramp_training_step(self, model, inputs, num_items_in_batch, super().training_step)

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple[Any, ...]:
        return batch_ramp.ramp_training_values(self, super().set_initial_training_values(args, dataloader),
                                               dataloader)

    def floating_point_ops(self, inputs: Any) -> int:
        if isinstance(inputs, batch_ramp.MicroBatches):
            return sum(super(LarsTrainer, self).floating_point_ops(micro) for micro in inputs)
        return super().floating_point_ops(inputs)
