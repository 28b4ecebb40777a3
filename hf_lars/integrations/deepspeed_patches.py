"""Every hf_lars wrap of a DeepSpeed function, in one place: the table, the check, the wrap.

DeepSpeed resolves an ``"optimizer": {"type": ...}`` it does not know with a bare ``AssertionError``
(``LARSS is not a supported DeepSpeed Optimizer``) deep inside engine construction.  There is no hook at the
point it resolves the name, so :func:`wrap_initialize` wraps the public ``deepspeed.initialize`` (which
Trainer, Accelerate and user code all call through the ``deepspeed`` module attribute) with a check that runs
first and raises :func:`hf_lars.integrations.deepspeed.check_config`'s ``ValueError`` instead.  Only names
DeepSpeed would reject anyway are refused.

Tested with DeepSpeed :data:`TESTED_DEEPSPEED`.

===============================================  ===============================================================
what                                             why
===============================================  ===============================================================
``deepspeed.initialize(args, ..., config,        wrapped: the config (``config`` / ``config_params`` /
config_params)``                                 ``args.deepspeed_config``) is checked before DeepSpeed reads it
===============================================  ===============================================================
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["TESTED_DEEPSPEED", "PRIVATE_NAMES", "check_deepspeed", "wrap_initialize", "unwrap_initialize", "is_wrapped"]

logger = logging.getLogger(__name__)

#: The DeepSpeed versions the test suite ran against.
TESTED_DEEPSPEED: tuple[str, ...] = ("0.19.8",)
#: What :func:`wrap_initialize` relies on: ``deepspeed.initialize`` taking these keyword arguments.
PRIVATE_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("deepspeed.initialize", ("args", "config", "config_params")),
)

_MARK = "__hf_lars_original__"


def check_deepspeed() -> bool:
    """Whether ``deepspeed.initialize`` has the arguments :func:`wrap_initialize` reads (logged when not)."""
    import deepspeed

    for _, params in PRIVATE_NAMES:
        found = set(inspect.signature(getattr(deepspeed, "initialize")).parameters)
        missing = [p for p in params if p not in found]
        if missing:
            logger.warning(
                "hf_lars: deepspeed.initialize of DeepSpeed %s lacks %s; unknown optimizer types are left to "
                "DeepSpeed's own message (tested: %s)", deepspeed.__version__, missing, ", ".join(TESTED_DEEPSPEED)
            )
            return False
    return True


def _config_of(bound: inspect.BoundArguments) -> Any:
    """The config ``deepspeed.initialize`` will use, by its own precedence (``args.deepspeed_config`` wins)."""
    given = bound.arguments
    config = given.get("config")
    if config is None:
        config = given.get("config_params")
    return getattr(given.get("args"), "deepspeed_config", None) or config


def wrap_initialize(check: Callable[[Any], None]) -> None:
    """Make ``deepspeed.initialize`` call ``check(config)`` first.  Idempotent; a no-op without DeepSpeed."""
    import deepspeed

    if is_wrapped() or not check_deepspeed():
        return
    original = deepspeed.initialize
    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        try:
            config = _config_of(signature.bind_partial(*args, **kwargs))
        except TypeError:  # DeepSpeed reports bad arguments itself
            config = None
        if config is not None:
            check(config)
        return original(*args, **kwargs)

    setattr(initialize, _MARK, original)
    deepspeed.initialize = initialize


def is_wrapped() -> bool:
    """Whether :func:`wrap_initialize` is in effect."""
    import deepspeed

    return hasattr(deepspeed.initialize, _MARK)


def unwrap_initialize() -> None:
    """Put back the original ``deepspeed.initialize``."""
    import deepspeed

    if is_wrapped():
        deepspeed.initialize = getattr(deepspeed.initialize, _MARK)
