"""Hugging Face Trainer integration: ``--optim lars``, ``--lr_scheduler_type warmup_poly``, trust-ratio logs.

Three ways in, all reading the one registry (:mod:`hf_lars.registry`):

1. :func:`register` (also ``hf_lars.register()``): afterwards plain ``TrainingArguments``, ``HfArgumentParser``
   and ``Trainer`` accept every registry name for ``optim`` (``lars``, ``larc``, ``nlars``, ``adam_lars``,
   ``lamb``, ``ranger_lars``) and ``warmup_poly`` for ``lr_scheduler_type``.
2. ``hf-lars run SCRIPT.py [args]``: calls :func:`register`, then runs an unmodified script as ``__main__``.
3. :class:`LarsTrainingArguments` + :class:`LarsTrainer`: subclasses that need no patching at all.

What :func:`register` patches
-----------------------------
Supported: transformers ``>=4.46,<6`` (developed and tested against 5.23).  The version and the presence
of every object below are checked *before* anything is touched; a mismatch raises ``RuntimeError`` naming
the supported range.  Nothing else in transformers is modified, and every change is undone by
:func:`unregister`.

- ``transformers.training_args.OptimizerNames`` (a closed ``str`` enum that ``TrainingArguments.__post_init__``
  converts ``optim`` into and that ``HfArgumentParser`` turns into ``--optim`` choices): one member per
  registry name, e.g. ``OptimizerNames.LARS == "lars"``.  A value transformers already defines is left alone
  (transformers' own optimizer keeps the name).
- ``transformers.trainer_utils.SchedulerType`` (same for ``lr_scheduler_type``): member ``WARMUP_POLY``; and
  ``transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION[WARMUP_POLY]`` = :func:`create_warmup_poly_scheduler`,
  so ``get_scheduler`` (used by ``Trainer.create_scheduler``) builds
  :func:`hf_lars.schedule.get_warmup_poly_schedule`.  It never reads ``optimizer.defaults``, so it works when
  DeepSpeed wraps the optimizer.
- ``Trainer.get_optimizer_cls_and_kwargs`` (staticmethod) is wrapped: for an hf_lars name it returns
  ``(class, kwargs)`` from :func:`optimizer_cls_and_kwargs`; any other name goes to the original.
- ``Trainer.create_optimizer`` is wrapped: for an hf_lars name (and no optimizer given) it builds the
  optimizer with :func:`create_trainer_optimizer`: Trainer's own decay / no-decay split
  (``self.get_decay_parameter_names``, so subclass overrides count), as ``(name, tensor)`` groups, the
  no-decay group with ``adapt=False``; and it adds :class:`TrustRatioCallback`.  Other names go to the original.

Hyper-parameters: ``--learning_rate`` -> ``lr``; ``--weight_decay`` -> ``weight_decay`` of the decay group;
``--adam_beta1/2`` -> ``betas`` and ``--adam_epsilon`` -> ``eps`` for the Adam forms only (classes with
``betas``); ``--optim_args "k=v,k=v"`` sets any other constructor argument, typed from the class signature
(:func:`parse_optim_args`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from hf_lars.integrations.callbacks import (
    TrustRatioCallback,
    add_trust_ratio_callback,
    find_trust_ratio_optimizer,
)
from hf_lars.integrations.lr_scaling import LrScalingArguments, apply_lr_scaling
from hf_lars.optim import TrustRatioOptimizer
from hf_lars.registry import get_optimizer_info, list_optimizers

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "SCHEDULER_NAME",
    "WARMUP_POLY_KWARGS",
    "register",
    "unregister",
    "is_registered",
    "check_transformers_version",
    "hf_lars_optim_name",
    "optimizer_hyperparameters",
    "parse_optim_args",
    "optimizer_cls_and_kwargs",
    "trainer_param_groups",
    "create_trainer_optimizer",
    "create_warmup_poly_scheduler",
    "LarsTrainingArguments",
    "LarsTrainer",
    "TrustRatioCallback",
    "add_trust_ratio_callback",
]

logger = logging.getLogger(__name__)

#: The transformers versions :func:`register` supports (checked at call time).
SUPPORTED_TRANSFORMERS = ">=4.46,<6"
_MIN_VERSION, _MAX_VERSION = Version("4.46"), Version("6")
#: The scheduler name added to ``lr_scheduler_type``.
SCHEDULER_NAME = "warmup_poly"
#: ``lr_scheduler_kwargs`` accepted by ``warmup_poly`` (the tunables of ``get_warmup_poly_schedule``).
WARMUP_POLY_KWARGS = ("power", "lr_end", "warmup", "warmup_start")

# Values of OptimizerNames members that register() added (so that "ours" never hijacks transformers' names).
_ADDED_OPTIM_VALUES: set[str] = set()
_PATCH_MARK = "__hf_lars_original__"


class HfLarsName(str):
    """An hf_lars optimizer or scheduler name stored in :class:`LarsTrainingArguments`.

    A plain ``str`` that also has ``.value``, like transformers' enums, so code that reads
    ``args.optim.value`` or ``args.lr_scheduler_type.value`` (model cards) keeps working.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str(self)


# ------------------------------------------------------------------------------------------------ names
def _value(name: Any) -> Any:
    return name.value if isinstance(name, (Enum, HfLarsName)) else name


def hf_lars_optim_name(optim: Any) -> str | None:
    """The canonical registry name if ``optim`` (a string or an ``OptimizerNames`` member) is an hf_lars one.

    A name that transformers itself defines is never ours, even if the registry knows a spelling of it.
    """
    value = _value(optim)
    if not isinstance(value, str):
        return None
    builtin = value in OptimizerNames._value2member_map_ and value not in _ADDED_OPTIM_VALUES
    if builtin:
        return None
    try:
        return get_optimizer_info(value).name
    except ValueError:
        return None


def _is_warmup_poly(name: Any) -> bool:
    return _value(name) == SCHEDULER_NAME


def _valid_optim_names() -> list[str]:
    names = [m.value for m in OptimizerNames]
    return names + [n for n in list_optimizers() if n not in names]


def _valid_scheduler_names() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    names = [m.value for m in SchedulerType]
    return names + ([SCHEDULER_NAME] if SCHEDULER_NAME not in names else [])


# ------------------------------------------------------------------------------------ hyper-parameters
def optimizer_hyperparameters(cls: type) -> dict[str, tuple[Any, Any]]:
    """``{argument: (type hint, default)}`` of an optimizer class's constructor, ``params`` excluded.

    A required argument (``lr`` of LARS) has default ``inspect.Parameter.empty``.
    """
    hints = typing.get_type_hints(cls.__init__)
    out: dict[str, tuple[Any, Any]] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "params") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        out[name] = (hints.get(name, Any), param.default)
    return out


def _is_adam_form(hparams: dict[str, tuple[Any, Any]]) -> bool:
    return "betas" in hparams


def _reserved_keys(hparams: dict[str, tuple[Any, Any]]) -> dict[str, str]:
    reserved = {"lr": "--learning_rate", "weight_decay": "--weight_decay"}
    if _is_adam_form(hparams):
        reserved.update(betas="--adam_beta1 / --adam_beta2", eps="--adam_epsilon")
    return reserved


def _type_name(hint: Any) -> str:
    if hint is Any:
        return "value"
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return text or str(hint).replace("typing.", "")


def _describe_keys(hparams: dict[str, tuple[Any, Any]], reserved: dict[str, str]) -> str:
    parts = []
    for key, (hint, default) in hparams.items():
        if key in reserved:
            continue
        shown = "" if default is inspect.Parameter.empty else f", default {default!r}"
        parts.append(f"{key} ({_type_name(hint)}{shown})")
    return ", ".join(parts)


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _convert(raw: str, hint: Any, default: Any) -> Any:
    """Convert ``raw`` to ``hint`` (or the type of ``default`` when there is no hint); ``ValueError`` if it fails."""
    if hint is Any:
        hint = type(default) if default not in (None, inspect.Parameter.empty) else str
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(hint)
        if type(None) in options and raw.strip().lower() in ("none", "null"):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(raw, option, default)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    text = raw.strip()
    if hint is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("expected a boolean (true/false)")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an integer") from None
    if hint is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected a number") from None
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    if origin is tuple:
        items = [s for s in text.strip("()[]").replace(":", ",").replace(" ", ",").split(",") if s]
        args = typing.get_args(hint)
        item_types = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(items) != len(item_types):
            raise ValueError(f"expected {len(item_types)} values such as ({', '.join(['0.9'] * len(item_types))})")
        return tuple(_convert(item, t, None) for t, item in zip(item_types, items))
    if hint is str:
        return text
    raise ValueError(f"cannot parse a {_type_name(hint)} from text")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"betas=(0.9,0.99),k=5"`` -> ``["betas=(0.9,0.99)", "k=5"]``."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_optim_args(optim_args: str | None, optim: str) -> dict[str, Any]:
    """Parse ``--optim_args "trust_coefficient=0.002,momentum=0.95"`` for the hf_lars optimizer ``optim``.

    Values are typed from the class's constructor (``float``, ``int``, ``bool``, tuples such as
    ``betas=(0.9,0.99)`` or ``0.9:0.99``, ``none`` where ``None`` is allowed).  Keys that have their own
    TrainingArguments flag (``lr``, ``weight_decay``, and ``betas``/``eps`` for the Adam forms) are refused with
    the flag to use.  Range checks are the optimizer's own (at construction).

    Raises:
        ValueError: an unknown key, a malformed item or a value of the wrong type; the message lists the valid
            keys with their types and defaults.
    """
    if not optim_args:
        return {}
    info = get_optimizer_info(optim)
    hparams = optimizer_hyperparameters(info.cls)
    reserved = _reserved_keys(hparams)
    where = f"--optim_args for {info.name} ({info.cls.__name__})"
    valid = f"Valid keys: {_describe_keys(hparams, reserved)}"
    out: dict[str, Any] = {}
    for item in _split_top_level(optim_args):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"Malformed item {item!r} in {where}: expected key=value. {valid}")
        if key in reserved:
            raise ValueError(f"{key!r} cannot be set in {where}: use {reserved[key]}. {valid}")
        if key not in hparams:
            raise ValueError(f"Unknown key {key!r} in {where}. {valid}")
        hint, default = hparams[key]
        try:
            out[key] = _convert(raw, hint, default)
        except ValueError as err:
            raise ValueError(f"Invalid value {raw.strip()!r} for {key!r} in {where}: {err}. {valid}") from None
    return out


def optimizer_cls_and_kwargs(args: Any, optim: str | None = None) -> tuple[type[TrustRatioOptimizer], dict[str, Any]]:
    """``(class, constructor kwargs)`` for an hf_lars ``optim`` from TrainingArguments-like ``args``.

    Order of precedence (later wins): the registry name's defaults (``larc`` -> ``trust_clip=True``), the
    mapped TrainingArguments (``learning_rate``, ``weight_decay``, and ``adam_beta1/2``, ``adam_epsilon`` for
    classes with ``betas``), then ``optim_args``.
    """
    name = hf_lars_optim_name(args.optim) if optim is None else get_optimizer_info(optim).name
    if name is None:
        raise ValueError(
            f"{_value(args.optim)!r} is not an hf_lars optimizer. hf_lars names: {', '.join(list_optimizers())}"
        )
    info = get_optimizer_info(name)
    hparams = optimizer_hyperparameters(info.cls)
    kwargs: dict[str, Any] = dict(info.defaults)
    kwargs["lr"] = float(args.learning_rate)
    if "weight_decay" in hparams:
        kwargs["weight_decay"] = float(args.weight_decay)
    if _is_adam_form(hparams):
        kwargs["betas"] = (float(args.adam_beta1), float(args.adam_beta2))
        kwargs["eps"] = float(args.adam_epsilon)
    kwargs.update(parse_optim_args(getattr(args, "optim_args", None), name))
    return info.cls, kwargs


# ------------------------------------------------------------------------------------ optimizer creation
def trainer_param_groups(
    model: nn.Module, decay_parameter_names: Any, weight_decay: float
) -> list[dict[str, Any]]:
    """Trainer's two groups, as ``(name, tensor)`` pairs: decay (``weight_decay``) and no-decay.

    The no-decay group (biases, norm weights: whatever ``decay_parameter_names`` leaves out) gets
    ``weight_decay=0.0`` and ``adapt=False``: no trust ratio either.  Frozen parameters are skipped and empty
    groups dropped.
    """
    decay_names = set(decay_parameter_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(n, p) for n, p in named if n in decay_names], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in named if n not in decay_names], "weight_decay": 0.0, "adapt": False},
    ]
    return [g for g in groups if g["params"]]


def _per_layer_log(args: Any) -> bool:
    return bool(getattr(args, "trust_ratio_jsonl", True))


def _is_sharded(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))


def create_trainer_optimizer(trainer: Any, model: nn.Module | None = None) -> torch.optim.Optimizer:
    """Build ``trainer.optimizer`` for an hf_lars ``trainer.args.optim`` (what ``create_optimizer`` does for ours).

    Class and kwargs come from ``trainer.get_optimizer_cls_and_kwargs`` (so overrides count), the groups from
    :func:`trainer_param_groups` over ``trainer.get_decay_parameter_names``.  Adds a
    :class:`TrustRatioCallback` (per-layer JSONL unless ``args.trust_ratio_jsonl`` is false; gathered across
    ranks under DeepSpeed/FSDP) before the reporting integrations.
    """
    opt_model = trainer.model if model is None else model
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, opt_model)
    kwargs = dict(kwargs)
    kwargs.pop("params", None)
    groups = trainer_param_groups(
        opt_model, trainer.get_decay_parameter_names(opt_model), kwargs.get("weight_decay", trainer.args.weight_decay)
    )
    counts = [(len(g["params"]), "adapt" in g) for g in groups]
    trainer.optimizer = cls(groups, **kwargs)
    logger.info(
        "created %s (%s) with %d decay / %d no-decay (not adapted) tensors",
        cls.__name__,
        hf_lars_optim_name(trainer.args.optim),
        sum(n for n, no_decay in counts if not no_decay),
        sum(n for n, no_decay in counts if no_decay),
    )
    add_trust_ratio_callback(
        trainer, TrustRatioCallback(per_layer=_per_layer_log(trainer.args), gather=_is_sharded(trainer))
    )
    return trainer.optimizer


# ------------------------------------------------------------------------------------------- scheduler
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
    from hf_lars.schedule import get_warmup_poly_schedule

    unknown = sorted(set(scheduler_kwargs) - set(WARMUP_POLY_KWARGS))
    if unknown:
        raise ValueError(
            f"Unknown lr_scheduler_kwargs for {SCHEDULER_NAME}: {', '.join(unknown)}. "
            f"Valid keys: {', '.join(WARMUP_POLY_KWARGS)}"
        )
    if num_training_steps is None:
        raise ValueError(f"{SCHEDULER_NAME} requires num_training_steps (set --max_steps or --num_train_epochs)")
    return get_warmup_poly_schedule(
        optimizer,
        num_warmup_steps=int(num_warmup_steps or 0),
        num_training_steps=int(num_training_steps),
        **scheduler_kwargs,
    )


def _scheduler_kwargs(args: Any) -> dict[str, Any]:
    kwargs = args.lr_scheduler_kwargs or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"lr_scheduler_kwargs must be a dict or a JSON string, got {kwargs!r}")
    return dict(kwargs)


# ------------------------------------------------------------------------------------------- patching
def _installed_version() -> str:
    return transformers.__version__


def check_transformers_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed one) is in :data:`SUPPORTED_TRANSFORMERS`
    and the objects :func:`register` patches are where it expects them."""
    found = Version(version or _installed_version())
    if not _MIN_VERSION <= found < _MAX_VERSION:
        raise RuntimeError(
            f"hf_lars.register() supports transformers {SUPPORTED_TRANSFORMERS}, found {found}. Install a "
            f"supported version (pip install 'transformers{SUPPORTED_TRANSFORMERS}'), or build the optimizer "
            "yourself with hf_lars.create_optimizer(model, name) and pass Trainer(optimizers=(optimizer, scheduler))."
        )
    from transformers import optimization, trainer_utils

    missing = []
    if not isinstance(getattr(trainer_utils, "SchedulerType", None), type):
        missing.append("transformers.trainer_utils.SchedulerType")
    if not isinstance(getattr(optimization, "TYPE_TO_SCHEDULER_FUNCTION", None), dict):
        missing.append("transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION")
    if not isinstance(Trainer.__dict__.get("get_optimizer_cls_and_kwargs"), staticmethod):
        missing.append("staticmethod Trainer.get_optimizer_cls_and_kwargs")
    for method in ("create_optimizer", "get_decay_parameter_names", "create_scheduler"):
        if not callable(getattr(Trainer, method, None)):
            missing.append(f"Trainer.{method}")
    if missing:
        raise RuntimeError(
            f"hf_lars.register() cannot patch transformers {found}: missing {', '.join(missing)}. "
            f"Supported: transformers {SUPPORTED_TRANSFORMERS}"
        )


def _add_enum_member(enum_cls: type[Enum], name: str, value: str) -> Enum:
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


def _remove_enum_member(enum_cls: type[Enum], value: str) -> None:
    member = enum_cls._value2member_map_.pop(value, None)
    if member is None:
        return
    enum_cls._member_map_.pop(member._name_, None)
    if member._name_ in enum_cls._member_names_:
        enum_cls._member_names_.remove(member._name_)
    if enum_cls.__dict__.get(member._name_) is member:
        type.__delattr__(enum_cls, member._name_)


def is_registered() -> bool:
    """Whether :func:`register` is in effect."""
    return hasattr(Trainer.__dict__.get("create_optimizer"), _PATCH_MARK)


def _wrap_static_get_optimizer_cls_and_kwargs() -> None:
    original = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
    original_func = original.__func__

    @functools.wraps(original_func)
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model: Any = None) -> tuple[Any, Any]:
        name = hf_lars_optim_name(args.optim)
        if name is not None:
            return optimizer_cls_and_kwargs(args, name)
        return original_func(args, model)

    setattr(get_optimizer_cls_and_kwargs, _PATCH_MARK, original)
    Trainer.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def _wrap_create_optimizer() -> None:
    original = Trainer.__dict__["create_optimizer"]

    @functools.wraps(original)
    def create_optimizer(self: Trainer, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if (
            self.optimizer is None
            and getattr(self, "optimizer_cls_and_kwargs", None) is None
            and hf_lars_optim_name(self.args.optim) is not None
        ):
            return create_trainer_optimizer(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    setattr(create_optimizer, _PATCH_MARK, original)
    Trainer.create_optimizer = create_optimizer


# --lr_scaling for scripts that build plain TrainingArguments (set by `hf-lars run --lr_scaling ...`).
_LAUNCH_LR_SCALING: dict[str, Any] = {}


def set_launch_lr_scaling(lr_scaling: str, lr_scaling_ref_batch: int | None = None, b_noise: float | None = None) -> None:
    """Rescale the LR of every ``TrainingArguments`` built from now on (after :func:`register`).

    This is how ``hf-lars run SCRIPT.py --lr_scaling surge --lr_scaling_ref_batch 512 --b_noise 2e5 ...``
    reaches an unmodified script whose ``TrainingArguments`` do not know these flags: the command takes them
    off the script's arguments and calls this; the patched ``TrainingArguments.__post_init__`` then applies
    :func:`~hf_lars.integrations.lr_scaling.apply_lr_scaling` (``--learning_rate`` is the reference LR).
    ``lr_scaling="none"`` turns it off.  Validated when the arguments are built.
    """
    _LAUNCH_LR_SCALING.clear()
    if lr_scaling != "none":
        _LAUNCH_LR_SCALING.update(lr_scaling=lr_scaling, lr_scaling_ref_batch=lr_scaling_ref_batch, b_noise=b_noise)


def _wrap_training_arguments_post_init() -> None:
    original = TrainingArguments.__dict__["__post_init__"]

    @functools.wraps(original)
    def __post_init__(self: TrainingArguments) -> None:
        original(self)
        if _LAUNCH_LR_SCALING and not isinstance(self, LrScalingArguments):
            for key, value in _LAUNCH_LR_SCALING.items():
                object.__setattr__(self, key, value)
            apply_lr_scaling(self, self.world_size)

    setattr(__post_init__, _PATCH_MARK, original)
    TrainingArguments.__post_init__ = __post_init__


def register() -> None:
    """Make the registry's optimizer names and ``warmup_poly`` usable by transformers (see the module docstring).

    Idempotent.  Raises ``RuntimeError`` on an unsupported transformers version before touching anything.
    """
    if is_registered():
        return
    check_transformers_version()
    from transformers import optimization
    from transformers.trainer_utils import SchedulerType

    for name in list_optimizers():
        if name in OptimizerNames._value2member_map_:
            logger.warning(
                "transformers already defines optim=%r; it keeps its meaning there (hf_lars's is "
                "hf_lars.create_optimizer(model, %r))",
                name,
                name,
            )
            continue
        _add_enum_member(OptimizerNames, name.upper(), name)
        _ADDED_OPTIM_VALUES.add(name)
    if SCHEDULER_NAME not in SchedulerType._value2member_map_:
        member = _add_enum_member(SchedulerType, SCHEDULER_NAME.upper(), SCHEDULER_NAME)
        optimization.TYPE_TO_SCHEDULER_FUNCTION[member] = create_warmup_poly_scheduler
    _wrap_static_get_optimizer_cls_and_kwargs()
    _wrap_create_optimizer()
    _wrap_training_arguments_post_init()
    logger.info(
        "hf_lars: registered --optim %s and --lr_scheduler_type %s", ", ".join(sorted(_ADDED_OPTIM_VALUES)), SCHEDULER_NAME
    )


def unregister() -> None:
    """Undo :func:`register` (for tests and for code that must hand back an untouched transformers)."""
    if not is_registered():
        return
    from transformers import optimization
    from transformers.trainer_utils import SchedulerType

    Trainer.create_optimizer = getattr(Trainer.__dict__["create_optimizer"], _PATCH_MARK)
    TrainingArguments.__post_init__ = getattr(TrainingArguments.__dict__["__post_init__"], _PATCH_MARK)
    _LAUNCH_LR_SCALING.clear()
    Trainer.get_optimizer_cls_and_kwargs = getattr(
        Trainer.__dict__["get_optimizer_cls_and_kwargs"].__func__, _PATCH_MARK
    )
    member = SchedulerType._value2member_map_.get(SCHEDULER_NAME)
    if member is not None and optimization.TYPE_TO_SCHEDULER_FUNCTION.get(member) is create_warmup_poly_scheduler:
        del optimization.TYPE_TO_SCHEDULER_FUNCTION[member]
        _remove_enum_member(SchedulerType, SCHEDULER_NAME)
    for value in sorted(_ADDED_OPTIM_VALUES):
        _remove_enum_member(OptimizerNames, value)
    _ADDED_OPTIM_VALUES.clear()


# ------------------------------------------------------------------------------- the no-patching route
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
            "choices": _valid_optim_names(),
        },
    )
    lr_scheduler_type: str = field(
        default=SCHEDULER_NAME,
        metadata={
            "help": "The learning rate scheduler: a transformers name or 'warmup_poly' (warmup then poly decay; "
            'set power/lr_end/warmup/warmup_start with --lr_scheduler_kwargs \'{"power": 2.0}\').',
            "choices": _valid_scheduler_names(),
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
        optim = _value(self.optim)
        ours = hf_lars_optim_name(optim)
        if ours is None and optim not in OptimizerNames._value2member_map_:
            raise ValueError(f"Unknown optim {optim!r}. Valid names: {', '.join(_valid_optim_names())}")
        warmup_poly = _is_warmup_poly(self.lr_scheduler_type)
        scheduler = _value(self.lr_scheduler_type)
        if not warmup_poly and scheduler not in _valid_scheduler_names():
            raise ValueError(
                f"Unknown lr_scheduler_type {scheduler!r}. Valid names: {', '.join(_valid_scheduler_names())}"
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
            cls, kwargs = optimizer_cls_and_kwargs(self, ours)
            cls([torch.zeros(2, 2, requires_grad=True)], **kwargs)  # range checks now, not at train time
        if warmup_poly:
            self.lr_scheduler_type = HfLarsName(SCHEDULER_NAME)
            unknown = sorted(set(_scheduler_kwargs(self)) - set(WARMUP_POLY_KWARGS))
            if unknown:
                raise ValueError(
                    f"Unknown lr_scheduler_kwargs for {SCHEDULER_NAME}: {', '.join(unknown)}. "
                    f"Valid keys: {', '.join(WARMUP_POLY_KWARGS)}"
                )
        apply_lr_scaling(self, self.world_size)


class LarsTrainer(Trainer):
    """``Trainer`` that builds hf_lars optimizers and the ``warmup_poly`` schedule itself (no patching).

    With an hf_lars ``args.optim`` (from :class:`LarsTrainingArguments`, or plain ``TrainingArguments`` after
    :func:`register`) it creates the optimizer like the patched ``Trainer``: Trainer's decay / no-decay split
    as named groups, the no-decay group not adapted.  A :class:`TrustRatioCallback` is added whenever the
    optimizer is an hf_lars one, including one passed in ``optimizers=(optimizer, scheduler)``.  Any other
    ``optim``/scheduler behaves exactly as in ``Trainer``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if find_trust_ratio_optimizer(self.optimizer) is not None:
            add_trust_ratio_callback(
                self, TrustRatioCallback(per_layer=_per_layer_log(self.args), gather=_is_sharded(self))
            )

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model: Any = None) -> tuple[Any, Any]:
        name = hf_lars_optim_name(args.optim)
        if name is not None:
            return optimizer_cls_and_kwargs(args, name)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if (
            self.optimizer is None
            and getattr(self, "optimizer_cls_and_kwargs", None) is None
            and hf_lars_optim_name(self.args.optim) is not None
        ):
            return create_trainer_optimizer(self, *args, **kwargs)
        return super().create_optimizer(*args, **kwargs)

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None and _is_warmup_poly(self.args.lr_scheduler_type):
            self.lr_scheduler = create_warmup_poly_scheduler(
                self.optimizer if optimizer is None else optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                **_scheduler_kwargs(self.args),
            )
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

