"""``--optim_args "k=v,k=v"`` for hf_lars optimizers: typed from the class signature, checked against it.

Keys with their own ``TrainingArguments`` flag (``lr``, ``weight_decay``, and ``betas``/``eps`` for the Adam
forms) are refused with the flag to use; every message lists the valid keys with their types and defaults.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from typing import Any

from hf_lars.registry import get_optimizer_info

__all__ = ["optimizer_hyperparameters", "is_adam_form", "parse_optim_args"]


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


def is_adam_form(hparams: dict[str, tuple[Any, Any]]) -> bool:
    """Whether the class takes ``betas`` (then ``--adam_beta1/2`` and ``--adam_epsilon`` map onto it)."""
    return "betas" in hparams


def _reserved_keys(hparams: dict[str, tuple[Any, Any]]) -> dict[str, str]:
    reserved = {"lr": "--learning_rate", "weight_decay": "--weight_decay"}
    if is_adam_form(hparams):
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
