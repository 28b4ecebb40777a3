"""``--lr_scheduler_type warmup_poly``: :func:`hf_lars.schedule.get_warmup_poly_schedule` for Trainer.

The patched route reaches :func:`create_warmup_poly_scheduler` through ``transformers.get_scheduler``;
:class:`~hf_lars.integrations.transformers.LarsTrainer` through :func:`create_scheduler`.  Neither reads
``optimizer.defaults``, so both work when DeepSpeed wraps the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hf_lars.integrations.batch_ramp import attach_batch_ramp
from hf_lars.integrations.online_lr import attach_online_lr_scaling
from hf_lars.integrations.transformers.names import SCHEDULER_NAME, WARMUP_POLY_KWARGS, is_warmup_poly
from hf_lars.integrations.transformers.patches import mark_scheduler_created
from hf_lars.schedule import get_warmup_poly_schedule

__all__ = ["create_warmup_poly_scheduler", "scheduler_kwargs", "check_scheduler_kwargs", "create_scheduler"]


def check_scheduler_kwargs(kwargs: Any) -> None:
    """``ValueError`` naming the valid keys if ``kwargs`` has one ``warmup_poly`` does not take."""
    unknown = sorted(set(kwargs) - set(WARMUP_POLY_KWARGS))
    if unknown:
        raise ValueError(
            f"Unknown lr_scheduler_kwargs for {SCHEDULER_NAME}: {', '.join(unknown)}. "
            f"Valid keys: {', '.join(WARMUP_POLY_KWARGS)}"
        )


def create_warmup_poly_scheduler(
    optimizer: Any,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    **scheduler_kwargs: Any,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``get_scheduler("warmup_poly", ...)``: :func:`hf_lars.schedule.get_warmup_poly_schedule` for Trainer.

    ``scheduler_kwargs`` are ``--lr_scheduler_kwargs`` (``power``, ``lr_end``, ``warmup``, ``warmup_start``).
    Works on optimizers without ``.defaults`` (DeepSpeed ZeRO, Accelerate's wrapper around it).
    """
    check_scheduler_kwargs(scheduler_kwargs)
    if num_training_steps is None:
        raise ValueError(f"{SCHEDULER_NAME} requires num_training_steps (set --max_steps or --num_train_epochs)")
    return get_warmup_poly_schedule(
        optimizer,
        num_warmup_steps=int(num_warmup_steps or 0),
        num_training_steps=int(num_training_steps),
        **scheduler_kwargs,
    )


def scheduler_kwargs(args: Any) -> dict[str, Any]:
    """``args.lr_scheduler_kwargs`` as a dict (``ValueError`` if it is anything else)."""
    kwargs = args.lr_scheduler_kwargs or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"lr_scheduler_kwargs must be a dict or a JSON string, got {kwargs!r}")
    return dict(kwargs)


def create_scheduler(
    trainer: Any,
    num_training_steps: int,
    optimizer: torch.optim.Optimizer | None,
    fallback: Callable[[int, torch.optim.Optimizer | None], torch.optim.lr_scheduler.LRScheduler],
) -> Any:
    """``Trainer.create_scheduler``: ``warmup_poly`` built here, any other scheduler by ``fallback``.

    With ``--lr_scaling_online`` the scheduler is wrapped so its LRs follow the measured noise scale
    (:func:`hf_lars.integrations.online_lr.attach_online_lr_scaling`); with a ``--batch_size_*`` ramp so they
    follow its batch (:func:`hf_lars.integrations.batch_ramp.attach_batch_ramp`; the two exclude each other).
    """
    if trainer.lr_scheduler is None and is_warmup_poly(trainer.args.lr_scheduler_type):
        trainer.lr_scheduler = create_warmup_poly_scheduler(
            trainer.optimizer if optimizer is None else optimizer,
            num_warmup_steps=trainer.args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            **scheduler_kwargs(trainer.args),
        )
        mark_scheduler_created(trainer)
        scheduler = trainer.lr_scheduler
    else:
        scheduler = fallback(num_training_steps, optimizer)
    online = attach_online_lr_scaling(trainer, scheduler, num_training_steps)
    return attach_batch_ramp(trainer, online, num_training_steps)
