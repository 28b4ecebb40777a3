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
    "NORM_LAYER_TYPES",
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


# Normalization layers whose weights Trainer (and we) exclude from weight decay and the trust ratio.
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _is_norm_module(module: nn.Module) -> bool:
    if isinstance(module, NORM_LAYER_TYPES):
        return True
    # transformers' LlamaRMSNorm & co. are plain Modules named "...Norm".
    return type(module).__name__.lower().endswith(("norm", "layernorm", "rmsnorm"))


def build_param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    no_decay_names: Iterable[str] = ("bias",),
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters the way Trainer does, with names.

    Returns two groups of ``(name, tensor)`` pairs: parameters that take weight decay and the trust ratio,
    and the no-decay group (biases, weights of normalization layers, anything whose name contains one of
    ``no_decay_names``) with ``weight_decay=0.0`` and ``adapt=False``.  Extra keyword arguments go into both
    groups.  Empty groups are dropped.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if _is_norm_module(module):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = id(p) in no_decay_ids or any(key in name for key in no_decay_names)
        (no_decay if excluded else decay).append((name, p))
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, **group_kwargs})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "adapt": False, **group_kwargs})
    return groups


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
