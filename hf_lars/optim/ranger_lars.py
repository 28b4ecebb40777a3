"""RangerLARS: RAdam + Lookahead + Gradient Centralization + a layer-wise trust ratio."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from hf_lars.layout import StepLayout
from hf_lars.optim.adam_lars import check_betas
from hf_lars.optim._docs import with_shared_args
from hf_lars.optim.base import TrustRatioOptimizer, check_range, constructor_defaults
from hf_lars.optim.fused import fused_ranger_lars
from hf_lars.optim.lamb_form import AdamFormHyper, lamb_form_step
from hf_lars.optim.moments import AdamScalars, count_steps, init_adam_state, is_zero, operand, per_piece, rectified_scalars
from hf_lars.optim.trust import Ratios, StepPlan, add_scaled
from hf_lars.optim.working_copies import StepTensors, active_inv_scale, step_in_chunks

__all__ = ["RangerLARS", "RangerLarsHyper", "ranger_lars", "centralize_gradient"]


@dataclass(frozen=True)
class RangerLarsHyper(AdamFormHyper):
    """RangerLARS's hyper-parameters (see :class:`RangerLARS`), as the functional entries take them."""

    use_gc: bool
    k: int
    alpha: float
    rectify_threshold: float
    degenerated_to_sgd: bool
    # The LAMB-form step's options that RangerLARS does not offer.
    trust_clip: ClassVar[bool] = False
    trust_bounds: ClassVar[None] = None

    def scalars(self, t: float | Tensor) -> AdamScalars:
        """This step's scalars (:func:`hf_lars.optim.moments.rectified_scalars`) for step count(s) ``t``."""
        return rectified_scalars(t, *self.betas, self.eps, self.rectify_threshold, self.k, self.degenerated_to_sgd)


@with_shared_args
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
        {params}
        lr: learning rate :math:`\gamma` >= 0.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` >= 0.
        weight_decay: :math:`\lambda` >= 0 (never on excluded layers).
        use_gc: Gradient Centralization for tensors with ndim > 1.
        k: Lookahead synchronization period (>= 1).
        alpha: Lookahead slow-weight step in (0, 1].
        rectify_threshold: :math:`\tau`; the variance is rectified once :math:`\rho_t > \tau`.
        {exclude_1d}
        degenerated_to_sgd: while unrectified, step ``w -= lr * m^`` (no trust ratio, no weight decay)
            instead of not stepping.
        adapt_excluded: excluded layers take the trust ratio (default False, LAMB's convention: they take a
            plain RAdam step at ``lr``; a group key overrides).
        {implementation}
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
        *, foreach: bool | None = None, fused: bool | None = None,  # the implementation
    ) -> None:
        defaults = constructor_defaults(locals())
        # id(group) -> the centred gradients of its ZeRO step, from _prepare_group to _step_group (several
        # groups at once when a batched step measures every group first: "Layers, pieces and one all-reduce").
        self._centred_grads: dict[int, list[Tensor]] = {}
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_betas(group["betas"])
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
        self._centred_grads.pop(id(group), None)
        if not group["use_gc"] or layout.process_group is None or all(lay.whole_rows for lay in layout.layouts):
            return
        grads = [g if g.dtype == torch.float32 else g.float() for g in layout.local([p.grad for p in stepped])]
        self._centred_grads[id(group)] = layout.row_centring().centre(grads, centralize_gradient)

    def _measure_group(self, group: dict[str, Any], stepped: list[Tensor], plan: StepPlan, foreach: bool) -> None:
        """The base class's measurement, keeping the centred gradients for the real step that follows."""
        centred = self._centred_grads.get(id(group))
        try:
            super()._measure_group(group, stepped, plan, foreach)
        finally:
            if centred is not None:
                self._centred_grads[id(group)] = centred

    _written_before_norms = frozenset({"step", "exp_avg", "exp_avg_sq"})  # the moments come first

    def _state_keys(self, group: dict[str, Any]) -> frozenset[str]:
        return frozenset({"step", "exp_avg", "exp_avg_sq", "slow_buffer"})

    def _init_state(self, group: dict[str, Any], stepped: list[Tensor]) -> None:
        for p in stepped:
            state = self.state[p]
            step = init_adam_state(state, p)
            if step is not None:
                self._step_counts.record([step], 0)
            if "slow_buffer" not in state:
                state["slow_buffer"] = p.detach().to(torch.float32, copy=True)

    def _step_group(self, group: dict[str, Any], stepped: list[Tensor], plan: StepPlan, foreach: bool) -> Ratios | None:
        states = [self.state[p] for p in stepped]
        steps = [s["step"] for s in states]
        count = self._step_counts.known(steps)
        centred = self._centred_grads.pop(id(group), None)
        result = ranger_lars(
            stepped, [p.grad for p in stepped] if centred is None else centred, [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["slow_buffer"] for s in states], steps, plan,
            RangerLarsHyper.of_group(group), foreach=foreach, fused=bool(group["fused"]), centred=centred is not None,
            count=count,
        )
        if count is not None and not group["fused"]:
            self._step_counts.record(steps, count + 1)
        return result


def centralize_gradient(grad: Tensor, *, in_place: bool = False) -> Tensor:
    """Gradient Centralization (Yong et al. 2020): ``grad`` minus, per index along dim 0, its mean over the
    other dims.

    Computed in fp32 for bf16/fp16 (the result is cast back), in the gradient's own dtype otherwise.
    Tensors with at most one dimension are returned unchanged.  ``in_place``: ``grad`` (fp32 or wider: a
    working copy) is centred in its own memory and returned (the same values).  The package's one GC
    function: the step uses it on tensors that hold whole rows (:class:`hf_lars.layout.RowCentring`
    completes cut rows).
    """
    if grad.dim() <= 1:
        return grad
    wide = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
    mean = wide.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
    if in_place and wide is grad:
        return grad.sub_(mean)
    return (wide - mean).to(grad.dtype)


def ranger_lars(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    slow_buffers: list[Tensor],
    steps: list[Tensor],
    plan: StepPlan,
    hp: RangerLarsHyper,
    *,
    foreach: bool,
    fused: bool = False,
    centred: bool = False,
    count: int | None = None,
) -> Ratios | None:
    """Functional RangerLARS step over one param group; returns ``(layer ids, ratios)`` of adapted layers.

    ``centred``: ``grads`` are already centred (Gradient Centralization of ZeRO flat partitions, done
    before the step by :meth:`RangerLARS._prepare_group`).  ``count``: as for
    :func:`hf_lars.optim.adam_lars.adam_lars`; with it, "rectified yet" and "Lookahead syncs now" are host
    decisions (a step that does not sync makes no Lookahead pass).  While a tensor is unrectified its
    trust-ratio step is scaled by 0 (a NaN still propagates, as torch's optimizers propagate one);
    ``degenerated_to_sgd`` adds ``-lr * m^`` there instead.  The ratios reported for such steps are those of
    ``u = m^ + wd * w``.  ``fused``: the compiled two-pass step of
    :func:`hf_lars.optim.fused.fused_ranger_lars` (same result).
    """
    if fused:
        return fused_ranger_lars(params, grads, exp_avgs, exp_avg_sqs, slow_buffers, steps, plan, hp, centred=centred,
                                 centre_rows=centralize_gradient, inv_scale=active_inv_scale())
    scalars = hp.scalars(count_steps(steps, count))

    def step_chunk(work: StepTensors, sub: StepPlan, span: slice) -> Ratios | None:
        if hp.use_gc and not centred:  # whole rows centred locally; rows cut by a flat partition likewise
            owned = {id(g) for i, g in enumerate(work.grads) if work.owns_grad(i)}  # working copies: in place
            work.grads = sub.layout.row_centring().centre(
                work.grads, lambda g: centralize_gradient(g, in_place=id(g) in owned)
            )
        sc = scalars.take(span)
        result = lamb_form_step(work, sub, exp_avgs[span], exp_avg_sqs[span], sc, hp, foreach)
        w = work.pieces(work.weights)
        if not is_zero(sc.fallback):
            # degenerated_to_sgd: RAdam's fallback w -= lr * m / (1 - beta1^t) while unrectified, read from the
            # updated first moment (no trust ratio, no weight decay).
            add_scaled(w, work.state_pieces(exp_avgs[span]), per_piece(sub.layout, sc.fallback), hp.lr, foreach,
                       in_place=False)
        if not is_zero(sc.sync):
            _lookahead(work.state_pieces(slow_buffers[span]), w, per_piece(sub.layout, sc.sync), hp.alpha, foreach)
        return result

    return step_in_chunks(plan, params, grads, step_chunk)


def _lookahead(slow: list[Tensor], w: list[Tensor], sync: float | Tensor, alpha: float, foreach: bool) -> None:
    """Lookahead where ``sync`` is 1: ``slow += alpha * (w - slow); w = slow`` (a 0/1 weight per piece, so no
    branch reads a device value; a host 1 is one pair of ops with scalar weights)."""
    if foreach:  # per-piece weights broadcast once (operand): on CUDA's multi-tensor fast path
        torch._foreach_lerp_(slow, w, operand(sync * alpha, w))
        torch._foreach_lerp_(w, slow, operand(sync, w))
        return
    for i, (sl, wi) in enumerate(zip(slow, w)):
        s_i = sync[i] if isinstance(sync, Tensor) else sync
        sl.lerp_(wi, s_i * alpha)
        wi.lerp_(sl, s_i)
