"""Validation and records of hyper-parameters, shared by every rule (re-exported by :mod:`hf_lars.optim.base`).

Errors name the problem and the allowed values (torch.optim's ``Invalid momentum value: -1``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

__all__ = ["HyperParameters", "check_bool", "check_range", "constructor_defaults"]


def check_bool(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``ValueError("Invalid <name> value: ...")`` unless ``value`` is a bool (or None if ``optional``)."""
    if isinstance(value, bool) or (optional and value is None):
        return
    allowed = "True, False or None" if optional else "True or False"
    raise ValueError(f"Invalid {name} value: {value!r} (allowed: {allowed})")


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError("Invalid <name> value: <value> (allowed: ...)")`` unless ``value`` is in range."""
    lo_b, hi_b = ("(" if low_open else "["), (")" if high_open else "]")
    allowed = f"{lo_b}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi_b}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"Invalid {name} value: {value!r} (allowed range: {allowed})")


_H = TypeVar("_H", bound="HyperParameters")


@dataclasses.dataclass(frozen=True)
class HyperParameters:
    """Base of each rule's frozen hyper-parameter record: the functional entries (eager and fused) take one
    record instead of a keyword per hyper-parameter.  Field names are the param-group keys."""

    @classmethod
    def of_group(cls: type[_H], group: dict[str, Any]) -> _H:
        """The record of a param group (lists, e.g. ``betas`` read from JSON, become tuples: hashable)."""
        return cls(**{f.name: _frozen(group[f.name]) for f in dataclasses.fields(cls)})


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def constructor_defaults(arguments: dict[str, Any]) -> dict[str, Any]:
    """An optimizer constructor's arguments (its ``locals()`` before anything else) as its ``defaults``:
    every hyper-parameter and implementation flag is the group key of the same name."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}
