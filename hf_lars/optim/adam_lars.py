"""AdamLARS (LAMB): Adam with a layer-wise trust ratio (You et al. 2019)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hf_lars.optim._docs import with_shared_args
from hf_lars.optim.base import TrustRatioOptimizer, check_range, constructor_defaults
from hf_lars.optim.fused import fused_adam_lars
from hf_lars.optim.lamb_form import AdamFormHyper, lamb_form_step
from hf_lars.optim.moments import AdamScalars, adam_scalars, count_steps, init_adam_state
from hf_lars.optim.trust import Ratios, StepPlan
from hf_lars.optim.working_copies import StepTensors, active_inv_scale, step_in_chunks

__all__ = ["AdamLARS", "AdamLarsHyper", "adam_lars", "check_betas", "check_trust_bounds"]


@dataclass(frozen=True)
class AdamLarsHyper(AdamFormHyper):
    """AdamLARS's hyper-parameters (see :class:`AdamLARS`), as the functional entries take them."""

    bias_correction: bool
    trust_clip: bool
    trust_bounds: tuple[float, float] | None

    def scalars(self, t: float | Tensor) -> AdamScalars:
        """This step's scalars (:func:`hf_lars.optim.moments.adam_scalars`) for step count(s) ``t``."""
        return adam_scalars(t, *self.betas, self.eps, self.bias_correction)


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


@with_shared_args
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
        {params}
        lr: learning rate :math:`\gamma` >= 0.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` >= 0.
        weight_decay: :math:`\lambda` >= 0 (decoupled, inside the ratio; never on excluded layers).
        bias_correction: divide the moments by :math:`1-\beta^t`.
        trust_clip: cap the ratio at 1.
        trust_bounds: ``None`` or ``(lo, hi)`` with ``0 < lo <= hi``.
        {exclude_1d}
        adapt_excluded: excluded layers take the trust ratio (default False, LAMB's convention: they take a
            plain Adam step at ``lr``; a group key overrides).
        {implementation}
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
        *, foreach: bool | None = None, fused: bool | None = None,  # the implementation
    ) -> None:
        super().__init__(params, constructor_defaults(locals()))

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_betas(group["betas"])
        check_trust_bounds(group["trust_bounds"])

    _written_before_norms = frozenset({"step", "exp_avg", "exp_avg_sq"})  # the moments come first

    def _state_keys(self, group: dict[str, Any]) -> frozenset[str]:
        return frozenset({"step", "exp_avg", "exp_avg_sq"})

    def _init_state(self, group: dict[str, Any], stepped: list[Tensor]) -> None:
        for p in stepped:
            step = init_adam_state(self.state[p], p)
            if step is not None:
                self._step_counts.record([step], 0)

    def _step_group(self, group: dict[str, Any], stepped: list[Tensor], plan: StepPlan, foreach: bool) -> Ratios | None:
        states = [self.state[p] for p in stepped]
        steps = [s["step"] for s in states]
        count = self._step_counts.known(steps)
        result = adam_lars(
            stepped, [p.grad for p in stepped], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            steps, plan, AdamLarsHyper.of_group(group), foreach=foreach, fused=bool(group["fused"]), count=count,
        )
        if count is not None and not group["fused"]:
            self._step_counts.record(steps, count + 1)
        return result


def adam_lars(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    plan: StepPlan,
    hp: AdamLarsHyper,
    *,
    foreach: bool,
    fused: bool = False,
    count: int | None = None,
) -> Ratios | None:
    """Functional AdamLARS step over one param group; returns ``(layer ids, ratios)`` of adapted layers.

    ``steps`` are the ``state["step"]`` tensors; ``count``: their common value before this step when the
    caller knows it on the host (:class:`hf_lars.optim.moments.HostStepCounts`), so the per-step scalars are
    host floats; ``None``: they are computed from ``steps`` on the device.  ``fused``: the compiled
    two-pass step of :func:`hf_lars.optim.fused.fused_adam_lars` (same result; it reads the counts on the
    device).  The eager step runs a chunk of tensors at a time (:func:`step_in_chunks`).
    """
    if fused:
        return fused_adam_lars(params, grads, exp_avgs, exp_avg_sqs, steps, plan, hp, inv_scale=active_inv_scale())
    scalars = hp.scalars(count_steps(steps, count))

    def step_chunk(work: StepTensors, sub: StepPlan, span: slice) -> Ratios | None:
        return lamb_form_step(work, sub, exp_avgs[span], exp_avg_sqs[span], scalars.take(span), hp, foreach)

    return step_in_chunks(plan, params, grads, step_chunk)
