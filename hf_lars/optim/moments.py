"""Adam's moments, direction and per-step scalars, shared by AdamLARS and RangerLARS.

Per-step scalars (bias corrections, RAdam's rectification, the Lookahead sync) depend only on the step
count.  When every stepped tensor of a group is at the same step and the optimizer wrote that count itself,
the count is known on the host (:class:`HostStepCounts`), as torch's non-capturable Adam knows it, and the
scalars are Python floats: foreach ops take them on CUDA's fast path and decisions such as "is the variance
rectified yet" or "does Lookahead sync this step" are plain ``if``\\ s.  Otherwise (a GradScaler step that
may be skipped on the device, tensors at different steps) they are computed from the device step tensors,
one value per stepped tensor (:data:`PerTensor`).  One formula serves both: the functions below take a
float or a float64 device vector, compute in float64 and round to fp32 once, so the two forms give the same
bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from hf_lars.layout import StepLayout, expand_scalars

__all__ = [
    "PerTensor",
    "AdamScalars",
    "HostStepCounts",
    "adam_direction",
    "adam_direction_piece",
    "adam_scalars",
    "count_steps",
    "element",
    "init_adam_state",
    "is_one",
    "is_zero",
    "operand",
    "per_piece",
    "step_scalar_dtype",
    "step_scalars",
]

# A per-step scalar: one Python float for every stepped tensor, or an fp32 device vector, one value each.
PerTensor = Union[float, Tensor]

# Device types whose kernels support float64 at full speed for a handful of scalars.  MPS has no float64;
# XLA (TPU) and XPU emulate or reject it; anything not known to be fine gets float32.
_FLOAT64_DEVICE_TYPES = frozenset({"cpu", "cuda", "meta"})


# ------------------------------------------------------------------------------ float or device vector
def is_one(x: PerTensor | None) -> bool:
    """``x`` is the host float 1 (a multiplication by it can be left out)."""
    return not isinstance(x, Tensor) and x == 1.0


def is_zero(x: PerTensor | None) -> bool:
    """``x`` is ``None`` or the host float 0 (an addition of it times anything finite can be left out)."""
    return x is None or (not isinstance(x, Tensor) and x == 0.0)


def element(x: PerTensor, i: int) -> float | Tensor:
    """The value of tensor (or piece) ``i``."""
    return x[i] if isinstance(x, Tensor) else x


def per_piece(layout: StepLayout, x: PerTensor) -> PerTensor:
    """Per-tensor values as per-piece values (pieces of a tensor share its step)."""
    return layout.per_piece(x) if isinstance(x, Tensor) else x


def operand(x: PerTensor, like: Sequence[Tensor]) -> Any:
    """``x`` as the scalar operand of a foreach op over ``like``: a host float as it is, a device vector
    broadcast once to ``like``'s shapes (``expand_scalars``), so the op stays on CUDA's multi-tensor fast
    path either way.  A single tensor takes its one 0-d value: one launch as well, and no buffer the size
    of the tensor."""
    if not isinstance(x, Tensor):
        return x
    return [x[0]] if len(like) == 1 else expand_scalars(x, like)


def _sqrt(x: Any) -> Any:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _as_float(condition: Any, like: Any) -> Any:
    """1.0 where ``condition`` holds, else 0.0 (a bool or a bool tensor)."""
    return condition.to(like.dtype) if isinstance(condition, Tensor) else float(condition)


def _clamp_min0(x: Any) -> Any:
    return x.clamp(min=0) if isinstance(x, Tensor) else max(x, 0.0)


def _fp32(x: Any) -> Any:
    """Round a float64 device vector to the fp32 the update math uses; a host float is rounded by the op
    that takes it (ATen converts a Python scalar to the tensor's compute type: the same rounding)."""
    return x.float() if isinstance(x, Tensor) else x


# ----------------------------------------------------------------------------------------- scalars
@dataclass(frozen=True)
class AdamScalars:
    """One step's scalars of the Adam-form rules, each :data:`PerTensor`.

    The direction is ``m / (sqrt(v) * den_scale + den_shift)`` (see :func:`adam_direction`); ``factor``
    multiplies the trust-ratio step (RangerLARS: RAdam's ``s_t``, 0 while unrectified; AdamLARS: 1);
    ``fallback`` (RangerLARS's ``degenerated_to_sgd``) adds ``-lr * fallback * m`` (``1/c_1`` while
    unrectified, else 0); ``sync`` (RangerLARS) is 1 where Lookahead synchronises this step.
    """

    den_scale: PerTensor
    den_shift: PerTensor
    factor: PerTensor = 1.0
    fallback: PerTensor | None = None
    sync: PerTensor | None = None

    def take(self, span: slice) -> "AdamScalars":
        """The scalars of stepped tensors ``span`` (a chunk)."""

        def cut(x: PerTensor | None) -> PerTensor | None:
            return x[span] if isinstance(x, Tensor) else x

        return AdamScalars(*(cut(x) for x in (self.den_scale, self.den_shift, self.factor, self.fallback, self.sync)))


def adam_scalars(t: float | Tensor, beta1: float, beta2: float, eps: float, bias_correction: bool) -> AdamScalars:
    r"""Adam's denominator scalars for step ``t``: :math:`a = c_1/\sqrt{c_2}`, :math:`b = c_1\epsilon` with
    :math:`c_i = 1-\beta_i^t` (``bias_correction=False``: :math:`a = 1`, :math:`b = \epsilon`).

    ``t`` is a host float or a float64 device vector (:func:`step_scalars`): in float32, ``1 - 0.999**t``
    loses ~1e-5 relative to cancellation.
    """
    if not bias_correction:
        return AdamScalars(1.0, eps)
    c1 = 1 - beta1**t
    return AdamScalars(_fp32(c1 / _sqrt(1 - beta2**t)), _fp32(c1 * eps))


def rectified_scalars(
    t: float | Tensor, beta1: float, beta2: float, eps: float, threshold: float, k: int, degenerated_to_sgd: bool
) -> AdamScalars:
    r"""RangerLARS's scalars for step ``t`` (a host float or a float64 device vector): RAdam's
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)` decides rectification (:math:`\rho_t >`
    ``threshold``); rectified tensors take Adam's denominator and ``factor`` :math:`s_t`, unrectified ones
    the denominator 1 (so the direction is :math:`\hat m`) and factor 0, plus ``fallback`` :math:`1/c_1`
    with ``degenerated_to_sgd``.  ``sync`` is 1 on multiples of ``k``.
    """
    c1 = 1 - beta1**t
    beta2_t = beta2**t
    c2 = 1 - beta2_t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2_t / c2
    rect = _as_float(rho_t > threshold, t)
    s = _sqrt(_clamp_min0((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)))
    sync = _as_float((torch.remainder(t, k) if isinstance(t, Tensor) else t % k) == 0, t)
    return AdamScalars(
        den_scale=_fp32(rect * c1 / _sqrt(c2)),
        den_shift=_fp32(rect * c1 * eps + (1 - rect) * c1),
        factor=_fp32(rect * s),
        fallback=_fp32((1 - rect) / c1) if degenerated_to_sgd else None,
        sync=_fp32(sync),
    )


def step_scalar_dtype(device: torch.device | str) -> torch.dtype:
    """float64 where the device runs it natively (cpu, cuda; ROCm is ``cuda``), float32 elsewhere (mps,
    xla, xpu, hpu, privateuse1, ...)."""
    return torch.float64 if torch.device(device).type in _FLOAT64_DEVICE_TYPES else torch.float32


def step_scalars(t: Tensor) -> Tensor:
    """Step counts in the per-step scalars' dtype (:func:`step_scalar_dtype`; float64 on cpu and cuda).

    Both lose digits to cancellation in float32: ``1 - 0.999**t`` carries ~1e-5 relative error and ``rho_t``
    ~0.04 absolute for ``beta2 = 0.999`` (0.2 for 0.9995, which flips RAdam's rectification threshold at
    t = 5).  Computed on the device, so still no host sync.
    """
    return t.to(step_scalar_dtype(t.device))


# ------------------------------------------------------------------------------------- step counts
class HostStepCounts:
    """The values of the ``state["step"]`` tensors this optimizer wrote itself, kept on the host.

    ``state["step"]`` stays a 0-d fp32 device tensor (torch's key and the checkpoint format); beside it the
    optimizer remembers what it wrote, per tensor, with the tensor's version counter at that moment.  Any
    other write (GradScaler's skip, which restores state on the device; a user's edit) changes the version,
    and the count is then unknown: the step reads it on the device instead.  Reading the version costs no
    synchronization.
    """

    def __init__(self) -> None:
        self._counts: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def known(self, steps: Sequence[Tensor]) -> int | None:
        """The common count of ``steps`` when every one is known and they agree, else ``None``."""
        value = None
        for s in steps:
            entry = self._counts.get(s)
            if entry is None or entry[1] != s._version or (value is not None and entry[0] != value):
                return None
            value = entry[0]
        return value

    def record(self, steps: Sequence[Tensor], value: int) -> None:
        """``steps`` now hold ``value`` (written by this optimizer, or read once at ``load_state_dict``)."""
        for s in steps:
            self._counts[s] = (value, s._version)


def count_steps(steps: list[Tensor], known: int | None) -> float | Tensor:
    """``step += 1`` on the device (one foreach op: no host sync) and the new count: a host float when the
    count was ``known`` (:class:`HostStepCounts`), else one float64 device value per tensor."""
    torch._foreach_add_(steps, 1)
    if known is not None:
        return float(known + 1)
    return step_scalars(torch.stack(steps))


def init_adam_state(state: dict, p: Tensor) -> Tensor | None:
    """Lazily create torch's Adam state keys: fp32 ``exp_avg``/``exp_avg_sq`` and a tensor ``step``.

    Returns the new ``step`` tensor (count 0), or ``None`` when the state existed."""
    if "step" in state:
        return None
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    return state["step"]


# --------------------------------------------------------------------------------------- direction
def adam_direction(
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    grads: list[Tensor],
    scalars: AdamScalars,
    beta1: float,
    beta2: float,
    foreach: bool,
    scratch: list[Tensor] | None = None,
) -> list[Tensor]:
    r"""Update the moments in place and return the Adam direction of each tensor (new temporaries, or
    ``scratch``: tensors like the moments that are dead once the moments are updated, e.g. fp32 working
    copies of the gradients, which then hold the directions).

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        r = \frac{m}{\sqrt{v}\, a + b}

    with :math:`a`, :math:`b` from :func:`adam_scalars` (:math:`r = \hat m/(\sqrt{\hat v}+\epsilon)`) or
    :func:`rectified_scalars`: two passes for the denominator, not up to five.  The per-tensor path is
    :func:`adam_direction_piece` on each tensor.
    """
    a, b = scalars.den_scale, scalars.den_shift
    if not foreach:
        return [
            adam_direction_piece(m, v, g, element(a, i), element(b, i), beta1, beta2,
                                 None if scratch is None else scratch[i])
            for i, (m, v, g) in enumerate(zip(exp_avgs, exp_avg_sqs, grads))
        ]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if scratch is None:
        denom = list(torch._foreach_sqrt(exp_avg_sqs))
    else:  # foreach ops have no out=: copy, then in place (one launch more, one temporary fewer)
        denom = list(scratch)
        torch._foreach_copy_(denom, exp_avg_sqs)
        torch._foreach_sqrt_(denom)
    # One after the other, so that at most one expanded buffer (the size of the list) is alive at a time.
    if not is_one(a):
        torch._foreach_mul_(denom, operand(a, denom))
    torch._foreach_add_(denom, operand(b, denom))
    # m / denom in denom's memory, as m * (1 / denom): one temporary, not two, and the same bits whether the
    # denominator lives in scratch or not (a GradScaler step, whose gradients are copies, equals an unscaled one).
    torch._foreach_reciprocal_(denom)
    torch._foreach_mul_(denom, exp_avgs)
    return denom


def adam_direction_piece(
    m: Tensor,
    v: Tensor,
    g: Tensor,
    a: float | Tensor,
    b: float | Tensor,
    beta1: float,
    beta2: float,
    scratch: Tensor | None = None,
) -> Tensor:
    """One tensor of :func:`adam_direction`: update ``m``, ``v`` in place, return the direction.

    ``a``/``b`` are this tensor's denominator scalars.  ``scratch``: ``None`` or a temporary of the
    tensor's shape and dtype that the caller no longer needs once the moments are updated (e.g. an fp32
    working copy of the gradient); the direction is written into it instead of a new allocation.
    """
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v.sqrt() if scratch is None else torch.sqrt(v, out=scratch)
    if not is_one(a):
        denom.mul_(a)
    denom.add_(b)
    return torch.div(m, denom, out=denom)  # into denom: one temporary per tensor, not two
