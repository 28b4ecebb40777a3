"""``register()`` / ``unregister()``: the ``--optim`` route, assembled from :mod:`.patches`' primitives.

After :func:`register`, plain ``TrainingArguments``, ``HfArgumentParser`` and ``Trainer`` accept every
registry name for ``optim`` and ``warmup_poly`` for ``lr_scheduler_type``:

- ``OptimizerNames`` gets one member per registry name (``OptimizerNames.LARS == "lars"``); a value
  transformers already defines is left alone (its own optimizer keeps the name).
- ``SchedulerType`` gets ``WARMUP_POLY``, and ``get_scheduler`` builds it with
  :func:`~hf_lars.integrations.transformers.scheduler.create_warmup_poly_scheduler`.
- ``Trainer.get_optimizer_cls_and_kwargs`` and ``Trainer.create_optimizer`` answer hf_lars names with
  :mod:`.factory` (the same functions :class:`~hf_lars.integrations.transformers.LarsTrainer` uses) and pass
  any other name to the original; ``Trainer.create_scheduler`` builds ``warmup_poly`` the same way and wraps
  any schedule for ``--lr_scaling_online``
  (:func:`~hf_lars.integrations.transformers.scheduler.create_scheduler`).
- ``TrainingArguments`` gets the fields ``lr_scaling``, ``lr_scaling_ref_batch`` and ``b_noise`` (so
  ``HfArgumentParser(TrainingArguments)`` takes ``--lr_scaling``; also the ``--lr_scaling_online`` and
  ``--batch_size_*`` ones; the ramp itself runs in ``LarsTrainer`` only), and its ``__post_init__`` runs
  :mod:`.launch`'s checks and set-up around the original: ``--deepspeed NAME`` for a shipped config, the gloo
  process state of a multi-process CPU DeepSpeed launch, ``--optim_args`` and ``--lr_scaling`` validated
  before any data or model work.

:func:`~hf_lars.integrations.transformers.patches.check_transformers_version` runs before anything is
touched; :func:`unregister` undoes everything.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from hf_lars.integrations.transformers import factory, patches
from hf_lars.integrations.transformers import launch
from hf_lars.integrations.transformers.names import ADDED_OPTIM_VALUES, SCHEDULER_NAME
from hf_lars.integrations.transformers import scheduler
from hf_lars.integrations.transformers.scheduler import create_warmup_poly_scheduler
from hf_lars.registry import list_optimizers

__all__ = ["register", "unregister", "is_registered"]

logger = logging.getLogger(__name__)


def is_registered() -> bool:
    """Whether :func:`register` is in effect."""
    return patches.is_wrapped(Trainer, "create_optimizer")


def _get_optimizer_cls_and_kwargs(original: Any) -> Any:
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model: Any = None) -> tuple[Any, Any]:
        return factory.get_optimizer_cls_and_kwargs(args, model, original)

    return get_optimizer_cls_and_kwargs


def _create_optimizer(original: Any) -> Any:
    def create_optimizer(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        return factory.create_optimizer(self, lambda *a, **k: original(self, *a, **k), *args, **kwargs)

    return create_optimizer


def _create_scheduler(original: Any) -> Any:
    def create_scheduler(self: Trainer, num_training_steps: int, optimizer: Any = None) -> Any:
        return scheduler.create_scheduler(
            self, num_training_steps, optimizer, lambda n, o: original(self, n, o)
        )

    return create_scheduler


def _post_init(original: Any) -> Any:
    def __post_init__(self: TrainingArguments) -> None:
        launch.before_post_init(self)
        original(self)
        launch.after_post_init(self)

    return __post_init__


# The LrScalingArguments fields register() added to TrainingArguments (removed by unregister()).
_ADDED_FIELDS: list[str] = []


def _init(original: Any) -> Any:
    def __init__(self: TrainingArguments, *args: Any, **kwargs: Any) -> None:
        if type(self).__init__ is TrainingArguments.__init__:  # subclasses have their own fields and __init__
            launch.pop_lr_scaling_kwargs(self, kwargs, _ADDED_FIELDS)
        original(self, *args, **kwargs)

    return __init__


def register() -> None:
    """Make the registry's optimizer names and ``warmup_poly`` usable by transformers (see the module docstring).

    Idempotent.  Raises ``RuntimeError`` on an unsupported transformers version before touching anything.
    """
    if is_registered():
        return
    patches.check_transformers_version()
    for name in list_optimizers():
        if patches.enum_has_value(OptimizerNames, name):
            logger.warning(
                "transformers already defines optim=%r; it keeps its meaning there (hf_lars's is "
                "hf_lars.create_optimizer(model, %r))",
                name,
                name,
            )
            continue
        patches.add_enum_member(OptimizerNames, name.upper(), name)
        ADDED_OPTIM_VALUES.add(name)
    if not patches.enum_has_value(SchedulerType, SCHEDULER_NAME):
        member = patches.add_enum_member(SchedulerType, SCHEDULER_NAME.upper(), SCHEDULER_NAME)
        patches.set_scheduler_function(member, create_warmup_poly_scheduler)
    patches.wrap_method(Trainer, "get_optimizer_cls_and_kwargs", _get_optimizer_cls_and_kwargs)
    patches.wrap_method(Trainer, "create_optimizer", _create_optimizer)
    patches.wrap_method(Trainer, "create_scheduler", _create_scheduler)
    patches.wrap_method(TrainingArguments, "__post_init__", _post_init)
    _ADDED_FIELDS[:] = launch.add_lr_scaling_fields(TrainingArguments)
    patches.wrap_method(TrainingArguments, "__init__", _init)
    logger.info(
        "hf_lars: registered --optim %s and --lr_scheduler_type %s", ", ".join(sorted(ADDED_OPTIM_VALUES)), SCHEDULER_NAME
    )


def unregister() -> None:
    """Undo :func:`register` (for tests and for code that must hand back an untouched transformers)."""
    if not is_registered():
        return
    patches.unwrap_method(Trainer, "create_optimizer")
    patches.unwrap_method(Trainer, "create_scheduler")
    patches.unwrap_method(TrainingArguments, "__post_init__")
    patches.unwrap_method(TrainingArguments, "__init__")
    launch.remove_lr_scaling_fields(TrainingArguments, _ADDED_FIELDS)
    _ADDED_FIELDS.clear()
    launch.clear_launch_lr_scaling()
    patches.unwrap_method(Trainer, "get_optimizer_cls_and_kwargs")
    member = SchedulerType(SCHEDULER_NAME) if patches.enum_has_value(SchedulerType, SCHEDULER_NAME) else None
    if member is not None and patches.remove_scheduler_function(member, create_warmup_poly_scheduler):
        patches.remove_enum_member(SchedulerType, SCHEDULER_NAME)
    for value in sorted(ADDED_OPTIM_VALUES):
        patches.remove_enum_member(OptimizerNames, value)
    ADDED_OPTIM_VALUES.clear()
