"""The optimizer table that drives the generic optimizer tests (torch ``common_optimizers.py`` style).

One :class:`OptimizerInfo` per optimizer class: its documented defaults, the independent reference rule
(``optim_reference.py``), the inputs to check against the reference (:class:`OptimizerInput`) and the
invalid inputs with the error each must raise (:class:`ErrorInput`).  Also the standard random layers and
gradients every test uses, and :func:`build`, which turns an info + input into a real optimizer over those
layers and the matching reference optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hf_lars import LARS, AdamLARS, RangerLARS
from optim_reference import (
    ReferenceAdamLARS,
    ReferenceLARS,
    ReferenceOptimizer,
    ReferenceRangerLARS,
)

__all__ = [
    "OptimizerInput",
    "ErrorInput",
    "OptimizerInfo",
    "OPTIMIZERS",
    "reference_cases",
    "error_cases",
    "LAYER_SPECS",
    "make_layers",
    "make_grads",
    "Setup",
    "build",
    "CONVERGENCE",
    "INFO",
    "assert_close_scaled",
    "state_snapshot",
]


@dataclass(frozen=True)
class OptimizerInput:
    """Constructor keyword arguments, plus param groups split off by layer-name prefix.

    ``groups`` maps a layer-name prefix to the overrides of a separate param group holding the layers whose
    names start with it (first matching prefix wins); the other layers form the first group.
    """

    desc: str
    kwargs: dict[str, Any]
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorInput:
    """An invalid hyper-parameter setting and the error it must raise.

    ``via`` says where the setting is given: ``"constructor"`` (keyword arguments), ``"group"`` (a group dict
    passed to the constructor) or ``"add_param_group"``.  Each via is a separate test case.
    """

    desc: str
    settings: dict[str, Any]
    error_regex: str
    error_type: type[Exception] = ValueError
    vias: tuple[str, ...] = ("constructor", "group", "add_param_group")


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: type[torch.optim.Optimizer]
    reference: type[ReferenceOptimizer]
    # The documented signature (the API); ``lr`` of LARS has no default.
    defaults: dict[str, Any]
    # What every construction needs (LARS has no default lr).
    required: dict[str, Any]
    inputs: tuple[OptimizerInput, ...]
    errors: tuple[ErrorInput, ...]
    # The keys of each parameter's state after a step (for state comparisons).
    state_keys: frozenset[str]


_GROUP_VIAS = ("group", "add_param_group")  # not constructor keywords
_GROUP_ERRORS = (
    ErrorInput("unknown group key", {"lr_typo": 0.1}, r"Unknown param group key\(s\).*lr_typo", vias=_GROUP_VIAS),
    ErrorInput("removed key adapt", {"adapt": False}, r"'adapt' was replaced by .*'excluded': True", vias=_GROUP_VIAS),
    ErrorInput("excluded not a bool", {"excluded": "yes"}, r"Invalid excluded value: 'yes'", vias=_GROUP_VIAS),
    ErrorInput("excluded 1", {"excluded": 1}, r"Invalid excluded value: 1", vias=_GROUP_VIAS),
    ErrorInput("adapt_excluded not a bool", {"adapt_excluded": "no"}, r"Invalid adapt_excluded value: 'no'"),
    ErrorInput("exclude_1d a string", {"exclude_1d": "no"}, r"Invalid exclude_1d value: 'no' \(allowed: True or False"),
    ErrorInput("foreach a string", {"foreach": "yes"}, r"Invalid foreach value: 'yes' \(allowed: True, False or"),
)

_ADAM_ERRORS = (
    ErrorInput("negative lr", {"lr": -1e-3}, r"Invalid lr value: -0\.001"),
    ErrorInput("beta1 = 1", {"betas": (1.0, 0.999)}, r"Invalid beta1.* value: 1\.0"),
    ErrorInput("beta1 < 0", {"betas": (-0.1, 0.999)}, r"Invalid beta1.* value: -0\.1"),
    ErrorInput("beta2 = 1", {"betas": (0.9, 1.0)}, r"Invalid beta2.* value: 1\.0"),
    ErrorInput("beta2 > 1", {"betas": (0.9, 1.5)}, r"Invalid beta2.* value: 1\.5"),
    ErrorInput("betas not a pair", {"betas": 0.9}, r"Invalid betas value: 0\.9"),
    ErrorInput("negative eps", {"eps": -1e-6}, r"Invalid eps value: -1e-06"),
    ErrorInput("negative weight_decay", {"weight_decay": -0.1}, r"Invalid weight_decay value: -0\.1"),
    ErrorInput("nan lr", {"lr": float("nan")}, r"Invalid lr value: nan"),
)

OPTIMIZERS: tuple[OptimizerInfo, ...] = (
    OptimizerInfo(
        name="LARS",
        cls=LARS,
        reference=ReferenceLARS,
        defaults=dict(
            momentum=0.9,
            weight_decay=0.0,
            trust_coefficient=1e-3,
            eps=1e-8,
            nesterov=False,
            trust_clip=False,
            exclude_1d=True,
            adapt_excluded=True,
            foreach=None,
            fused=None,
        ),
        required={"lr": 0.1},
        inputs=(
            # eta = 1e-3 makes steps ~1e-3 of the weights; lr 20 makes them visible at the test tolerance.
            OptimizerInput("defaults", {"lr": 20.0}),
            OptimizerInput("weight_decay", {"lr": 1.0, "trust_coefficient": 0.02, "weight_decay": 0.05}),
            OptimizerInput(
                "nesterov", {"lr": 1.0, "trust_coefficient": 0.02, "weight_decay": 0.01, "nesterov": True}
            ),
            # eta = 2: layers with ||w|| > ||g|| / 2 are clipped at 1, the smaller ones are not.
            OptimizerInput(
                "trust_clip", {"lr": 0.05, "trust_coefficient": 2.0, "weight_decay": 0.01, "trust_clip": True}
            ),
            # eps large enough to matter next to the norms (~1-10): the default 1e-8 is invisible.
            OptimizerInput("no momentum, eps 0.5", {"lr": 1.0, "trust_coefficient": 0.02, "momentum": 0.0, "eps": 0.5}),
            OptimizerInput(
                "exclude_1d False", {"lr": 1.0, "trust_coefficient": 0.02, "weight_decay": 0.01, "exclude_1d": False}
            ),
            OptimizerInput(
                "adapt_excluded False",
                {"lr": 1.0, "trust_coefficient": 0.02, "weight_decay": 0.01, "adapt_excluded": False},
            ),
            OptimizerInput(
                "groups excluded, adapt_excluded False/True",
                {"lr": 1.0, "trust_coefficient": 0.02, "weight_decay": 0.01, "adapt_excluded": False},
                groups={
                    "conv": {"excluded": True, "lr": 0.3},
                    "norm": {"adapt_excluded": True, "weight_decay": 0.1},
                    "fc1": {"excluded": True, "adapt_excluded": True, "weight_decay": 0.1},
                },
            ),
        ),
        errors=(
            ErrorInput("negative lr", {"lr": -0.1}, r"Invalid lr value: -0\.1"),
            ErrorInput("momentum < 0", {"momentum": -0.1}, r"Invalid momentum value: -0\.1"),
            ErrorInput("momentum = 1", {"momentum": 1.0}, r"Invalid momentum value: 1\.0"),
            ErrorInput("negative eps", {"eps": -1e-8}, r"Invalid eps value: -1e-08"),
            ErrorInput("trust_coefficient = 0", {"trust_coefficient": 0.0}, r"Invalid trust_coefficient value: 0\.0"),
            ErrorInput("trust_coefficient < 0", {"trust_coefficient": -0.5}, r"Invalid trust_coefficient value: -0\.5"),
            ErrorInput("negative weight_decay", {"weight_decay": -0.1}, r"Invalid weight_decay value: -0\.1"),
            ErrorInput(
                "nesterov without momentum", {"momentum": 0.0, "nesterov": True}, r"Invalid nesterov value.*momentum"
            ),
            ErrorInput("nesterov a string", {"nesterov": "no"}, r"Invalid nesterov value: 'no'"),
            ErrorInput("trust_clip 0", {"trust_clip": 0}, r"Invalid trust_clip value: 0"),
            *_GROUP_ERRORS,
        ),
        state_keys=frozenset({"momentum_buffer"}),
    ),
    OptimizerInfo(
        name="AdamLARS",
        cls=AdamLARS,
        reference=ReferenceAdamLARS,
        defaults=dict(
            lr=1e-3,
            betas=(0.9, 0.999),
            eps=1e-6,
            weight_decay=0.01,
            bias_correction=True,
            trust_clip=False,
            trust_bounds=None,
            exclude_1d=True,
            adapt_excluded=False,
            foreach=None,
            fused=None,
        ),
        required={},
        inputs=(
            # lr 0.05 (not the default 1e-3) so each step moves the weights by ~5%, visible at the tolerance.
            OptimizerInput("default hyper-parameters", {"lr": 0.05}),
            OptimizerInput("no weight decay", {"lr": 0.05, "weight_decay": 0.0}),
            # fc1's ratio is ~2 (clipped to 1), conv's ~0.3 (not clipped).
            OptimizerInput("trust_clip", {"lr": 0.05, "trust_clip": True}),
            # fc1 (~2) is clamped to 1.5, conv (~0.3) to 0.5, fc2 (~1) untouched.
            OptimizerInput("trust_bounds", {"lr": 0.05, "trust_bounds": (0.5, 1.5)}),
            OptimizerInput(
                "no bias correction, eps 0.1", {"lr": 0.05, "bias_correction": False, "betas": (0.8, 0.99), "eps": 0.1}
            ),
            OptimizerInput("exclude_1d False", {"lr": 0.05, "exclude_1d": False}),
            OptimizerInput("adapt_excluded True", {"lr": 0.05, "adapt_excluded": True}),
            OptimizerInput(
                "groups excluded, adapt_excluded False/True",
                {"lr": 0.05},
                groups={
                    "conv": {"excluded": True, "lr": 0.02},
                    "norm": {"adapt_excluded": True, "weight_decay": 0.1},
                    "fc1": {"excluded": True, "adapt_excluded": True, "weight_decay": 0.1},
                },
            ),
        ),
        errors=(
            *_ADAM_ERRORS,
            ErrorInput("trust_bounds lo = 0", {"trust_bounds": (0.0, 1.0)}, r"Invalid trust_bounds value: \(0\.0, 1"),
            ErrorInput("trust_bounds lo > hi", {"trust_bounds": (2.0, 1.0)}, r"Invalid trust_bounds value: \(2\.0, 1"),
            ErrorInput("trust_bounds lo < 0", {"trust_bounds": (-1.0, 1.0)}, r"Invalid trust_bounds value"),
            ErrorInput("trust_bounds not a pair", {"trust_bounds": 1.0}, r"Invalid trust_bounds value: 1\.0"),
            ErrorInput("bias_correction 1", {"bias_correction": 1}, r"Invalid bias_correction value: 1"),
            ErrorInput("trust_clip a string", {"trust_clip": "yes"}, r"Invalid trust_clip value: 'yes'"),
            *_GROUP_ERRORS,
        ),
        state_keys=frozenset({"step", "exp_avg", "exp_avg_sq"}),
    ),
    OptimizerInfo(
        name="RangerLARS",
        cls=RangerLARS,
        reference=ReferenceRangerLARS,
        defaults=dict(
            lr=1e-3,
            betas=(0.95, 0.999),
            eps=1e-6,
            weight_decay=0.01,
            use_gc=True,
            k=6,
            alpha=0.5,
            rectify_threshold=5.0,
            exclude_1d=True,
            degenerated_to_sgd=False,
            adapt_excluded=False,
            foreach=None,
            fused=None,
        ),
        required={},
        inputs=(
            # With beta2 = 0.999, rho_t <= 5 for t <= 5 (un-rectified) and > 5 from t = 6; syncs at 6 and 12.
            OptimizerInput("default hyper-parameters", {"lr": 0.05}),
            OptimizerInput("k 3 alpha 0.8", {"lr": 0.05, "k": 3, "alpha": 0.8}),
            OptimizerInput("no GC, eps 0.1", {"lr": 0.05, "use_gc": False, "eps": 0.1}),
            OptimizerInput("no weight decay", {"lr": 0.05, "weight_decay": 0.0, "betas": (0.9, 0.99)}),
            OptimizerInput("rectify_threshold 6.5", {"lr": 0.05, "rectify_threshold": 6.5}),
            # rho_5 = 4.998 (un-rectified) and rho_6 = 5.997: the threshold is crossed by a hair.
            OptimizerInput("beta2 0.9995", {"lr": 0.05, "betas": (0.95, 0.9995)}),
            OptimizerInput("exclude_1d False", {"lr": 0.05, "exclude_1d": False, "k": 4}),
            # RAdam's SGD-momentum fallback while unrectified (no trust ratio, no weight decay); k 4: a
            # Lookahead sync inside the unrectified phase too.
            OptimizerInput("degenerated_to_sgd", {"lr": 0.05, "degenerated_to_sgd": True, "k": 4}),
            OptimizerInput("adapt_excluded True", {"lr": 0.05, "adapt_excluded": True}),
            OptimizerInput(
                "groups excluded, adapt_excluded False/True",
                {"lr": 0.05},
                groups={
                    "conv": {"excluded": True, "lr": 0.02},
                    "norm": {"adapt_excluded": True, "weight_decay": 0.1, "k": 5},
                    "fc1": {"excluded": True, "adapt_excluded": True, "weight_decay": 0.1},
                },
            ),
        ),
        errors=(
            *_ADAM_ERRORS,
            ErrorInput("k = 0", {"k": 0}, r"Invalid k value: 0"),
            ErrorInput("k not an int", {"k": 2.5}, r"Invalid k value: 2\.5"),
            ErrorInput("alpha = 0", {"alpha": 0.0}, r"Invalid alpha value: 0\.0"),
            ErrorInput("alpha > 1", {"alpha": 1.5}, r"Invalid alpha value: 1\.5"),
            ErrorInput("rectify_threshold <= 4", {"rectify_threshold": 3.0}, r"Invalid rectify_threshold value: 3"),
            ErrorInput("degenerated_to_sgd not a bool", {"degenerated_to_sgd": 1}, r"Invalid degenerated_to_sgd value: 1"),
            ErrorInput("use_gc a string", {"use_gc": "false"}, r"Invalid use_gc value: 'false'"),
            *_GROUP_ERRORS,
        ),
        state_keys=frozenset({"step", "exp_avg", "exp_avg_sq", "slow_buffer"}),
    ),
)

INFO = {info.name: info for info in OPTIMIZERS}


def _id(text: str) -> str:
    return text.replace(" ", "_").replace("/", "_")


def reference_cases() -> list[Any]:
    """``pytest.param(info, input)`` for every input of every optimizer."""
    import pytest

    return [
        pytest.param(info, inp, id=f"{info.name}-{_id(inp.desc)}") for info in OPTIMIZERS for inp in info.inputs
    ]


def error_cases() -> list[Any]:
    """``pytest.param(info, error, via)`` for every error input of every optimizer and every via."""
    import pytest

    return [
        pytest.param(info, err, via, id=f"{info.name}-{_id(err.desc)}-{via}")
        for info in OPTIMIZERS
        for err in info.errors
        for via in err.vias
    ]


# ------------------------------------------------------------------------------------------ the layers
# name, shape, init: several 2-D and 4-D weights, 1-D biases and a norm scale, a zero-initialised weight
# layer and bias, a 0-d parameter.  Scales differ so trust ratios differ from layer to layer.
LAYER_SPECS: tuple[tuple[str, tuple[int, ...], Callable[[torch.Generator, tuple[int, ...]], Tensor]], ...] = (
    ("fc1.weight", (6, 5), lambda g, s: 2.0 * torch.randn(s, generator=g, dtype=torch.float64)),
    ("fc1.bias", (6,), lambda g, s: 0.1 * torch.randn(s, generator=g, dtype=torch.float64)),
    ("conv.weight", (4, 3, 3, 3), lambda g, s: 0.3 * torch.randn(s, generator=g, dtype=torch.float64)),
    ("conv.bias", (4,), lambda g, s: 0.1 * torch.randn(s, generator=g, dtype=torch.float64)),
    ("norm.weight", (5,), lambda g, s: 1.0 + 0.1 * torch.randn(s, generator=g, dtype=torch.float64)),
    ("fc2.weight", (3, 6), lambda g, s: torch.randn(s, generator=g, dtype=torch.float64)),
    ("zero.weight", (4, 6), lambda g, s: torch.zeros(s, dtype=torch.float64)),
    ("zero.bias", (4,), lambda g, s: torch.zeros(s, dtype=torch.float64)),
    ("scale", (), lambda g, s: torch.randn(s, generator=g, dtype=torch.float64)),
)

# Steps at which some gradients are None (the layer is not stepped) or exactly zero.
GRAD_NONE: dict[int, tuple[str, ...]] = {4: ("fc2.weight", "zero.bias")}
GRAD_ZERO: dict[int, tuple[str, ...]] = {2: ("fc1.weight", "conv.bias")}


def make_layers(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    """The standard layers, as ``(name, Parameter)`` pairs (values drawn in float64, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    return [(name, torch.nn.Parameter(init(gen, shape).to(dtype))) for name, shape, init in LAYER_SPECS]


def make_grads(
    step: int, dtype: torch.dtype = torch.float64, seed: int = 1, special: bool = True
) -> list[Tensor | None]:
    """Gradients of the standard layers at ``step`` (1-based); ``special``: apply GRAD_NONE / GRAD_ZERO.

    Gradients have a non-zero mean per row, so Gradient Centralization changes them.
    """
    gen = torch.Generator().manual_seed(1000 * seed + step)
    out: list[Tensor | None] = []
    for name, shape, _ in LAYER_SPECS:
        g = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5
        if special and name in GRAD_NONE.get(step, ()):
            out.append(None)
            continue
        if special and name in GRAD_ZERO.get(step, ()):
            g = torch.zeros_like(g)
        out.append(g.to(dtype))
    return out


@dataclass
class Setup:
    opt: torch.optim.Optimizer
    ref: ReferenceOptimizer
    names: list[str]  # layer names in the optimizer's (global) order
    params: list[torch.nn.Parameter]  # parallel to names
    order: list[int]  # order[i]: index into LAYER_SPECS of the optimizer's i-th layer

    def set_grads(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """Put ``grads`` (in LAYER_SPECS order) on the parameters; returns them in the optimizer's order."""
        ordered = [grads[j] for j in self.order]
        for p, g in zip(self.params, ordered):
            p.grad = None if g is None else g.clone()
        return ordered


def build(
    info: OptimizerInfo,
    inp: OptimizerInput,
    *,
    dtype: torch.dtype = torch.float64,
    foreach: bool | None = None,
    named: bool = True,
    reference_kwargs: dict[str, Any] | None = None,
) -> Setup:
    """The real optimizer over the standard layers (grouped as ``inp`` says) and the matching reference.

    ``named``: pass ``(name, tensor)`` pairs (else plain tensors; layers are then known by global index).
    The reference's hyper-parameters are the *documented* defaults of the table, overridden by the input's
    kwargs and its group's overrides — never read back from the optimizer.
    """
    layers = make_layers(dtype)
    buckets: dict[str | None, list[int]] = {None: []}
    for prefix in inp.groups:
        buckets[prefix] = []
    for j, (name, _) in enumerate(layers):
        prefix = next((pre for pre in inp.groups if name.startswith(pre)), None)
        buckets[prefix].append(j)
    order: list[int] = []
    groups: list[dict[str, Any]] = []
    hps: list[dict[str, Any]] = []
    base = {**info.defaults, **info.required, **inp.kwargs}
    for prefix, idx in buckets.items():
        if not idx:
            continue
        overrides = inp.groups.get(prefix, {}) if prefix is not None else {}
        params = [layers[j] if named else layers[j][1] for j in idx]
        groups.append({"params": params, **overrides})
        order.extend(idx)
        hps.extend({**base, **overrides} for _ in idx)
    kwargs = {**info.required, **inp.kwargs}
    if foreach is not None:
        kwargs["foreach"] = foreach
    opt = info.cls(groups, **kwargs)
    names = [layers[j][0] for j in order] if named else [str(i) for i in range(len(order))]
    params = [layers[j][1] for j in order]
    ref = info.reference(names, params, hps, **(reference_kwargs or {}))
    return Setup(opt=opt, ref=ref, names=names, params=params, order=order)


# ------------------------------------------------------------------------------------- convergence
# Registry name -> keyword arguments for the convergence smoke test (seeded synthetic regression task).
# LARS gets a moderate lr and a larger trust coefficient rather than the paper's lr ~ 1-10 with eta = 1e-3.
CONVERGENCE: dict[str, dict[str, Any]] = {
    "lars": {"lr": 0.2, "trust_coefficient": 0.05},
    "larc": {"lr": 0.2, "trust_coefficient": 0.05},
    "nlars": {"lr": 0.2, "trust_coefficient": 0.05},
    "adam_lars": {"lr": 0.02},
    "lamb": {"lr": 0.02},
    # beta2 0.99: RAdam's variance warm-up (s ~ 0.03 on the first rectified steps at beta2 0.999, after 5
    # steps without an update) is then short enough for 200 steps (final MSE 0.057; 0.12 at beta2 0.999, lr 0.2).
    "ranger_lars": {"lr": 0.05, "betas": (0.9, 0.99)},
}


# ---------------------------------------------------------------------------------------- comparisons
def assert_close_scaled(actual: Tensor, expected: Tensor, rtol: float, msg: str = "", floor: float = 0.0) -> None:
    """``|actual - expected| <= rtol * (|expected| + max(max|expected|, floor))`` elementwise, in float64.

    The absolute part is relative to the tensor's largest element (or ``floor``, e.g. the largest value the
    tensor held before, for a value passing through zero), so elements that happen to be near zero are held
    to the accuracy the tensor as a whole can carry.
    """
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    scale = max(float(e.abs().max()) if e.numel() else 0.0, floor, 1e-30)
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{msg}\n{m}")


def state_snapshot(opt: torch.optim.Optimizer) -> dict[int, dict[str, Tensor]]:
    """Deep copy of every parameter's state, keyed by the parameter's global index."""
    params = [p for group in opt.param_groups for p in group["params"]]
    return {
        i: {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in opt.state[p].items()}
        for i, p in enumerate(params)
        if p in opt.state
    }
