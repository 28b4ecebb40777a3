"""The numerics of :func:`hf_lars.scaling.fit.fit_surge`: the least-squares fit of one law and its uncertainty.

``ln lr = a + h(ln B - u)`` is fitted by the profile residual sum of squares ``RSS(u)`` on a grid over
``u = ln B_noise``, polished by golden-section search; the uncertainty is the profile interval, the Wald
(covariance) intervals and the bootstrap (the method is described in :mod:`hf_lars.scaling.fit`).  Private:
``fit.py`` is the front door, this module its arithmetic, split off for size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_lars.scaling._common import _sigmoid, _t_quantile
from hf_lars.scaling.laws import _log_shape

__all__: list[str] = []

_WINDOW = math.log(1e3)  # search B_noise up to three decades beyond the observed batch sizes
_GRID_STEP = 0.02  # in ln B_noise
_RSS_FLOOR = 1e-24  # per point, so that exact data do not give log(0)


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


def _intervals(
    rule: str, x: np.ndarray, y: np.ndarray, law: _LawFit, confidence: float, n_boot: int, method: str,
    seed: int | None,
) -> dict[str, Any]:
    """The covariance and bootstrap fields of :class:`~hf_lars.scaling.fit.SurgeFit` (``n_boot`` 0: no
    bootstrap), by field name."""
    cov, eps_ci, bn_ci = _wald_intervals(rule, x, law, confidence)
    boot = _bootstrap(rule, x, y, law, n_boot, method, seed) if n_boot > 0 else None
    fitted = boot is not None and len(boot) > 0
    return {
        "log_cov": cov,
        "eps_max_ci": eps_ci,
        "b_noise_ci": bn_ci,
        "eps_max_ci_bootstrap": _percentile_ci(boot[:, 0], confidence) if fitted else None,
        "b_noise_ci_bootstrap": _percentile_ci(boot[:, 1], confidence) if fitted else None,
        "n_bootstrap": 0 if boot is None else len(boot),
        "bootstrap_log_params": boot,
    }


def _no_intervals() -> dict[str, Any]:
    """:func:`_intervals`'s fields where ``B_noise`` is not identifiable: none."""
    return {**dict.fromkeys(("log_cov", "eps_max_ci", "b_noise_ci", "eps_max_ci_bootstrap", "b_noise_ci_bootstrap",
                             "bootstrap_log_params")), "n_bootstrap": 0}
