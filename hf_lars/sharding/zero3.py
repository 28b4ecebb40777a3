"""DeepSpeed ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``).

Stage 3 splits each param group into sub-groups of about ``sub_group_size`` partition elements and steps
the client optimizer once per sub-group with ``group["params"] = [fp32_partitioned_groups_flat[i]]``.
The flat tensor of sub-group ``i`` concatenates the local partitions (``ds_tensor``) of the parameters
``fp16_groups[i]``; ``grad_position[ds_id] = (i, offset, partition_numel)`` gives each one's place.
Every parameter is padded to a multiple of the world size, so rank ``r`` of a parameter with ``ds_numel``
elements and partitions of ``n`` holds ``max(0, min(n, ds_numel - r * n))`` real elements followed by
padding (garbage).  Every module parameter carries ``_z3_optimizer`` (the stage-3 optimizer) and
``ds_process_group``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hf_lars.layout import Segment, TensorLayout

__all__ = ["flat_partition_layout", "layer_shape", "real_partition_numel"]

_REQUIRED = ("fp32_partitioned_groups_flat", "fp16_groups", "grad_position", "get_param_id")


def layer_shape(p: Tensor) -> torch.Size:
    """The full logical shape of an original parameter, however it is sharded.

    ``p.ds_shape`` for a DeepSpeed ZeRO-3 parameter (whose ``p.shape`` is an empty placeholder outside
    forward/backward); otherwise ``p.shape`` (for a DTensor that is already the global shape).
    """
    ds_shape = getattr(p, "ds_shape", None)
    if ds_shape is not None:
        return torch.Size(ds_shape)
    return p.shape


def real_partition_numel(ds_numel: int, partition_numel: int, rank: int) -> int:
    """Elements of a ZeRO-3 partition that belong to the parameter (the rest is end padding)."""
    return max(0, min(partition_numel, ds_numel - rank * partition_numel))


def _stage3_optimizer(layers: Sequence[Tensor]) -> Any:
    for p in layers:
        opt = getattr(p, "_z3_optimizer", None)
        if opt is not None:
            return opt
    return None


def flat_partition_layout(flat: Tensor, layers: Sequence[Tensor]) -> TensorLayout | None:
    """The layout of a ZeRO-3 sub-group's flat fp32 partition, or ``None`` if ZeRO-3 is not in use.

    Raises:
        ValueError: the layers are ZeRO-3 parameters but ``flat`` is not one of the stage-3 optimizer's
            sub-group partitions, or a sub-group holds a parameter that is not among ``layers``.
    """
    opt = _stage3_optimizer(layers)
    if opt is None:
        return None
    missing = [name for name in _REQUIRED if not hasattr(opt, name)]
    if missing:
        raise ValueError(
            f"hf_lars: the DeepSpeed ZeRO-3 optimizer {type(opt).__name__} lacks {missing}; this DeepSpeed "
            "version lays out ZeRO-3 partitions differently than hf_lars expects (tested: 0.19)."
        )
    sub_group = next((i for i, f in enumerate(opt.fp32_partitioned_groups_flat) if f is flat), None)
    if sub_group is None:
        raise ValueError(
            f"hf_lars: the layers are DeepSpeed ZeRO-3 parameters, but the stepped tensor (shape "
            f"{tuple(flat.shape)}, dtype {flat.dtype}) is none of the stage-3 optimizer's "
            f"{len(opt.fp32_partitioned_groups_flat)} sub-group partitions."
        )
    index = {id(p): j for j, p in enumerate(layers)}
    segments: list[Segment] = []
    process_group = None
    for p in opt.fp16_groups[sub_group]:
        j = index.get(id(p))
        if j is None:
            raise ValueError(
                f"hf_lars: ZeRO-3 sub-group {sub_group} holds a parameter (ds_id {getattr(p, 'ds_id', '?')}, shape "
                f"{tuple(getattr(p, 'ds_shape', p.shape))}) that this param group was not constructed with.  The "
                "optimizer must map each param group to its own layers."
            )
        position, offset, numel = opt.grad_position[opt.get_param_id(p)]
        if int(position) != sub_group:
            raise ValueError(
                f"hf_lars: ZeRO-3 grad_position puts layer {j} in sub-group {position}, but it is listed in "
                f"sub-group {sub_group}."
            )
        process_group = p.ds_process_group
        rank = torch.distributed.get_rank(group=process_group)
        real = real_partition_numel(int(p.ds_numel), int(numel), rank)
        if int(offset) + int(numel) > flat.numel():
            raise ValueError(
                f"hf_lars: ZeRO-3 partition of layer {j} (offset {offset}, numel {numel}) overruns sub-group "
                f"{sub_group}'s flat tensor of {flat.numel()} elements."
            )
        if real > 0:  # rank r holds the parameter's elements from r * partition_numel on
            segments.append(Segment(j, int(offset), real, rank * int(numel)))
    if process_group is None:
        raise ValueError(f"hf_lars: ZeRO-3 sub-group {sub_group} holds no parameters.")
    return TensorLayout(tuple(segments), process_group=process_group, whole_rows=False, dtensor=False)
