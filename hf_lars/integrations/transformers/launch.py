"""What ``register()`` does when plain ``TrainingArguments`` are built: launch-time flags, checks, CPU state.

``register()`` wraps ``TrainingArguments.__init__`` / ``__post_init__`` (:mod:`.patches` lists them) with
:func:`before_post_init` and :func:`after_post_init`, so an unmodified script gets, at argument parsing and
before any data or model work:

- ``--deepspeed zero3``: a name stands for the config shipped with hf_lars when no such file exists
  (:func:`hf_lars.integrations.deepspeed.resolve_config`).
- On a multi-process launch with no accelerator: with ``--deepspeed``, Accelerate's DeepSpeed state over
  gloo, created first, and ``accelerator_config.use_configured_state``; otherwise ``use_cpu=True``
  (:func:`prepare_cpu_process_state`), so Trainer and DeepSpeed see every process (otherwise
  ``train_batch_size`` counts one process and ``from_pretrained`` under ZeRO-3's ``zero.Init`` asserts, and
  DDP ranks train alone).  One log line says which.  Nothing changes when an accelerator is present, or when
  the script configured the state itself.
- ``--optim_args`` of an hf_lars ``--optim`` parsed by the one parser that builds the optimizer
  (:func:`~hf_lars.integrations.transformers.factory.optimizer_cls_and_kwargs`), and the optimizer's own
  range checks run on a dummy tensor.
- ``--lr_scaling``, ``--lr_scaling_ref_batch``, ``--b_noise`` (and the ``--lr_scaling_online`` and
  ``--batch_size_*`` ones, all of :class:`LrScalingArguments`): fields added to ``TrainingArguments`` at
  ``register()`` (:func:`add_lr_scaling_fields`), or set by ``hf-lars run`` for the whole launch
  (:func:`set_launch_lr_scaling`); ``--learning_rate`` is then the reference LR.
  :class:`LarsTrainingArguments` carries the fields itself and is left alone.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any

import torch

from hf_lars.integrations.lr_scaling import (
    LrScalingArguments,
    apply_lr_scaling,
    check_lr_scaling_flags,
    ramp_requested,
)

__all__ = [
    "LR_SCALING_FIELDS",
    "set_launch_lr_scaling",
    "clear_launch_lr_scaling",
    "apply_launch_lr_scaling",
    "accelerator_present",
    "prepare_cpu_process_state",
    "before_post_init",
    "after_post_init",
    "check_optim_args",
    "add_lr_scaling_fields",
    "remove_lr_scaling_fields",
    "pop_lr_scaling_kwargs",
]

logger = logging.getLogger(__name__)

#: The dataclass fields ``register()`` adds to ``TrainingArguments`` (those of :class:`LrScalingArguments`).
LR_SCALING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LrScalingArguments))

# The --lr_scaling settings of this process's launch (empty: none).
_LAUNCH_LR_SCALING: dict[str, Any] = {}


def set_launch_lr_scaling(
    lr_scaling: str = "none", lr_scaling_ref_batch: int | None = None, b_noise: float | None = None, **online: Any
) -> None:
    """Rescale the LR of every ``TrainingArguments`` built from now on (after ``register()``).

    ``lr_scaling="none"`` turns it off (unless a batch-size ramp is set).  ``online`` takes the other
    :class:`LrScalingArguments` fields: the ``lr_scaling_online`` ones (``lr_scaling_online``,
    ``lr_scaling_min_factor``, ``lr_scaling_max_factor``, ``lr_scaling_smoothing``) and the ramp's
    (``batch_size_schedule``, ``batch_size_noise_k``, ``batch_size_min``, ``batch_size_max``).  The rule, its
    required values and what can be checked of the ramp without a run are checked now.

    Raises:
        ValueError: an unknown rule or field, a missing or non-positive ``lr_scaling_ref_batch``, a missing
            ``b_noise`` for ``surge``/``sgd`` (unless online), bad online settings.
    """
    unknown = sorted(set(online) - set(LR_SCALING_FIELDS))
    if unknown:
        raise ValueError(f"Unknown lr_scaling setting(s) {', '.join(unknown)}; valid: {', '.join(LR_SCALING_FIELDS)}")
    check_lr_scaling_flags(lr_scaling, lr_scaling_ref_batch, b_noise, **online)
    _LAUNCH_LR_SCALING.clear()
    if lr_scaling != "none" or any(online.get(k) is not None for k in online if k.startswith("batch_size_")):
        _LAUNCH_LR_SCALING.update(
            lr_scaling=lr_scaling, lr_scaling_ref_batch=lr_scaling_ref_batch, b_noise=b_noise, **online
        )


def clear_launch_lr_scaling() -> None:
    """Forget the launch's settings (``unregister()``)."""
    _LAUNCH_LR_SCALING.clear()


def apply_launch_lr_scaling(args: Any) -> None:
    """Apply ``--lr_scaling`` (the launch's, else the arguments' own fields) to freshly built ``args``."""
    if isinstance(args, LrScalingArguments):
        return
    for key, value in _LAUNCH_LR_SCALING.items():
        object.__setattr__(args, key, value)
    if str(getattr(args, "lr_scaling", "none") or "none") != "none" or ramp_requested(args):
        apply_lr_scaling(args, args.world_size)


# ------------------------------------------------------------------------------------- process state
def accelerator_present() -> bool:
    """Whether torch sees any accelerator (CUDA, XPU, MPS, ...): then the launch is left to Accelerate."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _set_use_configured_state(args: Any) -> bool:
    """Set ``args.accelerator_config``'s ``use_configured_state``; ``False`` when the user set it to false."""
    from transformers.trainer_pt_utils import AcceleratorConfig

    config = args.accelerator_config
    if config is None:
        args.accelerator_config = {"use_configured_state": True}
        return True
    if isinstance(config, (str, os.PathLike)):
        config = AcceleratorConfig.from_json_file(str(config))
    if isinstance(config, dict):
        if config.get("use_configured_state") is False:
            return False
        args.accelerator_config = {**config, "use_configured_state": True}
        return True
    if isinstance(config, AcceleratorConfig):
        config.use_configured_state = True
        args.accelerator_config = config
        return True
    return False


def prepare_cpu_process_state(args: Any) -> bool:
    """Set up ``args`` for a multi-process launch on a machine without an accelerator; whether it changed them.

    Only when ``WORLD_SIZE > 1``, no accelerator is present and no Accelerate state exists yet (those are the
    cases where Trainer would otherwise count one process per rank):

    - without ``--deepspeed`` (DDP, or ``accelerate launch`` with a DeepSpeed YAML, which says so in
      ``ACCELERATE_USE_DEEPSPEED``): ``args.use_cpu = True``; Trainer then builds Accelerate's CPU state,
      distributed over gloo (without it each DDP rank trains alone and believes it is process zero, and
      DeepSpeed's batch check counts one process);
    - with ``--deepspeed`` (``torchrun``, the ``deepspeed`` launcher): Accelerate's DeepSpeed state over gloo,
      created now, and ``accelerator_config.use_configured_state`` so Trainer keeps it (``use_cpu`` would not
      do: Trainer then builds a non-DeepSpeed state and DeepSpeed's batch check fails).
    """
    from hf_lars.integrations.transformers.patches import process_state_exists

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or accelerator_present() or process_state_exists():
        return False
    if not getattr(args, "deepspeed", None):
        if args.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
            return False
        args.use_cpu = True
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            logger.warning(
                "hf_lars: no accelerator: use_cpu=True so Trainer runs the %s processes as one job over gloo",
                os.environ.get("WORLD_SIZE"),
            )
        return True
    if not _set_use_configured_state(args):
        return False
    from hf_lars.integrations.distributed import init_cpu_distributed_state

    init_cpu_distributed_state(deepspeed=True)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        logger.warning(
            "hf_lars: no accelerator: created Accelerate's DeepSpeed process state over gloo for %s processes "
            "(accelerator_config.use_configured_state=True), so Trainer and DeepSpeed count every process",
            os.environ.get("WORLD_SIZE"),
        )
    return True


# ------------------------------------------------------------------------------------------- checks
def check_optim_args(args: Any) -> None:
    """Parse ``args.optim_args`` for an hf_lars ``args.optim`` and run the optimizer's range checks.

    The same parser and the same constructor that build the optimizer later, on a dummy tensor: a bad key,
    type or range fails at argument parsing, naming ``--optim_args``, the value and the valid keys.
    """
    from hf_lars.integrations.transformers import factory
    from hf_lars.integrations.transformers.names import hf_lars_optim_name

    name = hf_lars_optim_name(getattr(args, "optim", None))
    if name is None:
        return
    cls, kwargs = factory.optimizer_cls_and_kwargs(args, name)
    try:
        cls([torch.zeros(2, 2, requires_grad=True)], **kwargs)
    except ValueError as err:
        raise ValueError(f"--optim {name} --optim_args {getattr(args, 'optim_args', None)!r}: {err}") from None


def before_post_init(args: Any) -> None:
    """Run before ``TrainingArguments.__post_init__``: resolve ``--deepspeed NAME``, prepare the CPU state."""
    from hf_lars.integrations.deepspeed import resolve_config

    if isinstance(getattr(args, "deepspeed", None), str):
        args.deepspeed = resolve_config(args.deepspeed)
    prepare_cpu_process_state(args)


def after_post_init(args: Any) -> None:
    """Run after ``TrainingArguments.__post_init__``: check ``--optim_args``, apply ``--lr_scaling``."""
    if not isinstance(args, LrScalingArguments):
        check_optim_args(args)
    apply_launch_lr_scaling(args)


# ------------------------------------------------------------------------------- --lr_scaling fields
def add_lr_scaling_fields(cls: type) -> list[str]:
    """Add :class:`LrScalingArguments`' fields to the dataclass ``cls`` (what ``HfArgumentParser`` reads).

    Fields it already has are left alone.  Returns the names added (for :func:`remove_lr_scaling_fields`).
    ``cls.__init__`` must be wrapped to take them (:func:`pop_lr_scaling_kwargs`).
    """
    added = []
    for source in dataclasses.fields(LrScalingArguments):
        if source.name in cls.__dataclass_fields__:
            continue
        new = copy.copy(source)
        cls.__dataclass_fields__[new.name] = new
        cls.__annotations__[new.name] = source.type if not isinstance(source.type, str) else _hint(source.name)
        setattr(cls, new.name, source.default)
        added.append(new.name)
    return added


def _hint(name: str) -> Any:
    import typing

    return typing.get_type_hints(LrScalingArguments)[name]


def remove_lr_scaling_fields(cls: type, names: list[str]) -> None:
    """Undo :func:`add_lr_scaling_fields`."""
    for name in names:
        cls.__dataclass_fields__.pop(name, None)
        cls.__annotations__.pop(name, None)
        if name in cls.__dict__:
            delattr(cls, name)


def pop_lr_scaling_kwargs(args: Any, kwargs: dict[str, Any], names: list[str]) -> None:
    """Move the added fields out of ``__init__``'s ``kwargs`` onto ``args`` (before the dataclass ``__init__``)."""
    for name in names:
        if name in kwargs:
            object.__setattr__(args, name, kwargs.pop(name))
