"""Private helpers shared by the :mod:`hf_lars.scaling` modules: argument checks and small statistics."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

__all__: list[str] = []

ArrayLike = Any  # a float, an int, a 0-d tensor, a sequence or an ndarray of them


def _positive_number(name: str, value: Any, *, optional: bool = False) -> float | None:
    """``float(value)`` for a finite positive int/float (``None`` passes when ``optional``); else ``ValueError``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a positive number)")
    return float(value)


def _check_saved_settings(config: dict[str, Any], state: dict[str, Any], what: str, fix: str) -> None:
    """Refuse a checkpointed ``state`` whose settings differ from ``config``, naming each (``what``: whose, ``fix``)."""
    mismatched = {k: (v, state.get(k)) for k, v in config.items() if state.get(k) != v}
    if mismatched:
        shown = ", ".join(f"{k}: now {now!r}, saved {saved!r}" for k, (now, saved) in mismatched.items())
        raise ValueError(f"The checkpoint's {what} other settings ({shown}): {fix}")


def _waits_for_start(start_step: int, step: int | None, who: str) -> bool:
    """Whether an estimate logged after ``step`` optimizer steps comes before ``start_step`` (not acted on)."""
    if step is None:
        if start_step:
            raise ValueError(f"{who} waits until step {start_step} before acting on B_noise: pass update(b_noise, "
                             "step=<optimizer steps done>)")
        return False
    return step < start_step


def _start_step(start_step: Any) -> int:
    """``start_step`` as a non-negative int (``ValueError`` naming it otherwise)."""
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"Invalid start_step: {start_step!r} (the first optimizer step whose B_noise estimate is "
                         "acted on: a non-negative integer; 0 acts on the first estimate)")
    return start_step


def _as_positive(value: ArrayLike, name: str) -> tuple[np.ndarray, bool]:
    """``value`` as a float64 array of positive finite numbers, and whether it was a scalar.

    Raises ``ValueError`` naming ``name`` when a value is not a number, not finite, or not positive.
    """
    arr = _as_float_array(value, name)
    bad = ~np.isfinite(arr) | (arr <= 0)
    if np.any(bad):
        first = arr[bad].flat[0]
        raise ValueError(f"{name} must be positive and finite, got {first!r}")
    return arr, arr.ndim == 0


def _as_float_array(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a float64 array (``ValueError`` naming ``name`` when it is not numeric)."""
    if hasattr(value, "detach"):  # a torch tensor: no torch import needed here
        value = value.detach().cpu().numpy()
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be numeric, got {value!r}")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric, got {value!r}") from err
    return arr


def _as_positive_float(value: ArrayLike, name: str) -> float:
    """A single positive finite float (``ValueError`` naming ``name`` otherwise)."""
    arr, scalar = _as_positive(value, name)
    if not scalar and arr.size != 1:
        raise ValueError(f"{name} must be a single number, got an array of shape {arr.shape}")
    return float(arr.reshape(()))


def _like_input(result: np.ndarray, scalar: bool) -> float | np.ndarray:
    """Return a Python float for scalar input, else the array."""
    return float(result) if scalar else result


def _log_cosh(z: np.ndarray) -> np.ndarray:
    """``log(cosh(z))`` without overflow: ``|z| + log1p(exp(-2|z|)) - log 2``."""
    a = np.abs(z)
    return a + np.log1p(np.exp(-2.0 * a)) - math.log(2.0)


def _softplus(z: np.ndarray) -> np.ndarray:
    """``log(1 + exp(z))`` without overflow."""
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` without overflow."""
    return np.exp(-np.logaddexp(0.0, -z))


def _t_quantile(p: float, dof: int) -> float:
    """Quantile ``p`` of Student's t with ``dof`` degrees of freedom.

    Uses :func:`scipy.stats.t.ppf` when SciPy is installed.  Without it: the closed forms for 1 and 2
    degrees of freedom and, above, the Cornish-Fisher expansion of Abramowitz & Stegun 26.7.5 (relative
    error at dof >= 3 below 0.05% for p = 0.95, 0.15% for p = 0.975 and 1% for p = 0.995).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof!r}")
    try:
        from scipy.stats import t as _student_t  # optional: lazily imported, numpy fallback below
    except ImportError:  # pragma: no cover - exercised through _t_quantile_fallback in the tests
        return _t_quantile_fallback(p, dof)
    return float(_student_t.ppf(p, dof))


def _t_quantile_fallback(p: float, dof: int) -> float:
    """Student-t quantile without SciPy (see :func:`_t_quantile`)."""
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))
    z = NormalDist().inv_cdf(p)
    z2 = z * z
    g1 = (z2 + 1.0) * z / 4.0
    g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0
    g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0
    g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0
    v = float(dof)
    return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4
