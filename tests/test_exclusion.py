"""Exclusion is two decisions (docs/design.md, "Exclusion: two decisions"); NaN is never a healthy ratio;
the optimizer object stays sound (add_param_group, booleans, load_state_dict).

Fast, single-process tests on small layers; the float64 reference comparison of the same rules is in
test_optim_reference.py (its inputs include ``adapt_excluded`` and ``excluded`` groups).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from hf_lars import LARS, AdamLARS, RangerLARS
from hf_lars.layout import Segment, StepLayout, TensorLayout
from hf_lars.optim.adam_lars import AdamLarsHyper, adam_lars
from hf_lars.optim.trust import StepPlan, adam_trust_ratio, lars_trust_ratio

CLASSES = {"LARS": LARS, "AdamLARS": AdamLARS, "RangerLARS": RangerLARS}
# Each optimizer's documented default for adapt_excluded.
ADAPTS_EXCLUDED_BY_DEFAULT = {"LARS": True, "AdamLARS": False, "RangerLARS": False}
LR = {"LARS": 1.0, "AdamLARS": 0.05, "RangerLARS": 0.05}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))


def _grads(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _run(name: str, groups_fn, steps: int = 6, **kwargs) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model, its optimizer over ``groups_fn(model)``, ``steps`` steps with seeded gradients."""
    model = _model()
    opt = CLASSES[name](groups_fn(model), lr=LR[name], **kwargs)
    for step in range(steps):
        _grads(model, seed=step + 1)
        opt.step()
    return model, opt


def _named(model: nn.Module) -> list:
    return list(model.named_parameters())


# ------------------------------------------------------------------------------------- who is adapted
@pytest.mark.parametrize("name", list(CLASSES))
def test_default_adaptation_of_1d_layers(name):
    """LARS adapts biases and norm scales by default (Algorithm 1); AdamLARS/RangerLARS do not (LAMB)."""
    _, opt = _run(name, _named, steps=1)
    ratios = opt.trust_ratios()
    assert "0.weight" in ratios and "2.weight" in ratios
    one_d = {"0.bias", "1.weight", "1.bias", "2.bias"}
    if ADAPTS_EXCLUDED_BY_DEFAULT[name]:
        assert one_d <= set(ratios)
    else:
        assert not one_d & set(ratios)


@pytest.mark.parametrize("name", list(CLASSES))
def test_adapt_excluded_flips_the_default_and_a_group_key_overrides_it(name):
    flipped = not ADAPTS_EXCLUDED_BY_DEFAULT[name]
    _, opt = _run(name, _named, steps=1, adapt_excluded=flipped)
    assert ("0.bias" in opt.trust_ratios()) is flipped
    # A group key overrides the constructor, per group.
    _, opt = _run(
        name,
        lambda m: [
            {"params": [("0.weight", m[0].weight), ("0.bias", m[0].bias)]},
            {"params": [("2.weight", m[2].weight), ("2.bias", m[2].bias)], "adapt_excluded": not flipped},
        ],
        steps=1,
        adapt_excluded=flipped,
    )
    ratios = opt.trust_ratios()
    assert ("0.bias" in ratios) is flipped and ("2.bias" in ratios) is (not flipped)


@pytest.mark.parametrize("name", list(CLASSES))
def test_excluded_group_of_2d_layers(name):
    """``excluded=True`` excludes every layer of the group (2-D included): no weight decay (the result equals
    the same run with wd 0), and the trust ratio only if the optimizer adapts excluded layers."""

    def groups(wd):
        return lambda m: [
            {"params": [("0.weight", m[0].weight)]},
            {"params": [("2.weight", m[2].weight)], "excluded": True, "weight_decay": wd},
        ]

    decayed, opt = _run(name, groups(0.1), weight_decay=0.1)
    plain, _ = _run(name, groups(0.0), weight_decay=0.1)
    assert torch.equal(decayed[2].weight, plain[2].weight)
    assert ("2.weight" in opt.trust_ratios()) is ADAPTS_EXCLUDED_BY_DEFAULT[name]
    assert "0.weight" in opt.trust_ratios()


@pytest.mark.parametrize("adapt_excluded", [True, False])
@pytest.mark.parametrize("name", list(CLASSES))
def test_weight_decay_never_reaches_excluded_layers(name, adapt_excluded):
    """A 1-D bias in a group with weight_decay > 0 takes no decay, adapted or not; 2-D layers do decay."""
    params = lambda m: [p for n, p in m.named_parameters() if n.startswith("0.")]  # noqa: E731
    decayed, _ = _run(name, params, weight_decay=0.1, adapt_excluded=adapt_excluded)
    plain, _ = _run(name, params, weight_decay=0.0, adapt_excluded=adapt_excluded)
    assert torch.equal(decayed[0].bias, plain[0].bias)
    assert not torch.allclose(decayed[0].weight, plain[0].weight)


@pytest.mark.parametrize("name", list(CLASSES))
def test_exclude_1d_false_makes_1d_layers_ordinary(name):
    """Without ``exclude_1d`` a bias is adapted and decays (even under ``adapt_excluded=False``)."""
    params = lambda m: [p for n, p in m.named_parameters() if n.startswith("0.")]  # noqa: E731
    decayed, opt = _run(name, params, weight_decay=0.1, exclude_1d=False, adapt_excluded=False)
    plain, _ = _run(name, params, weight_decay=0.0, exclude_1d=False, adapt_excluded=False)
    assert "1" in opt.trust_ratios()  # the bias, by global index
    assert not torch.allclose(decayed[0].bias, plain[0].bias)


def test_a_users_own_weight_decay_zero_group_keeps_the_trust_ratio():
    """Exclusion is data, not inferred from ``weight_decay == 0``: a user's wd=0 group of 2-D layers is
    still adapted by AdamLARS (which does not adapt excluded layers)."""
    _, opt = _run("AdamLARS", lambda m: [{"params": [("0.weight", m[0].weight)], "weight_decay": 0.0}], steps=1)
    assert "0.weight" in opt.trust_ratios()


def test_removed_adapt_key_says_what_replaced_it():
    model = _model()
    with pytest.raises(ValueError, match=r"'adapt' was replaced.*adapt_excluded.*Old adapt=False"):
        LARS([{"params": list(model.parameters()), "adapt": False}], lr=0.1)


def test_flat_tensor_of_two_layers_decays_only_the_2d_one_per_tensor_path():
    """The per-tensor (``foreach=False``) LAMB-form update on a flat tensor holding two layers, as ZeRO
    hands it on CPU, equals AdamLARS on the separate layers: weight decay on the 2-D layer only."""
    torch.manual_seed(0)
    w2d, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    g2d, gb = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    wd, lr = 0.3, 0.05
    p2d, pb = nn.Parameter(w2d.clone()), nn.Parameter(b.clone())
    p2d.grad, pb.grad = g2d.clone(), gb.clone()
    AdamLARS([p2d, pb], lr=lr, weight_decay=wd, foreach=False).step()

    flat = torch.cat([w2d.reshape(-1), b])
    grad = torch.cat([g2d.reshape(-1), gb])
    layout = StepLayout([TensorLayout((Segment(0, 0, 30), Segment(1, 30, 6)))], num_layers=2)
    m, v = torch.zeros_like(flat, dtype=torch.float32), torch.zeros_like(flat, dtype=torch.float32)
    t = torch.zeros(())
    hp = AdamLarsHyper(lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd, bias_correction=True,
                       trust_clip=False, trust_bounds=None)
    result = adam_lars([flat], [grad], [m], [v], [t], StepPlan.of(layout, [True, False], [True, False]), hp,
                       foreach=False)
    assert result is not None and result[0] == [0]
    torch.testing.assert_close(flat[:30].view(6, 5), p2d.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat[30:], pb.detach(), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------ NaN
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ratio_functions_never_turn_a_non_finite_norm_into_a_healthy_ratio(bad):
    w = torch.tensor([2.0, 0.0, bad, 3.0, 0.0])
    other = torch.tensor([1.0, 4.0, 1.0, bad, bad])
    for ratio in (lars_trust_ratio(w, other, 1e-3, 0.01, 1e-8), adam_trust_ratio(w, other, trust_clip=True)):
        assert torch.isfinite(ratio[:2]).all() and float(ratio[1]) == 1.0  # an exactly-zero norm: 1
        assert not torch.isfinite(ratio[2:]).any(), ratio
    bounded = adam_trust_ratio(w, other, trust_bounds=(0.5, 2.0))
    assert not torch.isfinite(bounded[2:]).any()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(CLASSES))
def test_a_nan_gradient_gives_a_nan_ratio_and_nan_weights_like_torch(name, foreach):
    model = _model()
    opt = CLASSES[name](_named(model), lr=LR[name], foreach=foreach)
    _grads(model)
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    ratios = opt.trust_ratios()
    assert math.isnan(float(ratios["0.weight"]))
    assert math.isfinite(float(ratios["2.weight"]))
    assert torch.isnan(model[0].weight).any()  # NaN in, NaN out, as torch.optim does
    assert torch.isfinite(model[2].weight).all()


# ------------------------------------------------------------------------------ a sound optimizer object
@pytest.mark.parametrize("bad_group", [{"lr": -1.0}, {"exclude_1d": "no"}, {"adapt": True}, {"lr_typo": 1}])
@pytest.mark.parametrize("name", list(CLASSES))
def test_rejected_param_group_leaves_the_optimizer_as_it_was(name, bad_group):
    model = _model()
    opt = CLASSES[name]([model[0].weight, model[0].bias], lr=LR[name])
    _grads(model)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [model[2].weight], **bad_group})
    assert len(opt.param_groups) == 1 and len(opt._layers) == 1
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    opt.step()  # still usable (was an IndexError)


def test_rejected_complex_group_is_taken_back():
    model = _model()
    opt = AdamLARS([model[0].weight])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1
    _grads(model)
    opt.step()


def _stepped(name: str, **kwargs) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = CLASSES[name](_named(model), lr=LR[name], **kwargs)
    _grads(model)
    opt.step()
    return model, opt


@pytest.mark.parametrize(("source", "target"), [("LARS", "AdamLARS"), ("AdamLARS", "LARS"), ("LARS", "RangerLARS")])
def test_state_dict_of_another_optimizer_is_refused_naming_the_missing_keys(source, target):
    _, src = _stepped(source)
    _, dst = _stepped(target)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError, match=r"lacks the hyper-parameter\(s\) .*(betas|momentum)"):
        dst.load_state_dict(src.state_dict())
    assert str(dst.state_dict()) == str(before)  # untouched


def test_rangerlars_refuses_adam_moments_without_slow_buffer():
    """The sign of a lossy universal-checkpoint conversion: Adam's moments kept, Lookahead's slow weights lost."""
    _, opt = _stepped("RangerLARS")
    sd = opt.state_dict()
    for state in sd["state"].values():
        del state["slow_buffer"]
    with pytest.raises(ValueError, match=r"lacks slow_buffer .*lossily"):
        opt.load_state_dict(sd)


def test_missing_state_key_is_named():
    _, opt = _stepped("AdamLARS")
    sd = opt.state_dict()
    del sd["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"parameter 0 .*lacks exp_avg_sq"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("lr", -0.5, r"Invalid lr value: -0\.5"),
        ("betas", (0.9, 1.5), "Invalid beta2"),
        ("exclude_1d", "no", "Invalid exclude_1d value"),
    ],
)
def test_loaded_hyper_parameters_are_range_checked(key, value, match):
    _, opt = _stepped("AdamLARS")
    sd = opt.state_dict()
    sd["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert opt.param_groups[0][key] != value


def test_valid_state_dict_round_trips():
    model, opt = _stepped("RangerLARS")
    sd = copy.deepcopy(opt.state_dict())
    _, fresh = _stepped("RangerLARS")
    fresh.load_state_dict(sd)
    assert str(fresh.state_dict()) == str(opt.state_dict())
