"""Every hf_lars patch or wrap of DeepSpeed, in one place: the names each touches, the check, the patch.

Tested with DeepSpeed :data:`TESTED_DEEPSPEED_VERSIONS`.  :func:`hf_lars.integrations.deepspeed.register`
installs both when DeepSpeed is installed; each checks its names first and, if DeepSpeed moved them, logs
what it skipped instead of failing.

===============================================================  =================================================
what                                                             why
===============================================================  =================================================
``FP16_UnfusedOptimizer.initialize_optimizer_states`` (private,  stage-0 fp16/bf16 creates state by a zero-gradient
:data:`PATCHED_PRIVATE_NAMES`; :func:`install`)                  ``step()``: routed to ``initialize_state()``
``deepspeed.initialize`` (public, wrapped; its arguments in      an unknown ``"optimizer": {"type": ...}`` gets
:data:`WRAPPED_FUNCTIONS`; :func:`wrap_initialize`)              ``check_config``'s message, not a bare assert
===============================================================  =================================================

*The stage-0 patch.*  DeepSpeed's stage-0 fp16/bf16 wrapper (``FP16_UnfusedOptimizer``, chosen for any client
optimizer that is not ``FusedAdam``, including bf16 without ZeRO) creates optimizer state at
``deepspeed.initialize`` by setting every gradient to zero and calling ``step()`` once
(``initialize_optimizer_states``).  For a rule with decoupled weight decay inside the trust ratio that
zero-gradient step is not a no-op: AdamLARS takes ``u = wd * w``, ``rho = 1 / wd`` and so ``w -= lr * w``,
and it counts step 1 (bias correction and schedules then start one step late).  The patch routes that call
to :meth:`~hf_lars.optim.base.TrustRatioOptimizer.initialize_state`, which creates the same state without
stepping; other optimizers keep DeepSpeed's behaviour.  No public hook exists for this (the wrapper is
built inside ``deepspeed.initialize``), and detecting an all-zero gradient inside ``step()`` would cost a
host sync or extra passes on every real step.  ``FP16_Optimizer`` (the fused wrapper) makes the same call
but is only chosen for ``FusedAdam``; ZeRO-1/2/3 set zero gradients without stepping.

*The initialize wrap.*  DeepSpeed resolves an ``"optimizer": {"type": ...}`` it does not know with a bare
``AssertionError`` (``LARSS is not a supported DeepSpeed Optimizer``) deep inside engine construction.  There
is no hook at the point it resolves the name, so :func:`wrap_initialize` wraps the public
``deepspeed.initialize`` (which Trainer, Accelerate and user code all call through the ``deepspeed`` module
attribute) with a check that runs first and raises :func:`hf_lars.integrations.deepspeed.check_config`'s
``ValueError`` instead.  Only names DeepSpeed would reject anyway are refused.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

__all__ = [
    "PATCHED_PRIVATE_NAMES",
    "WRAPPED_FUNCTIONS",
    "TESTED_DEEPSPEED_VERSIONS",
    "install",
    "installed",
    "check_deepspeed",
    "wrap_initialize",
    "unwrap_initialize",
    "is_wrapped",
]

logger = logging.getLogger(__name__)

#: module, class, method: every private name of DeepSpeed that :func:`install` replaces.
PATCHED_PRIVATE_NAMES: tuple[tuple[str, str, str], ...] = (
    ("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer", "initialize_optimizer_states"),
)
#: What :func:`wrap_initialize` relies on: ``deepspeed.initialize`` taking these keyword arguments.
WRAPPED_FUNCTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("deepspeed.initialize", ("args", "config", "config_params")),
)
#: The DeepSpeed versions the test suite ran against.
TESTED_DEEPSPEED_VERSIONS = ("0.19.8",)

_MARK = "_hf_lars_original"


def _route_state_initialisation(original: Any) -> Any:
    @functools.wraps(original)
    def initialize_optimizer_states(self: Any) -> None:
        from hf_lars.optim.base import TrustRatioOptimizer

        if isinstance(self.optimizer, TrustRatioOptimizer):
            self.optimizer.initialize_state()  # the state of a first step, without the step
            return
        original(self)

    setattr(initialize_optimizer_states, _MARK, original)
    return initialize_optimizer_states


def install() -> list[str]:
    """Install the patches (idempotent); returns the dotted names patched.  A no-op without DeepSpeed."""
    done = []
    for module_name, cls_name, attr in PATCHED_PRIVATE_NAMES:
        dotted = f"{module_name}.{cls_name}.{attr}"
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
            current = getattr(cls, attr)
        except (ImportError, AttributeError):
            logger.warning(
                "hf_lars: %s not found (DeepSpeed changed; tested with %s): stage-0 fp16/bf16 will take one "
                "zero-gradient step at initialize", dotted, ", ".join(TESTED_DEEPSPEED_VERSIONS)
            )
            continue
        if not hasattr(current, _MARK):
            setattr(cls, attr, _route_state_initialisation(current))
        done.append(dotted)
    return done


def installed() -> bool:
    """Whether every patch is in place."""
    try:
        return all(
            hasattr(getattr(getattr(importlib.import_module(m), c), a), _MARK) for m, c, a in PATCHED_PRIVATE_NAMES
        )
    except (ImportError, AttributeError):
        return False


def check_deepspeed() -> bool:
    """Whether ``deepspeed.initialize`` has the arguments :func:`wrap_initialize` reads (logged when not)."""
    import deepspeed

    for _, params in WRAPPED_FUNCTIONS:
        found = set(inspect.signature(getattr(deepspeed, "initialize")).parameters)
        missing = [p for p in params if p not in found]
        if missing:
            logger.warning(
                "hf_lars: deepspeed.initialize of DeepSpeed %s lacks %s; unknown optimizer types are left to "
                "DeepSpeed's own message (tested: %s)", deepspeed.__version__, missing, ", ".join(TESTED_DEEPSPEED_VERSIONS)
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
