"""Learning-rate schedules and batch-size scaling rules for large-batch training.

Warmup then polynomial decay
----------------------------
With ``W = num_warmup_steps``, ``T = num_training_steps`` and ``lr0`` the learning rate a parameter group
starts from, the learning rate at optimizer step ``t`` (``t = 0, 1, ...``) is::

    t <  W:       lr(t) = lr0 * warm(t)
                      linear:   warm(t) = warmup_start + (1 - warmup_start) * t / W
                      constant: warm(t) = warmup_start              (jumps to lr0 at t = W)
    W <= t < T:   lr(t) = lr_end + (lr0 - lr_end) * (1 - (t - W) / (T - W)) ** power
    t >= T:       lr(t) = lr_end

``warmup_start`` is a *fraction of lr0* (in ``[0, 1]``); ``lr_end`` is an *absolute* learning rate, the same
for every group, as in :func:`transformers.get_polynomial_decay_schedule_with_warmup`. With linear warmup
from 0 the two schedules agree exactly.

- Gradual (linear) and constant warmup: Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet
  in 1 Hour" (arXiv:1706.02677), Sec. 2.2. Constant warmup at ``lr0 / k`` for 5 epochs was their first try;
  gradual warmup from ``lr0 / k`` to ``lr0`` works better at batch 8k.
- Polynomial decay with ``power = 2``: You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional
  Networks" (arXiv:1708.03888), the LARS paper: ``lr = lr0 * (1 - t / T) ** 2``.

Batch-size scaling
------------------
Rescaling a learning rate for a new batch size is :func:`hf_lars.scaling.scaled_lr` (linear, sqrt, the SGD
and Adam/surge laws): the one function every front door calls.

Following the noise scale
-------------------------
:class:`OnlineLrScheduler` multiplies any step-driven schedule by a factor recomputed from the gradient noise
scale measured while training (:mod:`hf_lars.scaling.online`, ``--lr_scaling_online``).

Works under DeepSpeed ZeRO and Accelerate
-----------------------------------------
The schedule reads ``lr0`` from each parameter group (``group["initial_lr"]``, else ``group["lr"]``) and never
from ``optimizer.defaults``: DeepSpeed's ZeRO optimizers have no ``defaults`` (and Accelerate's wrapper around
them raises ``AttributeError`` on it), which is where ``transformers``' polynomial schedule crashes. ZeRO
optimizers are also not :class:`torch.optim.Optimizer` subclasses, which :class:`~torch.optim.lr_scheduler.LambdaLR`
requires; such objects are given a thin view that shares their ``param_groups`` (see
:func:`get_warmup_poly_schedule`).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

__all__ = [
    "WARMUP_KINDS",
    "warmup_poly_factor",
    "get_warmup_poly_schedule",
    "OnlineLrScheduler",
]

logger = logging.getLogger(__name__)

#: Allowed values of ``warmup``.
WARMUP_KINDS: tuple[str, ...] = ("linear", "constant")

# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer)")
    return int(value)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class _WarmupPoly:
    """The schedule's shape, validated once: what :func:`warmup_poly_factor` and every multiplier of
    :func:`get_warmup_poly_schedule` compute with."""

    num_warmup_steps: int
    num_training_steps: int
    power: float
    lr_end: float
    warmup: str
    warmup_start: float

    @classmethod
    def checked(
        cls, num_warmup_steps: Any, num_training_steps: Any, power: Any, lr_end: Any, warmup: Any, warmup_start: Any
    ) -> _WarmupPoly:
        """The shape, or ``ValueError`` naming the first argument out of range and its allowed range."""
        num_warmup_steps = _check_int("num_warmup_steps", num_warmup_steps)
        num_training_steps = _check_int("num_training_steps", num_training_steps)
        if num_training_steps <= 0:
            raise ValueError(f"Invalid num_training_steps: {num_training_steps} (must be > 0)")
        if num_warmup_steps < 0:
            raise ValueError(f"Invalid num_warmup_steps: {num_warmup_steps} (must be >= 0)")
        if num_warmup_steps >= num_training_steps:
            raise ValueError(
                f"Invalid num_warmup_steps: warmup >= total steps ({num_warmup_steps} >= num_training_steps="
                f"{num_training_steps}); num_warmup_steps must be in [0, num_training_steps)"
            )
        if not (_is_real(power) and power > 0):
            raise ValueError(f"Invalid power: {power!r} (must be a finite number > 0)")
        if not (_is_real(lr_end) and lr_end >= 0):
            raise ValueError(f"Invalid lr_end: {lr_end!r} (must be a finite number >= 0)")
        if warmup not in WARMUP_KINDS:
            raise ValueError(f"Invalid warmup: {warmup!r} (must be one of {', '.join(map(repr, WARMUP_KINDS))})")
        if not (_is_real(warmup_start) and 0.0 <= warmup_start <= 1.0):
            raise ValueError(f"Invalid warmup_start: {warmup_start!r} (must be a fraction of lr0 in [0, 1])")
        return cls(num_warmup_steps, num_training_steps, float(power), float(lr_end), warmup, float(warmup_start))

    def factor(self, step: int, lr0: float) -> float:
        """``lr(step) / lr0``, unchecked (the shape was checked once; ``lr0 >= lr_end`` by the caller)."""
        if lr0 == 0.0:
            return 0.0
        if step < self.num_warmup_steps:
            if self.warmup == "constant":
                return self.warmup_start
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.num_warmup_steps
        if step >= self.num_training_steps:
            return self.lr_end / lr0
        pct_remaining = 1.0 - (step - self.num_warmup_steps) / (self.num_training_steps - self.num_warmup_steps)
        return (self.lr_end + (lr0 - self.lr_end) * pct_remaining**self.power) / lr0


def _as_float(lr: Any) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


# ----------------------------------------------------------------------------------------------------------
# the schedule
# ----------------------------------------------------------------------------------------------------------
def warmup_poly_factor(
    step: int,
    num_warmup_steps: int,
    num_training_steps: int,
    lr0: float,
    power: float = 2.0,
    lr_end: float = 0.0,
    warmup: str = "linear",
    warmup_start: float = 0.0,
) -> float:
    """Multiplier ``m(t)`` of the warmup + poly-decay schedule, so that ``lr(t) = lr0 * m(t)``.

    A pure function (nanoGPT's ``get_lr`` style): no optimizer needed, and it is the function
    :func:`get_warmup_poly_schedule` hands to :class:`~torch.optim.lr_scheduler.LambdaLR`. With
    ``W = num_warmup_steps`` and ``T = num_training_steps``::

        t <  W:       lr(t) = lr0 * (warmup_start + (1 - warmup_start) * t / W)   # warmup="linear"
                      lr(t) = lr0 * warmup_start                                   # warmup="constant"
        W <= t < T:   lr(t) = lr_end + (lr0 - lr_end) * (1 - (t - W) / (T - W)) ** power
        t >= T:       lr(t) = lr_end

    Args:
        step: optimizer step ``t >= 0`` (the scheduler's ``last_epoch``).
        num_warmup_steps: ``W``, in ``[0, T)``.
        num_training_steps: ``T > 0``.
        lr0: the peak learning rate of the group (its ``initial_lr``); ``>= lr_end``. A group with
            ``lr0 == 0`` (which forces ``lr_end == 0``) gets multiplier ``0``.
        power: decay exponent ``> 0``; 2 in the LARS paper (You et al. 2017), 1 is linear decay.
        lr_end: absolute final learning rate ``>= 0``, reached at ``t = T`` and kept after.
        warmup: ``"linear"`` (Goyal et al. 2017's gradual warmup) or ``"constant"``.
        warmup_start: warmup level as a fraction of ``lr0``, in ``[0, 1]``: where linear warmup starts, or
            the level of constant warmup.

    Returns:
        ``lr(t) / lr0`` as a float.
    """
    shape = _WarmupPoly.checked(num_warmup_steps, num_training_steps, power, lr_end, warmup, warmup_start)
    step = _check_int("step", step)
    if step < 0:
        raise ValueError(f"Invalid step: {step} (must be >= 0)")
    lr0 = _as_float(lr0)
    if lr_end > lr0:
        raise ValueError(f"Invalid lr_end: {lr_end} > lr0={lr0} (lr_end must be <= lr0)")
    return shape.factor(step, lr0)


class _ParamGroupsView(Optimizer):
    """A :class:`torch.optim.Optimizer` face for an optimizer-like object that is not one.

    DeepSpeed's ZeRO optimizers (``DeepSpeedZeroOptimizer``, ``DeepSpeedZeroOptimizer_Stage3``) are plain
    objects with ``param_groups``, ``step``, ``state_dict`` and ``load_state_dict``, but
    :class:`~torch.optim.lr_scheduler.LRScheduler` refuses anything that is not an ``Optimizer``. The view
    shares the wrapped object's ``param_groups`` list (the same dicts), so learning rates the scheduler writes
    land in the wrapped optimizer. ``Optimizer.__init__`` is deliberately not called: the view owns no
    parameters and no state.

    The scheduler cannot see the wrapped optimizer's ``step`` calls, so its "lr_scheduler.step() before
    optimizer.step()" check is switched off (``_opt_called`` is always true).
    """

    _opt_called = True

    def __init__(self, wrapped: Any) -> None:  # noqa: D107 - no super().__init__ on purpose
        self._wrapped = wrapped
        self.defaults: dict[str, Any] = {}
        self.state: dict[Any, Any] = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._wrapped.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._wrapped.param_groups = value

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        return self._wrapped.step() if closure is None else self._wrapped.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        zero_grad = getattr(self._wrapped, "zero_grad", None)
        if zero_grad is not None:
            zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self._wrapped.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self._wrapped.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self._wrapped).__name__})"

    # Optimizer's pickling/repr helpers expect attributes set by Optimizer.__init__; keep them harmless.
    def __getstate__(self) -> dict[str, Any]:
        return {"_wrapped": self._wrapped, "defaults": self.defaults, "state": self.state}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _group_lr0(group: dict[str, Any]) -> float:
    return _as_float(group["initial_lr"] if "initial_lr" in group else group["lr"])


def get_warmup_poly_schedule(
    optimizer: Any,
    num_warmup_steps: int,
    num_training_steps: int,
    power: float = 2.0,
    lr_end: float = 0.0,
    warmup: str = "linear",
    warmup_start: float = 0.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Warmup (linear or constant) followed by polynomial decay, as a resumable ``LambdaLR``.

    For each parameter group with peak learning rate ``lr0`` (its ``initial_lr``, else its ``lr``)::

        t <  W:       lr(t) = lr0 * (warmup_start + (1 - warmup_start) * t / W)   # warmup="linear"
                      lr(t) = lr0 * warmup_start                                   # warmup="constant"
        W <= t < T:   lr(t) = lr_end + (lr0 - lr_end) * (1 - (t - W) / (T - W)) ** power
        t >= T:       lr(t) = lr_end

    Gradual/constant warmup follow Goyal et al. 2017 (arXiv:1706.02677); ``power=2`` is the poly decay of
    the LARS paper, You et al. 2017 (arXiv:1708.03888). With ``warmup="linear"``, ``warmup_start=0`` this is
    exactly :func:`transformers.get_polynomial_decay_schedule_with_warmup` (which defaults to ``power=1``),
    but multi-group aware and without reading ``optimizer.defaults``.

    Args:
        optimizer: a :class:`torch.optim.Optimizer`, or any object with a ``param_groups`` list of dicts
            (DeepSpeed ZeRO optimizers, which are not ``Optimizer`` subclasses and have no ``defaults``;
            they are wrapped in a view sharing their ``param_groups``). ``optimizer.defaults`` is never read.
        num_warmup_steps: ``W``, in ``[0, num_training_steps)``.
        num_training_steps: ``T > 0``, total optimizer steps.
        power: decay exponent ``> 0`` (2 = LARS paper, 1 = linear decay).
        lr_end: absolute final learning rate, ``0 <= lr_end <= lr0`` of every group.
        warmup: ``"linear"`` or ``"constant"``.
        warmup_start: warmup level as a fraction of ``lr0`` in ``[0, 1]`` (e.g. ``0.1`` starts linear
            warmup at ``lr0 / 10``; constant warmup at ``warmup_start * lr0``, then a jump to ``lr0`` at W).
        last_epoch: index of the last step when resuming (``-1`` for a fresh start), as in ``LambdaLR``.

    Returns:
        A :class:`torch.optim.lr_scheduler.LambdaLR` with one multiplier function per parameter group.
        Resume either with ``scheduler.load_state_dict(saved)`` or by passing ``last_epoch``.

    Raises:
        ValueError: on any out-of-range argument, naming it and the allowed range.
    """
    shape = _WarmupPoly.checked(num_warmup_steps, num_training_steps, power, lr_end, warmup, warmup_start)
    param_groups = getattr(optimizer, "param_groups", None)
    if param_groups is None or len(param_groups) == 0:
        raise ValueError(f"optimizer must have a non-empty param_groups list, got {type(optimizer).__name__}")
    lr0s = [_group_lr0(group) for group in param_groups]
    for index, lr0 in enumerate(lr0s):
        if lr_end > lr0:
            raise ValueError(
                f"Invalid lr_end: {lr_end} > lr={lr0} of param group {index} "
                "(lr_end is absolute and must be <= the lr of every param group)"
            )
    if warmup == "constant" and warmup_start == 0.0 and num_warmup_steps > 0:
        logger.warning(
            "warmup='constant' with warmup_start=0 keeps lr at 0 for the %d warmup steps; "
            "Goyal et al. use a fraction such as warmup_start=0.1",
            num_warmup_steps,
        )
    if not isinstance(optimizer, Optimizer):
        logger.debug("Wrapping %s in a param-group view for LambdaLR", type(optimizer).__name__)
        optimizer = _ParamGroupsView(optimizer)
    lr_lambdas = [partial(shape.factor, lr0=lr0) for lr0 in lr0s]
    return LambdaLR(optimizer, lr_lambdas, last_epoch=last_epoch)


class OnlineLrScheduler(LRScheduler):
    """A step-driven LR scheduler whose learning rates are multiplied by an online LR factor.

    The factor is a :class:`hf_lars.scaling.online.OnlineLrFactor` (``B_noise`` -> LR factor by the surge or
    SGD law, bounded and smoothed) or a :class:`hf_lars.scaling.ramp.BatchSizeRamp` (the LR of its current
    batch by the launch rule; :meth:`refresh` applies it after the ramp counted a step).  Each :meth:`step` puts back the wrapped scheduler's own LRs, steps it (so
    chainable schedulers compute from their own values, never from a multiplied one), then sets every
    group's ``lr`` to ``scheduler LR x factor``.  :meth:`update` folds in a new ``B_noise`` estimate and
    applies the new factor at once (the next optimizer step uses it).  :meth:`get_last_lr` returns the LRs
    the optimizer uses; :meth:`state_dict` holds the wrapped scheduler's state and the factor's, so a
    checkpoint resumes both.

    It is an :class:`~torch.optim.lr_scheduler.LRScheduler` (so ``accelerator.prepare`` and Trainer treat it
    as one) that does not run the base class's ``__init__``: the wrapped scheduler already made its initial
    step.  Trainer gets it from ``--lr_scaling_online`` (:mod:`hf_lars.integrations.online_lr`); a loop wraps
    its scheduler, keeps the reference, and calls :meth:`update` at logging steps::

        start = default_start_step(warmup_steps, monitor.estimator.beta)   # young estimates are not acted on
        online = OnlineLrScheduler(scheduler, OnlineLrFactor("surge", ref_batch=256, batch=global_batch,
                                                             start_step=start))
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, online)
        ...
        stats = monitor.compute()                      # GradientNoiseScaleMonitor: {"b_noise": ...}
        stats["lr_factor"] = online.update(stats.get("b_noise"), step=optimizer_steps_done)
    """

    def __init__(self, scheduler: Any, factor: Any) -> None:  # noqa: D107 - no super().__init__: see above
        if type(scheduler).__name__ in ("ReduceLROnPlateau", "GreedyLR"):
            raise ValueError(
                f"Online LR scaling composes with step-driven schedules; {type(scheduler).__name__} steps on "
                "metrics: use another --lr_scheduler_type"
            )
        if isinstance(scheduler, OnlineLrScheduler):
            raise ValueError("This scheduler already follows an online LR factor")
        self.scheduler = scheduler
        self.factor = factor
        self.optimizer = scheduler.optimizer
        self._apply()

    # The wrapped scheduler's step counters, read and written through (Accelerate's AcceleratedScheduler
    # advances ``_step_count`` on accumulation steps).
    @property
    def last_epoch(self) -> int:  # type: ignore[override]
        return self.scheduler.last_epoch

    @property
    def _step_count(self) -> int:
        return self.scheduler._step_count

    @_step_count.setter
    def _step_count(self, value: int) -> None:
        self.scheduler._step_count = value

    def _apply(self, factor: float | None = None) -> None:
        """Every group's ``lr`` = the wrapped scheduler's x ``factor`` (default: the current factor)."""
        factor = self.factor.factor if factor is None else factor
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr * factor

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._apply(1.0)  # the scheduler's own LRs back, so a chainable one steps from them
        self.scheduler.step(*args, **kwargs)
        self._apply()

    def update(self, b_noise: float | None, step: int | None = None) -> float:
        """Fold in an estimate logged after ``step`` optimizer steps, apply it now; the factor.

        See :meth:`~hf_lars.scaling.online.OnlineLrFactor.update` (``step`` is needed when the factor has a
        ``start_step``).
        """
        factor = self.factor.update(b_noise, step)
        self._apply()
        return factor

    def refresh(self) -> float:
        """Apply the factor as it is now (after the factor object moved, e.g. a batch-size ramp's step); it."""
        self._apply()
        return self.factor.factor

    def get_last_lr(self) -> list[Any]:
        """The learning rates the optimizer uses now (the wrapped scheduler's, times the factor)."""
        return [lr * self.factor.factor for lr in self.scheduler.get_last_lr()]

    def get_lr(self) -> list[Any]:
        return self.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "online_lr_factor": self.factor.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "online_lr_factor" not in state_dict:
            raise ValueError(
                "This scheduler state has no online LR factor: it was saved without --lr_scaling_online (or a "
                "--batch_size_* ramp); resume with the flags the checkpoint was trained with"
            )
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.factor.load_state_dict(state_dict["online_lr_factor"])
        self._apply()
