"""The LAMB-form step that AdamLARS and RangerLARS share: Adam's direction on whole local tensors, then the
trust-ratio update (:func:`hf_lars.optim.trust.trust_ratio_step`), for one chunk of a group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hf_lars.optim.base import HyperParameters
from hf_lars.optim.moments import AdamScalars, adam_direction, adam_direction_piece, element, is_one
from hf_lars.optim.trust import Ratios, StepPlan, adam_trust_ratio, trust_ratio_step
from hf_lars.optim.working_copies import StepTensors

if TYPE_CHECKING:
    from hf_lars.optim.adam_lars import AdamLarsHyper
    from hf_lars.optim.ranger_lars import RangerLarsHyper

__all__ = ["AdamFormHyper", "lamb_form_step"]


@dataclass(frozen=True)
class AdamFormHyper(HyperParameters):
    """The hyper-parameters AdamLARS's and RangerLARS's records share.  The LAMB-form step also reads
    ``trust_clip`` and ``trust_bounds``: AdamLARS's fields, constants of RangerLARS's record."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


def lamb_form_step(
    work: StepTensors,
    plan: StepPlan,
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scalars: AdamScalars,
    hp: AdamLarsHyper | RangerLarsHyper,
    foreach: bool,
) -> Ratios | None:
    """Moments, direction, trust ratio and update of the tensors of ``work`` (a chunk; ``plan`` is its plan).

    The direction is elementwise: it is computed on whole (local) tensors, one op each even for a flat ZeRO
    partition holding many layers, and cut into pieces only for the per-layer norms and the update.  When
    every tensor is one whole layer and ``foreach`` is off, each tensor is finished before the next starts
    (:func:`_tensor_by_tensor`).  Returns the adapted layers' ids and ratios.
    """
    beta1, beta2 = hp.betas
    if not foreach and plan.layout.trivial:
        return _tensor_by_tensor(work, plan, exp_avgs, exp_avg_sqs, scalars, hp)
    writable = all(work.owns_grad(i) for i in range(len(work.grads)))
    u = adam_direction(work.state_local(exp_avgs), work.state_local(exp_avg_sqs), work.grads, scalars, beta1, beta2,
                       foreach, scratch=work.grads if writable else None)
    work.release_grads()
    return trust_ratio_step(
        plan, work.pieces(work.weights), work.pieces(u), lr=hp.lr, factor=scalars.factor,
        weight_decay=hp.weight_decay, trust_clip=hp.trust_clip, trust_bounds=hp.trust_bounds, foreach=foreach,
    )


def _tensor_by_tensor(work: StepTensors, plan: StepPlan, exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      scalars: AdamScalars, hp: AdamLarsHyper | RangerLarsHyper) -> Ratios | None:
    """The per-tensor path when every tensor is one whole, unsharded layer (the readable reference).

    Each tensor is finished (moments, direction, norms, trust ratio, update) before the next one starts, so
    its one temporary dies at once and its data is still in cache.  Materialising every direction before
    taking the norms, as layers split across tensors or ranks require, is ~2x slower on CPU.  Same result
    as :func:`trust_ratio_step`, op for op.
    """
    beta1, beta2 = hp.betas
    norm = torch.linalg.vector_norm
    ratios = []
    for i, (w, g, adapted, decayed) in enumerate(zip(work.weights, work.grads, plan.adapt, plan.decay)):
        # A working copy of the gradient is dead once the moments are updated: the direction reuses it.
        u = adam_direction_piece(exp_avgs[i], exp_avg_sqs[i], g, element(scalars.den_scale, i),
                                 element(scalars.den_shift, i), beta1, beta2, work.grads[i] if work.owns_grad(i) else None)
        factor = element(scalars.factor, i)
        if not adapted:
            if not is_one(factor):
                u.mul_(factor)
            w.add_(u, alpha=-hp.lr)
            continue
        if hp.weight_decay != 0 and decayed:
            u.add_(w, alpha=hp.weight_decay)
        ratio = adam_trust_ratio(norm(w, dtype=torch.float32), norm(u, dtype=torch.float32), hp.trust_clip,
                                 hp.trust_bounds)
        w.addcmul_(u, ratio if is_one(factor) else ratio * factor, value=-hp.lr)
        ratios.append(ratio)
    return (plan.layout.select(plan.adapt).layers, torch.stack(ratios)) if ratios else None
