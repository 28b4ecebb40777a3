"""Gradient Centralization on the pieces of a layout: whole rows locally, cut rows completed by one all-reduce.

Part of the layout contract (:mod:`hf_lars.layout`), in its own module for size: built by
:meth:`hf_lars.layout.StepLayout.row_centring`, used by RangerLARS (docs/design.md, "Gradient
Centralization").  Imports only torch and the contract.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hf_lars.layout import Segment, StepLayout

__all__ = ["RowCentring"]


# ------------------------------------------------------------------------------------- row centring
@dataclass(frozen=True)
class _Rows:
    """``count`` whole rows of ``length`` elements at ``start`` of local tensor ``tensor``."""

    tensor: int
    start: int
    count: int
    length: int


@dataclass(frozen=True)
class _CutPiece:
    """``numel`` elements at ``start`` of local tensor ``tensor``: this rank's part of cut row ``slot``."""

    tensor: int
    start: int
    numel: int
    slot: int
    row_length: int


@dataclass(frozen=True)
class _ColumnPiece:
    """A piece of a layer stored ``(in, out)`` (``columns`` outputs): ``numel`` elements at ``start`` of local
    tensor ``tensor``, beginning at element ``layer_offset`` of the flattened layer.  ``slot`` is the first of
    the layer's ``columns`` column-sum slots when the layer is cut (-1: the piece is the whole layer)."""

    tensor: int
    start: int
    numel: int
    layer_offset: int
    columns: int
    rows: int
    slot: int


def _column_runs(piece: _ColumnPiece) -> tuple[list[tuple[int, int, int]], tuple[int, int]]:
    """A column piece as partial-row runs ``(start in the piece, length, first column)`` (at most one at each
    end) and one block of whole rows ``(start in the piece, number of rows)``."""
    columns, n = piece.columns, piece.numel
    head = min((-piece.layer_offset) % columns, n)
    count = (n - head) // columns
    tail = n - head - count * columns
    runs = []
    if head:
        runs.append((0, head, piece.layer_offset % columns))
    if tail:
        runs.append((n - tail, tail, 0))
    return runs, (head, count)


def _cut_layers(segments: Sequence[tuple[int, int, int]], numel: Sequence[int], columns: Sequence[int]) -> list[int]:
    """Layers stored ``(in, out)`` of which some segment ``(layer, layer_offset, numel)`` holds only a part."""
    return sorted({layer for layer, offset, n in segments if columns[layer] and n and (offset, n) != (0, numel[layer])})


def _cut_rows(segments: Sequence[tuple[int, int, int]], row_length: Sequence[int]) -> list[tuple[int, int]]:
    """``(layer, row)`` of every row that some segment ``(layer, layer_offset, numel)`` holds only part of."""
    cut = set()
    for layer, offset, numel in segments:
        length = row_length[layer]
        if length == 0 or numel == 0:
            continue
        if offset % length:
            cut.add((layer, offset // length))
        if (offset + numel) % length:
            cut.add((layer, (offset + numel - 1) // length))
    return sorted(cut)


def _check_partition(segments: Sequence[tuple[int, int, int]], layout: StepLayout) -> None:
    """Raise ``ValueError`` if the pieces ``(layer, layer_offset, numel)`` of some layer overlap.

    Pieces of a flat partition (ZeRO) or of ``Shard(0)`` (whole rows of the flattened layer) never overlap.
    A DTensor sharded on another dimension (FSDP2 with a ``shard_placement_fn`` giving ``Shard(1)``) holds a
    strided block on each rank, which its layout describes as a run at offset 0 on every rank: its rows (or
    columns) lie across ranks in a way pieces cannot describe, so Gradient Centralization refuses it here.
    """
    spans: dict[int, list[tuple[int, int]]] = {}
    for layer, offset, numel in segments:
        if numel:
            spans.setdefault(layer, []).append((offset, offset + numel))
    for layer, runs in spans.items():
        runs.sort()
        if all(a[1] <= b[0] for a, b in zip(runs, runs[1:])):
            continue
        names = layout.layer_names
        name = repr(names[layer]) if names is not None else f"{layer} of the param group"
        shape = tuple(layout.layer_shapes[layer]) if layout.layer_shapes is not None else "?"
        raise ValueError(
            f"hf_lars: Gradient Centralization cannot centre layer {name} of shape {shape}: its ranks' local "
            "pieces overlap, so it is a DTensor sharded on a dimension other than 0 (a placement Shard(d) with "
            "d > 0, e.g. from fully_shard(..., shard_placement_fn=...)), and its rows are split across ranks "
            "in a way the step cannot complete.  Shard it on dim 0 (return Shard(0) or None from "
            "shard_placement_fn for it), or turn GC off for its param group (use_gc=False)."
        )


class RowCentring:
    """Gradient Centralization on the pieces of a :class:`StepLayout`: each row of every layer with
    ``ndim > 1`` (an index along dim 0) minus its mean, without reassembling layers.

    A layer stored ``(in, out)`` (``StepLayout.layer_transposed``: transformers' ``Conv1D``, experts used as
    ``x @ W``) is centred by its output *columns* instead: a piece that is the whole layer locally; a layer
    some rank holds only part of (a ZeRO cut, FSDP2's ``Shard(0)`` of its input rows) by its column sums
    (``columns`` floats, in the same all-reduce as the cut rows).

    Tensors whose pieces hold whole rows (unsharded, DDP, FSDP2 ``Shard(0)``) are centred locally.  In a
    ZeRO flat partition, rows wholly inside a piece are centred locally too (one reshape per piece); a row
    cut by a partition boundary is completed by its partial sums: one float per cut row, summed over the
    process group in *one* ``all_reduce`` per call, then each part subtracts the row's mean (a row cut
    between two pieces of one rank needs no collective).  The numbering
    of the cut rows depends only on the layout: it is agreed once, when the plan is built, by gathering
    every rank's ``(layer, layer_offset, numel)`` segments (``all_gather_object``, once per layout).
    Pieces of one layer that overlap across ranks (a DTensor sharded on a dimension other than 0) are
    refused there, naming the layer.

    Attributes:
        num_cut_rows: rows cut by a partition boundary anywhere in the process group.
        num_slots: the payload of the one all-reduce: the cut rows, then the column sums of every layer
            stored ``(in, out)`` that some rank holds only part of (0: no collective).
        collective: whether :meth:`centre` all-reduces (the same on every rank of the group).
    """

    def __init__(self, layout: StepLayout) -> None:
        if layout.layer_shapes is None:
            raise ValueError("hf_lars: RowCentring needs the StepLayout's layer_shapes (the full shape of every layer).")
        shapes = layout.layer_shapes
        self.layout = layout
        centred = [len(s) > 1 and s.numel() > 0 for s in shapes]  # GC: layers with ndim > 1
        transposed = layout.layer_transposed
        # Row length of each layer centred by rows; 0 for the others (ndim <= 1, empty, or stored (in, out)).
        self.row_length = [s.numel() // s[0] if c and not t else 0 for s, c, t in zip(shapes, centred, transposed)]
        # Outputs (columns) of each layer stored (in, out), centred by columns; 0 for the others.
        self.columns = [s[-1] if c and t else 0 for s, c, t in zip(shapes, centred, transposed)]
        self.local_tensors: list[int] = []  # tensors centred as a whole (their pieces hold whole rows)
        flat: list[tuple[int, Segment]] = []
        for t_idx, lay in enumerate(layout.layouts):
            if lay.whole_rows:
                if any(self.row_length[seg.layer] for seg in lay.segments):
                    self.local_tensors.append(t_idx)
            else:
                flat += [(t_idx, seg) for seg in lay.segments if self.row_length[seg.layer] or self.columns[seg.layer]]
        self.flat_tensors = sorted({t for t, _ in flat})
        group = layout.process_group
        cut_anywhere = any(not lay.whole_rows for lay in layout.layouts) and group is not None
        mine = [(seg.layer, seg.layer_offset, seg.numel) for _, seg in flat]
        if cut_anywhere:
            import torch.distributed as dist

            gathered: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, mine, group=group)
            everyone = [s for rank_segments in gathered for s in rank_segments]
        else:
            everyone = mine
        _check_partition(everyone, layout)
        slots = {row: i for i, row in enumerate(_cut_rows(everyone, self.row_length))}
        self.num_cut_rows = len(slots)
        # A layer stored (in, out) that some rank holds only part of: its column sums take `columns` slots.
        column_slots: dict[int, int] = {}
        for layer in _cut_layers(everyone, [s.numel() for s in shapes], self.columns):
            column_slots[layer] = self.num_cut_rows + sum(self.columns[k] for k in column_slots)
        self.num_slots = self.num_cut_rows + sum(self.columns[k] for k in column_slots)
        self.collective = group is not None and self.num_slots > 0
        self.rows: list[_Rows] = []
        self.cut: list[_CutPiece] = []
        self.column_pieces: list[_ColumnPiece] = []
        for t_idx, seg in flat:
            if self.columns[seg.layer]:
                columns = self.columns[seg.layer]
                rows = shapes[seg.layer].numel() // columns
                slot = column_slots.get(seg.layer, -1)
                self.column_pieces.append(_ColumnPiece(t_idx, seg.start, seg.numel, seg.layer_offset, columns, rows, slot))
                continue
            length = self.row_length[seg.layer]
            head = min((-seg.layer_offset) % length, seg.numel)
            count = (seg.numel - head) // length
            tail = seg.numel - head - count * length
            if head:
                self.cut.append(_CutPiece(t_idx, seg.start, head, slots[(seg.layer, seg.layer_offset // length)], length))
            if count:
                self.rows.append(_Rows(t_idx, seg.start + head, count, length))
            if tail:
                end = seg.layer_offset + seg.numel
                self.cut.append(_CutPiece(t_idx, seg.start + seg.numel - tail, tail, slots[(seg.layer, (end - 1) // length)], length))
        self._index: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _slot_index(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per cut piece: its slot and its row length (fp32), on ``device``; built once per device."""
        cached = self._index.get(device)
        if cached is None:
            slot = torch.tensor([c.slot for c in self.cut], dtype=torch.long, device=device)
            length = torch.tensor([float(c.row_length) for c in self.cut], dtype=torch.float32, device=device)
            cached = self._index[device] = (slot, length)
        return cached

    def centre(self, grads: Sequence[Tensor], centre_whole: Callable[[Tensor], Tensor]) -> list[Tensor]:
        """The centred gradients, parallel to ``grads`` (local fp32 tensors parallel to the stepped ones).

        Centred tensors are new temporaries; the others are returned as they are (``grads`` is never
        modified).  ``centre_whole`` centres a tensor that holds whole rows (the optimizer's GC function).
        Every rank of the group must call this when :attr:`collective` is true, holding pieces or not.
        """
        out = list(grads)
        for t_idx in self.local_tensors:
            out[t_idx] = centre_whole(grads[t_idx])
        for t_idx in self.flat_tensors:
            out[t_idx] = grads[t_idx].clone()
        for r in self.rows:
            rows = out[r.tensor].view(-1).narrow(0, r.start, r.count * r.length).view(r.count, r.length)
            rows.sub_(rows.mean(dim=1, keepdim=True))
        cut_columns = []
        for c in self.column_pieces:
            piece = out[c.tensor].view(-1).narrow(0, c.start, c.numel)
            if c.slot < 0:  # the whole layer: centre each output column over the inputs
                matrix = piece.view(c.rows, c.columns)
                matrix.sub_(matrix.mean(dim=0, keepdim=True))
            else:
                cut_columns.append((c, piece))
        if not self.num_slots:
            return out
        parts = [out[c.tensor].view(-1).narrow(0, c.start, c.numel) for c in self.cut]
        device = parts[0].device if parts else (cut_columns[0][1].device if cut_columns else self.layout.device)
        sums = torch.zeros(self.num_slots, dtype=torch.float32, device=device)
        if parts:
            slot, length = self._slot_index(device)
            partial = torch.stack([p.sum(dtype=torch.float32) for p in parts])
            sums.narrow(0, 0, self.num_cut_rows).index_add_(0, slot, partial)
        for c, piece in cut_columns:  # this rank's part of each output column's sum
            runs, (start, count) = _column_runs(c)
            if count:
                block = piece.narrow(0, start, count * c.columns).view(count, c.columns)
                sums.narrow(0, c.slot, c.columns).add_(block.sum(dim=0, dtype=torch.float32))
            for start, n, col in runs:
                sums.narrow(0, c.slot + col, n).add_(piece.narrow(0, start, n).float())
        if self.collective:
            sums = self.layout.all_reduce(sums)
        if parts:
            means = (sums.index_select(0, slot) / length).to(parts[0].dtype)
            for part, mean in zip(parts, means.unbind(0)):
                part.sub_(mean)
        for c, piece in cut_columns:
            means = (sums.narrow(0, c.slot, c.columns) / c.rows).to(piece.dtype)
            runs, (start, count) = _column_runs(c)
            if count:
                piece.narrow(0, start, count * c.columns).view(count, c.columns).sub_(means)
            for start, n, col in runs:
                piece.narrow(0, start, n).sub_(means.narrow(0, col, n))
        return out
