"""Per-layer (or per-tensor) values broadcast over a list of pieces in one kernel: :func:`expand_scalars`.

Part of the layout contract (:mod:`hf_lars.layout` re-exports it), in its own module for size; the update
rules use it through :func:`hf_lars.optim.moments.operand` (docs/design.md, "Layers, pieces and one
all-reduce", "Launches").  Imports only torch and the standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["expand_scalars"]


_REPEATS: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
_MAX_REPEATS = 64


def expand_scalars(values: Tensor, like: Sequence[Tensor]) -> Any:
    """``values[i]`` broadcast to the shape of ``like[i]``, as dense tensors: one kernel for the whole list.

    ``values`` of shape ``[n]`` gives one list; ``[k, n]`` gives ``k`` lists (one expansion for all).

    CUDA's multi-tensor fast path takes a foreach op only when, index by index, its tensor lists agree in
    shape and strides: a list of 0-d tensors (one trust ratio per layer) paired with a list of matrices
    falls back to one kernel per tensor.  One ``repeat_interleave`` into a flat buffer, split into views
    shaped like ``like``, puts every per-layer value back on the fast path, for one transient fp32 buffer of
    the list's size (torch's foreach AdamW makes as large a temporary for its denominator).  The values are
    copied, not recomputed, so the result is bit-identical to multiplying by each 0-d value.
    """
    numels = tuple(t.numel() for t in like)
    key = (values.device, numels)
    repeats = _REPEATS.get(key) if type(values) is Tensor else None  # never cache fake or traced tensors
    if repeats is None:  # one host-to-device copy per list shape, not per step
        repeats = torch.tensor(numels, dtype=torch.long, device=values.device)
        if type(values) is Tensor:
            if len(_REPEATS) >= _MAX_REPEATS:
                _REPEATS.pop(next(iter(_REPEATS)))
            _REPEATS[key] = repeats
    flat = torch.repeat_interleave(values, repeats, dim=-1, output_size=sum(numels))
    if values.dim() == 1:
        return [piece.view(t.shape) for piece, t in zip(flat.split(numels), like)]
    return [[piece.view(t.shape) for piece, t in zip(row.split(numels), like)] for row in flat.unbind(0)]
