"""AdamLARS (LAMB): Adam with a layer-wise trust ratio (You et al. 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_lars.layout import StepLayout
from hf_lars.optim.base import TrustRatioOptimizer, check_range
from hf_lars.optim.fused import check_fused, fused_adam_lars
from hf_lars.optim.moments import (
    adam_direction,
    adam_direction_piece,
    denominator_scalars,
    increment_steps,
    init_adam_state,
    step_scalars,
)
from hf_lars.optim.trust import adam_trust_ratio, trust_ratio_step
from hf_lars.optim.working_copies import StepTensors, active_inv_scale

__all__ = ["AdamLARS", "adam_lars", "check_betas", "check_trust_bounds"]


def check_betas(betas: Any) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas value: {betas!r} (allowed: a pair (beta1, beta2), each in [0, 1))")
    check_range("beta1 (betas[0])", betas[0], 0.0, 1.0, high_open=True)
    check_range("beta2 (betas[1])", betas[1], 0.0, 1.0, high_open=True)


def check_trust_bounds(bounds: Any) -> None:
    if bounds is None:
        return
    ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2
    ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
    if not ok or not 0 < bounds[0] <= bounds[1]:
        raise ValueError(f"Invalid trust_bounds value: {bounds!r} (allowed: None or (lo, hi) with 0 < lo <= hi)")


class AdamLARS(TrustRatioOptimizer):
    r"""Adam with a layer-wise trust ratio (LAMB).

    .. math::
        \begin{aligned}
        &m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        &\hat m_t = m_t / (1-\beta_1^t), \qquad \hat v_t = v_t / (1-\beta_2^t) \\
        &u_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon) + \lambda w_{t-1} \\
        &\rho_t = \|w_{t-1}\| / \|u_t\| \quad (\rho_t = 1 \text{ if either norm is } 0) \\
        &w_t = w_{t-1} - \gamma \rho_t u_t
        \end{aligned}

    with norms per *layer*.  ``trust_clip`` caps :math:`\rho_t` at 1; ``trust_bounds=(lo, hi)`` clamps it.
    Excluded layers (1-D under ``exclude_1d``; every layer of a group with ``excluded=True``) never take weight
    decay (:math:`\lambda=0`); by default they take a plain Adam step (:math:`\rho=1`, LAMB's convention),
    or the trust ratio with ``adapt_excluded=True``.

    Reference: Y. You et al., *Large Batch Optimization for Deep Learning: Training BERT in 76 minutes*,
    arXiv:1904.00962 (2019), Algorithm 2.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts.
        lr: learning rate :math:`\gamma` >= 0.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` >= 0.
        weight_decay: :math:`\lambda` >= 0 (decoupled, inside the ratio; never on excluded layers).
        bias_correction: divide the moments by :math:`1-\beta^t`.
        trust_clip: cap the ratio at 1.
        trust_bounds: ``None`` or ``(lo, hi)`` with ``0 < lo <= hi``.
        exclude_1d: 1-D (and 0-D) layers are excluded: no weight decay; trust ratio per ``adapt_excluded``.
        adapt_excluded: excluded layers take the trust ratio (default False, LAMB's convention: they take a
            plain Adam step at ``lr``; a group key overrides).
        foreach: use the foreach implementation; ``None`` picks the faster one for the device.
        fused: run the step as two compiled passes (``torch.compile``; docs/design.md, "The fused path").
            ``None`` (default) and ``False``: the eager step.  Pays back on long runs (see the README).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        trust_clip: bool = False,
        trust_bounds: tuple[float, float] | None = None,
        exclude_1d: bool = True,
        adapt_excluded: bool = False,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            trust_clip=trust_clip,
            trust_bounds=trust_bounds,
            exclude_1d=exclude_1d,
            adapt_excluded=adapt_excluded,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_fused(group)
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_trust_bounds(group["trust_bounds"])

    def _state_keys(self, group: dict[str, Any]) -> frozenset[str]:
        return frozenset({"step", "exp_avg", "exp_avg_sq"})

    def _init_state(self, group: dict[str, Any], stepped: list[Tensor]) -> None:
        for p in stepped:
            init_adam_state(self.state[p], p)

    def _step_group(
        self,
        group: dict[str, Any],
        stepped: list[Tensor],
        layout: StepLayout,
        adapt: list[bool],
        decay: list[bool],
        foreach: bool,
    ) -> tuple[list[int], Tensor] | None:
        states = [self.state[p] for p in stepped]
        return adam_lars(
            stepped,
            [p.grad for p in stepped],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            layout,
            adapt,
            decay,
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction=group["bias_correction"],
            trust_clip=group["trust_clip"],
            trust_bounds=group["trust_bounds"],
            foreach=foreach,
            fused=bool(group["fused"]),
        )


def adam_lars(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    layout: StepLayout,
    adapt: list[bool],
    decay: list[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    trust_clip: bool,
    trust_bounds: tuple[float, float] | None,
    foreach: bool,
    fused: bool = False,
) -> tuple[list[int], Tensor] | None:
    """Functional AdamLARS step over one param group; returns ``(layer ids, ratios)`` of adapted layers.

    ``fused``: the compiled two-pass step of :func:`hf_lars.optim.fused.fused_adam_lars` (same result).
    """
    if fused:
        return fused_adam_lars(
            params, grads, exp_avgs, exp_avg_sqs, steps, layout, adapt, decay, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay, bias_correction=bias_correction, trust_clip=trust_clip,
            trust_bounds=trust_bounds, inv_scale=active_inv_scale(),
        )
    work = StepTensors(params, grads, layout)
    increment_steps(steps, foreach)
    w = work.pieces(work.weights)
    bc1 = bc2 = None
    if bias_correction:  # one value per stepped tensor (all pieces of a tensor share its step)
        t = step_scalars(torch.stack(steps))
        bc1, bc2 = (1 - beta1**t).float(), (1 - beta2**t).float()
    if not foreach and layout.trivial:
        ratios = _tensor_by_tensor_adam_lars(
            w,
            work.pieces(work.grads),
            work.state_pieces(exp_avgs),
            work.state_pieces(exp_avg_sqs),
            bc1,
            bc2,
            adapt,
            decay,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            trust_clip=trust_clip,
            trust_bounds=trust_bounds,
        )
        work.write_back()
        return None if ratios is None else (layout.select(adapt).layers, ratios)
    # The direction is elementwise: compute it on whole (local) tensors, one op each even for a flat ZeRO
    # partition holding many layers, and cut it into pieces only for the per-layer norms and the update.
    u = work.pieces(
        adam_direction(
            work.state_local(exp_avgs),
            work.state_local(exp_avg_sqs),
            work.grads,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            bias_correction1=bc1,
            bias_correction2=bc2,
            foreach=foreach,
        )
    )
    result = trust_ratio_step(
        layout,
        adapt,
        decay,
        w,
        u,
        scale=-lr,
        weight_decay=weight_decay,
        trust_clip=trust_clip,
        trust_bounds=trust_bounds,
        foreach=foreach,
    )
    work.write_back()
    return result


def _tensor_by_tensor_adam_lars(
    w: list[Tensor],
    g: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bc1: Tensor | None,
    bc2: Tensor | None,
    adapt: list[bool],
    decay: list[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    trust_clip: bool,
    trust_bounds: tuple[float, float] | None,
) -> Tensor | None:
    """The per-tensor path when every tensor is one whole, unsharded layer; returns the adapted ones' ratios.

    Each tensor is finished (moments, direction, norms, trust ratio, update) before the next one starts, so
    its one temporary dies at once and its data is still in cache.  Materialising every direction before
    taking the norms, as layers split across tensors or ranks require, is ~2x slower on CPU.  Same result.
    """
    den_scale, den_shift = denominator_scalars(len(w), eps, bc1, bc2, None)
    ratios = []
    for i, (wi, adapted, decayed) in enumerate(zip(w, adapt, decay)):
        u = adam_direction_piece(
            exp_avgs[i],
            exp_avg_sqs[i],
            g[i],
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            scale=None if den_scale is None else den_scale[i],
            shift=None if den_shift is None else den_shift[i],
        )
        if not adapted:
            wi.add_(u, alpha=-lr)
            continue
        if weight_decay != 0 and decayed:
            u.add_(wi, alpha=weight_decay)
        norm = torch.linalg.vector_norm
        ratio = adam_trust_ratio(norm(wi, dtype=torch.float32), norm(u, dtype=torch.float32), trust_clip, trust_bounds)
        wi.addcmul_(u, ratio * -lr)
        ratios.append(ratio)
    return torch.stack(ratios) if ratios else None
