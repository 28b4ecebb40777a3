"""LARS: SGD with momentum and a layer-wise trust ratio (You, Gitman, Ginsburg 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_lars.layout import PieceSubset, StepLayout, expand_scalars
from hf_lars.optim.base import TrustRatioOptimizer, check_range
from hf_lars.optim.fused import check_fused, fused_lars
from hf_lars.optim.trust import lars_trust_ratio, ratio_weight_decay
from hf_lars.optim.working_copies import StepTensors, active_inv_scale

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
    Excluded layers (1-D under ``exclude_1d``: biases and norm scales; every layer of a group with
    ``excluded=True``) never take weight decay (:math:`\lambda = 0`).  By default LARS still adapts them, as
    Algorithm 1 adapts every layer (``adapt_excluded=True``): otherwise they would take plain SGD momentum at
    LARS's large global learning rate.  ``adapt_excluded=False`` gives them :math:`\rho_t = 1`.

    Reference: Y. You, I. Gitman, B. Ginsburg, *Large Batch Training of Convolutional Networks*,
    arXiv:1708.03888 (2017), Algorithm 1.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or param-group dicts.
        lr: learning rate :math:`\gamma`.
        momentum: :math:`\mu` in [0, 1).
        weight_decay: :math:`\lambda` >= 0 (never applied to excluded layers).
        trust_coefficient: :math:`\eta` > 0.
        eps: :math:`\epsilon` >= 0 in the ratio's denominator.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        trust_clip: cap the ratio at 1 (LARC).
        exclude_1d: 1-D (and 0-D) layers are excluded: no weight decay; trust ratio per ``adapt_excluded``.
        adapt_excluded: excluded layers take the trust ratio (default True for LARS; a group key overrides).
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
        adapt_excluded: bool = True,
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
            adapt_excluded=adapt_excluded,
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

    def _state_keys(self, group: dict[str, Any]) -> frozenset[str]:
        return frozenset({"momentum_buffer"}) if group["momentum"] > 0 else frozenset()

    def _init_state(self, group: dict[str, Any], stepped: list[Tensor]) -> None:
        for p in stepped:
            state = self.state[p]
            if group["momentum"] > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)

    def _step_group(
        self,
        group: dict[str, Any],
        stepped: list[Tensor],
        layout: StepLayout,
        adapt: list[bool],
        decay: list[bool],
        foreach: bool,
    ) -> tuple[list[int], Tensor] | None:
        bufs: list[Tensor | None] = [self.state[p].get("momentum_buffer") for p in stepped]
        return lars(
            stepped,
            [p.grad for p in stepped],
            bufs,
            layout,
            adapt,
            decay,
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
    decay: list[bool],
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

    ``adapt`` and ``decay`` say per piece whether it takes the trust ratio and weight decay (a decayed piece
    is always adapted).  ``fused``: the compiled two-pass step of :func:`hf_lars.optim.fused.fused_lars`
    (same result).
    """
    if fused:
        return fused_lars(
            params, grads, momentum_buffers, layout, adapt, decay, lr=lr, momentum=momentum,
            weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov,
            trust_clip=trust_clip, inv_scale=active_inv_scale(),
        )
    work = StepTensors(params, grads, layout)
    w, g = work.pieces(work.weights), work.pieces(work.grads)
    bufs = work.state_pieces(momentum_buffers) if momentum > 0 else [None] * len(w)
    adapted = layout.select(adapt)
    plain = layout.select([not a for a in adapt])
    impl = _multi_tensor_lars if foreach else _single_tensor_lars
    ratios = None
    if len(adapted):
        decays = adapted.take(decay)
        ratios = impl(
            adapted, w, g, bufs, lr, momentum, weight_decay, decays, trust_coefficient, eps, nesterov, trust_clip
        )
    if len(plain):
        impl(plain, w, g, bufs, lr, momentum, 0.0, [False] * len(plain), None, eps, nesterov, trust_clip)
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
    decays: list[bool],
    trust_coefficient: float | None,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
) -> Tensor | None:
    """The readable reference: one piece at a time.  ``trust_coefficient=None``: no trust ratio.

    ``decays[i]``: piece i takes weight decay (excluded layers do not).
    """
    ws, gs, bufs = sub.take(w_all), sub.take(g_all), sub.take(buf_all)
    rho = None
    if trust_coefficient is not None:
        norms = sub.norms(ws, gs, foreach=False)
        rho = _ratios(sub, norms, decays, trust_coefficient, weight_decay, eps, trust_clip)
    for i, (w, g, buf) in enumerate(zip(ws, gs, bufs)):
        d = g.add(w, alpha=weight_decay) if weight_decay != 0 and decays[i] else g
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
    decays: list[bool],
    trust_coefficient: float | None,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
) -> Tensor | None:
    ws, gs, bufs = sub.take(w_all), sub.take(g_all), sub.take(buf_all)
    rho = None
    if trust_coefficient is not None:
        norms = sub.norms(ws, gs, foreach=True)
        rho = _ratios(sub, norms, decays, trust_coefficient, weight_decay, eps, trust_clip)
    d = list(gs)
    if weight_decay != 0 and any(decays):
        idx = [i for i, dec in enumerate(decays) if dec]
        for i, di in zip(idx, torch._foreach_add([gs[i] for i in idx], [ws[i] for i in idx], alpha=weight_decay)):
            d[i] = di
    # Per-layer ratios broadcast once over the pieces (expand_scalars): every op below stays on CUDA's
    # multi-tensor fast path, one kernel each instead of one per tensor.
    rho_full = None if rho is None else expand_scalars(rho, d)
    if bufs[0] is None:
        if rho_full is None:
            torch._foreach_add_(ws, d, alpha=-lr)
        else:
            torch._foreach_addcmul_(ws, d, rho_full, value=-lr)
        return rho
    torch._foreach_mul_(bufs, momentum)
    if rho_full is None:
        torch._foreach_add_(bufs, d)
    elif nesterov:
        d = torch._foreach_mul(d, rho_full)
        torch._foreach_add_(bufs, d)
    else:
        torch._foreach_addcmul_(bufs, d, rho_full)
    if nesterov:
        torch._foreach_add_(ws, d, alpha=-lr)
        torch._foreach_add_(ws, bufs, alpha=-lr * momentum)
    else:
        torch._foreach_add_(ws, bufs, alpha=-lr)
    return rho


def _ratios(
    sub: PieceSubset,
    norms: Tensor,
    decays: list[bool],
    trust_coefficient: float,
    weight_decay: float,
    eps: float,
    trust_clip: bool,
) -> Tensor:
    """Per-piece LARS ratios from ``norms`` (``[2, n]``: weights, gradients); wd enters only decayed pieces.

    A group that mixes decayed and excluded-but-adapted pieces (LARS's default: biases adapted, not decayed)
    takes one per-piece weight-decay vector, made once per subset: one ratio computation either way.
    """
    wd = ratio_weight_decay(sub, decays, weight_decay, norms.device)
    return lars_trust_ratio(norms[0], norms[1], trust_coefficient, wd, eps, trust_clip)
