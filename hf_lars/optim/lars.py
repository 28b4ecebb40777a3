"""LARS: SGD with momentum and a layer-wise trust ratio (You, Gitman, Ginsburg 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_lars.layout import PieceSubset, StepLayout
from hf_lars.optim.base import TrustRatioOptimizer, check_range
from hf_lars.optim.fused import check_fused, fused_lars
from hf_lars.optim.trust import lars_trust_ratio
from hf_lars.optim.working_copies import StepTensors

__all__ = ["LARS", "lars"]


class LARS(TrustRatioOptimizer):
    r"""Layer-wise Adaptive Rate Scaling.

    .. math::
        \begin{aligned}
        &d_t = g_t + \lambda w_{t-1} \\
        &\rho_t = \eta \, \|w_{t-1}\| \,/\, (\|g_t\| + \lambda \|w_{t-1}\| + \epsilon)
            \quad (\rho_t = 1 \text{ if } \|w\| = 0 \text{ or } \|g\| = 0) \\
        &b_t = \mu b_{t-1} + \rho_t d_t \quad (b_0 = 0) \\
        &w_t = w_{t-1} - \gamma b_t \qquad
            \text{(nesterov: } w_t = w_{t-1} - \gamma(\rho_t d_t + \mu b_t))
        \end{aligned}

    with norms taken per *layer* (one original parameter).  ``trust_clip`` (LARC) caps :math:`\rho_t` at 1.
    Excluded layers (``exclude_1d``: biases and norm scales; or a group with ``adapt=False``) take a
    plain SGD-momentum step: :math:`\rho_t = 1`, :math:`\lambda = 0`.

    Reference: Y. You, I. Gitman, B. Ginsburg, *Large Batch Training of Convolutional Networks*,
    arXiv:1708.03888 (2017), Algorithm 1.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or param-group dicts.
        lr: learning rate :math:`\gamma`.
        momentum: :math:`\mu` in [0, 1).
        weight_decay: :math:`\lambda` >= 0 (applied only to adapted layers).
        trust_coefficient: :math:`\eta` > 0.
        eps: :math:`\epsilon` >= 0 in the ratio's denominator.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        trust_clip: cap the ratio at 1 (LARC).
        exclude_1d: 1-D layers get neither trust ratio nor weight decay.
        foreach: use the foreach implementation; ``None`` picks the faster one for the device.
        fused: run the step as two compiled passes (``torch.compile``; docs/design.md, "The fused path").
            ``None`` (default) and ``False``: the eager step.  Pays back on long runs (see the README).
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
        nesterov: bool = False,
        trust_clip: bool = False,
        exclude_1d: bool = True,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            trust_clip=trust_clip,
            exclude_1d=exclude_1d,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_fused(group)
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("trust_coefficient", group["trust_coefficient"], 0.0, low_open=True)
        check_range("eps", group["eps"], 0.0)
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("Invalid nesterov value: True (Nesterov momentum requires momentum > 0)")

    def _step_group(
        self, group: dict[str, Any], stepped: list[Tensor], layout: StepLayout, adapt: list[bool], foreach: bool
    ) -> tuple[list[int], Tensor] | None:
        bufs: list[Tensor | None] = []
        for p in stepped:
            state = self.state[p]
            if group["momentum"] > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            bufs.append(state.get("momentum_buffer"))
        return lars(
            stepped,
            [p.grad for p in stepped],
            bufs,
            layout,
            adapt,
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"],
            eps=group["eps"],
            nesterov=group["nesterov"],
            trust_clip=group["trust_clip"],
            foreach=foreach,
            fused=bool(group["fused"]),
        )


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    layout: StepLayout,
    adapt: list[bool],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
    foreach: bool,
    fused: bool = False,
) -> tuple[list[int], Tensor] | None:
    """Functional LARS step over one param group; returns ``(layer ids, ratios)`` of the adapted layers.

    ``fused``: the compiled two-pass step of :func:`hf_lars.optim.fused.fused_lars` (same result).
    """
    if fused:
        return fused_lars(
            params, grads, momentum_buffers, layout, adapt, lr=lr, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov, trust_clip=trust_clip,
        )
    work = StepTensors(params, grads, layout)
    w, g = work.pieces(work.weights), work.pieces(work.grads)
    bufs = work.state_pieces(momentum_buffers) if momentum > 0 else [None] * len(w)
    adapted = layout.select(adapt)
    plain = layout.select([not a for a in adapt])
    impl = _multi_tensor_lars if foreach else _single_tensor_lars
    ratios = None
    if len(adapted):
        ratios = impl(adapted, w, g, bufs, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, trust_clip)
    if len(plain):
        impl(plain, w, g, bufs, lr, momentum, 0.0, None, eps, nesterov, trust_clip)
    work.write_back()
    return None if ratios is None else (adapted.layers, ratios)


def _single_tensor_lars(
    sub: PieceSubset,
    w_all: list[Tensor],
    g_all: list[Tensor],
    buf_all: list[Tensor | None],
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float | None,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
) -> Tensor | None:
    """The readable reference: one piece at a time.  ``trust_coefficient=None``: no trust ratio."""
    ws, gs, bufs = sub.take(w_all), sub.take(g_all), sub.take(buf_all)
    rho = None
    if trust_coefficient is not None:
        norms = sub.norms(ws, gs, foreach=False)
        rho = lars_trust_ratio(norms[0], norms[1], trust_coefficient, weight_decay, eps, trust_clip)
    for i, (w, g, buf) in enumerate(zip(ws, gs, bufs)):
        d = g.add(w, alpha=weight_decay) if weight_decay != 0 else g
        if buf is not None and not nesterov:
            # buf = momentum * buf + rho * d without materialising rho * d (one pass and one temporary fewer)
            buf.mul_(momentum)
            if rho is None:
                buf.add_(d)
            else:
                buf.addcmul_(d, rho[i])
            w.add_(buf, alpha=-lr)
            continue
        if rho is not None:
            d = d * rho[i]
        if buf is None:
            w.add_(d, alpha=-lr)
            continue
        buf.mul_(momentum).add_(d)
        if nesterov:
            w.add_(d.add(buf, alpha=momentum), alpha=-lr)
        else:
            w.add_(buf, alpha=-lr)
    return rho


def _multi_tensor_lars(
    sub: PieceSubset,
    w_all: list[Tensor],
    g_all: list[Tensor],
    buf_all: list[Tensor | None],
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float | None,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
) -> Tensor | None:
    ws, gs, bufs = sub.take(w_all), sub.take(g_all), sub.take(buf_all)
    rho = None
    if trust_coefficient is not None:
        norms = sub.norms(ws, gs, foreach=True)
        rho = lars_trust_ratio(norms[0], norms[1], trust_coefficient, weight_decay, eps, trust_clip)
    d = torch._foreach_add(gs, ws, alpha=weight_decay) if weight_decay != 0 else gs
    if rho is not None:
        d = torch._foreach_mul(d, list(rho.unbind(0)))
    if bufs[0] is None:
        torch._foreach_add_(ws, d, alpha=-lr)
        return rho
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    if nesterov:
        torch._foreach_add_(ws, d, alpha=-lr)
        torch._foreach_add_(ws, bufs, alpha=-lr * momentum)
    else:
        torch._foreach_add_(ws, bufs, alpha=-lr)
    return rho
