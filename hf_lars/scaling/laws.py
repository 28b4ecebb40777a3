r"""Batch size -> optimal learning rate laws, and the rules every front door uses to rescale an LR.

SGD (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training",
arXiv 1812.06162, section 2)::

    eps_opt(B) = eps_max / (1 + B_noise / B)

grows linearly for ``B << B_noise`` and saturates at ``eps_max`` above it.

Adam-style optimizers (Li, Zhao, et al. 2024, "Surge Phenomenon in Optimal Learning Rate and Batch Size
Scaling", arXiv 2405.14578)::

    eps_opt(B) = eps_max / (0.5 * (sqrt(B_noise / B) + sqrt(B / B_noise)))
               = eps_max / cosh((ln B - ln B_noise) / 2)

rises like ``sqrt(B)`` below ``B_noise``, peaks at ``B = B_noise`` and then *falls* like ``1/sqrt(B)``.

Rules of thumb without a noise scale: the linear rule ``lr ∝ B`` (Goyal et al. 2017, SGD) and the
square-root rule ``lr ∝ sqrt(B)`` (Adam at small batch; the ``B << B_noise`` limit of the surge law).
"""

from __future__ import annotations

import numpy as np

from hf_lars.scaling._common import ArrayLike, _as_positive, _as_positive_float, _like_input, _log_cosh, _softplus

__all__ = [
    "RULES",
    "B_NOISE_RULES",
    "sgd_optimal_lr",
    "adam_optimal_lr",
    "scaled_lr",
    "canonical_rule",
]

#: Rule names accepted by :func:`scaled_lr` (``"surge"`` is an alias of ``"adam"``).
RULES: tuple[str, ...] = ("adam", "surge", "sgd", "linear", "sqrt", "none")
_ALIASES: dict[str, str] = {"surge": "adam"}
#: Canonical rules whose LR depends on ``B_noise`` (the laws; the rules of thumb do not).
B_NOISE_RULES: frozenset[str] = frozenset({"adam", "sgd"})


def canonical_rule(rule: str) -> str:
    """The canonical name of a scaling rule (``"surge"`` -> ``"adam"``); ``ValueError`` listing the valid ones."""
    key = str(rule).strip().lower()
    if key not in RULES:
        raise ValueError(f"Unknown scaling rule {rule!r}; valid rules: {', '.join(RULES)}")
    return _ALIASES.get(key, key)


def sgd_optimal_lr(batch_size: ArrayLike, eps_max: ArrayLike, b_noise: ArrayLike) -> float | np.ndarray:
    """McCandlish et al. 2018 (arXiv 1812.06162): ``eps_opt(B) = eps_max / (1 + B_noise / B)``.

    Vectorised: scalars in give a float out, arrays broadcast.  Every argument must be positive.
    """
    b, s1 = _as_positive(batch_size, "batch_size")
    e, s2 = _as_positive(eps_max, "eps_max")
    n, s3 = _as_positive(b_noise, "b_noise")
    return _like_input(e / (1.0 + n / b), s1 and s2 and s3)


def adam_optimal_lr(batch_size: ArrayLike, eps_max: ArrayLike, b_noise: ArrayLike) -> float | np.ndarray:
    """Li et al. 2024 surge law (arXiv 2405.14578) for Adam-style optimizers.

    ``eps_opt(B) = eps_max / (0.5 * (sqrt(B_noise / B) + sqrt(B / B_noise)))``, the peak ``eps_max`` is at
    ``B = B_noise``.  Computed as ``eps_max / cosh((ln B - ln B_noise) / 2)`` so extreme ratios do not
    overflow.  Vectorised: scalars in give a float out, arrays broadcast.  Every argument must be positive.
    """
    b, s1 = _as_positive(batch_size, "batch_size")
    e, s2 = _as_positive(eps_max, "eps_max")
    n, s3 = _as_positive(b_noise, "b_noise")
    return _like_input(e * np.exp(-_log_cosh(0.5 * (np.log(b) - np.log(n)))), s1 and s2 and s3)


def _log_shape(rule: str, log_batch: np.ndarray, log_b_noise: float | np.ndarray) -> np.ndarray:
    """``log(eps_opt(B) / eps_max)`` of the ``"adam"`` or ``"sgd"`` law, from ``ln B`` and ``ln B_noise``."""
    d = log_batch - log_b_noise
    if rule == "adam":
        return -_log_cosh(0.5 * d)
    if rule == "sgd":
        return -_softplus(-d)
    raise ValueError(f"rule must be 'adam' or 'sgd' here, got {rule!r}")


def _log_ratio(rule: str, log_batch: np.ndarray, log_ref_batch: float, log_b_noise: float | None) -> np.ndarray:
    """``log(lr(B) / lr(B_ref))`` under a canonical ``rule``."""
    if rule == "linear":
        return log_batch - log_ref_batch
    if rule == "sqrt":
        return 0.5 * (log_batch - log_ref_batch)
    if rule == "none":
        return np.zeros_like(log_batch)
    assert log_b_noise is not None
    return _log_shape(rule, log_batch, log_b_noise) - _log_shape(rule, np.asarray(log_ref_batch), log_b_noise)


def scaled_lr(
    rule: str,
    ref_batch: ArrayLike,
    ref_lr: ArrayLike,
    batch: ArrayLike,
    b_noise: ArrayLike | None = None,
) -> float | np.ndarray:
    """The learning rate for global batch ``batch``, given one that works at ``ref_batch``.

    ``lr(B) = ref_lr * f(B) / f(B_ref)`` where ``f`` is, by ``rule``:

    - ``"adam"`` / ``"surge"``: the surge law ``1 / cosh((ln B - ln B_noise) / 2)`` (Li et al. 2024);
    - ``"sgd"``: McCandlish's ``1 / (1 + B_noise / B)``;
    - ``"linear"``: ``B`` (Goyal et al. 2017);  ``"sqrt"``: ``sqrt(B)``;  ``"none"``: 1.

    ``b_noise`` is required by ``"adam"``/``"surge"`` and ``"sgd"`` and ignored by the others.  ``batch``
    may be an array (the result is then an array).  This is the one function every front door (CLI,
    Trainer integration, recipes) calls, so they all agree.
    """
    canon = canonical_rule(rule)
    ref_b = _as_positive_float(ref_batch, "ref_batch")
    ref = _as_positive_float(ref_lr, "ref_lr")
    b, scalar = _as_positive(batch, "batch")
    log_bn: float | None = None
    if canon in B_NOISE_RULES:
        if b_noise is None:
            raise ValueError(f"b_noise is required for scaling rule {rule!r}")
        log_bn = float(np.log(_as_positive_float(b_noise, "b_noise")))
    out = ref * np.exp(_log_ratio(canon, np.log(b), float(np.log(ref_b)), log_bn))
    return _like_input(out, scalar)
