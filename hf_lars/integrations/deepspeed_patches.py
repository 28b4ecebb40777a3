"""Every patch of DeepSpeed internals hf_lars makes, and the private names each touches.

Tested with DeepSpeed 0.19.8.  :func:`install` is called by :func:`hf_lars.integrations.deepspeed.register`;
it checks each private name first and, if DeepSpeed has moved it, logs what it skipped instead of failing.

The one patch: DeepSpeed's stage-0 fp16/bf16 wrapper (``FP16_UnfusedOptimizer``, chosen for any client
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
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

__all__ = ["PATCHED_PRIVATE_NAMES", "TESTED_DEEPSPEED_VERSIONS", "install", "installed"]

logger = logging.getLogger(__name__)

# module, class, method: every private name of DeepSpeed this module replaces.
PATCHED_PRIVATE_NAMES: tuple[tuple[str, str, str], ...] = (
    ("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer", "initialize_optimizer_states"),
)
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
