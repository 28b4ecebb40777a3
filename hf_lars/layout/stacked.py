"""Layer declarations: tensors that stack several layers (MoE experts) and layers stored ``(in, out)``.

Part of the layout contract (:mod:`hf_lars.layout`; docs/design.md, "Mixture-of-experts: stacked layers",
which also covers layers stored ``(in, out)``).
A param group with ``stacked_dim=0`` says that each of its tensors of shape ``[n, *rest]`` is ``n`` layers of
shape ``rest`` (``n`` experts, each a matrix): every expert gets its own trust ratio, exclusion decision and
Gradient Centralization.  The engines' layouts (``hf_lars.sharding``) still describe pieces of whole
parameters; :func:`split_stacked` cuts each piece at the expert boundaries, which is arithmetic on
``Segment.layer_offset`` (layer ``j``'s expert ``e`` is elements ``[e * size, (e + 1) * size)`` of the
flattened parameter).  So one rule serves every engine, and the update rules see nothing but more layers.

``transposed=True`` says each layer of the group is stored ``(in, out)`` (used as ``x @ W``): a plain
matrix (transformers' ``Conv1D``, GPT-2) or, with ``stacked_dim=0``, each expert (gpt-oss, Llama 4),
rather than ``(out, in)`` like ``nn.Linear``.  Gradient Centralization then centres each layer's output
*columns* (:class:`hf_lars.layout.row_centring.RowCentring`); trust ratios do not depend on it.  A tensor
holding such a layer is not centred as a whole (its dim-0 rows are inputs), so :func:`split_stacked` gives
it ``whole_rows=False`` and GC goes through its segments.

Imports only torch and the contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_lars.layout import Segment, TensorLayout

__all__ = ["LAYER_KEYS", "StackedLayers", "check_stacked", "check_stacked_keys", "stacked_layers", "split_stacked"]

# The param-group keys that declare what a group's layers are (accepted by every hf_lars optimizer).
LAYER_KEYS = ("stacked_dim", "transposed")


def check_stacked_keys(stacked_dim: Any, transposed: Any = False) -> None:
    """Raise ``ValueError`` unless the declaration's values have the right types (shapes aside)."""
    if not isinstance(transposed, bool):
        raise ValueError(f"Invalid transposed value: {transposed!r} (allowed: True or False)")
    if stacked_dim is None:
        return
    if not isinstance(stacked_dim, int) or isinstance(stacked_dim, bool):
        raise ValueError(f"Invalid stacked_dim value: {stacked_dim!r} (allowed: None or 0, the leading dimension)")


def check_stacked(shape: Sequence[int], stacked_dim: Any, transposed: Any = False, *, what: str = "a tensor") -> None:
    """Raise ``ValueError`` unless ``stacked_dim`` is a valid stacked declaration for a tensor of ``shape``.

    ``stacked_dim`` must be ``None`` (not stacked) or the leading dimension ``0`` (or ``-ndim``) of a tensor
    with at least two dimensions; ``transposed`` a bool (any shape: it only matters to layers with
    ``ndim > 1``).
    """
    check_stacked_keys(stacked_dim, transposed)
    if stacked_dim is None:
        return
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"Invalid stacked_dim for {what} of shape {tuple(shape)}: a tensor with {ndim} dimension(s) cannot "
            "stack layers (each would be a scalar).  Declare stacked_dim only for tensors of shape "
            "[num_experts, ...]; put this one in a group without stacked_dim."
        )
    if not -ndim <= stacked_dim < ndim:
        raise ValueError(
            f"Invalid stacked_dim value: {stacked_dim} for {what} of shape {tuple(shape)} (dimension out of range: "
            f"the tensor has {ndim} dimensions; the stacked dimension must be the leading one, 0)."
        )
    if stacked_dim % ndim != 0:
        raise ValueError(
            f"Invalid stacked_dim value: {stacked_dim} for {what} of shape {tuple(shape)}: only the leading "
            "dimension (0) can stack layers, so that each layer is one contiguous block (and FSDP2, which shards "
            "dim 0, never cuts a layer).  Store the tensor with its experts first (e.g. permute it in the "
            "module) or split it into one parameter per layer."
        )


@dataclass(frozen=True)
class StackedLayers:
    """The layers of one param group once stacked parameters are split.

    Attributes:
        shapes: the full shape of every layer (an expert's shape for a stacked parameter).
        param: for every layer, the index of the parameter (in the group's original order) holding it.
        expert: for every layer, its index along the stacked dimension, ``None`` for an ordinary parameter.
        transposed: for every layer, whether it is stored ``(in, out)`` (GC centres its columns; the group's
            ``transposed`` key, for ordinary and stacked parameters alike).
        first: for every parameter, the index of its first layer.
        counts: for every parameter, how many layers it stacks, ``None`` for an ordinary parameter.
    """

    shapes: tuple[torch.Size, ...]
    param: tuple[int, ...]
    expert: tuple[int | None, ...]
    transposed: tuple[bool, ...]
    first: tuple[int, ...]
    counts: tuple[int | None, ...]

    @property
    def stacked(self) -> bool:
        """Whether the group's parameters stack layers."""
        return any(c is not None for c in self.counts)

    def names(self, param_names: Sequence[str]) -> list[str]:
        """Layer names from parameter names: ``name[e]`` for expert ``e`` of a stacked parameter."""
        return [
            param_names[j] if e is None else f"{param_names[j]}[{e}]" for j, e in zip(self.param, self.expert)
        ]


def stacked_layers(
    shapes: Sequence[Sequence[int]], stacked_dim: int | None, transposed: bool = False, *, names: Sequence[str] = ()
) -> StackedLayers:
    """The layers of a group whose parameters have full shapes ``shapes`` and keys ``stacked_dim``, ``transposed``.

    Raises:
        ValueError: the declaration does not fit a parameter (:func:`check_stacked`), naming it.
    """
    out_shapes: list[torch.Size] = []
    param: list[int] = []
    expert: list[int | None] = []
    first: list[int] = []
    counts: list[int | None] = []
    for j, shape in enumerate(shapes):
        first.append(len(out_shapes))
        counts.append(None if stacked_dim is None else int(shape[0]))
        if stacked_dim is None:
            out_shapes.append(torch.Size(shape))
            param.append(j)
            expert.append(None)
            continue
        what = f"parameter {names[j]!r}" if j < len(names) else f"parameter {j} of the group"
        check_stacked(shape, stacked_dim, transposed, what=what)
        for e in range(shape[0]):
            out_shapes.append(torch.Size(shape[1:]))
            param.append(j)
            expert.append(e)
    flags = (transposed,) * len(out_shapes)
    return StackedLayers(tuple(out_shapes), tuple(param), tuple(expert), flags, tuple(first), tuple(counts))


def split_stacked(
    layouts: Sequence[TensorLayout], full_shapes: Sequence[Sequence[int]], layers: StackedLayers
) -> list[TensorLayout]:
    """The layouts of the stepped tensors in terms of ``layers``: stacked parameters cut at expert boundaries,
    tensors holding a layer stored ``(in, out)`` no longer centred as a whole.

    ``layouts`` come from the engines (``Segment.layer`` indexes the group's parameters, ``layer_offset`` is
    where the piece starts in the flattened parameter); the result's ``Segment.layer`` indexes
    ``layers`` (experts), with ``layer_offset`` inside the expert.  A tensor holding a stacked parameter, or
    a matrix stored ``(in, out)``, has ``whole_rows`` False (its dim-0 rows are experts or inputs, not output
    rows of a layer), so Gradient Centralization goes through its segments.  A group with neither gets its
    layouts back unchanged.

    Raises:
        ValueError: a stacked parameter is a DTensor sharded on a dimension other than 0, whose local shard
            is not a contiguous run of the parameter (FSDP2 shards dim 0 unless told otherwise).
    """
    columns = [t and len(s) > 1 for s, t in zip(layers.shapes, layers.transposed)]  # layers GC centres by columns
    if not layers.stacked and not any(columns):
        return list(layouts)
    out = []
    for lay in layouts:
        segments: list[Segment] = []
        for seg in lay.segments:
            j = seg.layer
            if layers.counts[j] is None:  # an ordinary parameter: one layer
                segments.append(Segment(layers.first[j], seg.start, seg.numel, seg.layer_offset))
                continue
            if lay.dtensor and not lay.whole_rows:
                raise ValueError(
                    f"hf_lars: a stacked parameter of shape {tuple(full_shapes[j])} is a DTensor sharded on a "
                    "dimension other than 0; its local shard cuts every expert.  Shard stacked parameters on dim 0 "
                    "(FSDP2's default; drop a shard_placement_fn that says otherwise for them)."
                )
            size = torch.Size(full_shapes[j][1:]).numel()
            begin, end = seg.layer_offset, seg.layer_offset + seg.numel
            e = begin // size if size else 0
            while size and e * size < end:
                lo, hi = max(begin, e * size), min(end, (e + 1) * size)
                segments.append(Segment(layers.first[j] + e, seg.start + lo - begin, hi - lo, lo - e * size))
                e += 1
        by_rows = not any(layers.counts[s.layer] is not None or columns[layers.first[s.layer]] for s in lay.segments)
        out.append(TensorLayout(tuple(segments), lay.process_group, lay.whole_rows and by_rows, lay.dtensor))
    return out
