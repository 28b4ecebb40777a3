"""FSDP2 (``torch.distributed.fsdp.fully_shard``) and other DTensor parameters.

The optimizer steps DTensors; the local shard (``to_local()``) is one piece of its layer.  ``Shard(0)``
(what FSDP2 uses) holds whole rows, a contiguous run of the flattened layer at a known offset, so row-wise
operations such as Gradient Centralization can run on it locally (a layer stored ``(in, out)`` completes
its column sums over the group); partial norms are all-reduced over the sharded mesh dimension's process
group.  A shard of another dimension (``Shard(1)`` from a ``shard_placement_fn``) is a strided block: its
layout (one run at offset 0, ``whole_rows=False``) is right for the norms, which only sum squares, and
Gradient Centralization refuses it by name (``RowCentring``; docs/design.md, "Mixture-of-experts: stacked
layers").
"""

from __future__ import annotations

import math

from torch import Tensor

from hf_lars.layout import Segment, TensorLayout

__all__ = ["dtensor_layout"]


def dtensor_layout(t: Tensor, layer: int) -> TensorLayout:
    """The layout of a DTensor parameter that is layer ``layer``.

    Raises:
        ValueError: the DTensor is ``Partial`` or sharded over more than one mesh dimension (FSDP2 combined
            with tensor parallelism), which needs a norm reduced over several groups (not supported yet).
    """
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    placements = tuple(t.placements)
    mesh = t.device_mesh
    if any(p.is_partial() for p in placements):
        raise ValueError(
            f"hf_lars: a DTensor parameter of shape {tuple(t.shape)} has a Partial placement {placements}; "
            "optimizer parameters must be Shard or Replicate (redistribute them before stepping)."
        )
    sharded = [(dim, p) for dim, p in enumerate(placements) if isinstance(p, (Shard, _StridedShard))]
    local_numel = t.to_local().numel()
    segments = (Segment(layer, 0, local_numel),)
    if not sharded:  # replicated everywhere: the local tensor is the whole layer
        return TensorLayout(segments, process_group=None, whole_rows=True, dtensor=True)
    if len(sharded) > 1:
        raise ValueError(
            f"hf_lars: a DTensor parameter of shape {tuple(t.shape)} is sharded over {len(sharded)} mesh "
            f"dimensions {placements} (e.g. FSDP2 + tensor parallel); per-layer norms over several process "
            "groups are not supported yet.  Use FSDP2 (or HSDP: Replicate + Shard(0)) alone for the layers "
            "this optimizer adapts."
        )
    mesh_dim, placement = sharded[0]
    group = mesh.get_group(mesh_dim=mesh_dim)
    if placement.dim == 0 and not isinstance(placement, _StridedShard):
        offset = _dim0_offset(t, mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim))
        segments = (Segment(layer, 0, local_numel, offset),)
    return TensorLayout(segments, process_group=group, whole_rows=placement.dim == 0, dtensor=True)


def _dim0_offset(t: Tensor, coordinate: int, shards: int) -> int:
    """Where the local shard of a ``Shard(0)`` DTensor begins in the flattened global tensor.

    ``Shard(0)`` cuts dim 0 as ``torch.chunk`` does (FSDP2's rule): ``ceil(n / shards)`` rows per rank, the
    last ranks holding fewer or none; so rank ``r`` begins at row ``min(r * ceil(n / shards), n)``.  A stacked
    parameter needs it (``layout.split_stacked`` cuts the shard at experts), and so does a layer stored
    ``(in, out)`` (GC completes its columns across ranks); checked against the local shape.

    Raises:
        ValueError: the local shard does not have the rows that rule gives (a sharding hf_lars does not know).
    """
    rows = t.shape[0]
    per_rank = -(-rows // shards)
    first = min(coordinate * per_rank, rows)
    expected = min(per_rank, rows - first)
    local = t.to_local()
    local_rows = local.shape[0] if local.dim() else 0
    if local_rows != expected:
        raise ValueError(
            f"hf_lars: a Shard(0) DTensor of shape {tuple(t.shape)} holds {local_rows} rows on mesh coordinate "
            f"{coordinate} of {shards}; torch.chunk's rule (FSDP2's) gives {expected}.  This sharding is not "
            "supported for stacked parameters or for Gradient Centralization of layers stored (in, out)."
        )
    return first * math.prod(t.shape[1:])
