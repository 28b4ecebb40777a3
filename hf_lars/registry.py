"""One table of optimizer names, read by every front door (Trainer ``--optim``, DeepSpeed JSON, the CLI).

Variants are data: ``larc`` is LARS with ``trust_clip=True``, ``lamb`` is AdamLARS, and so on.  Names are
matched case-insensitively and without ``_``/``-``, so ``"AdamLARS"`` (DeepSpeed style), ``"adam_lars"``
(Trainer style) and ``"adam-lars"`` are the same optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_lars.optim import LARS, AdamLARS, RangerLARS

__all__ = [
    "OptimInfo",
    "list_optimizers",
    "get_optimizer_info",
    "create_optimizer",
    "build_param_groups",
    "declare_stacked",
    "declare_transposed",
    "LAYER_KEYS_ATTRIBUTE",
]


@dataclass(frozen=True)
class OptimInfo:
    """A registered optimizer name: the class, what it is, and the defaults the name implies."""

    name: str
    cls: type[torch.optim.Optimizer]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    ds_type: str | None = None  # the DeepSpeed JSON "type" spelling shown in docs and errors


_REGISTRY: dict[str, OptimInfo] = {}


def _register(info: OptimInfo) -> None:
    _REGISTRY[_key(info.name)] = info


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


_register(OptimInfo("lars", LARS, "SGD + momentum with a layer-wise trust ratio (You et al. 2017)", ds_type="LARS"))
_register(OptimInfo("larc", LARS, "LARS with the trust ratio clipped at 1 (LARC)", {"trust_clip": True}))
_register(OptimInfo("nlars", LARS, "LARS with Nesterov momentum", {"nesterov": True}))
_register(
    OptimInfo("adam_lars", AdamLARS, "Adam with a layer-wise trust ratio (LAMB, You et al. 2019)", ds_type="AdamLARS")
)
_register(OptimInfo("lamb", AdamLARS, "alias of adam_lars (LAMB)"))
_register(
    OptimInfo(
        "ranger_lars", RangerLARS, "RAdam + Lookahead + Gradient Centralization + trust ratio", ds_type="RangerLARS"
    )
)


def list_optimizers() -> list[str]:
    """The registered names, in registration order (the canonical ones first in each family)."""
    return [info.name for info in _REGISTRY.values()]


def get_optimizer_info(name: str) -> OptimInfo:
    """Look a name up (case-insensitive, ``_``/``-`` ignored); an unknown name lists the valid ones."""
    info = _REGISTRY.get(_key(str(name)))
    if info is None:
        raise ValueError(f"Unknown hf_lars optimizer {name!r}. Valid names: {', '.join(list_optimizers())}")
    return info


# torch's normalization layers: their weights join Trainer's exclusions (a CNN's ``bn1`` or ``1`` is named
# like no norm, so Trainer's name patterns alone would decay and adapt BatchNorm scales).
_NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _default_decay_parameter_names(model: nn.Module) -> list[str]:
    """Trainer's rule (``Trainer.get_decay_parameter_names``) without the parameters of torch's norm layers."""
    from hf_lars.integrations.transformers.patches import trainer_decay_parameter_names

    decay = set(trainer_decay_parameter_names(model))
    norm_ids = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYER_TYPES) for p in m.parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if n in decay and id(p) not in norm_ids]


#: The attribute :func:`declare_stacked` and :func:`declare_transposed` set on a parameter: the param-group
#: keys it stands for.
LAYER_KEYS_ATTRIBUTE = "hf_lars_layer_keys"


def declare_stacked(param: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """Declare that ``param`` (shape ``[n, *rest]``) stacks ``n`` layers along dim 0, e.g. your own MoE experts.

    :func:`build_param_groups` (so ``create_optimizer``, Trainer's ``--optim`` and the Accelerate helper)
    then puts it in a group with ``stacked_dim=0``: every expert gets its own trust ratio, exclusion decision
    and Gradient Centralization (docs/design.md, "Mixture-of-experts: stacked layers").  ``transposed=True``:
    each layer is stored ``(in, out)`` (used as ``x @ W[e]``), so GC centres its output columns.  The
    experts of transformers' own MoE models are found without this.  Declare on the parameters the
    optimizer is built from (after ``fully_shard``, which makes new parameters).  Returns ``param``.

    Raises:
        ValueError: ``param`` has fewer than two dimensions, or ``transposed`` is not a bool.
    """
    from hf_lars.layout.stacked import check_stacked
    from hf_lars.sharding import layer_shape

    check_stacked(layer_shape(param), 0, transposed, what="the declared parameter")
    setattr(param, LAYER_KEYS_ATTRIBUTE, {"stacked_dim": 0, "transposed": transposed})
    return param


def declare_transposed(param: torch.Tensor) -> torch.Tensor:
    """Declare that the matrix ``param`` is stored ``(in, out)``: your module computes ``x @ param``.

    The sibling of :func:`declare_stacked` for an ordinary layer: :func:`build_param_groups` puts it in a
    group with ``transposed=True``, so Gradient Centralization centres each output *column* over the inputs
    (the same rule as an ``nn.Linear`` weight's rows; docs/design.md, "Mixture-of-experts: stacked layers").
    Trust ratios do not depend on it.  transformers' ``Conv1D`` (GPT-2) is found without this.  Declare on
    the parameters the optimizer is built from (after ``fully_shard``).  Returns ``param``.

    Raises:
        ValueError: ``param`` has fewer than two dimensions (a vector has no orientation).
    """
    from hf_lars.sharding import layer_shape

    shape = tuple(layer_shape(param))
    if len(shape) < 2:
        raise ValueError(
            f"declare_transposed: the parameter of shape {shape} is not a matrix; only a layer with two or more "
            "dimensions is stored (in, out) or (out, in).  Leave vectors (biases, norm scales) undeclared."
        )
    setattr(param, LAYER_KEYS_ATTRIBUTE, {"transposed": True})
    return param


def _layer_keys(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{parameter name: layer group keys}``: transformers' known modules, overridden by declared parameters."""
    from hf_lars.integrations.transformers.layers import layer_keys

    out = layer_keys(model)
    for n, p in model.named_parameters():
        declared = getattr(p, LAYER_KEYS_ATTRIBUTE, None)
        if declared is not None:
            out[n] = dict(declared)
    return out


def build_param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    decay_parameter_names: Iterable[str] | None = None,
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters with Trainer's rule, as ``(name, tensor)`` groups.

    The one param-group builder of every front door (:func:`create_optimizer`, the Trainer route, the
    Accelerate helpers), so a model is split the same way whichever door it comes through.

    Returns two groups: parameters that take weight decay and the trust ratio, and the no-decay group
    (whatever ``decay_parameter_names`` leaves out) with ``weight_decay=0.0`` and ``excluded=True``: its
    layers never take weight decay, and whether they take the trust ratio is the optimizer's
    ``adapt_excluded`` (LARS yes, AdamLARS/RangerLARS no; docs/design.md, "Exclusion: two decisions").  Extra
    keyword arguments go into both groups.  Frozen parameters are skipped and empty groups dropped.

    Parameters that stack layers along dim 0 (the experts of transformers' MoE models and any
    :func:`declare_stacked`) or are stored ``(in, out)`` (transformers' ``Conv1D`` weights, GPT-2, and any
    :func:`declare_transposed`), found by :func:`hf_lars.integrations.transformers.layers.layer_keys`, go
    into groups of their own beside each of the two, with ``stacked_dim=0`` and/or ``transposed=True``
    (docs/design.md, "Mixture-of-experts: stacked layers"); a model without them gets the two groups only.

    Args:
        decay_parameter_names: the names that decay.  A Trainer passes its ``get_decay_parameter_names``
            (so overrides count); the default is that same rule of transformers (no biases, nothing named like
            a norm: ``layernorm``, ``rmsnorm``, ``.norm.``, ``_norm``), also leaving out the parameters of
            torch's normalization layers (BatchNorm, GroupNorm, LayerNorm, RMSNorm, LocalResponseNorm).
    """
    if decay_parameter_names is None:
        decay_parameter_names = _default_decay_parameter_names(model)
    decay_names = set(decay_parameter_names)
    declared = _layer_keys(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    splits = [(True, {"weight_decay": weight_decay}), (False, {"weight_decay": 0.0, "excluded": True})]
    # ordinary (out, in), ordinary (in, out), stacked (out, in), stacked (in, out): the keys each group gets
    kinds = [{}, {"transposed": True}, {"stacked_dim": 0, "transposed": False}, {"stacked_dim": 0, "transposed": True}]
    groups = []
    for decays, keys in splits:
        for kind in kinds:
            params = [(n, p) for n, p in named if (n in decay_names) == decays and declared.get(n, {}) == kind]
            groups.append({"params": params, **keys, **kind, **group_kwargs})
    return [g for g in groups if g["params"]]


def create_optimizer(model_or_params: Any, name: str, **kwargs: Any) -> torch.optim.Optimizer:
    """Create a registered optimizer by name.

    ``model_or_params`` is an ``nn.Module`` (split with :func:`build_param_groups`, honouring
    ``weight_decay`` from ``kwargs``), or anything the optimizer class accepts (tensors, ``(name, tensor)``
    pairs, group dicts).  ``kwargs`` override the name's defaults.  Unknown keyword arguments raise a
    ``TypeError``/``ValueError`` from the class naming them.
    """
    info = get_optimizer_info(name)
    options = {**info.defaults, **kwargs}
    if isinstance(model_or_params, nn.Module):
        wd = options.pop("weight_decay", None)
        groups = build_param_groups(model_or_params, 0.0 if wd is None else wd)
        if wd is None:  # keep the class default for the decay group
            for group in groups:
                if not group.get("excluded"):
                    group.pop("weight_decay")
        params: Any = groups
    else:
        params = model_or_params
    return info.cls(params, **options)
