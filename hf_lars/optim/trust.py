"""The trust-ratio core that LARS, AdamLARS and RangerLARS share: ratio functions and the LAMB-form step.

Every rule scales a layer's update by a ratio of per-layer norms.  The norms come from the layout
(:meth:`hf_lars.layout.PieceSubset.norms`, one collective under sharding); this module turns them into
ratios and applies the update piece by piece.  It knows nothing of how the pieces were cut.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hf_lars.layout import PieceSubset, StepLayout, expand_scalars

__all__ = ["lars_trust_ratio", "ratio_weight_decay", "adam_trust_ratio", "trust_ratio_step", "apply_update"]


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

    ``weight_decay`` is one number or a tensor with one value per layer (0 where a layer is excluded).

    ``weight_decay`` is 0 for excluded layers, which never take weight decay; NaN if a norm is not finite.

    ``trust_clip`` (LARC) caps the ratio at 1 so the effective rate ``lr * ratio`` never exceeds ``lr``.
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


def apply_update(weights: list[Tensor], updates: list[Tensor], scale: Tensor | float, foreach: bool) -> None:
    """``w += scale * u`` per piece; ``scale`` is one number or a tensor with one value per piece."""
    if isinstance(scale, Tensor):
        if foreach:  # per-piece scales broadcast once: on CUDA's multi-tensor fast path
            torch._foreach_addcmul_(weights, updates, expand_scalars(scale, updates))
        else:
            for i, (w, u) in enumerate(zip(weights, updates)):
                w.addcmul_(u, scale[i])
    elif foreach:
        torch._foreach_add_(weights, updates, alpha=scale)
    else:
        for w, u in zip(weights, updates):
            w.add_(u, alpha=scale)


def trust_ratio_step(
    layout: StepLayout,
    adapt: list[bool],
    decay: list[bool],
    weights: list[Tensor],
    directions: list[Tensor],
    *,
    scale: Tensor | float,
    weight_decay: float,
    trust_clip: bool = False,
    trust_bounds: tuple[float, float] | None = None,
    foreach: bool,
) -> tuple[list[int], Tensor] | None:
    r"""The LAMB-form update shared by AdamLARS and RangerLARS, per piece.

    Adapted pieces: :math:`u = r + \lambda w` (:math:`\lambda = 0` for excluded layers, ``decay`` False),
    :math:`\phi = \|w\|/\|u\|` per layer (one collective under sharding),
    :math:`w \mathrel{+}= \text{scale}\cdot\phi\, u`; the others (excluded, not adapted):
    :math:`w \mathrel{+}= \text{scale}\cdot r`.  Only adapted pieces decay.
    ``scale`` is ``-lr`` or a per-piece tensor (RangerLARS's ``-lr * s``).  Returns the adapted layers' ids and
    ratios, or ``None`` when this rank holds no adapted piece.
    """
    adapted = layout.select(adapt)
    plain = layout.select([not a for a in adapt])
    result = None
    if len(adapted):
        w_a, u_a = adapted.take(weights), adapted.take(directions)
        decayed = layout.select(decay)
        if weight_decay != 0 and len(decayed):
            w_d, u_d = decayed.take(weights), decayed.take(directions)
            if foreach:
                torch._foreach_add_(u_d, w_d, alpha=weight_decay)
            else:
                for ui, wi in zip(u_d, w_d):
                    ui.add_(wi, alpha=weight_decay)
        norms = adapted.norms(w_a, u_a, foreach=foreach)
        ratio = adam_trust_ratio(norms[0], norms[1], trust_clip, trust_bounds)
        step_scale = adapted.take_vector(scale) if isinstance(scale, Tensor) else scale
        apply_update(w_a, u_a, ratio * step_scale, foreach)
        result = (adapted.layers, ratio)
    if len(plain):
        step_scale = plain.take_vector(scale) if isinstance(scale, Tensor) else scale
        apply_update(plain.take(weights), plain.take(directions), step_scale, foreach)
    return result
