"""Which ``optim`` and ``lr_scheduler_type`` values are hf_lars's, and the names transformers accepts.

A name transformers itself defines keeps its meaning there, even if the registry knows a spelling of it;
:func:`~hf_lars.integrations.transformers.register` records the values it added in
:data:`ADDED_OPTIM_VALUES` so that they count as ours.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from hf_lars.registry import get_optimizer_info, list_optimizers

__all__ = [
    "SCHEDULER_NAME",
    "WARMUP_POLY_KWARGS",
    "ADDED_OPTIM_VALUES",
    "HfLarsName",
    "name_value",
    "hf_lars_optim_name",
    "is_warmup_poly",
    "valid_optim_names",
    "valid_scheduler_names",
]

#: The scheduler name added to ``lr_scheduler_type``.
SCHEDULER_NAME = "warmup_poly"
#: ``lr_scheduler_kwargs`` accepted by ``warmup_poly`` (the tunables of ``get_warmup_poly_schedule``).
WARMUP_POLY_KWARGS = ("power", "lr_end", "warmup", "warmup_start")
#: ``OptimizerNames`` values that ``register()`` added (written only by it), so "ours" never hijacks theirs.
ADDED_OPTIM_VALUES: set[str] = set()


class HfLarsName(str):
    """An hf_lars optimizer or scheduler name stored in :class:`LarsTrainingArguments`.

    A plain ``str`` that also has ``.value``, like transformers' enums, so code that reads
    ``args.optim.value`` or ``args.lr_scheduler_type.value`` (model cards) keeps working.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str(self)


def name_value(name: Any) -> Any:
    """The string of an enum member or :class:`HfLarsName`; anything else as given."""
    return name.value if isinstance(name, (Enum, HfLarsName)) else name


def _transformers_optim_values() -> set[str]:
    return {m.value for m in OptimizerNames} - ADDED_OPTIM_VALUES


def hf_lars_optim_name(optim: Any) -> str | None:
    """The canonical registry name if ``optim`` (a string or an ``OptimizerNames`` member) is an hf_lars one.

    A name that transformers itself defines is never ours, even if the registry knows a spelling of it.
    """
    value = name_value(optim)
    if not isinstance(value, str) or value in _transformers_optim_values():
        return None
    try:
        return get_optimizer_info(value).name
    except ValueError:
        return None


def is_warmup_poly(name: Any) -> bool:
    """Whether ``lr_scheduler_type`` is ``warmup_poly``."""
    return name_value(name) == SCHEDULER_NAME


def valid_optim_names() -> list[str]:
    """transformers' ``optim`` values, then the registry's names it does not define."""
    names = [m.value for m in OptimizerNames]
    return names + [n for n in list_optimizers() if n not in names]


def valid_scheduler_names() -> list[str]:
    """transformers' ``lr_scheduler_type`` values and ``warmup_poly``."""
    names = [m.value for m in SchedulerType]
    return names + ([SCHEDULER_NAME] if SCHEDULER_NAME not in names else [])
