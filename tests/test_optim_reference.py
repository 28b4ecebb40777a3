"""LARS, AdamLARS and RangerLARS against the independent float64 references of ``optim_reference.py``.

Tolerances (float64 parameters; the only dtype compared with the references):

* weights and state: ``RTOL = 1e-6`` of each tensor's scale (see :func:`optim_cases.assert_close_scaled`).
  Where the error comes from: docs/design.md ("The update rules") takes norms in fp32; the state is fp32; the per-step scalar factors
  come from fp32 step tensors (carrying ~1e-7 relative error once computed); and float64 weights are
  stepped through fp32 working copies (``hf_lars/optim/working_copies.py``), i.e. rounded to ~6e-8 each step.
  Over 12 steps that accumulates to a few 1e-7.  The inputs use learning rates large enough that every
  step moves the weights by >= ~1e-3 (mostly ~5%) of their scale, so 1e-6 still checks each update to
  three or more significant digits.
* trust ratios: ``RTOL_RATIO = 2e-6`` (fp32 norms: ~1e-7 each, plus the weights' error).
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_lars.optim.ranger_lars import centralize_gradient
from optim_cases import INFO, OptimizerInput, Setup, assert_close_scaled, build, make_grads, reference_cases
from optim_reference import radam_rho, radam_s

RTOL = 1e-6
RTOL_RATIO = 2e-6
STEPS = 12


def _check_step(setup: Setup, step: int, ref_ratios: dict[str, float], floors: list[float]) -> None:
    opt, ref = setup.opt, setup.ref
    for i, (name, p) in enumerate(zip(setup.names, setup.params)):
        assert torch.isfinite(p).all(), f"step {step}: {name} is not finite"
        floors[i] = max(floors[i], float(ref.weights[i].abs().max()))  # e.g. the 0-d param crossing zero
        assert_close_scaled(p, ref.weights[i], RTOL, f"step {step}: weights of {name}", floor=floors[i])
        st, ref_st = opt.state[p], ref.state[i]
        for key, value in ref_st.items():
            assert key in st, f"step {step}: {name} has no state {key!r}"
            if key == "step":
                assert float(st[key]) == value, f"step {step}: step count of {name}"
            else:
                assert_close_scaled(st[key], value, RTOL, f"step {step}: state {key!r} of {name}")
    ratios = opt.trust_ratios()
    assert set(ratios) == set(ref_ratios), f"step {step}: trust_ratios() names"
    for name, expected in ref_ratios.items():
        got = ratios[name]
        assert got.dim() == 0
        assert math.isclose(float(got), expected, rel_tol=RTOL_RATIO), f"step {step}: ratio of {name}: {float(got)}"


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize(("info", "inp"), reference_cases())
def test_matches_reference(info, inp, foreach):
    """12 steps on the standard layers (2-D/4-D weights, biases, a norm scale, zero-initialised weight and
    bias, a 0-d param; zero gradients at step 2, missing gradients at step 4): weights, every state tensor
    and the trust ratios follow the reference, and no gradient is modified."""
    setup = build(info, inp, foreach=foreach)
    floors = [float(p.detach().abs().max()) for p in setup.params]
    for step in range(1, STEPS + 1):
        grads = setup.set_grads(make_grads(step))
        before = [None if p.grad is None else p.grad.clone() for p in setup.params]
        setup.opt.step()
        ref_ratios = setup.ref.step(grads)
        for name, p, g in zip(setup.names, setup.params, before):
            assert (p.grad is None) == (g is None)
            assert g is None or torch.equal(p.grad, g), f"step {step}: {name}.grad was modified"
        _check_step(setup, step, ref_ratios, floors)


@pytest.mark.parametrize("name", ["LARS", "AdamLARS", "RangerLARS"])
@pytest.mark.parametrize("exclude_1d", [True, False])
def test_zero_initialised_layers(name, exclude_1d):
    """A zero-norm layer gets ratio exactly 1 (never NaN) and moves on its first step (RangerLARS: its first
    rectified step, t = 6)."""
    info = INFO[name]
    setup = build(info, OptimizerInput("zero", {"lr": 0.5, "exclude_1d": exclude_1d}))
    for step in range(1, 7 if name == "RangerLARS" else 2):
        setup.set_grads(make_grads(step, special=name != "RangerLARS"))
        setup.opt.step()
    ratios = setup.opt.trust_ratios()
    bias_adapted = not exclude_1d or info.defaults["adapt_excluded"]  # LARS adapts excluded layers by default
    zero_layers = ["zero.weight"] + (["zero.bias"] if bias_adapted else [])
    for layer in zero_layers:
        p = setup.params[setup.names.index(layer)]
        assert float(ratios[layer]) == 1.0
        assert torch.isfinite(p).all()
        assert (p != 0).all(), f"{layer} did not move"
    for p in setup.params:
        assert torch.isfinite(p).all()
    assert all(torch.isfinite(r) for r in ratios.values())
    if not bias_adapted:
        assert "zero.bias" not in ratios


def test_inputs_exercise_trust_clip_and_bounds():
    """The trust_clip / trust_bounds inputs of the table really clip: some ratios sit on a bound, some not
    (checked on the reference; test_matches_reference then shows the optimizer clips the same way)."""
    for name, desc, check in [
        ("LARS", "trust_clip", lambda r: any(x == 1.0 for x in r) and any(x < 1.0 for x in r)),
        ("AdamLARS", "trust_clip", lambda r: any(x == 1.0 for x in r) and any(x < 1.0 for x in r)),
        ("AdamLARS", "trust_bounds", lambda r: {0.5, 1.5} <= set(r) and any(0.5 < x < 1.5 for x in r)),
    ]:
        inp = next(i for i in INFO[name].inputs if i.desc == desc)
        unclipped = {**inp.kwargs, "trust_clip": False}
        if name == "AdamLARS":
            unclipped["trust_bounds"] = None
        seen, raw = [], []
        setup = build(INFO[name], inp)
        setup_raw = build(INFO[name], OptimizerInput("raw", unclipped))
        for step in range(1, STEPS + 1):
            grads = make_grads(step)
            seen += list(setup.ref.step(setup.set_grads(grads)).values())
            raw += list(setup_raw.ref.step(setup_raw.set_grads(grads)).values())
        assert check(seen), (name, desc, seen)
        assert max(raw) > 1.0  # without clipping some ratios would exceed the bound


def test_radam_phases_are_covered():
    """With the table's beta2 the first 5 steps are un-rectified and steps 6.. rectified with s < 1."""
    for beta2 in (0.999, 0.9995):
        assert all(radam_rho(t, beta2) <= 5.0 for t in range(1, 6))
        assert all(radam_rho(t, beta2) > 5.0 for t in range(6, STEPS + 1))
        assert all(0 < radam_s(t, beta2) < 1 for t in range(6, STEPS + 1))
    assert radam_rho(5, 0.9995) > 4.99  # just under the threshold: the scalars must be computed accurately


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_rectification_stays_outside_the_trust_ratio(foreach):
    """RAdam's s multiplies the step outside the trust ratio.  A port that puts it inside u (where it cancels
    in rho * u when wd = 0) matches for t <= 5 (s = 1) but takes steps ~1/s times too large afterwards; the
    optimizer must match the correct reference and differ from that variant on adapted layers."""
    info = INFO["RangerLARS"]
    inp = OptimizerInput("wd0", {"lr": 0.05, "weight_decay": 0.0, "k": 100})
    setup = build(info, inp, foreach=foreach)
    wrong = build(info, inp, reference_kwargs={"s_inside_ratio": True}).ref
    adapted = [i for i, a in enumerate(setup.ref.adapt) if a]
    assert adapted
    for step in range(1, 10):
        grads = setup.set_grads(make_grads(step, special=False))
        setup.opt.step()
        setup.ref.step(grads)
        wrong.step(grads)
        for i, p in enumerate(setup.params):
            assert_close_scaled(p, setup.ref.weights[i], RTOL, f"step {step}: {setup.names[i]}")
        for i in adapted:
            p = setup.params[i]
            # max(..., 1e-12): the zero-initialised layer is still 0 in both while unrectified
            gap = float((p.detach() - wrong.weights[i]).abs().max()) / max(float(wrong.weights[i].abs().max()), 1e-12)
            if step <= 5:
                assert gap < RTOL, f"step {step}: unrectified, neither rule steps"
            elif step == 6 and setup.names[i] == "zero.weight":
                assert gap < RTOL, "a zero layer's first step has ratio 1 in both rules"
            else:
                assert gap > 1e-2, f"step {step}: {setup.names[i]} follows the s-inside-the-ratio variant"


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("degenerated_to_sgd", [False, True])
def test_no_step_while_unrectified(degenerated_to_sgd, foreach):
    """beta2 = 0.999: over steps 1-5 (rho_t <= 5) the weights do not move at all, while the moments
    accumulate and the step counts (a Lookahead sync at step 3 inside that phase leaves the weights and slow
    weights equal to the initial ones); step 6, the first rectified one, moves every layer, by the
    reference's lr * s * rho * u.  degenerated_to_sgd: steps 1-5 are w -= lr * m^ instead (no trust ratio,
    no weight decay), equal to the reference."""
    info = INFO["RangerLARS"]
    kwargs = {"lr": 0.05, "k": 3, "betas": (0.95, 0.999), "degenerated_to_sgd": degenerated_to_sgd}
    # fp32 parameters: float64 ones are stepped through fp32 copies, so "unchanged" is checked exactly in fp32
    setup = build(info, OptimizerInput("unrectified", kwargs), foreach=foreach, dtype=torch.float32)
    initial = [p.detach().clone() for p in setup.params]
    for step in range(1, 7):
        grads = setup.set_grads(make_grads(step, dtype=torch.float32, special=False))
        before = [p.detach().clone() for p in setup.params]
        setup.opt.step()
        setup.ref.step(grads)
        for i, (name, p) in enumerate(zip(setup.names, setup.params)):
            assert_close_scaled(p, setup.ref.weights[i], RTOL, f"step {step}: {name}")
            state = setup.opt.state[p]
            assert float(state["step"]) == step
            assert state["exp_avg"].abs().max() > 0, f"step {step}: the moments of {name} did not accumulate"
            moved = not torch.equal(p.detach(), before[i])
            if step <= 5 and not degenerated_to_sgd:
                assert torch.equal(p.detach(), initial[i]), f"step {step}: {name} moved while unrectified"
                assert torch.equal(state["slow_buffer"], initial[i]), f"step {step}: slow of {name}"
            else:
                assert moved, f"step {step}: {name} did not move"


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("k", [3, 6])
def test_lookahead_syncs(k, foreach):
    """The slow weights start as the initial weights; right after steps k and 2k the weights equal the slow
    weights (exactly) and both equal the reference's; in between they differ.  degenerated_to_sgd, so the
    weights move from step 1 (test_no_step_while_unrectified covers a sync inside the unrectified phase)."""
    info = INFO["RangerLARS"]
    setup = build(info, OptimizerInput("la", {"lr": 0.05, "k": k, "alpha": 0.5, "degenerated_to_sgd": True}), foreach=foreach)
    initial = [p.detach().clone() for p in setup.params]
    for step in range(1, 2 * k + 1):
        grads = setup.set_grads(make_grads(step, special=False))
        setup.opt.step()
        setup.ref.step(grads)
        for i, (name, p) in enumerate(zip(setup.names, setup.params)):
            slow = setup.opt.state[p]["slow_buffer"]
            assert_close_scaled(slow, setup.ref.state[i]["slow_buffer"], RTOL, f"step {step}: slow of {name}")
            if step % k == 0:
                assert torch.equal(p.detach(), slow.to(p.dtype)), f"step {step}: {name} != slow weights"
                assert_close_scaled(p, setup.ref.state[i]["slow_buffer"], RTOL, f"step {step}: {name}")
            else:
                assert not torch.equal(p.detach(), slow.to(p.dtype)), f"step {step}: {name} synced early"
                if step < k:
                    assert torch.equal(slow, initial[i].to(slow.dtype)), f"step {step}: slow of {name} moved"


@pytest.mark.parametrize("use_gc", [True, False])
def test_gradient_centralization_through_the_update(use_gc):
    """At t = 1 RangerLARS is un-rectified, m^ = g, and degenerated_to_sgd steps w -= lr * m^ on every layer
    (adapted or not: no trust ratio, no weight decay, here 0.1): every layer moves by exactly -lr * GC(g).
    With GC every output row of those updates has mean 0 (2-D and 4-D weights); without GC it does not."""
    info = INFO["RangerLARS"]
    lr = 0.1
    kwargs = {"lr": lr, "weight_decay": 0.1, "use_gc": use_gc, "degenerated_to_sgd": True}
    inp = OptimizerInput("gc", kwargs, groups={"conv": {"excluded": True}})
    setup = build(info, inp)
    grads = setup.set_grads(make_grads(1, special=False))
    before = [p.detach().clone() for p in setup.params]
    setup.opt.step()
    for name, p, w0, g in zip(setup.names, setup.params, before, grads):
        if g.ndim < 2:
            continue
        delta = (w0 - p.detach()) / lr
        row_means = delta.mean(dim=tuple(range(1, delta.ndim)))
        if use_gc:
            assert row_means.abs().max() < RTOL * delta.abs().max(), name  # fp32 working copies
        else:
            assert row_means.abs().max() > 1e-2 * delta.abs().max(), name
        expected = centralize_gradient(g) if use_gc else g
        # 1e-5: the float64 weights pass through fp32 copies, rounding (w0 - w) / lr by ~|w| / lr * 6e-8
        assert_close_scaled(delta, expected, 1e-5, name)


def test_centralize_helper():
    g = torch.randn(5, 3, 2, 2, dtype=torch.float64) + 1.0
    c = centralize_gradient(g)
    assert c.mean(dim=(1, 2, 3)).abs().max() < 1e-12
    torch.testing.assert_close(c, g - g.reshape(5, -1).mean(1).reshape(5, 1, 1, 1))


def test_centralize_gradient() -> None:
    g = torch.randn(4, 3, 2)
    c = centralize_gradient(g)
    torch.testing.assert_close(c.mean(dim=(1, 2)), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(c, g - g.mean(dim=(1, 2), keepdim=True))
    v = torch.randn(5)
    assert centralize_gradient(v) is v
    b = torch.randn(4, 6).to(torch.bfloat16)
    assert centralize_gradient(b).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["LARS", "AdamLARS", "RangerLARS"])
def test_trust_ratio_names_and_indices(name):
    """Named params report their names, plain tensors their global index (counted across groups); only
    adapted layers appear; values are 0-d tensors equal to the reference ratios."""
    info = INFO[name]
    inp = OptimizerInput(
        "two groups",
        {"lr": 0.05, "adapt_excluded": False},
        groups={"fc2": {"excluded": True, "adapt_excluded": False}, "zero": {"weight_decay": 0.0}},
    )
    for named in (True, False):
        setup = build(info, inp, named=named)
        grads = setup.set_grads(make_grads(1, special=False))
        setup.opt.step()
        ref_ratios = setup.ref.step(grads)
        ratios = setup.opt.trust_ratios()
        adapted = [n for n, a in zip(setup.names, setup.ref.adapt) if a]
        assert sorted(ratios) == sorted(adapted) == sorted(ref_ratios)
        if named:
            assert set(ratios) == {"fc1.weight", "conv.weight", "zero.weight"}
        else:
            # fc2.weight is alone in group 2, zero.weight/zero.bias in group 3: indices continue across groups.
            zero_weight = setup.names[[setup.order[i] for i in range(len(setup.order))].index(6)]
            assert zero_weight == str(len(setup.order) - 2)
            assert set(ratios) == {"0", "2", zero_weight}
        for key, value in ratios.items():
            assert value.dim() == 0
            assert math.isclose(float(value), ref_ratios[key], rel_tol=RTOL_RATIO)
