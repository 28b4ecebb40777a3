"""DeepSpeed ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and the stage-0 ``BF16_Optimizer``.

Both replace each param group's parameters by one flat fp32 partition (``group["params"] = [flat]``) and
link every low-precision parameter to its piece of that partition (``deepspeed/utils/
mixed_precision_linkage.py``, ``link_hp_params``):

* ``p._hp_mapping``: ``None`` when ``p`` has no element on this rank, else a ``tensor_fragment`` whose
  ``hp_fragment`` is ``flat.narrow(0, start, numel)`` and ``get_hp_fragment_address()`` gives
  ``(start, numel)`` relative to ``flat``;
* ``p._hp_mapping.lp_fragment_address.start``: where that piece starts inside the flattened ``p``
  (the segment's ``layer_offset``);
* ``p._dp_group``: the data-parallel process group the partition is sharded over.

The alignment padding between parameters and at the end of the last rank's partition belongs to no
fragment, so it is never part of a segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from hf_lars.layout import Segment, TensorLayout

__all__ = ["flat_partition_layout", "is_deepspeed_zero_param"]

_NO_MAPPING = object()


def is_deepspeed_zero_param(p: Tensor) -> bool:
    """Whether DeepSpeed partitions ``p``'s optimizer step: ZeRO-1/2 / bf16 (``_hp_mapping`` set) or ZeRO-3.

    Checked on the attributes DeepSpeed sets when its optimizer wrapper links the parameter
    (``_hp_mapping``, possibly ``None`` on ranks that hold no piece; ``_z3_optimizer`` for ZeRO-3).
    """
    return hasattr(p, "_hp_mapping") or getattr(p, "_z3_optimizer", None) is not None


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def flat_partition_layout(flat: Tensor, layers: Sequence[Tensor]) -> TensorLayout | None:
    """The layout of a ZeRO-1/2 (or bf16 stage-0) flat fp32 partition, or ``None`` if DeepSpeed is not in use.

    ``layers`` are the original parameters of the group whose partition ``flat`` is.

    Raises:
        ValueError: the layers are linked by DeepSpeed but their pieces do not live in ``flat`` (e.g. the
            optimizer was handed another group's layers), or the pieces are inconsistent.
    """
    linked = [(j, p) for j, p in enumerate(layers) if getattr(p, "_hp_mapping", _NO_MAPPING) is not _NO_MAPPING]
    if not linked:
        return None
    if flat.dim() != 1:
        raise ValueError(
            f"hf_lars: the layers of this param group are DeepSpeed ZeRO-1/2 parameters, but the stepped tensor "
            f"has shape {tuple(flat.shape)}, not that of a flat 1-D partition."
        )
    groups = {id(p._dp_group): p._dp_group for _, p in linked if getattr(p, "_dp_group", None) is not None}
    if len(groups) != 1:
        raise ValueError(
            f"hf_lars: expected every DeepSpeed-linked layer of a param group to share one `_dp_group`, found "
            f"{len(groups)}; put parameters sharded over different groups (e.g. MoE experts) in different "
            "param groups."
        )
    process_group = next(iter(groups.values()))
    segments: list[Segment] = []
    foreign: list[int] = []
    for j, p in linked:
        fragment: Any = p._hp_mapping
        if fragment is None:  # no element of this layer on this rank
            continue
        address = fragment.get_hp_fragment_address()
        hp = fragment.get_hp_fragment()
        if not _same_storage(hp, flat):
            foreign.append(j)
            continue
        if hp.storage_offset() - flat.storage_offset() != address.start:
            raise ValueError(
                f"hf_lars: layer {j}'s DeepSpeed fragment address (start={address.start}) does not match its "
                f"position in the flat partition ({hp.storage_offset() - flat.storage_offset()}); this "
                "DeepSpeed version links parameters differently than hf_lars expects."
            )
        # lp_fragment_address: where the piece starts inside the (flattened) low-precision parameter.
        layer_offset = int(fragment.lp_fragment_address.start)
        segments.append(Segment(j, int(address.start), int(address.numel), layer_offset))
    if foreign:
        raise ValueError(
            f"hf_lars: layers {foreign[:8]} of this param group are DeepSpeed ZeRO parameters whose pieces live in "
            f"another flat partition than the stepped tensor (numel {flat.numel()}).  The optimizer must map "
            "each param group to its own layers (DeepSpeed steps one group at a time, temporarily setting "
            "optimizer.param_groups = [group]); this is a bug in the calling optimizer."
        )
    segments.sort(key=lambda s: s.start)
    end = 0
    for seg in segments:
        if seg.start < end or seg.start + seg.numel > flat.numel():
            raise ValueError(
                f"hf_lars: DeepSpeed fragments overlap or overrun the flat partition (segment {seg}, partition "
                f"numel {flat.numel()})."
            )
        end = seg.start + seg.numel
    return TensorLayout(tuple(segments), process_group=process_group, whole_rows=False, dtensor=False)
