"""The optimizer registry: names, aliases, spelling, errors, create_optimizer and build_param_groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_lars
from hf_lars import AdamLARS, LARS, RangerLARS, build_param_groups, create_optimizer, list_optimizers

NAMES = {"lars", "larc", "nlars", "adam_lars", "lamb", "ranger_lars"}

# name -> class and the group settings the name implies
EXPECTED = {
    "lars": (LARS, {"trust_clip": False, "nesterov": False}),
    "larc": (LARS, {"trust_clip": True, "nesterov": False}),
    "nlars": (LARS, {"trust_clip": False, "nesterov": True}),
    "adam_lars": (AdamLARS, {"betas": (0.9, 0.999), "weight_decay": 0.01}),
    "lamb": (AdamLARS, {"betas": (0.9, 0.999), "weight_decay": 0.01}),
    "ranger_lars": (RangerLARS, {"k": 6, "use_gc": True}),
}


class LlamaRMSNorm(nn.Module):
    """A transformers-style norm: a plain Module, found by its name (``norm``) as Trainer's rule does."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.norm = LlamaRMSNorm(8)
        self.head = nn.Linear(8, 3, bias=False)
        self.frozen = nn.Linear(8, 8)
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.ln(self.frozen(self.proj(self.embed(idx))))))


DECAY = ["embed.weight", "proj.weight", "head.weight"]
NO_DECAY = ["proj.bias", "ln.weight", "ln.bias", "norm.weight"]


def _lr(name: str) -> dict:
    return {"lr": 0.1} if EXPECTED[name][0] is LARS else {}


def test_list_optimizers():
    names = list_optimizers()
    assert set(names) == NAMES
    assert len(names) == len(NAMES)
    assert hf_lars.list_optimizers is list_optimizers


@pytest.mark.parametrize("name", sorted(NAMES))
def test_names_and_aliases(name):
    cls, settings = EXPECTED[name]
    opt = create_optimizer([nn.Parameter(torch.randn(3, 2))], name, **_lr(name))
    assert type(opt) is cls
    for key, value in settings.items():
        assert opt.param_groups[0][key] == value, key


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("AdamLARS", "adam_lars"),
        ("adam-lars", "adam_lars"),
        ("ADAM_LARS", "adam_lars"),
        ("Lamb", "lamb"),
        ("RangerLARS", "ranger_lars"),
        ("ranger-lars", "ranger_lars"),
        ("LARS", "lars"),
        ("LaRc", "larc"),
        ("N-LARS", "nlars"),
        ("n_lars", "nlars"),
    ],
)
def test_spelling_is_case_and_separator_insensitive(spelling, name):
    cls, settings = EXPECTED[name]
    opt = create_optimizer([nn.Parameter(torch.randn(3, 2))], spelling, **_lr(name))
    assert type(opt) is cls
    for key, value in settings.items():
        assert opt.param_groups[0][key] == value, key


@pytest.mark.parametrize("bad", ["adam", "lars2", "", "ranger"])
def test_unknown_name_lists_valid_names(bad):
    with pytest.raises(ValueError, match=r"Unknown hf_lars optimizer") as info:
        create_optimizer([nn.Parameter(torch.randn(2))], bad)
    for name in NAMES:
        assert name in str(info.value)


def test_keyword_arguments_override_name_defaults():
    opt = create_optimizer([nn.Parameter(torch.randn(3, 2))], "larc", lr=0.1, trust_clip=False, momentum=0.5)
    assert opt.param_groups[0]["trust_clip"] is False
    assert opt.param_groups[0]["momentum"] == 0.5


def test_unknown_keyword_argument_is_named():
    with pytest.raises(TypeError, match="momentun"):
        create_optimizer([nn.Parameter(torch.randn(2))], "lars", lr=0.1, momentun=0.9)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_create_optimizer_from_a_module(name):
    """Two groups (decay / no-decay); the no-decay group has weight_decay 0 and adapt False; names reach the
    optimizer and its trust ratios; frozen parameters are left out."""
    model = Net()
    opt = create_optimizer(model, name, weight_decay=0.05, **_lr(name))
    assert type(opt) is EXPECTED[name][0]
    decay, no_decay = opt.param_groups
    assert decay["param_names"] == DECAY
    assert no_decay["param_names"] == NO_DECAY
    assert decay["weight_decay"] == 0.05 and decay["adapt"] is None
    assert no_decay["weight_decay"] == 0.0 and no_decay["adapt"] is False
    named = dict(model.named_parameters())
    assert [id(p) for p in decay["params"]] == [id(named[n]) for n in DECAY]
    assert [id(p) for p in no_decay["params"]] == [id(named[n]) for n in NO_DECAY]
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    before = {n: p.detach().clone() for n, p in named.items()}
    opt.step()
    assert set(opt.trust_ratios()) == set(DECAY)
    for n, p in named.items():
        moved = not torch.equal(p, before[n])
        assert moved == p.requires_grad, n


def test_create_optimizer_keeps_the_class_weight_decay_default():
    opt = create_optimizer(Net(), "adam_lars")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    opt = create_optimizer(Net(), "lars", lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]


def test_create_optimizer_from_parameters():
    model = Net()
    opt = create_optimizer(model.named_parameters(), "lamb", weight_decay=0.1)
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 0.1
    assert "frozen.weight" in opt.param_groups[0]["param_names"]  # the caller's list is used as given
    opt = create_optimizer(list(model.parameters()), "ranger_lars")
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


def test_build_param_groups():
    model = Net()
    groups = build_param_groups(model, weight_decay=0.03, foreach=False)
    assert len(groups) == 2
    decay, no_decay = groups
    assert [n for n, _ in decay["params"]] == DECAY
    assert [n for n, _ in no_decay["params"]] == NO_DECAY
    named = dict(model.named_parameters())
    for group in groups:
        for n, p in group["params"]:
            assert p is named[n]
            assert not n.startswith("frozen")
    assert decay["weight_decay"] == 0.03 and "adapt" not in decay
    assert no_decay["weight_decay"] == 0.0 and no_decay["adapt"] is False
    assert decay["foreach"] is False and no_decay["foreach"] is False


def test_build_param_groups_recognises_norm_modules_and_drops_empty_groups():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4), nn.GroupNorm(2, 4), nn.RMSNorm(4))
    decay, no_decay = build_param_groups(model, 0.1)
    assert [n for n, _ in decay["params"]] == ["0.weight"]
    assert [n for n, _ in no_decay["params"]] == ["1.weight", "1.bias", "2.weight", "2.bias", "3.weight"]
    only_weights = build_param_groups(nn.Linear(4, 4, bias=False), 0.1)
    assert len(only_weights) == 1 and only_weights[0]["weight_decay"] == 0.1
