"""``hf-lars run SCRIPT.py --lr_scaling ...``: rescale the LR of a script's plain ``TrainingArguments``.

An unmodified script's ``TrainingArguments`` do not know ``--lr_scaling``; the command takes the flags off
the script's arguments and calls :func:`set_launch_lr_scaling`; ``register()`` wraps
``TrainingArguments.__post_init__`` to call :func:`apply_launch_lr_scaling` on every arguments object built
afterwards (``--learning_rate`` is the reference LR).  :class:`LarsTrainingArguments` carries the flags
itself and is left alone.
"""

from __future__ import annotations

from typing import Any

from hf_lars.integrations.lr_scaling import LrScalingArguments, apply_lr_scaling

__all__ = ["set_launch_lr_scaling", "clear_launch_lr_scaling", "apply_launch_lr_scaling"]

# The --lr_scaling settings of this process's launch (empty: none).
_LAUNCH_LR_SCALING: dict[str, Any] = {}


def set_launch_lr_scaling(lr_scaling: str, lr_scaling_ref_batch: int | None = None, b_noise: float | None = None) -> None:
    """Rescale the LR of every ``TrainingArguments`` built from now on (after ``register()``).

    ``lr_scaling="none"`` turns it off.  Validated when the arguments are built
    (:func:`~hf_lars.integrations.lr_scaling.apply_lr_scaling`).
    """
    _LAUNCH_LR_SCALING.clear()
    if lr_scaling != "none":
        _LAUNCH_LR_SCALING.update(lr_scaling=lr_scaling, lr_scaling_ref_batch=lr_scaling_ref_batch, b_noise=b_noise)


def clear_launch_lr_scaling() -> None:
    """Forget the launch's settings (``unregister()``)."""
    _LAUNCH_LR_SCALING.clear()


def apply_launch_lr_scaling(args: Any) -> None:
    """Apply the launch's ``--lr_scaling`` to freshly built ``args`` (after their own ``__post_init__``)."""
    if _LAUNCH_LR_SCALING and not isinstance(args, LrScalingArguments):
        for key, value in _LAUNCH_LR_SCALING.items():
            object.__setattr__(args, key, value)
        apply_lr_scaling(args, args.world_size)
