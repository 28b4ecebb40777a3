"""Batch size -> learning rate: the laws, fitting them, measuring the noise scale, and rescaling an LR.

- :mod:`~hf_lars.scaling.laws`: ``eps_opt(B)`` for SGD (McCandlish et al. 2018) and Adam (surge, Li et al.
  2024), and :func:`scaled_lr`, the one rescaling function every front door calls.
- :mod:`~hf_lars.scaling.fit`: :func:`fit_surge` fits ``(eps_max, B_noise)`` with intervals, AIC model
  comparison and an identifiability verdict.
- :mod:`~hf_lars.scaling.grid`: :func:`best_lr_from_grid` turns a (batch, LR, loss) sweep into best LRs.
- :mod:`~hf_lars.scaling.critical`: ``S_min, E_min, B_crit`` from steps/examples, Kaplan's ``B_crit(L)``.
- :mod:`~hf_lars.scaling.noise`: the gradient noise scale ``B_simple`` measured during training.
- :mod:`~hf_lars.scaling.scaler`: :class:`AdamBatchSizeScaler`, :class:`SGDBatchSizeScaler`.
- :mod:`~hf_lars.scaling.online` and :mod:`~hf_lars.scaling.ramp`: while training, an LR factor that follows
  the measured ``B_noise`` (``OnlineLrFactor``), and a global batch that grows (``BatchSizeRamp``).
- :mod:`~hf_lars.scaling.runs` and :mod:`~hf_lars.scaling.plot`: the CSV and PNG of ``hf-lars scale fit``.

Everything here is NumPy (SciPy, when installed, only supplies exact Student-t quantiles).
"""

from __future__ import annotations

from hf_lars.scaling.critical import (
    KAPLAN_ALPHA_B,
    KAPLAN_B_STAR,
    StepsExamplesFit,
    b_noise_from_steps,
    kaplan_critical_batch,
)
from hf_lars.scaling.fit import MODEL_NAMES, ModelFit, SurgeFit, fit_surge
from hf_lars.scaling.grid import GridBest, best_lr_from_grid
from hf_lars.scaling.laws import RULES, adam_optimal_lr, canonical_rule, scaled_lr, sgd_optimal_lr
from hf_lars.scaling.noise import (
    GradientNoiseScale,
    NoiseScaleInputs,
    data_parallel_noise_inputs,
    grad_noise_trace,
    simple_noise_scale,
    true_grad_sq_norm,
)
from hf_lars.scaling import noise  # noqa: E402 - its __all__ is part of ours
from hf_lars.scaling.plot import plot_surge_fit
from hf_lars.scaling.runs import RunsFileError, RunsTable, read_runs_csv
from hf_lars.scaling.scaler import AdamBatchSizeScaler, BatchSizeScaler, ExtrapolationWarning, SGDBatchSizeScaler

__all__ = [
    # laws
    "RULES",
    "canonical_rule",
    "sgd_optimal_lr",
    "adam_optimal_lr",
    "scaled_lr",
    # fitting
    "MODEL_NAMES",
    "ModelFit",
    "SurgeFit",
    "fit_surge",
    "GridBest",
    "best_lr_from_grid",
    # critical batch
    "KAPLAN_B_STAR",
    "KAPLAN_ALPHA_B",
    "StepsExamplesFit",
    "b_noise_from_steps",
    "kaplan_critical_batch",
    # noise scale
    *noise.__all__,
    # scalers
    "ExtrapolationWarning",
    "BatchSizeScaler",
    "AdamBatchSizeScaler",
    "SGDBatchSizeScaler",
    # CLI support
    "RunsFileError",
    "RunsTable",
    "read_runs_csv",
    "plot_surge_fit",
]
