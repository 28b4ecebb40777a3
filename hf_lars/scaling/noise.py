r"""The gradient noise scale ``B_simple``, measured during training (McCandlish et al. 2018, App. A).

With per-example gradients ``g_i = G + xi_i``, ``E[xi] = 0``, ``Cov[xi] = Sigma``, the mean gradient over a
batch of ``b`` examples has ``E|G_b|^2 = |G|^2 + tr(Sigma) / b``.  Two batch sizes ``b < B`` give two
equations and the unbiased estimates::

    |G|^2     ≈ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ≈ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Each estimate is noisy (the ``|G|^2`` one can be negative), so keep an exponential moving average of each,
separately, and only then take the ratio::

    B_simple = EMA[tr(Sigma)] / EMA[|G|^2]

``B_simple`` approximates ``B_noise`` of the LR laws in :mod:`hf_lars.scaling.laws` (exactly so when the
Hessian is a multiple of the identity).

In data-parallel training the pair comes for free: ``b`` is the per-rank batch with ``|G_b|^2`` the mean
over ranks of each rank's local squared gradient norm (taken *before* the gradient all-reduce), and ``B``
the global batch with ``|G_B|^2`` the squared norm of the all-reduced (averaged) gradient.  See
:func:`data_parallel_noise_inputs`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from hf_lars.scaling._common import ArrayLike, _as_float_array, _as_positive, _like_input

__all__ = [
    "NoiseScaleInputs",
    "true_grad_sq_norm",
    "grad_noise_trace",
    "simple_noise_scale",
    "data_parallel_noise_inputs",
    "GradientNoiseScale",
]


class NoiseScaleInputs(NamedTuple):
    """Arguments of the estimators: squared norms at a small and a big batch size."""

    small_sq_norm: float
    small_batch: float
    big_sq_norm: float
    big_batch: float


def _check(
    small_sq_norm: ArrayLike, small_batch: ArrayLike, big_sq_norm: ArrayLike, big_batch: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    gb = _as_float_array(small_sq_norm, "small_sq_norm")
    gB = _as_float_array(big_sq_norm, "big_sq_norm")
    for name, arr in (("small_sq_norm", gb), ("big_sq_norm", gB)):
        bad = ~np.isfinite(arr) | (arr < 0)
        if np.any(bad):
            raise ValueError(f"{name} must be non-negative and finite, got {arr[bad].flat[0]!r}")
    b, s2 = _as_positive(small_batch, "small_batch")
    B, s4 = _as_positive(big_batch, "big_batch")
    if np.any(b >= B):
        raise ValueError(f"small_batch must be smaller than big_batch, got {b!r} and {B!r}")
    return gb, b, gB, B, gb.ndim == 0 and s2 and gB.ndim == 0 and s4


def true_grad_sq_norm(
    small_sq_norm: ArrayLike, small_batch: ArrayLike, big_sq_norm: ArrayLike, big_batch: ArrayLike
) -> float | np.ndarray:
    """Unbiased estimate of ``|G|^2``: ``(B |G_B|^2 - b |G_b|^2) / (B - b)`` (McCandlish et al. 2018, App. A)."""
    gb, b, gB, B, scalar = _check(small_sq_norm, small_batch, big_sq_norm, big_batch)
    return _like_input((B * gB - b * gb) / (B - b), scalar)


def grad_noise_trace(
    small_sq_norm: ArrayLike, small_batch: ArrayLike, big_sq_norm: ArrayLike, big_batch: ArrayLike
) -> float | np.ndarray:
    """Unbiased estimate of ``tr(Sigma)``: ``(|G_b|^2 - |G_B|^2) / (1/b - 1/B)`` (McCandlish et al. 2018, App. A)."""
    gb, b, gB, B, scalar = _check(small_sq_norm, small_batch, big_sq_norm, big_batch)
    return _like_input((gb - gB) / (1.0 / b - 1.0 / B), scalar)


def simple_noise_scale(
    small_sq_norm: ArrayLike, small_batch: ArrayLike, big_sq_norm: ArrayLike, big_batch: ArrayLike
) -> float | np.ndarray:
    """One-shot ``B_simple = tr(Sigma) / |G|^2`` from a single pair; ``nan`` where the ``|G|^2`` estimate is <= 0.

    Very noisy from one pair; :class:`GradientNoiseScale` averages the two estimates first.
    """
    g2 = np.asarray(true_grad_sq_norm(small_sq_norm, small_batch, big_sq_norm, big_batch))
    tr = np.asarray(grad_noise_trace(small_sq_norm, small_batch, big_sq_norm, big_batch))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(g2 > 0, tr / np.where(g2 > 0, g2, 1.0), np.nan)
    return _like_input(out, out.ndim == 0)


def data_parallel_noise_inputs(
    mean_local_sq_norm: ArrayLike, global_sq_norm: ArrayLike, per_rank_batch: ArrayLike, world_size: int
) -> NoiseScaleInputs:
    """Estimator inputs from data-parallel training.

    Args:
        mean_local_sq_norm: the average over ranks of ``|G_b,rank|^2``, each rank's squared norm of its own
            gradient before the all-reduce (one scalar all-reduce gives it).  Averaging over ranks keeps
            ``E = |G|^2 + tr(Sigma) / b`` and lowers the variance.
        global_sq_norm: squared norm of the all-reduced (averaged) gradient.
        per_rank_batch: examples per rank behind the local gradient (micro-batch times accumulation steps
            when the norm is taken on the accumulated gradient).
        world_size: data-parallel ranks (>= 2); the global batch is ``per_rank_batch * world_size``.
    """
    if int(world_size) != world_size or world_size < 2:
        raise ValueError(f"world_size must be an integer >= 2 (b must differ from B), got {world_size!r}")
    b = float(_as_positive(per_rank_batch, "per_rank_batch")[0])
    small = float(_as_float_array(mean_local_sq_norm, "mean_local_sq_norm"))
    big = float(_as_float_array(global_sq_norm, "global_sq_norm"))
    return NoiseScaleInputs(small, b, big, b * int(world_size))


class GradientNoiseScale:
    r"""Running estimate of the simple gradient noise scale ``B_simple`` (McCandlish et al. 2018, App. A).

    Each :meth:`update` turns one ``(|G_b|^2, b, |G_B|^2, B)`` into unbiased estimates of ``|G|^2`` and
    ``tr(Sigma)`` (see the module docstring) and folds each into its own bias-corrected EMA::

        m_t = beta m_{t-1} + (1 - beta) x_t,    m^_t = m_t / (1 - beta^t)

    :attr:`b_simple` is ``m^[tr(Sigma)] / m^[|G|^2]``; ``None`` before the first update and while the
    averaged ``|G|^2`` is not positive (noise dominates: the noise scale is not yet measurable).

    Inputs may be floats or 0-d tensors; a CUDA tensor costs a host sync, so on GPUs update every few
    steps rather than every step.
    """

    def __init__(self, beta: float = 0.99) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta value: {beta!r} (must be in [0, 1))")
        self.beta = float(beta)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.steps = 0
        self._ema_g2 = 0.0
        self._ema_trace = 0.0

    def update(
        self, small_sq_norm: ArrayLike, small_batch: ArrayLike, big_sq_norm: ArrayLike, big_batch: ArrayLike
    ) -> float | None:
        """Fold in one measurement; returns the current :attr:`b_simple`."""
        g2 = float(true_grad_sq_norm(small_sq_norm, small_batch, big_sq_norm, big_batch))
        tr = float(grad_noise_trace(small_sq_norm, small_batch, big_sq_norm, big_batch))
        self.steps += 1
        self._ema_g2 = self.beta * self._ema_g2 + (1.0 - self.beta) * g2
        self._ema_trace = self.beta * self._ema_trace + (1.0 - self.beta) * tr
        return self.b_simple

    def update_data_parallel(
        self, mean_local_sq_norm: ArrayLike, global_sq_norm: ArrayLike, per_rank_batch: ArrayLike, world_size: int
    ) -> float | None:
        """:meth:`update` from data-parallel quantities (see :func:`data_parallel_noise_inputs`)."""
        return self.update(*data_parallel_noise_inputs(mean_local_sq_norm, global_sq_norm, per_rank_batch, world_size))

    def _corrected(self, ema: float) -> float | None:
        if self.steps == 0:
            return None
        return ema / (1.0 - self.beta**self.steps)

    @property
    def grad_sq_norm(self) -> float | None:
        """Bias-corrected EMA of the ``|G|^2`` estimates (``None`` before the first update)."""
        return self._corrected(self._ema_g2)

    @property
    def trace_cov(self) -> float | None:
        """Bias-corrected EMA of the ``tr(Sigma)`` estimates (``None`` before the first update)."""
        return self._corrected(self._ema_trace)

    @property
    def b_simple(self) -> float | None:
        """``tr(Sigma) / |G|^2`` from the two EMAs; ``None`` until defined (see the class docstring)."""
        g2, tr = self.grad_sq_norm, self.trace_cov
        if g2 is None or tr is None or not g2 > 0 or not math.isfinite(g2) or not math.isfinite(tr):
            return None
        return tr / g2

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (plain floats, checkpoint-friendly)."""
        return {"beta": self.beta, "steps": self.steps, "ema_g2": self._ema_g2, "ema_trace": self._ema_trace}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.beta = float(state["beta"])
        self.steps = int(state["steps"])
        self._ema_g2 = float(state["ema_g2"])
        self._ema_trace = float(state["ema_trace"])

    def __repr__(self) -> str:
        return f"GradientNoiseScale(beta={self.beta}, steps={self.steps}, b_simple={self.b_simple})"
