"""The trust-ratio core that LARS, AdamLARS and RangerLARS share: the step plan, ratio functions and the
LAMB-form step.

Every rule scales a layer's update by a ratio of per-layer norms.  The norms come from the layout
(:meth:`hf_lars.layout.PieceSubset.norms`, one collective under sharding); this module turns them into
ratios and applies the update piece by piece.  It knows nothing of how the pieces were cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hf_lars.layout import PieceSubset, StepLayout
from hf_lars.optim.moments import PerTensor, element, is_one, operand, per_piece

__all__ = [
    "Ratios",
    "StepPlan",
    "lars_trust_ratio",
    "ratio_weight_decay",
    "adam_trust_ratio",
    "trust_ratio_step",
    "add_scaled",
]

# (layer ids, one ratio per adapted piece) of a step, or None when it adapted nothing.
Ratios = tuple[list[int], Tensor]


@dataclass(frozen=True)
class StepPlan:
    """One group's step: the layout of the stepped tensors and, per piece, whether it takes the trust
    ratio (``adapt``) and weight decay (``decay``; only adapted pieces decay)."""

    layout: StepLayout
    adapt: tuple[bool, ...]
    decay: tuple[bool, ...]

    @staticmethod
    def of(layout: StepLayout, adapt: list[bool] | tuple[bool, ...], decay: list[bool] | tuple[bool, ...]) -> "StepPlan":
        return StepPlan(layout, tuple(bool(a) for a in adapt), tuple(bool(d) for d in decay))


def _safe_ratio(num: Tensor, den: Tensor, w_norm: Tensor, other_norm: Tensor) -> Tensor:
    """``num / den``; 1 where a norm is exactly 0 (never a frozen layer); NaN where a norm is not finite.

    A NaN or infinite norm must not read as a healthy ratio (a NaN compares false, so a ``> 0`` guard
    would turn it into 1): it yields NaN, which the trust-ratio log shows and the update propagates, as
    torch's optimizers propagate a NaN gradient.  Elementwise tensor ops only: no host synchronization.
    Eight small kernels on per-layer vectors (they count on CUDA, where a step is launch-bound):
    ``w * o == 0`` is "a norm is 0" for finite norms (a non-finite product is NaN, never 0), and
    ``s - s == 0`` is "``s = w + o`` is finite" (``inf - inf`` and NaN give NaN).
    """
    ratio = (num / den).masked_fill_(w_norm * other_norm == 0, 1.0)
    total = w_norm + other_norm
    return ratio.masked_fill_(total - total != 0, float("nan"))


def ratio_weight_decay(
    sub: PieceSubset, decays: list[bool], weight_decay: float, device: torch.device
) -> float | Tensor:
    """The weight decay inside LARS's ratio for the pieces of ``sub``: 0 on pieces that do not decay.

    One number when every piece agrees (all decay, none does, or ``weight_decay == 0``); otherwise one
    per-piece vector made once per subset (:meth:`PieceSubset.constant`: no host-to-device copy per step),
    so a group mixing both (LARS's default: biases adapted, not decayed) still takes one ratio computation.
    The eager and the fused LARS share this choice.
    """
    if weight_decay == 0 or all(decays) or not any(decays):
        return weight_decay if any(decays) else 0.0
    return sub.constant([weight_decay if dec else 0.0 for dec in decays], device)


def lars_trust_ratio(
    w_norm: Tensor,
    g_norm: Tensor,
    trust_coefficient: float,
    weight_decay: float | Tensor,
    eps: float,
    trust_clip: bool = False,
) -> Tensor:
    """LARS (You et al. 2017, Algorithm 1): ``eta * ||w|| / (||g|| + wd * ||w|| + eps)``; 1 if a norm is 0.

    ``weight_decay`` is one number or a tensor with one value per layer (0 where a layer is excluded, since
    excluded layers never take weight decay); NaN if a norm is not finite.  ``trust_clip`` (LARC) caps the
    ratio at 1 so the effective rate ``lr * ratio`` never exceeds ``lr``.
    """
    ratio = _safe_ratio(trust_coefficient * w_norm, g_norm + weight_decay * w_norm + eps, w_norm, g_norm)
    return ratio.clamp(max=1.0) if trust_clip else ratio


def adam_trust_ratio(
    w_norm: Tensor,
    u_norm: Tensor,
    trust_clip: bool = False,
    trust_bounds: tuple[float, float] | None = None,
) -> Tensor:
    """LAMB (You et al. 2019): ``||w|| / ||u||``; 1 if a norm is 0, NaN if one is not finite; optionally
    clipped / clamped (clamping keeps a NaN)."""
    ratio = _safe_ratio(w_norm, u_norm, w_norm, u_norm)
    if trust_clip:
        ratio = ratio.clamp(max=1.0)
    if trust_bounds is not None:
        ratio = ratio.clamp(min=trust_bounds[0], max=trust_bounds[1])
    return ratio


def add_scaled(weights: list[Tensor], xs: list[Tensor], factor: PerTensor, lr: float, foreach: bool, *,
               in_place: bool) -> None:
    """``w -= lr * (x * factor)`` per piece: ``factor`` is a host float (skipped when 1) or one device value
    per piece.  ``x * factor`` is rounded to fp32 before ``lr`` scales it, in both forms, so a step whose
    scalars are host floats and one whose scalars are device values give the same bits.  ``in_place``:
    the ``xs`` are temporaries that may be overwritten."""
    if not is_one(factor):
        if foreach:
            scaled = operand(factor, xs)
            if in_place:
                torch._foreach_mul_(xs, scaled)
            else:
                xs = list(torch._foreach_mul(xs, scaled))
        else:
            xs = [x.mul_(element(factor, i)) if in_place else x * element(factor, i) for i, x in enumerate(xs)]
    if foreach:
        torch._foreach_add_(weights, xs, alpha=-lr)
    else:
        for w, x in zip(weights, xs):
            w.add_(x, alpha=-lr)


def trust_ratio_step(
    plan: StepPlan,
    weights: list[Tensor],
    directions: list[Tensor],
    *,
    lr: float,
    factor: PerTensor,
    weight_decay: float,
    trust_clip: bool = False,
    trust_bounds: tuple[float, float] | None = None,
    foreach: bool,
) -> Ratios | None:
    r"""The LAMB-form update shared by AdamLARS and RangerLARS, per piece.

    Adapted pieces: :math:`u = r + \lambda w` (:math:`\lambda = 0` for excluded layers, ``decay`` False),
    :math:`\phi = \|w\|/\|u\|` per layer (one collective under sharding),
    :math:`w \mathrel{-}= \text{lr}\cdot(\phi f)\, u`; the others (excluded, not adapted):
    :math:`w \mathrel{-}= \text{lr}\cdot f\, r`.  Only adapted pieces decay.  ``factor`` :math:`f` is 1
    (AdamLARS) or one value per stepped tensor (RangerLARS's rectification, 0 while unrectified), a host
    float or a device vector.  The directions are temporaries: this writes them.  Returns the adapted
    layers' ids and ratios, or ``None`` when this rank holds no adapted piece.
    """
    layout = plan.layout
    adapted = layout.select(plan.adapt)
    plain = layout.select([not a for a in plan.adapt])
    piece_factor = per_piece(layout, factor)
    result = None
    if len(adapted):
        w_a, u_a = adapted.take(weights), adapted.take(directions)
        decayed = layout.select(plan.decay)
        if weight_decay != 0 and len(decayed):
            w_d, u_d = decayed.take(weights), decayed.take(directions)
            if foreach:
                torch._foreach_add_(u_d, w_d, alpha=weight_decay)
            else:
                for ui, wi in zip(u_d, w_d):
                    ui.add_(wi, alpha=weight_decay)
        norms = adapted.norms(w_a, u_a, foreach=foreach)
        ratio = adam_trust_ratio(norms[0], norms[1], trust_clip, trust_bounds)
        scale = ratio
        if not is_one(piece_factor):
            scale = ratio * (adapted.take_vector(piece_factor) if isinstance(piece_factor, Tensor) else piece_factor)
        if foreach:  # per-piece values broadcast once (operand): on CUDA's multi-tensor fast path
            torch._foreach_addcmul_(w_a, u_a, operand(scale, u_a), value=-lr)
        else:
            for i, (w, u) in enumerate(zip(w_a, u_a)):
                w.addcmul_(u, scale[i], value=-lr)
        result = (adapted.layers, ratio)
    if len(plain):
        plain_factor = plain.take_vector(piece_factor) if isinstance(piece_factor, Tensor) else piece_factor
        add_scaled(plain.take(weights), plain.take(directions), plain_factor, lr, foreach, in_place=True)
    return result
