r"""The critical batch size from training-cost trade-offs, and Kaplan et al.'s empirical law for LMs.

McCandlish et al. 2018 (arXiv 1812.06162, section 2.3): to reach a given loss, the number of
optimizer steps ``S`` and of training examples ``E = B S`` at batch size ``B`` follow::

    S = S_min (1 + B_noise / B),        E = E_min (1 + B / B_noise)

Multiplying ``S / S_min - 1 = B_noise / B`` by ``E / E_min - 1 = B / B_noise`` gives the hyperbola

    (S / S_min - 1) (E / E_min - 1) = 1    <=>    E_min / E + S_min / S = 1
                                           <=>    1 / S = 1 / S_min - (E_min / S_min) (1 / E)

a straight line in ``(1/E, 1/S)`` with intercept ``1 / S_min`` and slope ``-E_min / S_min``; dividing the two
relations gives ``E / S = B = (E_min / S_min) (B / B_noise)``, so the critical batch is
``B_crit = E_min / S_min`` (= ``B_noise`` under the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hf_lars.scaling._common import ArrayLike, _as_positive, _as_positive_float, _like_input

__all__ = ["StepsExamplesFit", "b_noise_from_steps", "kaplan_critical_batch", "KAPLAN_B_STAR", "KAPLAN_ALPHA_B"]

#: Kaplan et al. 2020 (arXiv 2001.08361, eq. 1.4): ``B_crit(L) = B_* / L^(1/alpha_B)``, ``B_*`` in tokens.
KAPLAN_B_STAR: float = 2e8
#: Kaplan et al. 2020: exponent ``alpha_B`` of the critical batch size law (L in nats per token).
KAPLAN_ALPHA_B: float = 0.21


@dataclass(frozen=True)
class StepsExamplesFit:
    """Result of :func:`b_noise_from_steps`: ``S_min``, ``E_min`` and ``B_crit = E_min / S_min``."""

    s_min: float  # fewest optimizer steps (infinite batch)
    e_min: float  # fewest training examples (tiny batch)
    b_crit: float  # E_min / S_min, in the unit of E per step (examples, or tokens if E counts tokens)
    batch_sizes: np.ndarray  # E / S of each input pair
    residuals: np.ndarray  # 1/S - fitted 1/S


def b_noise_from_steps(steps: ArrayLike, examples: ArrayLike) -> StepsExamplesFit:
    """Fit McCandlish's ``(S / S_min - 1)(E / E_min - 1) = 1`` to ``(S, E)`` pairs; return ``S_min, E_min, B_crit``.

    Each pair is the number of optimizer steps ``S`` and of training examples ``E`` (``E = B S``) needed to
    reach the same target loss at one batch size.  The fit is ordinary least squares of the line
    ``1/S = 1/S_min - B_crit / E`` (see the module docstring for the derivation), so
    ``S_min = 1 / intercept``, ``B_crit = -slope``, ``E_min = B_crit * S_min``.

    Raises:
        ValueError: non-positive inputs, mismatched lengths, fewer than 2 distinct ``E``, or data whose
            fitted line has a non-negative slope or a non-positive intercept (not the McCandlish trade-off).
    """
    s, _ = _as_positive(steps, "steps")
    e, _ = _as_positive(examples, "examples")
    s, e = np.atleast_1d(s).ravel(), np.atleast_1d(e).ravel()
    if s.shape != e.shape:
        raise ValueError(f"steps and examples must have the same length, got {s.size} and {e.size}")
    if len(np.unique(e)) < 2:
        raise ValueError("b_noise_from_steps needs at least 2 (steps, examples) pairs with distinct examples")
    inv_e, inv_s = 1.0 / e, 1.0 / s
    slope, intercept = np.polyfit(inv_e, inv_s, 1)
    if not (intercept > 0 and slope < 0):
        raise ValueError(
            "the (steps, examples) pairs do not follow S = S_min (1 + B_noise/B), E = E_min (1 + B/B_noise): "
            f"the line 1/S = a + b/E has a = {intercept:.4g} (must be > 0) and b = {slope:.4g} (must be < 0)"
        )
    s_min = 1.0 / float(intercept)
    b_crit = -float(slope)
    return StepsExamplesFit(
        s_min=s_min,
        e_min=b_crit * s_min,
        b_crit=b_crit,
        batch_sizes=e / s,
        residuals=inv_s - (intercept + slope * inv_e),
    )


def kaplan_critical_batch(
    loss: ArrayLike, b_star: float = KAPLAN_B_STAR, alpha_b: float = KAPLAN_ALPHA_B
) -> float | np.ndarray:
    """Critical batch size in **tokens** for a language model at loss ``L`` (Kaplan et al. 2020, arXiv 2001.08361).

    ``B_crit(L) = B_* / L^(1 / alpha_B)`` with ``B_* ≈ 2e8`` tokens and ``alpha_B ≈ 0.21`` (their eq. 1.4,
    fitted on WebText2 decoder-only Transformers).  ``L`` is the cross-entropy loss in **nats per token**
    (natural log; convert bits with ``L_nats = L_bits * ln 2``).  Divide by the sequence length for a batch
    size in sequences.  Vectorised over ``loss``; ``b_star`` and ``alpha_b`` override the constants.
    """
    loss_arr, scalar = _as_positive(loss, "loss")
    b = _as_positive_float(b_star, "b_star")
    a = _as_positive_float(alpha_b, "alpha_b")
    return _like_input(b / loss_arr ** (1.0 / a), scalar)
