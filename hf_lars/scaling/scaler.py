r"""Rescale a known-good learning rate to a new global batch size.

``lr(B) = ref_lr * eps_opt(B) / eps_opt(B_ref)``: only the *shape* of the law matters (``eps_max`` cancels),
so one reference run plus ``B_noise`` (given, measured with :class:`~hf_lars.scaling.noise.GradientNoiseScale`,
or fitted with :func:`~hf_lars.scaling.fit.fit_surge`) is enough.  See :mod:`hf_lars.scaling.laws` for the laws.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import ClassVar

import numpy as np

from hf_lars.scaling._common import ArrayLike, _as_positive, _as_positive_float, _like_input
from hf_lars.scaling.fit import SurgeFit
from hf_lars.scaling.laws import B_NOISE_RULES, _log_ratio, canonical_rule

__all__ = ["ExtrapolationWarning", "BatchSizeScaler", "AdamBatchSizeScaler", "SGDBatchSizeScaler"]

logger = logging.getLogger(__name__)


class ExtrapolationWarning(UserWarning):
    """A batch size outside the range the law was fitted on."""


class BatchSizeScaler:
    r"""LR for any global batch size from a reference ``(ref_batch, ref_lr)`` and a scaling rule.

    ``lr(B) = ref_lr * f(B) / f(B_ref)`` with ``f`` the surge law (``"adam"``/``"surge"``, Li et al. 2024),
    McCandlish's SGD law (``"sgd"``), ``B`` (``"linear"``), ``sqrt(B)`` (``"sqrt"``) or 1 (``"none"``).

    Args:
        rule: one of :data:`~hf_lars.scaling.laws.RULES`.
        ref_batch: global batch size of the reference run.
        ref_lr: the (best) learning rate of the reference run.
        b_noise: ``B_noise`` for ``"adam"``/``"sgd"``: a number, or a :class:`SurgeFit` (its rule must match
            and its ``B_noise`` must be identifiable; its batch range becomes ``batch_range``).
        batch_range: ``(low, high)`` batch sizes the law was fitted on; :meth:`lr` warns
            (:class:`ExtrapolationWarning` and the log) outside it.
    """

    def __init__(
        self,
        rule: str,
        ref_batch: ArrayLike,
        ref_lr: ArrayLike,
        b_noise: float | SurgeFit | None = None,
        *,
        batch_range: tuple[float, float] | None = None,
    ) -> None:
        self.rule = canonical_rule(rule)
        self.ref_batch = _as_positive_float(ref_batch, "ref_batch")
        self.ref_lr = _as_positive_float(ref_lr, "ref_lr")
        if isinstance(b_noise, SurgeFit):
            _check_fit(b_noise, self.rule)
            if batch_range is None:
                batch_range = b_noise.batch_range
            b_noise = b_noise.b_noise
        self.b_noise: float | None = None
        if self.rule in B_NOISE_RULES:
            if b_noise is None:
                raise ValueError(f"b_noise is required for scaling rule {self.rule!r}")
            self.b_noise = _as_positive_float(b_noise, "b_noise")
        self.batch_range: tuple[float, float] | None = None
        if batch_range is not None:
            lo, hi = (_as_positive_float(v, "batch_range") for v in batch_range)
            if lo > hi:
                raise ValueError(f"batch_range must be (low, high) with low <= high, got {batch_range!r}")
            self.batch_range = (lo, hi)

    @classmethod
    def from_fit(
        cls, fit: SurgeFit, ref_batch: ArrayLike | None = None, ref_lr: ArrayLike | None = None
    ) -> BatchSizeScaler:
        """A scaler from a :func:`~hf_lars.scaling.fit.fit_surge` result.

        Without a reference the fitted law itself is used (``ref = (B_noise, eps_max)``, so ``lr(B)`` is the
        fitted ``eps_opt(B)``); with one, only the fitted shape and ``B_noise`` are used.
        """
        if (ref_batch is None) != (ref_lr is None):
            raise ValueError("give both ref_batch and ref_lr, or neither")
        rb = fit.b_noise if ref_batch is None else ref_batch
        rl = fit.eps_max if ref_lr is None else ref_lr
        if cls is BatchSizeScaler:
            return BatchSizeScaler(fit.rule, rb, rl, fit)
        return cls(rb, rl, fit)  # type: ignore[call-arg]  # subclasses fix the rule

    def lr(self, batch: ArrayLike) -> float | np.ndarray:
        """The learning rate for global batch size ``batch`` (a number or an array)."""
        b, scalar = _as_positive(batch, "batch")
        self._warn_if_outside(b)
        log_bn = None if self.b_noise is None else math.log(self.b_noise)
        out = self.ref_lr * np.exp(_log_ratio(self.rule, np.log(b), math.log(self.ref_batch), log_bn))
        return _like_input(out, scalar)

    __call__ = lr

    def ratio(self, batch: ArrayLike) -> float | np.ndarray:
        """``lr(batch) / ref_lr``."""
        b, scalar = _as_positive(batch, "batch")
        return _like_input(np.asarray(self.lr(b)) / self.ref_lr, scalar)

    def _warn_if_outside(self, b: np.ndarray) -> None:
        if self.batch_range is None:
            return
        lo, hi = self.batch_range
        outside = b[(b < lo) | (b > hi)]
        if outside.size:
            msg = (
                f"batch size {outside.flat[0]:g} is outside the fitted batch range [{lo:g}, {hi:g}]: "
                f"the {self.rule!r} law is extrapolated"
            )
            logger.warning("%s", msg)
            warnings.warn(msg, ExtrapolationWarning, stacklevel=3)

    def __repr__(self) -> str:
        extra = "" if self.b_noise is None else f", b_noise={self.b_noise:g}"
        rng = "" if self.batch_range is None else f", batch_range=({self.batch_range[0]:g}, {self.batch_range[1]:g})"
        name = type(self).__name__
        return f"{name}(rule={self.rule!r}, ref_batch={self.ref_batch:g}, ref_lr={self.ref_lr:g}{extra}{rng})"


def _check_fit(fit: SurgeFit, rule: str) -> None:
    if fit.rule != rule:
        raise ValueError(f"the fit is of the {fit.rule!r} law, not {rule!r}")
    if not fit.identifiable:
        raise ValueError(f"cannot scale with this fit: {fit.message}")


class _LawScaler(BatchSizeScaler):
    """A :class:`BatchSizeScaler` whose rule is fixed by the subclass (``_RULE``) and needs ``b_noise``."""

    _RULE: ClassVar[str]

    def __init__(
        self,
        ref_batch: ArrayLike,
        ref_lr: ArrayLike,
        b_noise: float | SurgeFit,
        *,
        batch_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(self._RULE, ref_batch, ref_lr, b_noise, batch_range=batch_range)


class AdamBatchSizeScaler(_LawScaler):
    """:class:`BatchSizeScaler` with the surge law of Li et al. 2024 (Adam, AdamLARS/LAMB, RangerLARS).

    ``lr(B) = ref_lr * cosh((ln B_ref - ln B_noise) / 2) / cosh((ln B - ln B_noise) / 2)``: the LR grows like
    ``sqrt(B)`` below ``B_noise``, peaks there and falls above it.
    """

    _RULE = "adam"


class SGDBatchSizeScaler(_LawScaler):
    """:class:`BatchSizeScaler` with McCandlish et al.'s SGD law (SGD, LARS).

    ``lr(B) = ref_lr * (1 + B_noise / B_ref) / (1 + B_noise / B)``: linear scaling well below ``B_noise``,
    saturation above.
    """

    _RULE = "sgd"
