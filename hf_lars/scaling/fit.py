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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hf_lars.scaling._common import ArrayLike, _as_positive, _sigmoid, _t_quantile
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
_WINDOW = math.log(1e3)  # search B_noise up to three decades beyond the observed batch sizes
_GRID_STEP = 0.02  # in ln B_noise
_RSS_FLOOR = 1e-24  # per point, so that exact data do not give log(0)
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


# ----------------------------------------------------------------------------------------------- profile fit


def _dlog_shape_du(rule: str, log_batch: np.ndarray, u: float) -> np.ndarray:
    """Derivative of :func:`~hf_lars.scaling.laws._log_shape` with respect to ``u = ln B_noise``."""
    d = log_batch - u
    if rule == "adam":
        return 0.5 * np.tanh(0.5 * d)
    return -_sigmoid(-d)


def _u_grid(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()) - _WINDOW, float(x.max()) + _WINDOW
    n = int(math.ceil((hi - lo) / _GRID_STEP)) + 1
    return np.linspace(lo, hi, n)


def _grid_rss(rule: str, x: np.ndarray, ys: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Profile RSS on ``grid`` for each row of ``ys`` (shape ``(N, n)``) at shared ``x``: shape ``(N, G)``.

    ``RSS(u) = |yc - hc(u)|^2`` with rows centred, expanded as ``|yc|^2 + |hc|^2 - 2 yc.hc``.
    """
    h = _log_shape(rule, x[None, :], grid[:, None])  # (G, n)
    hc = h - h.mean(axis=1, keepdims=True)
    yc = ys - ys.mean(axis=1, keepdims=True)
    rss = (yc**2).sum(axis=1)[:, None] + (hc**2).sum(axis=1)[None, :] - 2.0 * yc @ hc.T
    return np.maximum(rss, 0.0)


def _parabola_argmin(rss: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Per row of ``rss`` (``(N, G)``): the grid argmin refined by the parabola through it and its neighbours."""
    k = np.clip(np.argmin(rss, axis=1), 1, rss.shape[1] - 2)
    rows = np.arange(rss.shape[0])
    r0, r1, r2 = rss[rows, k - 1], rss[rows, k], rss[rows, k + 1]
    curv = r0 - 2.0 * r1 + r2
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(curv > 0, 0.5 * (r0 - r2) / curv, 0.0)
    step = grid[1] - grid[0]
    return np.clip(grid[k] + np.clip(shift, -1.0, 1.0) * step, grid[0], grid[-1])


def _golden_min(f: Callable[[float], float], a: float, b: float, tol: float = 1e-10) -> float:
    """Minimum of a unimodal ``f`` on ``[a, b]`` by golden-section search."""
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


def _profile(rule: str, x: np.ndarray, y: np.ndarray, u: float) -> tuple[float, float]:
    """Best ``a = ln eps_max`` and the RSS for fixed ``u = ln B_noise``."""
    r = y - _log_shape(rule, x, u)
    a = float(r.mean())
    return a, float(((r - a) ** 2).sum())


@dataclass(frozen=True)
class _LawFit:
    u: float
    a: float
    rss: float
    grid: np.ndarray
    grid_rss: np.ndarray


def _fit_law(rule: str, x: np.ndarray, y: np.ndarray) -> _LawFit:
    """Least-squares fit of ``ln lr = a + h(ln B - u)``: grid over ``u`` then golden-section polish."""
    grid = _u_grid(x)
    rss = _grid_rss(rule, x, y[None, :], grid)[0]
    k = int(np.argmin(rss))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    u = _golden_min(lambda v: _profile(rule, x, y, v)[1], float(lo), float(hi))
    a, r = _profile(rule, x, y, u)
    if r > rss[k]:  # the polish can only help; keep the grid point otherwise
        u = float(grid[k])
        a, r = _profile(rule, x, y, u)
    return _LawFit(u=u, a=a, rss=r, grid=grid, grid_rss=rss)


def _profile_interval(law: _LawFit, n: int, confidence: float) -> tuple[float, float]:
    """``{u : RSS(u) <= RSS_min (1 + F_{1,n-2}(confidence) / (n - 2))}`` as bounds on ``B_noise``.

    Returns ``(0.0, ...)`` / ``(..., inf)`` where the set reaches the edge of the search window.
    """
    dof = n - 2
    f_crit = _t_quantile(0.5 + confidence / 2.0, dof) ** 2
    floor = n * _RSS_FLOOR
    threshold = max(law.rss, floor) * (1.0 + f_crit / dof)
    inside = np.flatnonzero(law.grid_rss <= threshold)
    if inside.size == 0:  # the polished optimum beats every grid point by a hair: use the grid spacing
        return math.exp(law.u - _GRID_STEP), math.exp(law.u + _GRID_STEP)
    i, j = int(inside[0]), int(inside[-1])
    low = 0.0 if i == 0 else math.exp(_crossing(law.grid, law.grid_rss, threshold, i - 1, i))
    high = math.inf if j == len(law.grid) - 1 else math.exp(_crossing(law.grid, law.grid_rss, threshold, j, j + 1))
    return min(low, math.exp(law.u)), max(high, math.exp(law.u))


def _crossing(grid: np.ndarray, rss: np.ndarray, level: float, i: int, j: int) -> float:
    """Linear interpolation of where ``rss`` crosses ``level`` between grid points ``i`` and ``j``."""
    r_i, r_j = rss[i], rss[j]
    if r_i == r_j:
        return float(grid[i])
    t = (level - r_i) / (r_j - r_i)
    return float(grid[i] + np.clip(t, 0.0, 1.0) * (grid[j] - grid[i]))


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


# ----------------------------------------------------------------------------------------------- uncertainty


def _wald_intervals(
    rule: str, x: np.ndarray, law: _LawFit, confidence: float
) -> tuple[np.ndarray | None, tuple[float, float] | None, tuple[float, float] | None]:
    """Covariance of ``(a, u)`` and the exponentiated Wald intervals for ``eps_max`` and ``B_noise``."""
    n = len(x)
    jac = np.column_stack([np.ones(n), _dlog_shape_du(rule, x, law.u)])
    jtj = jac.T @ jac
    if np.linalg.cond(jtj) > 1e12:
        return None, None, None
    cov = law.rss / (n - 2) * np.linalg.inv(jtj)
    t = _t_quantile(0.5 + confidence / 2.0, n - 2)
    se_a, se_u = math.sqrt(max(cov[0, 0], 0.0)), math.sqrt(max(cov[1, 1], 0.0))
    eps_ci = (math.exp(law.a - t * se_a), math.exp(law.a + t * se_a))
    bn_ci = (math.exp(law.u - t * se_u), math.exp(law.u + t * se_u))
    return cov, eps_ci, bn_ci


def _bootstrap(
    rule: str, x: np.ndarray, y: np.ndarray, law: _LawFit, n_boot: int, method: str, seed: int | None
) -> np.ndarray:
    """``(n_ok, 2)`` array of ``(ln eps_max, ln B_noise)`` refitted on bootstrap replicates."""
    rng = np.random.default_rng(seed)
    n = len(x)
    grid = law.grid
    if method == "residuals":
        fitted = law.a + _log_shape(rule, x, law.u)
        resid = (y - fitted) * math.sqrt(n / (n - 2))
        resid = resid - resid.mean()
        out = []
        for start in range(0, n_boot, 1000):  # chunks bound the (N, G) RSS matrix
            m = min(1000, n_boot - start)
            ys = fitted[None, :] + rng.choice(resid, size=(m, n), replace=True)
            us = _parabola_argmin(_grid_rss(rule, x, ys, grid), grid)
            shapes = _log_shape(rule, x[None, :], us[:, None])
            out.append(np.column_stack([(ys - shapes).mean(axis=1), us]))
        return np.concatenate(out, axis=0)
    rows = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        xb, yb = x[idx], y[idx]
        if len(np.unique(xb)) < 3:
            continue
        u = float(_parabola_argmin(_grid_rss(rule, xb, yb[None, :], grid), grid)[0])
        rows.append((float(np.mean(yb - _log_shape(rule, xb, u))), u))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def _percentile_ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [0.5 - confidence / 2.0, 0.5 + confidence / 2.0])
    return math.exp(float(lo)), math.exp(float(hi))


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

    cov = eps_ci = bn_ci = eps_boot = bn_boot = boot = None
    if identifiable:
        cov, eps_ci, bn_ci = _wald_intervals(canon, x, law, confidence)
        if n_bootstrap > 0:
            boot = _bootstrap(canon, x, y, law, int(n_bootstrap), bootstrap, seed)
            if len(boot) > 0:
                eps_boot = _percentile_ci(boot[:, 0], confidence)
                bn_boot = _percentile_ci(boot[:, 1], confidence)
    fitted = law.a + _log_shape(canon, x, law.u)
    return SurgeFit(
        rule=canon,
        eps_max=math.exp(law.a),
        b_noise=math.exp(law.u),
        identifiable=identifiable,
        message=message,
        eps_max_ci=eps_ci,
        b_noise_ci=bn_ci,
        eps_max_ci_bootstrap=eps_boot,
        b_noise_ci_bootstrap=bn_boot,
        b_noise_profile_ci=profile_ci,
        log_cov=cov,
        residuals=y - fitted,
        residual_sd=math.sqrt(law.rss / (n - 2)),
        batch_sizes=b,
        best_lrs=lr,
        models=models,
        best_model=best,
        confidence=confidence,
        n_bootstrap=0 if boot is None else len(boot),
        bootstrap_method=bootstrap,
        bootstrap_log_params=boot,
    )
