"""LARS: SGD with momentum and a layer-wise trust ratio (You, Gitman, Ginsburg 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hf_lars.layout import PieceSubset
from hf_lars.optim._docs import with_shared_args
from hf_lars.optim.base import HyperParameters, TrustRatioOptimizer, check_range, constructor_defaults
from hf_lars.optim.fused import fused_lars
from hf_lars.optim.moments import operand
from hf_lars.optim.trust import Ratios, StepPlan, lars_trust_ratio, ratio_weight_decay
from hf_lars.optim.working_copies import StepTensors, active_inv_scale, step_in_chunks

__all__ = ["LARS", "LarsHyper", "lars"]


@dataclass(frozen=True)
class LarsHyper(HyperParameters):
    """LARS's hyper-parameters (see :class:`LARS`), as the functional entries take them."""

    lr: float
    momentum: float
    weight_decay: float
    trust_coefficient: float
    eps: float
    nesterov: bool
    trust_clip: bool


@with_shared_args
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
        {params}
        lr: learning rate :math:`\gamma`.
        momentum: :math:`\mu` in [0, 1).
        weight_decay: :math:`\lambda` >= 0 (never applied to excluded layers).
        trust_coefficient: :math:`\eta` > 0.
        eps: :math:`\epsilon` >= 0 in the ratio's denominator.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        trust_clip: cap the ratio at 1 (LARC).
        {exclude_1d}
        adapt_excluded: excluded layers take the trust ratio (default True for LARS; a group key overrides).
        {implementation}
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
        *, foreach: bool | None = None, fused: bool | None = None,  # the implementation
    ) -> None:
        super().__init__(params, constructor_defaults(locals()))

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("trust_coefficient", group["trust_coefficient"], 0.0, low_open=True)
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("Invalid nesterov value: True (Nesterov momentum requires momentum > 0)")

    def _state_keys(self, group: dict[str, Any]) -> frozenset[str]:
        return frozenset({"momentum_buffer"}) if group["momentum"] > 0 else frozenset()

    def _init_state(self, group: dict[str, Any], stepped: list[Tensor]) -> None:
        for p in stepped:
            state = self.state[p]
            if group["momentum"] > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any], stepped: list[Tensor], plan: StepPlan, foreach: bool) -> Ratios | None:
        bufs = [self.state[p].get("momentum_buffer") for p in stepped]
        return lars(stepped, [p.grad for p in stepped], bufs, plan, LarsHyper.of_group(group), foreach=foreach,
                    fused=bool(group["fused"]))


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    plan: StepPlan,
    hp: LarsHyper,
    *,
    foreach: bool,
    fused: bool = False,
) -> Ratios | None:
    """Functional LARS step over one param group; returns ``(layer ids, ratios)`` of the adapted layers.

    ``plan`` says per piece whether it takes the trust ratio and weight decay (a decayed piece is always
    adapted).  ``fused``: the compiled two-pass step of :func:`hf_lars.optim.fused.fused_lars` (same
    result).  The eager step runs a chunk of tensors at a time (:func:`step_in_chunks`).
    """
    if fused:
        return fused_lars(params, grads, momentum_buffers, plan, hp, inv_scale=active_inv_scale())
    impl = _multi_tensor_lars if foreach else _single_tensor_lars

    def step_chunk(work: StepTensors, sub: StepPlan, span: slice) -> Ratios | None:
        w, g = work.pieces(work.weights), work.pieces(work.grads)
        bufs = work.state_pieces(momentum_buffers[span]) if hp.momentum > 0 else [None] * len(w)
        adapted = sub.layout.select(sub.adapt)
        plain = sub.layout.select([not a for a in sub.adapt])
        writable = all(work.owns_grad(i) for i in range(len(work.grads)))
        ratios = impl(adapted, w, g, bufs, hp, adapted.take(sub.decay), True, writable) if len(adapted) else None
        if len(plain):
            impl(plain, w, g, bufs, hp, [False] * len(plain), False, writable)
        return None if ratios is None else (adapted.layers, ratios)

    return step_in_chunks(plan, params, grads, step_chunk)


def _single_tensor_lars(
    sub: PieceSubset, w_all: list[Tensor], g_all: list[Tensor], buf_all: list[Tensor | None], hp: LarsHyper,
    decays: list[bool], trust: bool, writable: bool,
) -> Tensor | None:
    """The readable reference: one piece at a time.  ``trust``: the pieces take the trust ratio.

    ``decays[i]``: piece i takes weight decay (excluded layers do not).  ``writable``: the gradient pieces
    are working copies, so ``g + wd * w`` is formed in their memory.
    """
    ws, gs, bufs = sub.take(w_all), sub.take(g_all), sub.take(buf_all)
    momentum, lr = hp.momentum, hp.lr
    rho = _ratios(sub, sub.norms(ws, gs, foreach=False), decays, hp) if trust else None
    for i, (w, g, buf) in enumerate(zip(ws, gs, bufs)):
        d = g
        if hp.weight_decay != 0 and decays[i]:
            d = g.add_(w, alpha=hp.weight_decay) if writable else g.add(w, alpha=hp.weight_decay)
        if buf is not None and not hp.nesterov:
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
        if hp.nesterov:
            w.add_(d.add(buf, alpha=momentum), alpha=-lr)
        else:
            w.add_(buf, alpha=-lr)
    return rho


def _multi_tensor_lars(
    sub: PieceSubset, w_all: list[Tensor], g_all: list[Tensor], buf_all: list[Tensor | None], hp: LarsHyper,
    decays: list[bool], trust: bool, writable: bool,
) -> Tensor | None:
    ws, gs, bufs = sub.take(w_all), sub.take(g_all), sub.take(buf_all)
    momentum, lr = hp.momentum, hp.lr
    rho = _ratios(sub, sub.norms(ws, gs, foreach=True), decays, hp) if trust else None
    d = list(gs)
    if hp.weight_decay != 0 and any(decays):
        idx = [i for i, dec in enumerate(decays) if dec]
        g_d, w_d = [gs[i] for i in idx], [ws[i] for i in idx]
        if writable:
            torch._foreach_add_(g_d, w_d, alpha=hp.weight_decay)
        else:
            for i, di in zip(idx, torch._foreach_add(g_d, w_d, alpha=hp.weight_decay)):
                d[i] = di
    # Per-layer ratios broadcast once over the pieces (operand): every op below stays on CUDA's
    # multi-tensor fast path, one kernel each instead of one per tensor.
    rho_full = None if rho is None else operand(rho, d)
    if bufs[0] is None:
        if rho_full is None:
            torch._foreach_add_(ws, d, alpha=-lr)
        else:
            torch._foreach_addcmul_(ws, d, rho_full, value=-lr)
        return rho
    torch._foreach_mul_(bufs, momentum)
    if rho_full is None:
        torch._foreach_add_(bufs, d)
    elif hp.nesterov:
        d = torch._foreach_mul(d, rho_full)
        torch._foreach_add_(bufs, d)
    else:
        torch._foreach_addcmul_(bufs, d, rho_full)
    if hp.nesterov:
        torch._foreach_add_(ws, d, alpha=-lr)
        torch._foreach_add_(ws, bufs, alpha=-lr * momentum)
    else:
        torch._foreach_add_(ws, bufs, alpha=-lr)
    return rho


def _ratios(sub: PieceSubset, norms: Tensor, decays: list[bool], hp: LarsHyper) -> Tensor:
    """Per-piece LARS ratios from ``norms`` (``[2, n]``: weights, gradients); wd enters only decayed pieces.

    A group that mixes decayed and excluded-but-adapted pieces (LARS's default: biases adapted, not decayed)
    takes one per-piece weight-decay vector, made once per subset: one ratio computation either way.
    """
    wd = ratio_weight_decay(sub, decays, hp.weight_decay, norms.device)
    return lars_trust_ratio(norms[0], norms[1], hp.trust_coefficient, wd, hp.eps, hp.trust_clip)
