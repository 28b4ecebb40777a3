"""The deliberately wrong layout every sharding-unaware LAMB/LARS uses: the negative control of the evidence.

Each flat ZeRO partition (or FSDP2 local shard) is taken as one whole layer, so its norms are local and no
all-reduce happens.  ``tests/dist/exact.py``, ``benchmarks/bench_sharded.py`` and
``recipes/zero2_matches_single.py`` put it in place of :func:`hf_lars.sharding.tensor_layouts` to show that
what hf_lars computes differs from it (and what the exact path costs over it).  Outside the installed
package on purpose: it is wrong.  Built from the public layout contract only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor

import hf_lars.sharding
from hf_lars.sharding import is_dtensor

from hf_lars.layout import Segment, TensorLayout

__all__ = ["naive_tensor_layouts", "naive_layouts"]


def naive_tensor_layouts(
    stepped: Sequence[Tensor], layers: Sequence[Tensor], group_params: Sequence[Tensor] | None = None
) -> list[TensorLayout]:
    """Each stepped tensor as one layer with local norms (same signature as ``tensor_layouts``)."""
    out = []
    index = {id(p): j for j, p in enumerate(layers)}
    positions = {id(p): k for k, p in enumerate(group_params or [])}
    for t in stepped:
        if is_dtensor(t):
            j = index.get(id(t), positions.get(id(t), 0))
            out.append(TensorLayout((Segment(j, 0, t.to_local().numel()),), whole_rows=True, dtensor=True))
        else:
            out.append(TensorLayout.of_layer(0, t))
    return out


@contextlib.contextmanager
def naive_layouts(enabled: bool = True) -> Iterator[None]:
    """Within the block, optimizers that build their layouts get :func:`naive_tensor_layouts` (if ``enabled``)."""
    real: Any = hf_lars.sharding.tensor_layouts
    if enabled:
        hf_lars.sharding.tensor_layouts = naive_tensor_layouts
    try:
        yield
    finally:
        hf_lars.sharding.tensor_layouts = real
