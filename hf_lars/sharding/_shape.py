"""The full logical shape of an original parameter, however an engine shards it."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["layer_shape"]


def layer_shape(p: Tensor) -> torch.Size:
    """The full logical shape of an original parameter, however it is sharded.

    ``p.ds_shape`` for a DeepSpeed ZeRO-3 parameter (whose ``p.shape`` is an empty placeholder outside
    forward/backward), the global shape for a DTensor, otherwise ``p.shape``.
    """
    ds_shape = getattr(p, "ds_shape", None)
    if ds_shape is not None:
        return torch.Size(ds_shape)
    return p.shape
