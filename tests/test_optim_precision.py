"""Low-precision parameters and the precision of the per-step scalar factors.

Tolerances:

* bf16 / fp16 parameters vs an fp32 run started from the same (representable) values with the same
  gradients: after step ``t`` the weights agree to ``t * eps / 2`` of each layer's scale, ``eps`` being
  the dtype's machine epsilon (bf16 2**-7, fp16 2**-10).  The optimizer computes in fp32 with fp32 state
  and only rounds the weights when writing them back, which costs at most half an ulp (eps/2 relative)
  per step; those roundings then feed the next trust ratio, so the bound grows with the step count.  Over
  6 steps that is 2.3e-2 (bf16) and 2.9e-3 (fp16); the fp32 run moves every layer by > 1e-1 of its scale,
  so a low-precision step that did not happen, or went wrong, is far outside the tolerance.
* The scalar-factor tests compare single steps against closed forms at 1e-6 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_lars import AdamLARS, RangerLARS
from optim_cases import OptimizerInput, OPTIMIZERS, assert_close_scaled, build, make_grads
from optim_reference import radam_rho

STEPS = 6
OPT_IDS = [info.name for info in OPTIMIZERS]


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_low_precision_parameters(info, dtype, foreach):
    """Params stay in their dtype, every state tensor is fp32, and the weights track an fp32 run (RangerLARS:
    with degenerated_to_sgd, so that its weights move before step 6)."""
    inp = info.inputs[0]
    if info.name == "RangerLARS":  # lr 0.5: moves > 4x the bf16 tolerance in 6 steps
        inp = OptimizerInput("degenerated", {"lr": 0.5, "degenerated_to_sgd": True})
    low = build(info, inp, dtype=dtype, foreach=foreach)
    ref = build(info, inp, dtype=torch.float32, foreach=foreach)
    with torch.no_grad():
        for p32, p in zip(ref.params, low.params):
            p32.copy_(p.float())  # the same, representable starting values
    initial = [p.detach().clone() for p in ref.params]
    eps = torch.finfo(dtype).eps
    for step in range(1, STEPS + 1):
        grads = make_grads(step, dtype)
        low.set_grads(grads)
        ref.set_grads([None if g is None else g.float() for g in grads])
        low.opt.step()
        ref.opt.step()
        for name, p, p32, w0 in zip(low.names, low.params, ref.params, initial):
            assert p.dtype == dtype, name
            assert torch.isfinite(p).all(), name
            for key, value in low.opt.state[p].items():
                assert value.dtype == torch.float32, f"{name}: state {key!r} is {value.dtype}"
            floor = max(float(w0.abs().max()), float(p32.detach().abs().max()))
            assert_close_scaled(p, p32, step * eps / 2, f"step {step}: {name}", floor=floor)
    for name, p32, w0 in zip(ref.names, ref.params, initial):
        scale = max(float(w0.abs().max()), float(p32.detach().abs().max()))
        assert float((p32.detach() - w0).abs().max()) > 4 * STEPS * eps / 2 * scale, f"{name} barely moved"


def test_bias_correction_is_accurate():
    """AdamLARS, first step, an excluded layer: m^ = g and v^ = g*g, so the step is exactly
    lr * g / (|g| + eps).  In fp32, 1 - 0.999**t carries ~1e-5 relative error (cancellation); the step must
    be right to 1e-6."""
    g = torch.tensor([0.3, -2.0, 1e-3, 5.0], dtype=torch.float64)
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    lr, eps = 0.1, 1e-6
    opt = AdamLARS([p], lr=lr, eps=eps, betas=(0.9, 0.999))
    p.grad = g.clone()
    opt.step()
    expected = -lr * g / (g.abs() + eps)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_rectification_threshold_is_decided_accurately(foreach):
    """beta2 = 0.9995: rho_5 = 4.998 <= 5, so step 5 is un-rectified (degenerated_to_sgd: the SGD-momentum
    form, s = 1) and step 6 rectified.  rho_t computed in fp32 is off by ~0.2 here (it cancels 2/(1-beta2) ~ 4000 against a term of
    the same size) and crosses the threshold a step early, shrinking step 5 by ~70x.  A constant gradient
    makes the un-rectified step exactly lr * g (m^ = g).  Absolute slack: the float64 weights are stepped
    through fp32 working copies (rounding ~6e-8 of |w|)."""
    beta2 = 0.9995
    assert radam_rho(5, beta2) <= 5.0 < radam_rho(6, beta2)
    lr = 0.1
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = RangerLARS([p], lr=lr, betas=(0.9, beta2), k=100, degenerated_to_sgd=True, foreach=foreach)
    for step in range(1, 7):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        delta = before - p.detach()
        atol = 1e-7 * float(p.detach().abs().max())
        if step <= 5:
            msg = f"step {step} must be un-rectified"
            torch.testing.assert_close(delta, lr * g, rtol=1e-6, atol=atol, msg=lambda m: f"{msg}\n{m}")
        else:  # rectified: m^ / (sqrt(v^) + eps) = g / (|g| + eps), times s(6) ~ 0.018
            rho_inf = 2 / (1 - beta2) - 1
            rho = radam_rho(6, beta2)
            s = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            torch.testing.assert_close(delta, lr * s * g / (g.abs() + 1e-6), rtol=1e-6, atol=atol)
