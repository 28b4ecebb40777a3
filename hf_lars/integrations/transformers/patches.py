"""Every reliance on transformers internals, in one place: the table, the check, and the primitives.

transformers has no plugin registry for optimizer or scheduler names, so the ``--optim`` route has to patch
it.  Nothing else in hf_lars touches a private transformers name or a behaviour transformers does not
document; everything else uses public hooks (``Trainer(optimizer_cls_and_kwargs=...)``, callbacks,
``TrainingArguments`` subclasses).  :func:`check_transformers_version` runs first in
:func:`~hf_lars.integrations.transformers.register` and names whatever is missing before anything is touched.

Tested with transformers :data:`TESTED_TRANSFORMERS`; accepted: :data:`SUPPORTED_TRANSFORMERS`.

=============================================================  =================================================
what                                                           why
=============================================================  =================================================
``OptimizerNames`` / ``SchedulerType`` ``_member_map_``,        add (and remove) enum members after creation, so
``_value2member_map_``, ``_member_names_``, member ``_name_``,  ``TrainingArguments`` and ``HfArgumentParser``
``_value_``, ``_sort_order_``                                   accept ``lars`` and ``warmup_poly``
``transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION``        ``get_scheduler("warmup_poly")`` builds ours
``Trainer.get_optimizer_cls_and_kwargs`` (a staticmethod)       wrapped: hf_lars names -> (class, kwargs)
``Trainer.create_optimizer``                                    wrapped: Trainer's groups for hf_lars names
``Trainer.create_scheduler``                                    wrapped: ``warmup_poly``, ``--lr_scaling_online``
``TrainingArguments.__post_init__``                             wrapped: launch checks and set-up (:mod:`.launch`)
``TrainingArguments.__init__``, ``__dataclass_fields__``,       ``--lr_scaling`` fields added: HfArgumentParser
``__annotations__``                                             reads fields + hints, ``__init__`` takes them
``TrainingArguments.accelerator_config`` accepts a dict with    set on a multi-process CPU DeepSpeed launch
``use_configured_state`` (read in ``_setup_devices``)           after creating Accelerate's gloo state first
``accelerate.state.PartialState._shared_state``                 a process state the script made is never replaced
``Trainer._created_lr_scheduler``                               set when we build the scheduler, as Trainer does
``state.log_history[-1]`` is the current log in ``on_log``      callbacks complete it (``trainer_state.json``)
``Trainer.get_decay_parameter_names`` reads nothing of ``self``  Trainer's decay rule for loops without a Trainer
``Trainer.get_batch_samples`` fetches one optimizer step's    overridden by ``LarsTrainer`` for
micro-batches; with ``gradient_accumulation_steps=1``           ``--batch_size_schedule``: one bundle of the
``_run_epoch`` steps once per fetched item                      ramp's micro-batches per step (:mod:`..batch_ramp`)
``Trainer.set_initial_training_values`` returns the epochs      the ramp raises the epoch count to cover the
to run (first of its tuple)                                     micro-batches its ``max_steps`` need
``accelerate.state.GradientState._set_sync_gradients``          set per micro-batch inside a bundle, as Trainer
                                                                does (DeepSpeed's boundary, the noise monitor)
=============================================================  =================================================
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import transformers
from packaging.version import Version
from transformers import Trainer

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "TESTED_TRANSFORMERS",
    "PRIVATE_NAMES",
    "check_transformers_version",
    "add_enum_member",
    "remove_enum_member",
    "enum_has_value",
    "set_scheduler_function",
    "remove_scheduler_function",
    "wrap_method",
    "unwrap_method",
    "is_wrapped",
    "mark_scheduler_created",
    "trainer_decay_parameter_names",
    "complete_last_log_entry",
    "process_state_exists",
    "set_sync_gradients",
]

#: The transformers versions :func:`check_transformers_version` accepts.
SUPPORTED_TRANSFORMERS = ">=4.46,<6"
#: The versions the test suite ran against.
TESTED_TRANSFORMERS: tuple[str, ...] = ("5.23", "5.24")
_MIN_VERSION, _MAX_VERSION = Version("4.46"), Version("6")

#: Every transformers (and Accelerate) object this module relies on, as ``(dotted name, what it must be)``.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("transformers.training_args.OptimizerNames._member_map_", "dict"),
    ("transformers.training_args.OptimizerNames._value2member_map_", "dict"),
    ("transformers.training_args.OptimizerNames._member_names_", "list"),
    ("transformers.trainer_utils.SchedulerType._member_map_", "dict"),
    ("transformers.trainer_utils.SchedulerType._value2member_map_", "dict"),
    ("transformers.trainer_utils.SchedulerType._member_names_", "list"),
    ("transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION", "dict"),
    ("transformers.Trainer.get_optimizer_cls_and_kwargs", "staticmethod"),
    ("transformers.Trainer.create_optimizer", "function"),
    ("transformers.Trainer.create_scheduler", "function"),
    ("transformers.Trainer.get_decay_parameter_names", "function"),
    ("transformers.TrainingArguments.__post_init__", "function"),
    ("transformers.TrainingArguments.__init__", "function"),
    ("transformers.TrainingArguments.__dataclass_fields__", "dict"),
    ("transformers.TrainingArguments.__annotations__", "dict"),
    ("transformers.TrainingArguments.accelerator_config", "field"),
    ("accelerate.state.PartialState._shared_state", "dict"),
    ("transformers.Trainer.get_batch_samples", "function"),
    ("transformers.Trainer.set_initial_training_values", "function"),
    ("accelerate.state.GradientState._set_sync_gradients", "function"),
)

_PATCH_MARK = "__hf_lars_original__"


def _installed_version() -> str:
    return transformers.__version__


def _resolve(dotted: str) -> Any:
    """The object at ``dotted`` (a class attribute is read from the class ``__dict__`` chain), or ``None``."""
    import accelerate.state
    from transformers import optimization, trainer_utils, training_args

    modules = {
        "accelerate.state": accelerate.state,
        "transformers.training_args": training_args,
        "transformers.trainer_utils": trainer_utils,
        "transformers.optimization": optimization,
        "transformers": transformers,
    }
    for prefix in sorted(modules, key=len, reverse=True):
        if dotted.startswith(prefix + "."):
            obj: Any = modules[prefix]
            for part in dotted[len(prefix) + 1 :].split("."):
                if isinstance(obj, type):
                    obj = next((c.__dict__[part] for c in obj.__mro__ if part in c.__dict__), None)
                else:
                    obj = getattr(obj, part, None)
                if obj is None:
                    return None
            return obj
    return None


_KINDS: dict[str, Callable[[Any], bool]] = {
    "dict": lambda obj: isinstance(obj, dict),
    "list": lambda obj: isinstance(obj, list),
    "staticmethod": lambda obj: isinstance(obj, staticmethod),
    "function": callable,
}


def _present(dotted: str, kind: str) -> bool:
    """Whether ``dotted`` is there, of ``kind`` (a ``"field"`` is a dataclass field of its class)."""
    if kind == "field":
        owner, _, name = dotted.rpartition(".")
        return name in (getattr(_resolve(owner), "__dataclass_fields__", None) or {})
    return _KINDS[kind](_resolve(dotted))


def check_transformers_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed one) is supported and every entry of
    :data:`PRIVATE_NAMES` is there, of the expected kind.  Touches nothing."""
    found = Version(version or _installed_version())
    if not _MIN_VERSION <= found < _MAX_VERSION:
        raise RuntimeError(
            f"hf_lars.register() supports transformers {SUPPORTED_TRANSFORMERS}, found {found}. Install a "
            f"supported version (pip install 'transformers{SUPPORTED_TRANSFORMERS}'), or build the optimizer "
            "yourself with hf_lars.create_optimizer(model, name) and pass Trainer(optimizers=(optimizer, scheduler))."
        )
    missing = [f"{kind} {name}" for name, kind in PRIVATE_NAMES if not _present(name, kind)]
    if missing:
        raise RuntimeError(
            f"hf_lars.register() cannot patch transformers {found}: missing {', '.join(missing)}. "
            f"Supported: transformers {SUPPORTED_TRANSFORMERS} (tested: {', '.join(TESTED_TRANSFORMERS)})"
        )


# ------------------------------------------------------------------------------------------- enums
def enum_has_value(enum_cls: type[Enum], value: str) -> bool:
    """Whether ``enum_cls`` (including members we added) has a member of value ``value``."""
    return value in enum_cls._value2member_map_


def add_enum_member(enum_cls: type[Enum], name: str, value: str) -> Enum:
    """Add a member to a ``str`` enum after its creation (what ``OptimizerNames(value)`` and iteration see)."""
    if name in enum_cls._member_map_:
        name = f"HF_LARS_{name}"
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def remove_enum_member(enum_cls: type[Enum], value: str) -> None:
    """Undo :func:`add_enum_member` (nothing if there is no such member)."""
    member = enum_cls._value2member_map_.pop(value, None)
    if member is None:
        return
    enum_cls._member_map_.pop(member._name_, None)
    if member._name_ in enum_cls._member_names_:
        enum_cls._member_names_.remove(member._name_)
    if enum_cls.__dict__.get(member._name_) is member:
        type.__delattr__(enum_cls, member._name_)


# -------------------------------------------------------------------------------------- schedulers
def set_scheduler_function(member: Enum, fn: Callable[..., Any]) -> None:
    """Make ``transformers.get_scheduler(member)`` call ``fn``."""
    from transformers import optimization

    optimization.TYPE_TO_SCHEDULER_FUNCTION[member] = fn


def remove_scheduler_function(member: Enum, fn: Callable[..., Any]) -> bool:
    """Remove ``member``'s scheduler function if it is ``fn``; whether it was."""
    from transformers import optimization

    if optimization.TYPE_TO_SCHEDULER_FUNCTION.get(member) is not fn:
        return False
    del optimization.TYPE_TO_SCHEDULER_FUNCTION[member]
    return True


# ----------------------------------------------------------------------------------------- methods
def wrap_method(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``cls.name`` by ``make(original)``, remembering the original for :func:`unwrap_method`.

    A ``staticmethod`` stays one: ``make`` receives and returns plain functions.
    """
    original = cls.__dict__[name]
    static = isinstance(original, staticmethod)
    func = original.__func__ if static else original
    wrapper = functools.wraps(func)(make(func))
    setattr(wrapper, _PATCH_MARK, original)
    setattr(cls, name, staticmethod(wrapper) if static else wrapper)


def _wrapper(cls: type, name: str) -> Any:
    attr = cls.__dict__.get(name)
    return attr.__func__ if isinstance(attr, staticmethod) else attr


def is_wrapped(cls: type, name: str) -> bool:
    """Whether :func:`wrap_method` replaced ``cls.name``."""
    return hasattr(_wrapper(cls, name), _PATCH_MARK)


def unwrap_method(cls: type, name: str) -> None:
    """Put back what :func:`wrap_method` replaced (nothing if it is not wrapped)."""
    if is_wrapped(cls, name):
        setattr(cls, name, getattr(_wrapper(cls, name), _PATCH_MARK))


# ------------------------------------------------------------------------------------ Trainer state
def mark_scheduler_created(trainer: Trainer) -> None:
    """Tell Trainer it built the scheduler (as its own ``create_scheduler`` does), so it rebuilds it later."""
    trainer._created_lr_scheduler = True


def trainer_decay_parameter_names(model: Any) -> list[str]:
    """Trainer's own decay rule (``Trainer.get_decay_parameter_names``) for a model without a Trainer.

    The method reads nothing of the Trainer, so it is called on a bare instance: one rule for every front door.
    """
    return list(Trainer.get_decay_parameter_names(object.__new__(Trainer), model))


def complete_last_log_entry(state: Any, logs: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
    """Add ``stats`` to the copy of ``logs`` Trainer appended to ``state.log_history`` just before ``on_log``.

    Only when the last entry is that copy (same step, same other values), so nothing else is changed.
    """
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        entry = state.log_history[-1]
        # `is` first: the entry holds the same objects, and a NaN (a diverged loss, a b_noise) is not == itself.
        if all(entry.get(k) is v or entry.get(k) == v for k, v in logs.items() if k not in stats):
            entry.update(stats)


# ------------------------------------------------------------------------------------ Accelerate state
def process_state_exists() -> bool:
    """Whether Accelerate's ``PartialState`` was created in this process (without creating one)."""
    from accelerate.state import PartialState

    return bool(PartialState._shared_state)


def set_sync_gradients(accelerator: Any, sync: bool) -> None:
    """Say whether the coming backward ends the optimizer step, as Trainer's loop does before each micro-batch."""
    accelerator.gradient_state._set_sync_gradients(sync)
