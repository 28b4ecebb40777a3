r"""Fit the surge law (Adam) or McCandlish's law (SGD) to (batch size, best LR) pairs.

The fit is least squares in log space, parameterised by ``a = ln eps_max`` and ``u = ln B_noise``::

    ln lr_i = a + h(ln B_i - u) + e_i,     e_i ~ N(0, sigma^2)
    h_adam(d) = -ln cosh(d / 2)            (Li et al. 2024, arXiv 2405.14578)
    h_sgd(d)  = -ln(1 + exp(-d))           (McCandlish et al. 2018, arXiv 1812.06162)

For fixed ``u`` the best ``a`` is the mean of ``ln lr_i - h(ln B_i - u)``, so the fit is a one-dimensional
minimisation of the profile residual sum of squares ``RSS(u)``: a fine grid over ``u`` (three decades
beyond the observed batches on each side) refined by golden-section search.

Uncertainty, three ways:

- covariance (Wald): ``Cov(a, u) = s^2 (J^T J)^{-1}`` with ``s^2 = RSS / (n - 2)`` and ``J`` the Jacobian in
  ``(a, u)``; intervals ``a ± t_{n-2} se(a)`` and ``u ± t_{n-2} se(u)``, exponentiated;
- bootstrap (seeded): resampled residuals (default, residuals inflated by ``sqrt(n / (n - 2))``) or
  resampled (batch, LR) pairs; percentile intervals;
- profile: ``{u : RSS(u) <= RSS_min (1 + F_{1,n-2} / (n - 2))}``.  When it reaches the edge of the search
  window the data do not bound ``B_noise`` on that side.

``B_noise`` is declared *not identifiable* when the fitted peak (knee, for SGD) lies outside the observed
batch range, when its profile interval is unbounded, or (Adam) when the best LR is monotone in batch size:
then only one side of the peak was observed and the data pin down ``eps_max / sqrt(B_noise)`` (or
``eps_max * sqrt(B_noise)``), not ``B_noise``.

Model comparison: the fitted law against the other law, the linear rule ``ln lr = c + ln B`` and the
square-root rule ``ln lr = c + ln B / 2``, by AIC with Gaussian errors in log LR:
``AIC = n ln(RSS / n) + 2 k`` where ``k`` counts the noise variance (laws: 3, rules: 2).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from hf_lars.scaling._common import ArrayLike, _as_positive
from hf_lars.scaling._law_fit import _RSS_FLOOR, _fit_law, _intervals, _LawFit, _no_intervals, _profile_interval
from hf_lars.scaling.laws import _log_shape, adam_optimal_lr, canonical_rule, sgd_optimal_lr

__all__ = ["ModelFit", "SurgeFit", "fit_surge", "MODEL_NAMES"]

logger = logging.getLogger(__name__)

#: Models compared by AIC in :attr:`SurgeFit.models`.
MODEL_NAMES: tuple[str, ...] = ("adam", "sgd", "linear", "sqrt")
_LAW_TITLES: dict[str, str] = {
    "adam": "Adam surge law (Li et al. 2024)",
    "sgd": "SGD law (McCandlish et al. 2018)",
    "linear": "linear rule (lr ∝ B)",
    "sqrt": "square-root rule (lr ∝ sqrt(B))",
}
_BOOTSTRAP_METHODS = ("residuals", "pairs")


@dataclass(frozen=True)
class ModelFit:
    """One model of ``ln lr`` against ``ln B``: its parameters, residual sum of squares and AIC."""

    name: str
    n_params: int  # parameters of the law itself; AIC adds one for the noise variance
    params: dict[str, float]
    rss: float
    aic: float

    def predict(self, batch_size: ArrayLike) -> float | np.ndarray:
        """The model's LR at ``batch_size``."""
        if self.name == "adam":
            return adam_optimal_lr(batch_size, self.params["eps_max"], self.params["b_noise"])
        if self.name == "sgd":
            return sgd_optimal_lr(batch_size, self.params["eps_max"], self.params["b_noise"])
        b, scalar = _as_positive(batch_size, "batch_size")
        power = 1.0 if self.name == "linear" else 0.5
        out = self.params["coef"] * b**power
        return float(out) if scalar else out


@dataclass(frozen=True)
class SurgeFit:
    """Result of :func:`fit_surge`.

    Intervals are ``(low, high)`` at level :attr:`confidence`, ``None`` when ``B_noise`` is not
    identifiable (see :attr:`identifiable` and :attr:`message`).  :attr:`b_noise_profile_ci` is always
    given; a bound of ``0.0`` or ``inf`` marks the side the data leave unbounded.
    """

    rule: str
    eps_max: float
    b_noise: float
    identifiable: bool
    message: str
    eps_max_ci: tuple[float, float] | None
    b_noise_ci: tuple[float, float] | None
    eps_max_ci_bootstrap: tuple[float, float] | None
    b_noise_ci_bootstrap: tuple[float, float] | None
    b_noise_profile_ci: tuple[float, float]
    log_cov: np.ndarray | None  # covariance of (ln eps_max, ln B_noise)
    residuals: np.ndarray  # ln(best_lr) - ln(fitted lr), in input order
    residual_sd: float  # sqrt(RSS / (n - 2)), in ln LR
    batch_sizes: np.ndarray
    best_lrs: np.ndarray
    models: dict[str, ModelFit]
    best_model: str
    confidence: float
    n_bootstrap: int  # replicates that were fitted (0 when skipped)
    bootstrap_method: str
    bootstrap_log_params: np.ndarray | None = field(default=None, repr=False)  # (n, 2): ln eps_max, ln B_noise

    @property
    def aic(self) -> dict[str, float]:
        """AIC per model (lower is better)."""
        return {name: m.aic for name, m in self.models.items()}

    @property
    def batch_range(self) -> tuple[float, float]:
        """Smallest and largest batch size in the data."""
        return float(self.batch_sizes.min()), float(self.batch_sizes.max())

    def predict(self, batch_size: ArrayLike) -> float | np.ndarray:
        """The fitted law's optimal LR at ``batch_size``."""
        return self.models[self.rule].predict(batch_size)

    def summary(self) -> str:
        """A human-readable report: estimates with intervals, the AIC table and the identifiability verdict."""
        lo, hi = self.batch_range
        n_batches = len(np.unique(self.batch_sizes))
        pct = f"{self.confidence:.0%}"
        tag = "" if self.identifiable else " (not identifiable)"
        lines = [
            f"Fit of the {_LAW_TITLES[self.rule]} to {len(self.batch_sizes)} points at {n_batches} batch sizes"
            f" ({lo:g} .. {hi:g})",
            f"  eps_max = {self.eps_max:.4g}{tag}    {pct} CI: covariance {_fmt_ci(self.eps_max_ci)},"
            f" bootstrap {_fmt_ci(self.eps_max_ci_bootstrap)}",
            f"  B_noise = {self.b_noise:.4g}{tag}    {pct} CI: covariance {_fmt_ci(self.b_noise_ci)},"
            f" bootstrap {_fmt_ci(self.b_noise_ci_bootstrap)}, profile {_fmt_ci(self.b_noise_profile_ci)}",
            f"  residual sd in ln LR = {self.residual_sd:.3g}"
            + (f"; bootstrap: {self.n_bootstrap} {self.bootstrap_method} replicates" if self.n_bootstrap else ""),
            "Model comparison by AIC (Gaussian errors in ln LR; lower is better):",
            f"  {'model':<8}{'params':>7}{'AIC':>11}{'dAIC':>9}  fitted",
        ]
        best_aic = self.models[self.best_model].aic
        for name in MODEL_NAMES:
            m = self.models[name]
            params = ", ".join(f"{k}={v:.4g}" for k, v in m.params.items())
            mark = "  <- best" if name == self.best_model else ""
            lines.append(f"  {name:<8}{m.n_params:>7}{m.aic:>11.2f}{m.aic - best_aic:>9.2f}  {params}{mark}")
        lines.append(f"Identifiability: {self.message}")
        return "\n".join(lines)


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return "unbounded"
    return f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def _aic(rss: float, n: int, k: int) -> float:
    """``n ln(RSS / n) + 2 k`` (Gaussian errors, ``k`` includes the noise variance)."""
    return n * math.log(max(rss, n * _RSS_FLOOR) / n) + 2 * k


def _fit_models(x: np.ndarray, y: np.ndarray, laws: dict[str, _LawFit]) -> dict[str, ModelFit]:
    """Every model of :data:`MODEL_NAMES`, fitted to ``(x, y) = (ln B, ln lr)``."""
    n = len(x)
    models: dict[str, ModelFit] = {}
    for name in ("adam", "sgd"):
        law = laws[name]
        params = {"eps_max": math.exp(law.a), "b_noise": math.exp(law.u)}
        models[name] = ModelFit(name, 2, params, law.rss, _aic(law.rss, n, 3))
    for name, power in (("linear", 1.0), ("sqrt", 0.5)):
        r = y - power * x
        c = float(r.mean())
        rss = float(((r - c) ** 2).sum())
        models[name] = ModelFit(name, 1, {"coef": math.exp(c)}, rss, _aic(rss, n, 2))
    return models


def _best_model(models: dict[str, ModelFit]) -> str:
    """Lowest AIC; ties go to the model with fewer parameters."""
    return min(MODEL_NAMES, key=lambda m: (round(models[m].aic, 9), models[m].n_params))


# --------------------------------------------------------------------------------------- identifiability


def _is_monotone(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether the mean ``y`` per distinct ``x`` is strictly monotone in ``x``."""
    _, inverse = np.unique(x, return_inverse=True)
    means = np.bincount(inverse, weights=y) / np.bincount(inverse)
    diffs = np.diff(means)
    return bool(np.all(diffs > 0) or np.all(diffs < 0))


def _identifiability(
    rule: str, x: np.ndarray, y: np.ndarray, law: _LawFit, profile_ci: tuple[float, float], confidence: float
) -> tuple[bool, str]:
    """Whether ``B_noise`` is pinned down by the data, and a message saying why (not)."""
    what = "peak" if rule == "adam" else "knee"
    b_lo, b_hi = math.exp(float(x.min())), math.exp(float(x.max()))
    b_fit = math.exp(law.u)
    reasons: list[str] = []
    if law.u > x.max():
        reasons.append(f"the fitted {what} B_noise ≈ {b_fit:.3g} lies above the largest batch size ({b_hi:g})")
    elif law.u < x.min():
        reasons.append(f"the fitted {what} B_noise ≈ {b_fit:.3g} lies below the smallest batch size ({b_lo:g})")
    open_sides = [side for side, is_open in (("below", profile_ci[0] == 0.0), ("above", math.isinf(profile_ci[1])))
                  if is_open]
    if open_sides:
        reasons.append(f"its {confidence:.0%} profile interval is unbounded {' and '.join(open_sides)}")
    if rule == "adam" and _is_monotone(x, y):
        trend = "rises" if y[np.argmax(x)] > y[np.argmin(x)] else "falls"
        reasons.append(f"the best LR {trend} monotonically with batch size, so only one side of the peak is observed")
    if not reasons:
        return True, (
            f"B_noise is identifiable: the {what} lies inside the observed batch range ({b_lo:g} .. {b_hi:g})"
            " and its profile interval is bounded."
        )
    if len(open_sides) == 2:
        advice = "too few points or too much noise to locate it: add batch sizes or repeats."
    else:
        advice = f"add batch sizes on the other side of the {what}."
        low, high = profile_ci
        if rule == "adam" and law.u > x.max():
            bound = max(b_hi, low)
            advice += (
                f" The data only bound it from below (B_noise > ~{bound:.3g}): below the peak the square-root"
                " rule applies."
            )
        elif rule == "adam" and law.u < x.min():
            bound = min(b_lo, high)
            advice += f" The data only bound it from above (B_noise < ~{bound:.3g}): every batch is past the peak."
    return False, f"B_noise is not identifiable: {'; '.join(reasons)}. Its confidence intervals are unbounded; {advice}"


# ----------------------------------------------------------------------------------------------- front door


def fit_surge(
    batch_sizes: ArrayLike,
    best_lrs: ArrayLike,
    rule: str = "adam",
    *,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    bootstrap: str = "residuals",
    seed: int | None = 0,
) -> SurgeFit:
    """Fit ``(eps_max, B_noise)`` of the surge law (``rule="adam"``) or McCandlish's law (``rule="sgd"``).

    Args:
        batch_sizes: global batch sizes (at least 3 distinct values; repeats, e.g. seeds, are fine).
        best_lrs: the best learning rate found at each batch size (same length).
        rule: ``"adam"`` (alias ``"surge"``): ``eps_max / cosh((ln B - ln B_noise) / 2)``, Li et al. 2024;
            ``"sgd"``: ``eps_max / (1 + B_noise / B)``, McCandlish et al. 2018.
        confidence: level of every interval.
        n_bootstrap: bootstrap replicates (0 skips the bootstrap).
        bootstrap: ``"residuals"`` (resample residuals around the fit) or ``"pairs"`` (resample points).
        seed: seed of the bootstrap's ``numpy.random.default_rng``.

    Returns:
        A :class:`SurgeFit`.  Check :attr:`SurgeFit.identifiable` before using ``b_noise``: when every
        batch is on one side of the peak the estimate is meaningless and its intervals are ``None``.

    Raises:
        ValueError: non-positive or non-finite inputs, mismatched lengths, fewer than 3 distinct batch
            sizes, an unknown rule or bootstrap method, a confidence outside (0, 1).
    """
    canon = canonical_rule(rule)
    if canon not in ("adam", "sgd"):
        raise ValueError(f"fit_surge fits rule 'adam' (alias 'surge') or 'sgd', got {rule!r}")
    if bootstrap not in _BOOTSTRAP_METHODS:
        raise ValueError(f"bootstrap must be one of {', '.join(_BOOTSTRAP_METHODS)}, got {bootstrap!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap!r}")
    b, _ = _as_positive(batch_sizes, "batch_sizes")
    lr, _ = _as_positive(best_lrs, "best_lrs")
    b, lr = np.atleast_1d(b).ravel(), np.atleast_1d(lr).ravel()
    if b.shape != lr.shape:
        raise ValueError(f"batch_sizes and best_lrs must have the same length, got {b.size} and {lr.size}")
    n_distinct = len(np.unique(b))
    if n_distinct < 3:
        raise ValueError(f"fit_surge needs at least 3 distinct batch sizes, got {n_distinct}")

    x, y, n = np.log(b), np.log(lr), b.size
    laws = {name: _fit_law(name, x, y) for name in ("adam", "sgd")}
    law = laws[canon]
    models = _fit_models(x, y, laws)
    best = _best_model(models)
    profile_ci = _profile_interval(law, n, confidence)
    identifiable, message = _identifiability(canon, x, y, law, profile_ci, confidence)
    if best != canon:
        d_aic = models[canon].aic - models[best].aic
        message += f" By AIC the data prefer the {best!r} model (dAIC = {d_aic:.1f}) over the fitted {canon!r} law."
    if not identifiable:
        logger.warning("%s", message)

    # The covariance and bootstrap intervals exist only where B_noise is identifiable.
    if identifiable:
        intervals = _intervals(canon, x, y, law, confidence, int(n_bootstrap), bootstrap, seed)
    else:
        intervals = _no_intervals()
    return SurgeFit(
        rule=canon,
        eps_max=math.exp(law.a),
        b_noise=math.exp(law.u),
        identifiable=identifiable,
        message=message,
        **intervals,
        b_noise_profile_ci=profile_ci,
        batch_sizes=b,
        best_lrs=lr,
        residuals=y - (law.a + _log_shape(canon, x, law.u)),
        residual_sd=math.sqrt(law.rss / (n - 2)),
        models=models,
        best_model=best,
        confidence=confidence,
        bootstrap_method=bootstrap,
    )
