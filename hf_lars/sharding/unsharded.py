"""Unsharded training (single process, DDP): every stepped tensor is one whole layer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from hf_lars.layout import TensorLayout

__all__ = ["layer_layout", "positional_layer"]


def layer_layout(t: Tensor, layer: int) -> TensorLayout:
    """``t`` is the original parameter ``layer`` itself: the trivial layout (a DTensor's is in :mod:`.fsdp`)."""
    return TensorLayout.of_layer(layer, t)


def positional_layer(
    t: Tensor,
    layers: Sequence[Tensor],
    group_params: Sequence[Tensor] | None,
    positions: Mapping[int, int],
    layer_shape: Callable[[Tensor], torch.Size],
) -> int | None:
    """The layer a replacement tensor stands for, from its position in ``group["params"]``.

    Engines that swap the optimizer's parameters for new tensors keep the order: Accelerate's
    ``fsdp2_switch_optimizer_parameters`` (plain tensors -> DTensors), DeepSpeed's fp16 optimizer
    (fp16 parameters -> fp32 copies).  Accepted only when ``group["params"]`` is parallel to the original
    layers and the shapes agree, so an unrelated tensor is never mistaken for a layer.
    """
    if group_params is None or len(group_params) != len(layers):
        return None
    k = positions.get(id(t))
    if k is None:
        return None
    if tuple(layer_shape(layers[k])) != tuple(t.shape):
        return None
    return k
