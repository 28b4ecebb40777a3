"""Layer maps: which pieces of which layers each tensor an optimizer steps holds.

The optimizers (``optim/``) compute one trust ratio per *layer* (one original model
parameter).  What they step is not always a layer: FSDP2 hands them the local shard of a DTensor,
DeepSpeed ZeRO-1/2/3 one flat fp32 partition per param group (or sub-group) holding contiguous pieces of
many layers.  This package is the only code that reads those engines' internals; it turns each stepped
tensor into a :class:`~hf_lars.layout.TensorLayout` (``(layer, start, numel)`` segments plus the
process group to all-reduce partial norms over).  Layouts are built once per set of stepped tensors and
cached by the optimizer, so nothing here runs on the hot path.

The optimizers never import this package: importing it (``import hf_lars`` does) registers
:func:`tensor_layouts` as the layout resolver of :mod:`hf_lars.layout`.  It imports only the layout
contract and torch.  Each ZeRO segment carries its offset inside its layer (``Segment.layer_offset``), so
row-wise operations (Gradient Centralization) can complete rows that a partition boundary cuts.

Supported:

========================  ==========================================  ===========================
engine                    stepped tensor                              module
========================  ==========================================  ===========================
none / DDP                the layer itself                            :mod:`.unsharded`
FSDP2 (``fully_shard``)   a DTensor (``Shard(0)``, ``Replicate``)     :mod:`.fsdp`
DeepSpeed ZeRO-1/2        the flat fp32 partition of a param group    :mod:`.zero`
DeepSpeed bf16 (stage 0)  the flat fp32 partition (``BF16_Optimizer``)  :mod:`.zero`
DeepSpeed ZeRO-3          the flat fp32 partition of a sub-group      :mod:`.zero3`
========================  ==========================================  ===========================

Nothing here imports DeepSpeed: its objects are recognised by the attributes DeepSpeed sets on
parameters (``_hp_mapping``, ``_dp_group``, ``_z3_optimizer``, ``ds_shape``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from hf_lars.layout import TensorLayout, is_dtensor, register_layout_resolver
from hf_lars.sharding import fsdp, unsharded, zero, zero3
from hf_lars.sharding.zero3 import layer_shape

__all__ = [
    "tensor_layouts",
    "layer_shape",
    "is_dtensor",
    "is_deepspeed_zero_param",
]

logger = logging.getLogger(__name__)

# The attribute FSDP1 sets on every parameter it flattens into a FlatParameter (torch's
# ``torch.distributed.fsdp._common_utils.FSDP_FLATTENED``; read, never written).
FSDP1_FLATTENED = "_fsdp_flattened"

is_deepspeed_zero_param = zero.is_deepspeed_zero_param


def tensor_layouts(
    stepped: Sequence[Tensor],
    layers: Sequence[Tensor],
    group_params: Sequence[Tensor] | None = None,
) -> list[TensorLayout]:
    """The layout of each stepped tensor of one param group, in the order of ``stepped``.

    Args:
        stepped: the tensors the optimizer steps now (those of ``group["params"]`` with a gradient).
        layers: the group's *original* parameters, in the order the optimizer was constructed with;
            ``Segment.layer`` indexes this list (the same on every rank).
        group_params: ``group["params"]`` as it is now.  Used only when an engine replaced the group's
            parameters with new tensors of the same shapes (Accelerate swapping in FSDP2 DTensors,
            DeepSpeed's fp16 optimizer swapping in fp32 copies): a stepped tensor at position ``k`` of
            ``group_params`` is then layer ``k``.

    Raises:
        ValueError: a stepped tensor is none of the supported kinds (the message says what was found).
    """
    if any(getattr(t, FSDP1_FLATTENED, False) for t in stepped):
        raise ValueError(
            "hf_lars does not support FSDP1 (FullyShardedDataParallel): the parameters it steps are views of one "
            "flat shard per rank, so its per-layer norms would be per-shard norms.  Use FSDP2: "
            "torch.distributed.fsdp.fully_shard, Accelerate's fsdp_version: 2 (recipes/accelerate/fsdp2.yaml) or "
            'Trainer\'s --fsdp with fsdp_config {"fsdp_version": 2}.'
        )
    index = {id(p): j for j, p in enumerate(layers)}
    positions = {id(p): k for k, p in enumerate(group_params)} if group_params is not None else {}
    out: list[TensorLayout] = []
    for t in stepped:
        j = index.get(id(t))
        if is_dtensor(t):
            if j is None:
                j = unsharded.positional_layer(t, layers, group_params, positions, layer_shape)
            if j is None:
                raise ValueError(_unrecognised(t, layers, group_params, dtensor=True))
            out.append(fsdp.dtensor_layout(t, j))
            continue
        if j is not None:
            out.append(unsharded.layer_layout(t, j))
            continue
        layout = zero3.flat_partition_layout(t, layers)
        if layout is None:
            layout = zero.flat_partition_layout(t, layers)
        if layout is None:
            j = unsharded.positional_layer(t, layers, group_params, positions, layer_shape)
            if j is not None:
                logger.debug("stepped tensor %s matched layer %d by position in group['params']", tuple(t.shape), j)
                layout = TensorLayout.of_layer(j, t)
        if layout is None:
            raise ValueError(_unrecognised(t, layers, group_params))
        out.append(layout)
    return out


def _unrecognised(
    t: Tensor, layers: Sequence[Tensor], group_params: Sequence[Tensor] | None, dtensor: bool = False
) -> str:
    shapes = [tuple(layer_shape(p)) for p in layers[:6]]
    more = f" ... ({len(layers)} in all)" if len(layers) > 6 else ""
    n_params = "not given" if group_params is None else f"{len(group_params)} tensors"
    if dtensor:
        why = (
            "It is a DTensor, but neither one of those parameters nor at a position of group['params'] that is "
            "parallel to them with the same global shape."
        )
    else:
        why = (
            "It is not a DTensor, and not a DeepSpeed flat fp32 partition (no layer carries DeepSpeed's "
            "`_hp_mapping` (ZeRO-1/2, bf16) or `_z3_optimizer` (ZeRO-3))."
        )
    return (
        f"hf_lars: cannot tell which layers a stepped tensor holds: found a {type(t).__name__} of shape "
        f"{tuple(t.shape)}, dtype {t.dtype}, device {t.device}, which is not one of the {len(layers)} "
        f"parameters the optimizer was constructed with (shapes {shapes}{more}; group['params']: {n_params}).  "
        f"{why}  Supported: plain and DDP parameters, FSDP2 DTensors "
        "(torch.distributed.fsdp.fully_shard), DeepSpeed ZeRO-1/2/3 and its bf16 optimizer.  Fix: construct "
        "the optimizer from the model's parameters before handing both to the engine "
        "(deepspeed.initialize(model=..., optimizer=...), accelerator.prepare(model, optimizer)), or after "
        "fully_shard(model); an engine that replaces the parameters must keep group['params'] in the "
        "original order and shapes."
    )


def _resolve(
    stepped: Sequence[Tensor], layers: Sequence[Tensor], group_params: Sequence[Tensor]
) -> tuple[list[TensorLayout], list[torch.Size]]:
    """The resolver registered with :mod:`hf_lars.layout`: layouts and full layer shapes.

    ``tensor_layouts`` is looked up when called, so tests and benchmarks that replace
    ``hf_lars.sharding.tensor_layouts`` (e.g. with the naive "one tensor, one layer" map) still take effect.
    """
    return tensor_layouts(stepped, layers, group_params), [layer_shape(p) for p in layers]


register_layout_resolver(_resolve)
