"""TEMPORARY: Gradient Centralization (Yong et al. 2020) before DeepSpeed ZeRO reduces the gradients.

GC subtracts, for each output row (index along dim 0), the mean of that row's gradient.  A ZeRO flat
partition cuts rows apart, so the optimizer cannot centre them inside ``step()``.  GC is linear, though:
centring every rank's full local gradient and then averaging equals centring the averaged gradient.  So
under ZeRO the centring runs in a tensor hook (``p.register_hook``), which autograd calls on the incoming
gradient *before* it is accumulated into ``p.grad`` and therefore before DeepSpeed's reduction, which
DeepSpeed 0.19 registers as a post-accumulate-grad hook (``deepspeed/utils/torch.py:register_grad_hook``).

The hooks decide at call time: they centre only parameters DeepSpeed partitions (ZeRO-1/2/3 and bf16),
so plain, DDP and FSDP2 training are untouched (there the optimizer centres whole rows in its step).

The centring function itself is RangerLARS's (``optim/ranger_lars.py``: ``centralize_gradient``),
handed in through :func:`hf_lars.layout.install_grad_centralization_hooks`, so there is one GC function
and this package imports only the layout contract.  A later change moves GC into ``step()`` and deletes
this module (docs/design.md, "Gradient Centralization").
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from hf_lars.sharding.zero import is_deepspeed_zero_param
from hf_lars.sharding.zero3 import layer_shape

__all__ = ["install_grad_centralization_hooks"]


def _make_hook(
    param: Tensor, shape: torch.Size, centralize: Callable[[Tensor], Tensor]
) -> Callable[[Tensor], Tensor | None]:
    ref = weakref.ref(param)

    def hook(grad: Tensor) -> Tensor | None:
        p = ref()
        if p is None or not is_deepspeed_zero_param(p):
            return None
        if grad.shape != shape:
            raise RuntimeError(
                f"hf_lars Gradient Centralization: the gradient of a DeepSpeed ZeRO parameter of shape "
                f"{tuple(shape)} arrived with shape {tuple(grad.shape)}, so its rows cannot be centred.  Set "
                "use_gc=False or report this with your DeepSpeed version."
            )
        return centralize(grad)

    return hook


def install_grad_centralization_hooks(
    layers: Iterable[Tensor], centralize: Callable[[Tensor], Tensor]
) -> list[RemovableHandle]:
    """Register a gradient-centring hook on every trainable layer with more than one dimension.

    The hook applies ``centralize`` to the incoming gradient only when DeepSpeed ZeRO (or its bf16
    optimizer) manages the parameter, detected when the gradient arrives from the attributes DeepSpeed
    sets (``_hp_mapping``, ``_z3_optimizer``); otherwise it returns ``None`` and leaves the gradient alone.
    Install once, when the optimizer is constructed (before ``deepspeed.initialize``, which registers its
    reduction hooks; ours run first anyway, being pre-accumulation tensor hooks).

    Returns:
        The hook handles; ``handle.remove()`` uninstalls one.
    """
    handles: list[RemovableHandle] = []
    for p in layers:
        shape = layer_shape(p)
        if not p.requires_grad or len(shape) <= 1:
            continue
        handles.append(p.register_hook(_make_hook(p, shape, centralize)))
    return handles
