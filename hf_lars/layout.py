"""The contract between the update rules (:mod:`hf_lars.optim`) and the engines (:mod:`hf_lars.sharding`).

A *layer* is one original model parameter (a weight matrix, a bias); trust ratios are per layer.  The
optimizer, however, steps whatever tensors it is handed: the layers themselves in plain or DDP training,
the local shards of DTensors under FSDP2, or flat fp32 partitions holding pieces of many layers under
DeepSpeed ZeRO.  This module works on *pieces*: contiguous 1-D (or whole-tensor) views that each belong to
exactly one layer.  A :class:`TensorLayout` says which pieces a stepped tensor holds; :class:`StepLayout`
gathers the pieces of one ``step()`` call, and :meth:`PieceSubset.norms` returns the global per-layer norms
for every piece with at most one ``all_reduce`` over the data-parallel group.

Both sides import this module and nothing of each other (``docs/design.md``, "The house and its arrows"):
the optimizer asks :func:`resolve_layouts` for the layouts of what it steps; the engine-specific answer
is a resolver that :mod:`hf_lars.sharding` registers with :func:`register_layout_resolver` when it is
imported (``import hf_lars`` imports it).  This module imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NORMS_PER_LAYER",
    "Segment",
    "TensorLayout",
    "StepLayout",
    "PieceSubset",
    "LayoutResolver",
    "is_dtensor",
    "register_layout_resolver",
    "resolve_layouts",
    "RowCentring",
]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor` (the package's one DTensor check)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# Every rule reduces two norms per layer (the weights and the gradient or update): the all-reduce payload.
NORMS_PER_LAYER = 2


@dataclass(frozen=True)
class Segment:
    """``numel`` contiguous elements at ``start`` of a flattened stepped tensor, all from layer ``layer``.

    ``layer`` indexes the *original* parameters of the param group; it is the same on every rank.
    ``layer_offset`` is where the piece begins inside the flattened layer.  Row-wise operations on pieces
    that may cut rows (Gradient Centralization under ZeRO, :class:`RowCentring`) need it; layouts whose
    pieces hold whole rows (``TensorLayout.whole_rows``) may leave it 0.
    """

    layer: int
    start: int
    numel: int
    layer_offset: int = 0


@dataclass(frozen=True)
class TensorLayout:
    """Where one stepped tensor's elements come from.

    Attributes:
        segments: the pieces of layers this tensor holds, as offsets into the flattened *local* tensor
            (elements outside every segment, e.g. ZeRO padding, are never read or written).
        process_group: the group to all-reduce partial sums over (``None``: the tensor holds whole layers).
        whole_rows: every piece holds whole rows (slices along dim 0) of its layer, so row-wise operations
            such as Gradient Centralization can run locally on the tensor.
        dtensor: the stepped tensor is a DTensor whose ``to_local()`` shard is the piece (FSDP2).
    """

    segments: tuple[Segment, ...]
    process_group: Any = None
    whole_rows: bool = True
    dtensor: bool = False

    @property
    def whole(self) -> bool:
        """Exactly one whole, unsharded layer: no collective, the tensor is its own piece."""
        return self.process_group is None and not self.dtensor and len(self.segments) == 1

    @staticmethod
    def of_layer(layer: int, tensor: Tensor) -> "TensorLayout":
        """The trivial layout: ``tensor`` is layer ``layer``, unsharded."""
        return TensorLayout((Segment(layer, 0, tensor.numel()),))


class StepLayout:
    """The pieces stepped by one ``step()`` call of one param group, and their layers.

    Built from the tensors of the group (parallel lists) and their :class:`TensorLayout`.
    ``pieces(tensors)`` turns any list of tensors parallel to the stepped ones (weights, gradients, state)
    into the parallel list of pieces; :meth:`norms` computes global per-layer norms.
    """

    def __init__(
        self, layouts: Sequence[TensorLayout], num_layers: int, layer_shapes: Sequence[torch.Size] | None = None
    ) -> None:
        self.layouts = list(layouts)
        self.num_layers = num_layers
        # Full shapes of the layers (row lengths for RowCentring); None: only the norms are needed.
        self.layer_shapes = None if layer_shapes is None else [torch.Size(s) for s in layer_shapes]
        self._row_centring: RowCentring | None = None
        self.trivial = all(lay.whole for lay in self.layouts)
        groups = {id(lay.process_group): lay.process_group for lay in self.layouts if lay.process_group is not None}
        if len(groups) > 1:
            raise ValueError(
                "hf_lars: the tensors of one param group are sharded over different process groups; put "
                "parameters sharded over different meshes into different param groups."
            )
        self.process_group = next(iter(groups.values()), None)
        # piece -> (tensor index, segment)
        self.piece_tensor: list[int] = []
        self.piece_layer: list[int] = []
        self._segments: list[Segment] = []
        for t_idx, lay in enumerate(self.layouts):
            for seg in lay.segments:
                self.piece_tensor.append(t_idx)
                self.piece_layer.append(seg.layer)
                self._segments.append(seg)
        self._subsets: dict[tuple[bool, ...], PieceSubset] = {}
        self._piece_tensor_index: dict[torch.device, Tensor] = {}

    def per_piece(self, per_tensor: Tensor) -> Tensor:
        """Expand a 1-D tensor of per-tensor values (e.g. step scalars) to one value per piece."""
        if self.trivial:
            return per_tensor
        index = self._piece_tensor_index.get(per_tensor.device)
        if index is None:  # built once: no host-to-device copy on later steps
            index = torch.tensor(self.piece_tensor, dtype=torch.long, device=per_tensor.device)
            self._piece_tensor_index[per_tensor.device] = index
        return per_tensor.index_select(0, index)

    @property
    def num_pieces(self) -> int:
        return len(self._segments)

    def local(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The local tensors (``to_local()`` of DTensors) of a list parallel to the stepped tensors."""
        return [t.to_local() if lay.dtensor else t for t, lay in zip(tensors, self.layouts)]

    def pieces(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Views of ``tensors`` (parallel to the stepped tensors) cut into the layout's pieces.

        A tensor whose only segment covers all of it is its own piece (keeping its shape); otherwise the
        pieces are 1-D views into the flattened tensor.
        """
        if self.trivial:
            return list(tensors)
        out = []
        for t_idx, seg in zip(self.piece_tensor, self._segments):
            t = tensors[t_idx]
            if self.layouts[t_idx].dtensor and is_dtensor(t):  # not already its local shard
                t = t.to_local()
            if seg.start == 0 and seg.numel == t.numel():
                out.append(t)
            else:
                out.append(t.view(-1).narrow(0, seg.start, seg.numel))
        return out

    def row_centring(self) -> "RowCentring":
        """The plan that centres rows of these pieces (Gradient Centralization), built once per layout.

        Under sharding where pieces may cut rows, building it is a collective over the process group (the
        pieces of every rank are gathered once, so every rank numbers the cut rows the same way): every rank
        of the group must call it in the same ``step()``.
        """
        if self._row_centring is None:
            self._row_centring = RowCentring(self)
        return self._row_centring

    def select(self, keep: Sequence[bool]) -> "PieceSubset":
        """A subset of the pieces (e.g. the adapted ones), keeping their layers for :meth:`norms`."""
        key = tuple(bool(k) for k in keep)
        subset = self._subsets.get(key)
        if subset is None:
            subset = self._subsets[key] = PieceSubset(self, [i for i, k in enumerate(key) if k])
        return subset


class PieceSubset:
    """Pieces ``idx`` of a :class:`StepLayout`; computes the global norms of their layers."""

    def __init__(self, layout: StepLayout, idx: list[int]) -> None:
        self.layout = layout
        self.idx = idx
        self.layers = [layout.piece_layer[i] for i in idx]
        self._layer_index: dict[torch.device, Tensor] = {}
        self._piece_index: dict[torch.device, Tensor] = {}

    def take(self, pieces: Sequence[Any]) -> list[Any]:
        """The entries of a per-piece list that belong to this subset."""
        return [pieces[i] for i in self.idx]

    def take_vector(self, values: Tensor) -> Tensor:
        """The entries of a 1-D per-piece tensor (over the whole layout) that belong to this subset."""
        if len(self.idx) == self.layout.num_pieces:
            return values
        index = self._piece_index.get(values.device)
        if index is None:
            index = self._piece_index[values.device] = torch.tensor(self.idx, dtype=torch.long, device=values.device)
        return values.index_select(0, index)

    def __len__(self) -> int:
        return len(self.idx)

    def norms(self, *piece_lists: Sequence[Tensor], foreach: bool = True) -> Tensor:
        """Global L2 norms of the layers of each piece, for each list of pieces: shape ``[len(lists), n]``.

        Each list holds one tensor per piece of this subset.  Norms are accumulated in fp32.  Under
        sharding, partial sums of squares are summed per layer, all-reduced in *one* collective over the
        data-parallel group (payload ``len(lists)`` floats per layer), and gathered back to the pieces.
        No host synchronization.

        A rank may hold no piece of this subset (e.g. its ZeRO partition holds only excluded 1-D layers)
        while other ranks do: it must still call ``norms`` with the same number of (empty) lists, so that
        it joins the collective; it then gets a ``[len(lists), 0]`` result.
        """
        if not self.idx:
            partial = torch.zeros(len(piece_lists), 0, dtype=torch.float32, device=_collective_device(self.layout))
            return partial if self.layout.process_group is None else self._reduce(partial)
        if foreach:
            partial = torch.stack([torch.stack(torch._foreach_norm(list(pl), 2, dtype=torch.float32)) for pl in piece_lists])
        else:
            partial = torch.stack(
                [torch.stack([torch.linalg.vector_norm(x, dtype=torch.float32) for x in pl]) for pl in piece_lists]
            )
        if self.layout.trivial and self.layout.process_group is None:
            return partial
        return self._reduce(partial)

    def _reduce(self, partial: Tensor) -> Tensor:
        device = partial.device
        layers = self._layer_index.get(device)
        if layers is None:  # built once per layout: no host-to-device copy on later steps
            layers = self._layer_index[device] = torch.tensor(self.layers, dtype=torch.long, device=device)
        sums = torch.zeros(partial.shape[0], self.layout.num_layers, dtype=torch.float32, device=device)
        sums.index_add_(1, layers, partial.square())
        group = self.layout.process_group
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return sums.sqrt().index_select(1, layers)


def _collective_device(layout: StepLayout) -> torch.device:
    """Where to put the (empty) partial sums of a rank that holds no piece: the process group's device."""
    group = layout.process_group
    if group is not None:
        import torch.distributed as dist

        if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ resolver
LayoutResolver = Callable[
    [Sequence[Tensor], Sequence[Tensor], Sequence[Tensor]], tuple[list[TensorLayout], list[torch.Size]]
]
"""``(stepped, layers, group_params) -> (layout of each stepped tensor, full shape of each layer)``."""

_resolver: LayoutResolver | None = None


def register_layout_resolver(resolver: LayoutResolver) -> None:
    """Plug in the code that knows the engines (:mod:`hf_lars.sharding` does this when imported)."""
    global _resolver
    _resolver = resolver


def resolve_layouts(
    stepped: Sequence[Tensor], layers: Sequence[Tensor], group_params: Sequence[Tensor]
) -> tuple[list[TensorLayout], list[torch.Size]]:
    """Layouts of the stepped tensors of one param group and the full shape of every layer of the group.

    Args:
        stepped: the tensors the optimizer steps now (those of ``group["params"]`` with a gradient).
        layers: the group's original parameters; ``Segment.layer`` indexes this list.
        group_params: ``group["params"]`` as it is now (an engine may have replaced the parameters).

    Plain tensors that are the group's own parameters are the trivial layout and need no resolver; anything
    else (DTensors, ZeRO flat partitions, replaced parameters) goes to the registered resolver.

    Raises:
        RuntimeError: a resolver is needed and none is registered.
    """
    index = {id(p): i for i, p in enumerate(layers)}
    if all(id(t) in index and not is_dtensor(t) for t in stepped):
        return [TensorLayout.of_layer(index[id(t)], t) for t in stepped], [p.shape for p in layers]
    if _resolver is None:
        raise RuntimeError(
            "hf_lars: the optimizer steps tensors that are not its own plain parameters (DTensors or engine "
            "partitions), and no layout resolver is registered; `import hf_lars.sharding` registers it."
        )
    return _resolver(stepped, layers, group_params)


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


class RowCentring:
    """Gradient Centralization on the pieces of a :class:`StepLayout`: each row of every layer with
    ``ndim > 1`` (an index along dim 0) minus its mean, without reassembling layers.

    Tensors whose pieces hold whole rows (unsharded, DDP, FSDP2 ``Shard(0)``) are centred locally.  In a
    ZeRO flat partition, rows wholly inside a piece are centred locally too (one reshape per piece); a row
    cut by a partition boundary is completed by its partial sums: one float per cut row, summed over the
    process group in *one* ``all_reduce`` per call, then each part subtracts the row's mean (a row cut
    between two pieces of one rank needs no collective).  The numbering
    of the cut rows depends only on the layout: it is agreed once, when the plan is built, by gathering
    every rank's ``(layer, layer_offset, numel)`` segments (``all_gather_object``, once per layout).

    Attributes:
        num_cut_rows: rows cut by a partition boundary anywhere in the process group (the payload of the
            one all-reduce; 0: no collective).
        collective: whether :meth:`centre` all-reduces (the same on every rank of the group).
    """

    def __init__(self, layout: StepLayout) -> None:
        if layout.layer_shapes is None:
            raise ValueError("hf_lars: RowCentring needs the StepLayout's layer_shapes (the full shape of every layer).")
        shapes = layout.layer_shapes
        self.layout = layout
        # Row length of each layer; 0 for layers that are not centred (ndim <= 1 or empty).
        self.row_length = [s.numel() // s[0] if len(s) > 1 and s.numel() > 0 else 0 for s in shapes]
        self.local_tensors: list[int] = []  # tensors centred as a whole (their pieces hold whole rows)
        flat: list[tuple[int, Segment]] = []
        for t_idx, lay in enumerate(layout.layouts):
            if lay.whole_rows:
                if any(self.row_length[seg.layer] for seg in lay.segments):
                    self.local_tensors.append(t_idx)
            else:
                flat += [(t_idx, seg) for seg in lay.segments if self.row_length[seg.layer]]
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
        slots = {row: i for i, row in enumerate(_cut_rows(everyone, self.row_length))}
        self.num_cut_rows = len(slots)
        self.collective = group is not None and self.num_cut_rows > 0
        self.rows: list[_Rows] = []
        self.cut: list[_CutPiece] = []
        for t_idx, seg in flat:
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
        if not self.num_cut_rows:
            return out
        parts = [out[c.tensor].view(-1).narrow(0, c.start, c.numel) for c in self.cut]
        device = parts[0].device if parts else _collective_device(self.layout)
        sums = torch.zeros(self.num_cut_rows, dtype=torch.float32, device=device)
        if parts:
            slot, length = self._slot_index(device)
            partial = torch.stack([p.sum(dtype=torch.float32) for p in parts])
            sums.index_add_(0, slot, partial)
        if self.collective:
            import torch.distributed as dist

            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.layout.process_group)
        if parts:
            means = (sums.index_select(0, slot) / length).to(parts[0].dtype)
            for part, mean in zip(parts, means.unbind(0)):
                part.sub_(mean)
        return out
