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
    (whatever ``decay_parameter_names`` leaves out) with ``weight_decay=0.0`` and ``adapt=False``.  Extra
    keyword arguments go into both groups.  Frozen parameters are skipped and empty groups dropped.

    Args:
        decay_parameter_names: the names that decay.  A Trainer passes its ``get_decay_parameter_names``
            (so overrides count); the default is that same rule of transformers (no biases, nothing named like
            a norm: ``layernorm``, ``rmsnorm``, ``.norm.``, ``_norm``), also leaving out the parameters of
            torch's normalization layers (BatchNorm, GroupNorm, LayerNorm, RMSNorm, LocalResponseNorm).
    """
    if decay_parameter_names is None:
        decay_parameter_names = _default_decay_parameter_names(model)
    decay_names = set(decay_parameter_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(n, p) for n, p in named if n in decay_names], "weight_decay": weight_decay, **group_kwargs},
        {
            "params": [(n, p) for n, p in named if n not in decay_names],
            "weight_decay": 0.0,
            "adapt": False,
            **group_kwargs,
        },
    ]
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
                if "adapt" not in group:
                    group.pop("weight_decay")
        params: Any = groups
    else:
        params = model_or_params
    return info.cls(params, **options)
