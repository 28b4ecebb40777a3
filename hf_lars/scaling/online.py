r"""Online learning-rate scaling: the LR follows the gradient noise scale measured while training.

The surge paper's second finding (Li et al. 2024, arXiv 2405.14578) is that ``B_noise`` grows during
training, so the batch size at which Adam's optimal LR peaks moves up.  A run launched at a batch ``B`` with an
LR scaled for the ``B_noise`` known at launch therefore drifts away from the law's optimum.  Here the LR is
re-derived at every logging step from the online estimate ``B_noise(t)`` (the
:class:`~hf_lars.integrations.noise_monitor.GradientNoiseScaleMonitor`'s ``b_noise``) by the same law the
launch used (:func:`hf_lars.scaling.scaled_lr`)::

    law(b)    = scaled_lr(rule, ref_batch, 1.0, batch, b)        # the law's LR factor at B_noise = b
    target(t) = clamp(law(B_noise(t)) / law(B_noise_0), min_factor, max_factor)
    factor(t) = exp(smoothing * ln factor(t-1) + (1 - smoothing) * ln target(t))      factor(0) = 1
    lr(t)     = schedule(t) * factor(t)

``B_noise_0`` is the launch's ``--b_noise``: the launch LR (the schedule's peak) already carries
``law(B_noise_0)``, so the factor is relative to it.  Without a launch value the launch LR is the reference
LR and ``law(B_noise_0)`` counts as 1: the factor then carries the whole rescaling.  The bounds are on the
factor, so the run's LR stays within ``[min_factor, max_factor]`` x the LR it was launched with.  A
non-finite or non-positive estimate (``B_simple`` is a ratio of two noisy estimators and can be negative
early on) changes nothing and is counted in ``skipped``.

**Young estimates are not acted on.**  An estimate logged before optimizer step ``start_step`` is measured (the
monitor's EMAs keep it) but leaves the factor at 1 (counted in ``waited``).  The first estimates average a few
steps of two noisy norms, and ``B_noise`` moves fastest while the LR warms up: on the LM task of
docs/results.md part 7 the estimate after 4 steps read 3x what it read 20 steps later.
:func:`default_start_step` is the front doors' default: the later of the LR warmup's end and the EMA's window,
``steps_per_estimate / (1 - beta)`` optimizer steps (100 for the monitor's ``beta = 0.99``; under DeepSpeed the
EMA folds one estimate per logging step, so the window is ``logging_steps`` times longer).

Only the laws that depend on ``B_noise`` (``surge``/``adam`` and ``sgd``) can follow it; ``linear``,
``sqrt`` and ``none`` are fixed at launch (``ValueError`` says so).

:class:`hf_lars.schedule.OnlineLrScheduler` composes the factor with any step-driven LR scheduler (it
multiplies what the scheduler sets and saves the factor in the scheduler's ``state_dict``, so checkpoints carry
it).  This module is plain Python like the rest of :mod:`hf_lars.scaling`; the Trainer side is
:mod:`hf_lars.integrations.online_lr`.
"""

from __future__ import annotations

import math
from typing import Any

from hf_lars.scaling._common import _check_saved_settings, _start_step, _waits_for_start
from hf_lars.scaling._common import _positive_number as _positive
from hf_lars.scaling.laws import B_NOISE_RULES, RULES, canonical_rule, scaled_lr

__all__ = ["ONLINE_RULES", "OnlineLrFactor", "default_start_step"]

#: The rule names (aliases included) whose LR depends on ``B_noise``: the only ones an online estimate can move
#: (``laws.B_NOISE_RULES`` decides; this is how they are spelled in messages).
ONLINE_RULES: tuple[str, ...] = ("surge", "adam", "sgd")


def default_start_step(warmup_steps: int, beta: float, steps_per_estimate: int = 1) -> int:
    """The first optimizer step whose ``B_noise`` estimate is acted on, by default (module docstring).

    ``max(warmup_steps, ceil(steps_per_estimate / (1 - beta)))``: the LR warmup has ended and the estimate's
    EMA (coefficient ``beta``, one estimate folded every ``steps_per_estimate`` optimizer steps) has seen about
    one window of them.
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (must be a non-negative integer)")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"Invalid beta: {beta!r} (the noise scale's EMA coefficient, in [0, 1))")
    if isinstance(steps_per_estimate, bool) or not isinstance(steps_per_estimate, int) or steps_per_estimate < 1:
        raise ValueError(f"Invalid steps_per_estimate: {steps_per_estimate!r} (must be a positive integer)")
    return max(warmup_steps, math.ceil(steps_per_estimate / (1.0 - beta) - 1e-9))


class OnlineLrFactor:
    """The LR factor of the module docstring: updated from ``B_noise`` estimates, bounded and smoothed.

    Args:
        rule: ``"surge"`` (alias ``"adam"``) or ``"sgd"``.
        ref_batch: the global batch the reference LR was tuned at.
        batch: this run's global batch.
        b_noise: the launch's ``B_noise`` (what the launch LR was scaled with); ``None``: the launch LR is the
            reference LR.
        min_factor, max_factor: bounds of the factor (``0 < min_factor <= 1 <= max_factor``).
        smoothing: weight of the previous factor in the log-space average (``0 <= smoothing < 1``; 0 follows
            each estimate at once; the estimate itself is already an EMA of ~1/(1-beta) steps).
        start_step: estimates logged before this many optimizer steps leave the factor at 1 (module
            docstring; :meth:`update` then needs the ``step``).  0 acts on the first.  Trainer and ``hf-lars``
            default to :func:`default_start_step`; a hand-built factor should pass it too.
    """

    def __init__(
        self,
        rule: str,
        *,
        ref_batch: float,
        batch: float,
        b_noise: float | None = None,
        min_factor: float = 0.25,
        max_factor: float = 4.0,
        smoothing: float = 0.0,
        start_step: int = 0,
    ) -> None:
        if str(rule).strip().lower() not in RULES or canonical_rule(rule) not in B_NOISE_RULES:
            raise ValueError(
                f"Online LR scaling follows B_noise, which only the rules {', '.join(ONLINE_RULES)} depend on; "
                f"got {rule!r} (its LR is fixed at launch: drop the online switch, or use surge or sgd)"
            )
        self.rule = canonical_rule(rule)
        self.ref_batch = _positive("ref_batch", ref_batch)
        self.batch = _positive("batch", batch)
        self.launch_b_noise = _positive("b_noise", b_noise, optional=True)
        low, high = _positive("min_factor", min_factor), _positive("max_factor", max_factor)
        if not low <= 1.0 <= high:
            raise ValueError(
                f"Invalid factor bounds [{min_factor!r}, {max_factor!r}]: need min_factor <= 1 <= max_factor "
                "(the factor starts at 1, the launch LR)"
            )
        self.min_factor, self.max_factor = low, high
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"Invalid smoothing: {smoothing!r} (must be in [0, 1))")
        self.smoothing = float(smoothing)
        self.start_step = _start_step(start_step)
        self._launch_law = 1.0 if self.launch_b_noise is None else self.law(self.launch_b_noise)
        self.factor = 1.0
        self.b_noise: float | None = None  # the last estimate used
        self.updates = 0
        self.skipped = 0
        self.waited = 0  # estimates before start_step

    def law(self, b_noise: float) -> float:
        """``scaled_lr(rule, ref_batch, 1.0, batch, b_noise)``: the law's LR factor for this run's batch."""
        return float(scaled_lr(self.rule, self.ref_batch, 1.0, self.batch, b_noise))

    def update(self, b_noise: float | None, step: int | None = None) -> float:
        """Fold in one ``B_noise`` estimate logged after ``step`` optimizer steps; the new factor.

        ``None``/non-finite/non-positive: skipped.  ``step < start_step``: waited (the factor stays).  ``step``
        may be left out only when ``start_step`` is 0.
        """
        if _waits_for_start(self.start_step, step, "OnlineLrFactor"):
            self.waited += 1
            return self.factor
        if b_noise is None or isinstance(b_noise, bool) or not math.isfinite(b_noise) or b_noise <= 0:
            self.skipped += 1
            return self.factor
        target = min(max(self.law(float(b_noise)) / self._launch_law, self.min_factor), self.max_factor)
        log_factor = self.smoothing * math.log(self.factor) + (1.0 - self.smoothing) * math.log(target)
        self.factor = min(max(math.exp(log_factor), self.min_factor), self.max_factor)
        self.b_noise = float(b_noise)
        self.updates += 1
        return self.factor

    def _config(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "ref_batch": self.ref_batch,
            "batch": self.batch,
            "launch_b_noise": self.launch_b_noise,
            "min_factor": self.min_factor,
            "max_factor": self.max_factor,
            "smoothing": self.smoothing,
            "start_step": self.start_step,
        }

    def state_dict(self) -> dict[str, Any]:
        """The factor, the last estimate, the counters and the settings they were computed with."""
        return {**self._config(), "factor": self.factor, "b_noise": self.b_noise, "updates": self.updates,
                "skipped": self.skipped, "waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if it was saved with other settings (e.g. another batch)."""
        _check_saved_settings(self._config(), state, "online LR factor was computed with",
                              "resume with the same --lr_scaling flags and global batch, or start a fresh run")
        self.factor = float(state["factor"])
        self.b_noise = state["b_noise"]
        self.updates = int(state["updates"])
        self.skipped = int(state["skipped"])
        self.waited = int(state["waited"])

    def __repr__(self) -> str:
        return f"OnlineLrFactor(rule={self.rule!r}, factor={self.factor:.4g}, b_noise={self.b_noise!r})"
