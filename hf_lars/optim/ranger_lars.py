"""RangerLARS: RAdam + Lookahead + Gradient Centralization + a layer-wise trust ratio."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_lars.layout import StepLayout, expand_scalars
from hf_lars.optim.base import TrustRatioOptimizer, check_range
from hf_lars.optim.fused import check_fused, fused_ranger_lars
from hf_lars.optim.moments import (
    adam_direction,
    adam_direction_piece,
    denominator_scalars,
    increment_steps,
    init_adam_state,
    step_scalars,
)
from hf_lars.optim.adam_lars import check_betas
from hf_lars.optim.trust import adam_trust_ratio, apply_update, trust_ratio_step
from hf_lars.optim.working_copies import StepTensors, active_inv_scale

__all__ = ["RangerLARS", "ranger_lars", "radam_rectification", "centralize_gradient"]


class RangerLARS(TrustRatioOptimizer):
    r"""RAdam + Lookahead + Gradient Centralization, with a layer-wise trust ratio.

    .. math::
        \begin{aligned}
        &g_t \leftarrow g_t - \mathrm{mean}_{\text{dims}>0}(g_t) \quad \text{(GC, tensors with ndim > 1)} \\
        &m_t, v_t, \hat m_t, \hat v_t \text{ as in Adam} \\
        &\rho_\infty = 2/(1-\beta_2) - 1, \qquad \rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t) \\
        &\text{if } \rho_t > \tau:\ r_t = \hat m_t/(\sqrt{\hat v_t}+\epsilon),\
            s_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}
            \\
        &\quad u_t = r_t + \lambda w_{t-1}, \qquad \phi_t = \|w_{t-1}\|/\|u_t\|, \qquad
            w_t = w_{t-1} - \gamma\, s_t\, \phi_t\, u_t \\
        &\text{else: } w_t = w_{t-1} \quad (\texttt{degenerated\_to\_sgd}:\ w_t = w_{t-1} - \gamma \hat m_t) \\
        &\text{every } k \text{ steps: } \tilde w \leftarrow \tilde w + \alpha (w_t - \tilde w),\ w_t \leftarrow \tilde w
            \quad (\tilde w_0 = w_0)
        \end{aligned}

    The rectification :math:`s_t` multiplies the step *outside* the trust ratio :math:`\phi_t`: any scalar
    inside :math:`u_t` cancels in :math:`\phi_t u_t`, which would silently delete RAdam's variance warmup.

    While the variance is unrectified (:math:`\rho_t \le \tau`: the first 5 steps at
    :math:`\beta_2 = 0.999`) no step is taken: the moments accumulate and the step counts for Lookahead.
    RAdam's own fallback there (:math:`r_t = \hat m_t`, :math:`s_t = 1`) is wrong under a trust ratio:
    :math:`\phi_t u_t` has norm :math:`\|w\|`, so each such step moves every layer by ``lr`` relative to
    its weights, against ``lr * s`` with ``s ~ 0.03`` on the first rectified steps.  ``degenerated_to_sgd``
    (RAdam's name) restores the SGD-momentum fallback *without* trust ratio or weight decay, for runs
    ported from Ranger.

    References: L. Liu et al., *On the Variance of the Adaptive Learning Rate and Beyond* (RAdam),
    arXiv:1908.03265; M. Zhang et al., *Lookahead Optimizer: k steps forward, 1 step back*,
    arXiv:1907.08610; H. Yong et al., *Gradient Centralization*, arXiv:2004.01461; You et al. 2017/2019
    for the trust ratio.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts.
        lr: learning rate :math:`\gamma` >= 0.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` >= 0.
        weight_decay: :math:`\lambda` >= 0 (never on excluded layers).
        use_gc: Gradient Centralization for tensors with ndim > 1.
        k: Lookahead synchronization period (>= 1).
        alpha: Lookahead slow-weight step in (0, 1].
        rectify_threshold: :math:`\tau`; the variance is rectified once :math:`\rho_t > \tau`.
        degenerated_to_sgd: while unrectified, step ``w -= lr * m^`` (no trust ratio, no weight decay)
            instead of not stepping.
        exclude_1d: 1-D (and 0-D) layers are excluded: no weight decay; trust ratio per ``adapt_excluded``.
        adapt_excluded: excluded layers take the trust ratio (default False, LAMB's convention: they take a
            plain RAdam step at ``lr``; a group key overrides).
        foreach: use the foreach implementation; ``None`` picks the faster one for the device.
        fused: run the step as two compiled passes (``torch.compile``; docs/design.md, "The fused path").
            ``None`` (default) and ``False``: the eager step.  Pays back on long runs (see the README).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        use_gc: bool = True,
        k: int = 6,
        alpha: float = 0.5,
        rectify_threshold: float = 5.0,
        exclude_1d: bool = True,
        degenerated_to_sgd: bool = False,
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
            use_gc=use_gc,
            k=k,
            alpha=alpha,
            rectify_threshold=rectify_threshold,
            exclude_1d=exclude_1d,
            degenerated_to_sgd=degenerated_to_sgd,
            adapt_excluded=adapt_excluded,
            foreach=foreach,
            fused=fused,
        )
        # The centred gradients of a ZeRO step, from _prepare_group to _step_group (one group at a time).
        self._centred_grads: list[Tensor] | None = None
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_fused(group)
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        if not isinstance(group["k"], int) or isinstance(group["k"], bool) or group["k"] < 1:
            raise ValueError(f"Invalid k value: {group['k']!r} (allowed: an integer >= 1)")
        check_range("alpha", group["alpha"], 0.0, 1.0, low_open=True)
        check_range("rectify_threshold", group["rectify_threshold"], 4.0, low_open=True)
        if not isinstance(group["degenerated_to_sgd"], bool):
            raise ValueError(
                f"Invalid degenerated_to_sgd value: {group['degenerated_to_sgd']!r} (allowed: True or False)"
            )

    def _prepare_group(self, group: dict[str, Any], stepped: list[Tensor], layout: StepLayout) -> None:
        """Gradient Centralization of ZeRO flat partitions, whose rows partition boundaries may cut.

        Completing a cut row takes an all-reduce of its partial sums (:class:`hf_lars.layout.RowCentring`),
        which must come before the norms' collective and be made by every rank of the group, also by one
        whose partition holds no piece; so it runs here, before :meth:`_step_group`, which takes the result.
        """
        self._centred_grads = None
        if not group["use_gc"] or layout.process_group is None or all(lay.whole_rows for lay in layout.layouts):
            return
        grads = [g if g.dtype == torch.float32 else g.float() for g in layout.local([p.grad for p in stepped])]
        self._centred_grads = layout.row_centring().centre(grads, centralize_gradient)

    def _state_keys(self, group: dict[str, Any]) -> frozenset[str]:
        return frozenset({"step", "exp_avg", "exp_avg_sq", "slow_buffer"})

    def _init_state(self, group: dict[str, Any], stepped: list[Tensor]) -> None:
        for p in stepped:
            state = self.state[p]
            if "slow_buffer" not in state:
                init_adam_state(state, p)
                state["slow_buffer"] = p.detach().to(torch.float32, copy=True)

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
        centred, self._centred_grads = self._centred_grads, None
        return ranger_lars(
            stepped,
            [p.grad for p in stepped] if centred is None else centred,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["slow_buffer"] for s in states],
            [s["step"] for s in states],
            layout,
            adapt,
            decay,
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            use_gc=group["use_gc"],
            k=group["k"],
            alpha=group["alpha"],
            rectify_threshold=group["rectify_threshold"],
            degenerated_to_sgd=group["degenerated_to_sgd"],
            centred=centred is not None,
            foreach=foreach,
            fused=bool(group["fused"]),
        )


def radam_rectification(t: Tensor, beta2: float, threshold: float) -> tuple[Tensor, Tensor]:
    """RAdam's ``(rectified, s)`` per step count ``t``: ``rectified`` is 1.0 where ``rho_t > threshold``."""
    rho_inf = 2 / (1 - beta2) - 1
    beta2_t = beta2**t
    rho_t = rho_inf - 2 * t * beta2_t / (1 - beta2_t)
    rectified = (rho_t > threshold).to(t.dtype)
    ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    s = torch.where(rectified > 0, ratio.clamp(min=0).sqrt(), torch.ones_like(ratio))
    return rectified, s


def centralize_gradient(grad: Tensor) -> Tensor:
    """Gradient Centralization (Yong et al. 2020): ``grad`` minus, per index along dim 0, its mean over the
    other dims.

    Computed in fp32 for bf16/fp16 (the result is cast back), in the gradient's own dtype otherwise.
    Tensors with at most one dimension are returned unchanged.  The package's one GC function: the step
    uses it on tensors that hold whole rows (:class:`hf_lars.layout.RowCentring` completes cut rows).
    """
    if grad.dim() <= 1:
        return grad
    wide = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
    centred = wide - wide.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
    return centred.to(grad.dtype)


def ranger_lars(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    slow_buffers: list[Tensor],
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
    use_gc: bool,
    k: int,
    alpha: float,
    rectify_threshold: float,
    degenerated_to_sgd: bool = False,
    centred: bool = False,
    foreach: bool,
    fused: bool = False,
) -> tuple[list[int], Tensor] | None:
    """Functional RangerLARS step over one param group; returns ``(layer ids, ratios)`` of adapted layers.

    ``centred``: ``grads`` are already centred (Gradient Centralization of ZeRO flat partitions, done
    before the step by :meth:`RangerLARS._prepare_group`).  While a tensor is unrectified its trust-ratio
    step is scaled by 0 (a 0/1 mask on the device, no host sync); ``degenerated_to_sgd`` adds
    ``-lr * m^`` there instead.  The ratios reported for such steps are those of ``u = m^ + wd * w``.
    ``fused``: the compiled two-pass step of :func:`hf_lars.optim.fused.fused_ranger_lars` (same result).
    """
    if fused:
        return fused_ranger_lars(
            params, grads, exp_avgs, exp_avg_sqs, slow_buffers, steps, layout, adapt, decay, lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay, use_gc=use_gc, k=k, alpha=alpha,
            rectify_threshold=rectify_threshold, degenerated_to_sgd=degenerated_to_sgd, centred=centred,
            centre_rows=centralize_gradient, inv_scale=active_inv_scale(),
        )
    work = StepTensors(params, grads, layout)
    tensor_by_tensor = not foreach and layout.trivial
    centre = [use_gc and not centred and g.ndim > 1 for g in work.grads]
    if use_gc and not centred and not tensor_by_tensor:
        # Whole rows centred locally; rows cut by a flat partition without a process group likewise.
        work.grads = layout.row_centring().centre(work.grads, centralize_gradient)
    increment_steps(steps, foreach)
    w = work.pieces(work.weights)
    t = torch.stack(steps)  # one value per stepped tensor (all pieces of a tensor share its step)
    t64 = step_scalars(t)
    rectified, s = (x.float() for x in radam_rectification(t64, beta2, rectify_threshold))
    bc1, bc2 = (1 - beta1**t64).float(), (1 - beta2**t64).float()
    # Unrectified tensors take no trust-ratio step (docs/design.md, "The update rules").
    scale = layout.per_piece(s * rectified * -lr)
    # degenerated_to_sgd: RAdam's fallback w -= lr * m / (1 - beta1^t) while unrectified, read from the
    # updated first moment after the moments step (no trust ratio, no weight decay).
    fallback = layout.per_piece((1 - rectified) * -lr / bc1) if degenerated_to_sgd else None
    # Lookahead: on steps that are multiples of k, slow += alpha * (w - slow); w = slow.  Written with a
    # 0/1 weight per piece so no Python branch depends on a device value.
    sync = layout.per_piece((torch.remainder(t, k) == 0).to(t.dtype))
    if tensor_by_tensor:
        ratios = _tensor_by_tensor_ranger_lars(
            w,
            work.pieces(work.grads),
            work.state_pieces(exp_avgs),
            work.state_pieces(exp_avg_sqs),
            work.state_pieces(slow_buffers),
            centre,
            bc1,
            bc2,
            rectified,
            scale,
            fallback,
            sync,
            adapt,
            decay,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            alpha=alpha,
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
            rectified=rectified,
            foreach=foreach,
        )
    )
    result = trust_ratio_step(
        layout, adapt, decay, w, u, scale=scale, weight_decay=weight_decay, foreach=foreach
    )
    if fallback is not None:
        apply_update(w, work.state_pieces(exp_avgs), fallback, foreach)
    slow = work.state_pieces(slow_buffers)
    if foreach:
        # Per-piece Lookahead weights broadcast once (expand_scalars): on CUDA's multi-tensor fast path.
        torch._foreach_lerp_(slow, w, expand_scalars(sync * alpha, w))
        torch._foreach_lerp_(w, slow, expand_scalars(sync, w))
    else:
        for i, (sl, wi) in enumerate(zip(slow, w)):
            sl.lerp_(wi, sync[i] * alpha)
            wi.lerp_(sl, sync[i])
    work.write_back()
    return result


def _tensor_by_tensor_ranger_lars(
    w: list[Tensor],
    g: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    slow_buffers: list[Tensor],
    centre: list[bool],
    bc1: Tensor,
    bc2: Tensor,
    rectified: Tensor,
    scale: Tensor,
    fallback: Tensor | None,
    sync: Tensor,
    adapt: list[bool],
    decay: list[bool],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    alpha: float,
) -> Tensor | None:
    """The per-tensor path when every tensor is one whole, unsharded layer; returns the adapted ones' ratios.

    Each tensor is finished (GC, moments, direction, norms, trust ratio, update, Lookahead) before the next
    one starts, so its one temporary dies at once and its data is still in cache.  Materialising every
    direction before taking the norms, as layers split across tensors or ranks require, is ~2x slower on
    CPU.  Same result.
    """
    den_scale, den_shift = denominator_scalars(len(w), eps, bc1, bc2, rectified)
    ratios = []
    for i, (wi, gi, adapted, decayed) in enumerate(zip(w, g, adapt, decay)):
        centred = centralize_gradient(gi) if centre[i] else None
        u = adam_direction_piece(
            exp_avgs[i],
            exp_avg_sqs[i],
            gi if centred is None else centred,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            scale=den_scale[i],
            shift=den_shift[i],
            scratch=centred,  # the direction reuses the centred gradient's memory: one temporary, not two
        )
        if adapted:
            if weight_decay != 0 and decayed:
                u.add_(wi, alpha=weight_decay)
            norm = torch.linalg.vector_norm
            ratio = adam_trust_ratio(norm(wi, dtype=torch.float32), norm(u, dtype=torch.float32))
            wi.addcmul_(u, ratio * scale[i])
            ratios.append(ratio)
        else:
            wi.addcmul_(u, scale[i])
        if fallback is not None:
            wi.addcmul_(exp_avgs[i], fallback[i])
        slow_buffers[i].lerp_(wi, sync[i] * alpha)
        wi.lerp_(slow_buffers[i], sync[i])
    return torch.stack(ratios) if ratios else None
