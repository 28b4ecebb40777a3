"""Independent reference implementations of the three update rules of docs/design.md ("The update rules").

Written from the formulas, not from ``hf_lars``: one layer at a time, plain Python loops, every tensor in
float64 and every scalar (step counts, ``beta**t``, ``rho_t``, norms, ratios) a Python float, i.e. IEEE
double.  Nothing here imports ``hf_lars``.

A reference optimizer holds its own float64 copy of each layer's weights and its own state.  Each layer has
its own hyper-parameters (``hp``: the merged values of its param group, the optimizer's documented
defaults included) from which :func:`resolve_roles` decides, independently of ``hf_lars``, whether it takes
the trust ratio and whether it takes weight decay (docs/design.md, "Exclusion: two decisions").
:meth:`ReferenceOptimizer.step` takes one gradient per layer (``None``: the layer is skipped and its step
count does not advance, like a parameter without a gradient in ``torch.optim``) and returns ``{layer name: trust ratio}`` for the adapted layers it stepped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ReferenceOptimizer",
    "ReferenceLARS",
    "ReferenceAdamLARS",
    "ReferenceRangerLARS",
    "resolve_roles",
    "radam_rho",
    "radam_s",
]


def resolve_roles(shape: Sequence[int], hp: dict[str, Any]) -> tuple[bool, bool]:
    """``(adapted, decayed)`` of a layer (docs/design.md, "Exclusion: two decisions").

    Excluded: 1-D or 0-D under ``exclude_1d``, or any layer of a group with ``excluded=True``.  Excluded
    layers never decay and take the trust ratio only under ``adapt_excluded``; the others take both.
    """
    excluded = bool(hp.get("excluded", False)) or (hp["exclude_1d"] and len(shape) <= 1)
    if excluded:
        return bool(hp["adapt_excluded"]), False
    return True, True


def _norm(x: Tensor) -> float:
    """L2 norm as a Python float, summed element by element in float64."""
    return math.sqrt(float((x.double() * x.double()).sum()))


def _ratio(num: float, den: float, w_norm: float, other_norm: float) -> float:
    """``num / den``; 1 where either norm is 0 (never a zero step); NaN where a norm is not finite
    (docs/design.md, "The update rules": NaN is never reported as a healthy 1)."""
    if not (math.isfinite(w_norm) and math.isfinite(other_norm)):
        return math.nan
    if w_norm == 0.0 or other_norm == 0.0:
        return 1.0
    return num / den


def _min(a: float, b: float) -> float:
    """``min`` that keeps a NaN (Python's ``min(nan, 1.0)`` is nan but ``min(1.0, nan)`` is 1.0)."""
    return a if math.isnan(a) else min(a, b)


def radam_rho(t: int, beta2: float) -> float:
    """RAdam's ``rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)`` in double precision."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    b2t = beta2**t
    return rho_inf - 2.0 * t * b2t / (1.0 - b2t)


def radam_s(t: int, beta2: float) -> float:
    """RAdam's rectification factor ``s`` (only meaningful where ``rho_t`` is above the threshold)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = radam_rho(t, beta2)
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


class ReferenceOptimizer:
    """Per-layer float64 weights, state and hyper-parameters; subclasses implement :meth:`_step_layer`."""

    def __init__(
        self,
        names: Sequence[str],
        weights: Sequence[Tensor],
        hps: Sequence[dict[str, Any]],
    ) -> None:
        if not (len(names) == len(weights) == len(hps)):
            raise AssertionError("names, weights and hps must be parallel lists")
        self.names = list(names)
        self.weights = [w.detach().to(torch.float64).clone() for w in weights]
        self.hps = [dict(hp) for hp in hps]
        roles = [resolve_roles(w.shape, hp) for w, hp in zip(weights, hps)]
        self.adapt = [a for a, _ in roles]
        self.decay = [d for _, d in roles]
        self.state: list[dict[str, Any]] = [{} for _ in weights]

    def step(self, grads: Sequence[Tensor | None]) -> dict[str, float]:
        ratios: dict[str, float] = {}
        for i, g in enumerate(grads):
            if g is None:
                continue
            ratio = self._step_layer(i, g.detach().to(torch.float64))
            if self.adapt[i]:
                ratios[self.names[i]] = ratio
        return ratios

    def _step_layer(self, i: int, g: Tensor) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class ReferenceLARS(ReferenceOptimizer):
    """docs/design.md ("The update rules"), LARS::

        d   = g + wd * w
        rho = eta * ||w|| / (||g|| + wd * ||w|| + eps)      (1 if a norm is 0; trust_clip: min(rho, 1))
        buf = momentum * buf + rho * d                       (first step: buf = rho * d)
        w   = w - lr * buf                                   (nesterov: w - lr * (rho * d + momentum * buf))

    Excluded layers: wd = 0; not adapted (``adapt_excluded=False``): rho = 1.
    """

    def _step_layer(self, i: int, g: Tensor) -> float:
        hp, w, st = self.hps[i], self.weights[i], self.state[i]
        wd = hp["weight_decay"] if self.decay[i] else 0.0
        rho = 1.0
        if self.adapt[i]:
            w_norm, g_norm = _norm(w), _norm(g)
            rho = _ratio(hp["trust_coefficient"] * w_norm, g_norm + wd * w_norm + hp["eps"], w_norm, g_norm)
            if hp["trust_clip"]:
                rho = _min(rho, 1.0)  # LARC: the effective rate lr * rho never exceeds lr
        d = g + wd * w
        mu = hp["momentum"]
        if mu == 0:
            step = rho * d
        else:
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = rho * d
            else:
                st["momentum_buffer"] = mu * st["momentum_buffer"] + rho * d
            buf = st["momentum_buffer"]
            step = rho * d + mu * buf if hp["nesterov"] else buf
        self.weights[i] = w - hp["lr"] * step
        return rho


def _adam_moments(st: dict[str, Any], g: Tensor, beta1: float, beta2: float) -> int:
    """Advance ``m``, ``v`` and ``t``; returns the new ``t`` (starting at 1)."""
    if "step" not in st:
        st["step"] = 0
        st["exp_avg"] = torch.zeros_like(g)
        st["exp_avg_sq"] = torch.zeros_like(g)
    st["step"] += 1
    st["exp_avg"] = beta1 * st["exp_avg"] + (1 - beta1) * g
    st["exp_avg_sq"] = beta2 * st["exp_avg_sq"] + (1 - beta2) * g * g
    return st["step"]


class ReferenceAdamLARS(ReferenceOptimizer):
    """docs/design.md ("The update rules"), Adam-LARS (LAMB)::

        m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g*g ;  m^ = m/(1-b1^t) ;  v^ = v/(1-b2^t)
        u = m^ / (sqrt(v^) + eps) + wd * w
        rho = ||w|| / ||u||        (1 if a norm is 0; trust_clip: min(rho, 1); trust_bounds: clamp)
        w = w - lr * rho * u

    Excluded layers: wd = 0; not adapted: rho = 1.  ``bias_correction=False``: m^ = m, v^ = v.
    """

    def _step_layer(self, i: int, g: Tensor) -> float:
        hp, w, st = self.hps[i], self.weights[i], self.state[i]
        beta1, beta2 = hp["betas"]
        t = _adam_moments(st, g, beta1, beta2)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        if hp["bias_correction"]:
            m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        else:
            m_hat, v_hat = m, v
        u = m_hat / (v_hat.sqrt() + hp["eps"])
        rho = 1.0
        if self.decay[i]:
            u = u + hp["weight_decay"] * w
        if self.adapt[i]:
            w_norm, u_norm = _norm(w), _norm(u)
            rho = _ratio(w_norm, u_norm, w_norm, u_norm)
            if hp["trust_clip"]:
                rho = _min(rho, 1.0)
            if hp["trust_bounds"] is not None:
                lo, hi = hp["trust_bounds"]
                rho = _min(-_min(-rho, -lo), hi)
        self.weights[i] = w - hp["lr"] * rho * u
        return rho


class ReferenceRangerLARS(ReferenceOptimizer):
    """docs/design.md ("The update rules"), Ranger-LARS::

        g = g - mean(g over all dims but 0)     (GC, only for tensors with ndim > 1)
        m, v, m^, v^ as in Adam-LARS
        rho_inf = 2/(1-b2) - 1 ;  rho_t = rho_inf - 2*t*b2^t/(1-b2^t)
        if rho_t > threshold: r = m^ / (sqrt(v^) + eps)
                              s = sqrt((rho_t-4)(rho_t-2)rho_inf / ((rho_inf-4)(rho_inf-2)rho_t))
                              u = r + wd * w ;  rho = ||w|| / ||u|| ;  w = w - lr * s * rho * u
        else:                 no update                   (degenerated_to_sgd: w = w - lr * m^)
        every k steps:  slow = slow + alpha * (w - slow) ;  w = slow      (slow starts as w at step 0)

    Excluded layers: wd = 0; not adapted (``adapt_excluded=False``): rho = 1.  The ratio returned for an
    unrectified step (which applies none) is ``||w|| / ||m^ + wd * w||``, what the optimizer reports then.

    ``s_inside_ratio=True`` is the *wrong* variant found in RangerLars ports (``u = s * r + wd * w``, no
    ``s`` outside the ratio): with ``wd = 0`` the ``s`` cancels in ``rho * u``.  Tests use it to show the
    real optimizer is not that.
    """

    def __init__(self, *args: Any, s_inside_ratio: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.s_inside_ratio = s_inside_ratio

    def _step_layer(self, i: int, g: Tensor) -> float:
        hp, w, st = self.hps[i], self.weights[i], self.state[i]
        if "slow_buffer" not in st:
            st["slow_buffer"] = w.clone()
        if hp["use_gc"] and g.ndim > 1:
            g = g - g.mean(dim=tuple(range(1, g.ndim)), keepdim=True)
        beta1, beta2 = hp["betas"]
        t = _adam_moments(st, g, beta1, beta2)
        m_hat = st["exp_avg"] / (1 - beta1**t)
        v_hat = st["exp_avg_sq"] / (1 - beta2**t)
        rectified = radam_rho(t, beta2) > hp["rectify_threshold"]
        if rectified:
            r = m_hat / (v_hat.sqrt() + hp["eps"])
            s = radam_s(t, beta2)
        else:
            r, s = m_hat, 0.0
        if self.s_inside_ratio and rectified:
            r, s = s * r, 1.0
        rho = 1.0
        u = r + hp["weight_decay"] * w if self.decay[i] else r
        if self.adapt[i]:
            w_norm, u_norm = _norm(w), _norm(u)
            rho = _ratio(w_norm, u_norm, w_norm, u_norm)
        w = w - hp["lr"] * s * rho * u
        if not rectified and hp["degenerated_to_sgd"]:
            w = w - hp["lr"] * m_hat
        if t % hp["k"] == 0:
            st["slow_buffer"] = st["slow_buffer"] + hp["alpha"] * (w - st["slow_buffer"])
            w = st["slow_buffer"].clone()
        self.weights[i] = w
        return rho
