r"""The best learning rate per batch size from a (batch size, LR, loss) sweep.

Around its minimum a loss-vs-LR curve is close to a parabola in ``ln lr``, so the best LR of each batch
size is taken as the vertex of the quadratic ``loss ≈ c0 + c1 ln lr + c2 (ln lr)^2`` fitted to the best
grid point and its neighbours (3 points, or ``2 * window + 1``)::

    ln lr* = -c1 / (2 c2)          when c2 > 0 (convex), clipped to the fitted points' range

and the grid argmin when the parabola is not convex or the best point lacks a finite neighbour on either
side.  A best point at the lowest or highest LR tried is flagged ``on_edge``: the true optimum may lie
outside the grid, so the value is a bound, not an estimate.  Non-finite losses (diverged runs) count as
worse than any finite loss; they never become the minimum and never enter a parabola.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GridBest", "best_lr_from_grid"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridBest:
    """Best LR of one batch size in a sweep."""

    batch_size: float
    best_lr: float
    best_loss: float  # the parabola's value at its vertex, or the grid minimum
    on_edge: bool  # the best grid point is the lowest or the highest LR tried
    n_points: int  # distinct LRs with a finite loss at this batch size
    n_diverged: int  # distinct LRs whose loss is not finite
    method: str  # "vertex" or "argmin"
    grid_lr: float  # LR of the best grid point


def _row_values(row: Any) -> tuple[float, float, float]:
    """``(batch, lr, loss)`` from a 3-sequence or a mapping with ``batch_size``/``batch``, ``lr``, ``loss``."""
    if isinstance(row, Mapping):
        batch = row["batch_size"] if "batch_size" in row else row["batch"]
        values = (batch, row["lr"], row["loss"])
    else:
        values = tuple(row)
        if len(values) != 3:
            raise ValueError(f"each row must be (batch_size, lr, loss), got {row!r}")
    try:
        batch, lr, loss = (float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"each row must hold numbers (batch_size, lr, loss), got {row!r}") from err
    for name, v in (("batch_size", batch), ("lr", lr)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be positive and finite, got {v!r} in row {row!r}")
    return batch, lr, loss


def _collect(rows: Iterable[Any]) -> dict[float, dict[float, float]]:
    """``{batch: {lr: loss}}``; repeated (batch, lr) runs are averaged, and any diverged repeat makes it ``inf``."""
    sums: dict[float, dict[float, list[float]]] = {}
    for row in rows:
        batch, lr, loss = _row_values(row)
        sums.setdefault(batch, {}).setdefault(lr, []).append(loss)
    return {
        batch: {lr: (float(np.mean(v)) if all(math.isfinite(x) for x in v) else math.inf) for lr, v in per_lr.items()}
        for batch, per_lr in sums.items()
    }


def _vertex(log_lr: np.ndarray, loss: np.ndarray) -> tuple[float, float] | None:
    """Vertex ``(ln lr, loss)`` of the least-squares parabola through the points, ``None`` if not convex."""
    c2, c1, c0 = np.polyfit(log_lr, loss, 2)
    scale = max(float(np.ptp(loss)), float(np.abs(loss).max()), 1e-300)
    span = float(np.ptp(log_lr))
    if not c2 * span**2 > 1e-12 * scale:  # flat or concave: no minimum to trust
        return None
    v = float(np.clip(-c1 / (2.0 * c2), log_lr.min(), log_lr.max()))
    return v, float(c0 + c1 * v + c2 * v * v)


def _best_of_batch(batch: float, per_lr: dict[float, float], window: int) -> GridBest | None:
    lrs = np.array(sorted(per_lr), dtype=np.float64)
    losses = np.array([per_lr[lr] for lr in lrs], dtype=np.float64)
    finite = np.isfinite(losses)
    n_diverged = int((~finite).sum())
    if not finite.any():
        logger.warning("batch size %g: every run diverged (non-finite loss); it has no best LR", batch)
        return None
    k = int(np.argmin(np.where(finite, losses, np.inf)))
    on_edge = k == 0 or k == len(lrs) - 1
    left = k
    while left > 0 and k - left < window and finite[left - 1]:
        left -= 1
    right = k
    while right < len(lrs) - 1 and right - k < window and finite[right + 1]:
        right += 1
    fit = None
    if left < k < right:
        fit = _vertex(np.log(lrs[left : right + 1]), losses[left : right + 1])
    if fit is None:
        best_lr, best_loss, method = float(lrs[k]), float(losses[k]), "argmin"
    else:
        best_lr, best_loss, method = math.exp(fit[0]), fit[1], "vertex"
    if on_edge:
        side = "lowest" if k == 0 else "highest"
        logger.warning(
            "batch size %g: the best LR %.4g is the %s LR tried; the optimum may lie outside the grid",
            batch,
            best_lr,
            side,
        )
    return GridBest(
        batch_size=batch,
        best_lr=best_lr,
        best_loss=best_loss,
        on_edge=on_edge,
        n_points=int(finite.sum()),
        n_diverged=n_diverged,
        method=method,
        grid_lr=float(lrs[k]),
    )


def best_lr_from_grid(rows: Iterable[Any], *, window: int = 1) -> list[GridBest]:
    """Per batch size, the best LR of a sweep (vertex of a quadratic in ``ln lr``, see the module docstring).

    Args:
        rows: ``(batch_size, lr, loss)`` triples or mappings with keys ``batch_size`` (or ``batch``),
            ``lr`` and ``loss``; an ``(N, 3)`` array works too.  A loss of ``nan``/``inf`` marks a diverged run.
        window: neighbours on each side of the best grid point that enter the parabola (1 gives 3 points).

    Returns:
        One :class:`GridBest` per batch size that has at least one finite loss, sorted by batch size.
        Batches where every run diverged are left out (and logged).

    Raises:
        ValueError: a row that is not three numbers, a non-positive batch size or LR, ``window < 1``.
    """
    if int(window) != window or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    table = _collect(rows)
    out = [_best_of_batch(batch, table[batch], int(window)) for batch in sorted(table)]
    return [r for r in out if r is not None]
