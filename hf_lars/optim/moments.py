"""Adam's moments, direction and per-step scalars, shared by AdamLARS and RangerLARS.

The direction is elementwise, so it runs on whole (local) tensors, per tensor or foreach; the per-layer
part of those rules (the LAMB-form trust-ratio step) is :func:`hf_lars.optim.trust.trust_ratio_step`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hf_lars.layout import expand_scalars


__all__ = [
    "adam_direction",
    "adam_direction_piece",
    "denominator_scalars",
    "init_adam_state",
    "increment_steps",
    "step_scalars",
    "step_scalar_dtype",
]

# Device types whose kernels support float64 at full speed for a handful of scalars.  MPS has no float64;
# XLA (TPU) and XPU emulate or reject it; anything not known to be fine gets float32.
_FLOAT64_DEVICE_TYPES = frozenset({"cpu", "cuda", "meta"})


def adam_direction(
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    grads: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction1: Tensor | None,
    bias_correction2: Tensor | None,
    rectified: Tensor | None = None,
    foreach: bool,
) -> list[Tensor]:
    r"""Update the moments in place and return the Adam direction of each piece.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        r = \frac{m / c_1}{\sqrt{v / c_2} + \epsilon}

    ``bias_correction1/2`` hold :math:`c_1 = 1-\beta_1^t`, :math:`c_2 = 1-\beta_2^t` per piece (``None``:
    no correction).  ``rectified`` (RAdam) holds 1.0 where the variance is rectified and 0.0 where it is
    not; there :math:`r = m / c_1` (SGD with momentum).  All scalars are device tensors: no host sync.

    The denominator is computed as ``sqrt(v) * a + b`` (two passes, not up to five), with per-piece scalars
    :math:`a = c_1/\sqrt{c_2}`, :math:`b = c_1 \epsilon` (unrectified pieces: :math:`a = 0`, :math:`b = c_1`)
    from :func:`denominator_scalars`; the per-tensor path is :func:`adam_direction_piece` on each piece.
    """
    scale, shift = denominator_scalars(len(exp_avgs), eps, bias_correction1, bias_correction2, rectified)
    if foreach:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        if scale is None:
            torch._foreach_add_(denom, eps)
        else:  # per-tensor scalars broadcast once (expand_scalars): on CUDA's multi-tensor fast path.  One
            # after the other, so that at most one expanded buffer (the size of the list) is alive at a time.
            torch._foreach_mul_(denom, expand_scalars(scale, denom))
            torch._foreach_add_(denom, expand_scalars(shift, denom))
        return list(torch._foreach_div(exp_avgs, denom))

    return [
        adam_direction_piece(
            m,
            v,
            g,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            scale=None if scale is None else scale[i],
            shift=None if shift is None else shift[i],
        )
        for i, (m, v, g) in enumerate(zip(exp_avgs, exp_avg_sqs, grads))
    ]


def adam_direction_piece(
    m: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    scale: Tensor | None,
    shift: Tensor | None,
    scratch: Tensor | None = None,
) -> Tensor:
    """One piece of :func:`adam_direction` (per-tensor): update ``m``, ``v`` in place, return the direction.

    ``scale``/``shift`` are this piece's entries of :func:`denominator_scalars`.  ``scratch``: ``None`` or a
    temporary of the piece's shape and dtype that the caller no longer needs once the moments are updated
    (e.g. the centralized gradient); the direction is written into it instead of a new allocation.
    """
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v.sqrt() if scratch is None else torch.sqrt(v, out=scratch)
    if scale is None:
        denom.add_(eps)
    else:
        denom.mul_(scale).add_(shift)
    return torch.div(m, denom, out=denom)  # into denom: one temporary per piece, not two


def denominator_scalars(
    n: int, eps: float, bc1: Tensor | None, bc2: Tensor | None, rectified: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Per-piece ``(a, b)`` with denominator ``sqrt(v) * a + b`` (see :func:`adam_direction`); ``(None,
    None)`` when it is ``sqrt(v) + eps``.  Vectors of ``n`` fp32 values, computed once per step."""
    given = [x for x in (bc1, bc2, rectified) if x is not None]
    if not given:
        return None, None
    c1 = torch.ones(n, dtype=torch.float32, device=given[0].device) if bc1 is None else bc1
    scale = c1 if bc2 is None else c1 / bc2.sqrt()
    shift = c1 * eps
    if rectified is not None:
        scale = scale * rectified
        shift = shift * rectified + c1 * (1 - rectified)
    return scale, shift


def init_adam_state(state: dict, p: Tensor) -> None:
    """Lazily create torch's Adam state keys: fp32 ``exp_avg``/``exp_avg_sq`` and a tensor ``step``."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)


def increment_steps(steps: list[Tensor], foreach: bool) -> None:
    """``step += 1`` for each tensor step count (on the device: no host sync)."""
    if foreach:
        torch._foreach_add_(steps, 1)
    else:
        for s in steps:
            s.add_(1)


def step_scalar_dtype(device: torch.device | str) -> torch.dtype:
    """float64 where the device runs it natively (cpu, cuda; ROCm is ``cuda``), float32 elsewhere (mps,
    xla, xpu, hpu, privateuse1, ...)."""
    return torch.float64 if torch.device(device).type in _FLOAT64_DEVICE_TYPES else torch.float32


def step_scalars(t: Tensor) -> Tensor:
    """Step counts in the per-step scalars' dtype (:func:`step_scalar_dtype`; float64 on cpu and cuda).

    Both lose digits to cancellation in float32: ``1 - 0.999**t`` carries ~1e-5 relative error and ``rho_t``
    ~0.04 absolute for ``beta2 = 0.999`` (0.2 for 0.9995, which flips RAdam's rectification threshold at
    t = 5).  Computed on the device, so still no host sync; callers cast the results back to float32.
    """
    return t.to(step_scalar_dtype(t.device))
