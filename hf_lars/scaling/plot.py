"""A PNG of a :class:`~hf_lars.scaling.fit.SurgeFit`: data, fitted laws and rules on log-log axes, ``B_noise`` marked.

Matplotlib is imported lazily (it is the ``plot`` extra) and drawn with the Agg canvas directly, so the
caller's pyplot backend is left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hf_lars.scaling.fit import MODEL_NAMES, SurgeFit
from hf_lars.scaling.grid import GridBest
from hf_lars.scaling.laws import _log_shape

__all__ = ["plot_surge_fit"]

logger = logging.getLogger(__name__)

_STYLES: dict[str, dict[str, object]] = {
    "adam": {"color": "C0", "linestyle": "-"},
    "sgd": {"color": "C1", "linestyle": "--"},
    "linear": {"color": "C2", "linestyle": ":"},
    "sqrt": {"color": "C3", "linestyle": "-."},
}
_LABELS = {"adam": "surge law (Adam)", "sgd": "McCandlish (SGD)", "linear": "linear rule", "sqrt": "sqrt rule"}


def _band(fit: SurgeFit, xs: np.ndarray, max_samples: int = 400) -> tuple[np.ndarray, np.ndarray] | None:
    """Pointwise bootstrap band of the fitted law at batch sizes ``xs``."""
    samples = fit.bootstrap_log_params
    if samples is None or len(samples) < 20:
        return None
    samples = samples[:: max(1, len(samples) // max_samples)]
    curves = samples[:, :1] + _log_shape(fit.rule, np.log(xs)[None, :], samples[:, 1:2])
    lo, hi = np.quantile(curves, [0.5 - fit.confidence / 2, 0.5 + fit.confidence / 2], axis=0)
    return np.exp(lo), np.exp(hi)


def plot_surge_fit(
    fit: SurgeFit,
    path: str | os.PathLike[str],
    *,
    grid: Sequence[GridBest] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of ``fit`` to ``path`` and return the path.

    Draws the (batch size, best LR) points (hollow where ``grid`` flags them on the sweep's edge), the
    fitted law with its bootstrap band, the other law and the linear and square-root rules (legend with
    AIC), and ``B_noise`` with its interval, or a note that it is not identifiable.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lo, hi = fit.batch_range
    xs = np.geomspace(lo / 2.0, hi * 2.0, 300)
    fig = Figure(figsize=(7.0, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    edge = {g.batch_size for g in grid if g.on_edge} if grid else set()
    on_edge = np.array([b in edge for b in fit.batch_sizes], dtype=bool)
    ax.scatter(fit.batch_sizes[~on_edge], fit.best_lrs[~on_edge], color="k", zorder=5, label="best LR")
    if on_edge.any():
        ax.scatter(
            fit.batch_sizes[on_edge], fit.best_lrs[on_edge], facecolors="none", edgecolors="k", zorder=5,
            label="best LR on the grid's edge",
        )

    band = _band(fit, xs)
    if band is not None:
        ax.fill_between(xs, band[0], band[1], color=_STYLES[fit.rule]["color"], alpha=0.15, linewidth=0)
    for name in MODEL_NAMES:
        model = fit.models[name]
        width = 2.2 if name == fit.rule else 1.2
        best = " (best AIC)" if name == fit.best_model else ""
        ax.plot(xs, model.predict(xs), linewidth=width, label=f"{_LABELS[name]}: AIC {model.aic:.1f}{best}",
                **_STYLES[name])  # type: ignore[arg-type]

    if fit.identifiable:
        ax.axvline(fit.b_noise, color="0.3", linewidth=1.0)
        ci = fit.b_noise_ci_bootstrap or fit.b_noise_ci
        if ci is not None:
            ax.axvspan(ci[0], ci[1], color="0.5", alpha=0.12, linewidth=0)
        ax.annotate(f"B_noise ≈ {fit.b_noise:.3g}", xy=(fit.b_noise, 0.02), xycoords=("data", "axes fraction"),
                    xytext=(4, 0), textcoords="offset points", fontsize=9)
    else:
        ax.text(0.02, 0.02, "B_noise not identifiable from these batch sizes", transform=ax.transAxes, fontsize=9,
                color="C3")

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(xs[0], xs[-1])
    ymin, ymax = fit.best_lrs.min(), fit.best_lrs.max()
    ax.set_ylim(ymin / 3.0, ymax * 3.0)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("best learning rate")
    ax.set_title(title or f"Optimal LR vs batch size ({fit.rule} law)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    logger.info("wrote %s", out)
    return out
