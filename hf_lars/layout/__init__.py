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
imported (``import hf_lars`` imports it).  This package imports only torch.

Beside the classes here, each in its own module and re-exported: :func:`collective_device` (``collective.py``:
where the all-reduce runs), :func:`expand_scalars` (``scalars.py``: per-layer values broadcast over pieces),
:class:`NormsBatch` (``norms_batch.py``: the norms of several param groups in one all-reduce per ``step()``),
:class:`RowCentring` (``row_centring.py``: Gradient Centralization on pieces) and the stacked-layer helpers
(``stacked.py``: experts stored in one tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hf_lars.layout.collective import collective_device, group_device_types
from hf_lars.layout.norms_batch import NormsBatch, active_batch
from hf_lars.layout.scalars import expand_scalars

__all__ = [
    "NORMS_PER_LAYER",
    "Segment",
    "TensorLayout",
    "StepLayout",
    "PieceSubset",
    "LayoutResolver",
    "NormsBatch",
    "is_dtensor",
    "collective_device",
    "expand_scalars",
    "group_device_types",
    "register_layout_resolver",
    "resolve_layouts",
    "RowCentring",
    "StackedLayers",
    "check_stacked",
    "split_stacked",
    "stacked_layers",
]


def __getattr__(name: str) -> Any:
    if name == "RowCentring":  # lives in its own module (hf_lars/layout/row_centring.py)
        from hf_lars.layout.row_centring import RowCentring

        return RowCentring
    if name in ("StackedLayers", "check_stacked", "split_stacked", "stacked_layers"):  # hf_lars/layout/stacked.py
        from hf_lars.layout import stacked

        return getattr(stacked, name)
    raise AttributeError(f"module 'hf_lars.layout' has no attribute {name!r}")


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
        whole_rows: the tensor's own rows (slices along its dim 0) are whole rows of its layers, so row-wise
            operations such as Gradient Centralization can run on the tensor as a whole.  False for ZeRO flat
            partitions, for tensors that stack layers and for layers stored ``(in, out)``
            (``layout.stacked.split_stacked``): those are centred per segment.
        dtensor: the stepped tensor is a DTensor whose ``to_local()`` shard is the piece (FSDP2).
    """

    segments: tuple[Segment, ...]
    process_group: Any = None
    whole_rows: bool = True
    dtensor: bool = False

    @property
    def whole(self) -> bool:
        """Exactly one whole, unsharded layer: no collective, the tensor is its own piece.

        One piece, at the start of its layer, with no process group (so every element of the layer is local:
        a layer cut across tensors has a piece further in, in a tensor that is not whole).  Whatever its rows
        are: a matrix stored ``(in, out)`` or a stacked parameter holding one expert is whole too
        (``whole_rows`` False: Gradient Centralization reads ``whole_rows``, never this).
        """
        one = len(self.segments) == 1 and self.segments[0].layer_offset == 0
        return self.process_group is None and not self.dtensor and one

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
        self,
        layouts: Sequence[TensorLayout],
        num_layers: int,
        device: torch.device | None = None,
        layer_shapes: Sequence[torch.Size] | None = None,
        layer_transposed: Sequence[bool] | None = None,
        layer_names: Sequence[str] | None = None,
    ) -> None:
        self.layouts = list(layouts)
        self.num_layers = num_layers
        # Where the stepped tensors live: a rank that holds no piece makes its (empty) partial sums here, so
        # that it picks the same collective device as the ranks that do (see collective_device).
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._collective_devices: dict[torch.device, torch.device] = {}
        self._piece_views: dict[tuple[int, ...], tuple[list[Tensor], list[Tensor]]] = {}
        # Full shapes of the layers (row lengths for RowCentring); None: only the norms are needed.
        self.layer_shapes = None if layer_shapes is None else [torch.Size(s) for s in layer_shapes]
        # Per layer: stored (in, out), its output dimension last (Conv1D, experts used as x @ W); Gradient
        # Centralization then centres its columns.  None: every layer is stored (out, in) like nn.Linear.
        self.layer_transposed = (
            [False] * num_layers if layer_transposed is None else [bool(t) for t in layer_transposed]
        )
        # Per layer: its name (``name[e]`` for an expert), for error messages; None: named by index.
        self.layer_names = None if layer_names is None else list(layer_names)
        self._row_centring: Any = None  # hf_lars.layout.row_centring.RowCentring, built on first use
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
        """The local tensors (``to_local()`` of DTensors) of a list parallel to the stepped tensors; tensors that
        are local already (e.g. gradients centred ahead of the step) are taken as they are."""
        return [t.to_local() if lay.dtensor and is_dtensor(t) else t for t, lay in zip(tensors, self.layouts)]

    def pieces(self, tensors: Sequence[Tensor], *, cache: bool = False) -> list[Tensor]:
        """Views of ``tensors`` (parallel to the stepped tensors) cut into the layout's pieces.

        A tensor whose only segment covers all of it is its own piece (keeping its shape); otherwise the
        pieces are 1-D views into the flattened tensor.  ``cache=True`` for tensors that live across steps
        (optimizer state, fp32 parameters): their views are cut once and reused, since a ZeRO partition
        holding hundreds of layers costs as many view ops per list per step.  Never for per-step tensors
        (gradients, working copies): a cached view would keep its storage alive.
        """
        if self.trivial:
            return list(tensors)
        key = tuple(id(t) for t in tensors)
        cached = self._piece_views.get(key) if cache else None
        if cached is not None and all(a is b for a, b in zip(cached[0], tensors)):  # ids can be reused
            return list(cached[1])
        out = []
        for t_idx, seg in zip(self.piece_tensor, self._segments):
            t = tensors[t_idx]
            if self.layouts[t_idx].dtensor and is_dtensor(t):  # not already its local shard
                t = t.to_local()
            if seg.start == 0 and seg.numel == t.numel():
                out.append(t)
            else:
                out.append(t.view(-1).narrow(0, seg.start, seg.numel))
        if cache:
            if len(self._piece_views) >= _MAX_CACHED_VIEW_SETS:
                self._piece_views.pop(next(iter(self._piece_views)))
            self._piece_views[key] = (list(tensors), out)
            return list(out)
        return out

    def collective_device(self, local: torch.device) -> torch.device:
        """The device the all-reduce of partial sums made on ``local`` runs on (cached per layout)."""
        device = self._collective_devices.get(local)
        if device is None:
            device = self._collective_devices[local] = collective_device(self.process_group, local)
        return device

    def all_reduce(self, sums: Tensor) -> Tensor:
        """``sums`` summed over the process group, on ``sums``'s device.

        A small vector of partial sums is all the group ever exchanges: it moves to the collective's device
        and back only when the group has no backend for the device it was made on (ZeRO-Offload and FSDP2 CPU
        offload keep fp32 partitions on the CPU under NCCL).
        """
        import torch.distributed as dist

        device = sums.device
        comm = self.collective_device(device)
        wire = sums if comm == device else sums.to(comm)
        dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self.process_group)
        return wire if comm == device else wire.to(device)

    def row_centring(self) -> Any:
        """The plan that centres rows of these pieces (Gradient Centralization), built once per layout: a
        :class:`hf_lars.layout.row_centring.RowCentring`.

        Under sharding where pieces may cut rows, building it is a collective over the process group (the
        pieces of every rank are gathered once, so every rank numbers the cut rows the same way): every rank
        of the group must call it in the same ``step()``.
        """
        if self._row_centring is None:
            from hf_lars.layout.row_centring import RowCentring  # beside the contract, imported when first needed

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
        self._constants: dict[tuple[tuple[float, ...], torch.device], Tensor] = {}

    def constant(self, values: Sequence[float], device: torch.device) -> Tensor:
        """``values`` (one per piece of this subset) as an fp32 tensor on ``device``, made once: a per-piece
        hyper-parameter (e.g. weight decay 0 on excluded layers) costs no host-to-device copy per step."""
        key = (tuple(float(v) for v in values), torch.device(device))
        cached = self._constants.get(key)
        if cached is None:
            cached = self._constants[key] = torch.tensor(key[0], dtype=torch.float32, device=device)
        return cached

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
        reduced = self.reduced_norms()
        if reduced is not None:  # phase 3 of a batched step: the norms are known, nothing to compute
            return reduced
        if not self.idx:
            partial = torch.zeros(len(piece_lists), 0, dtype=torch.float32, device=self.layout.device)
            return partial if self.layout.process_group is None else self._reduce(partial)  # zeros: squares too
        if foreach:  # one _foreach_norm and one stack for all lists: two kernels on CUDA, not 2 + 2 per list
            flat = [x for pl in piece_lists for x in pl]
            partial = torch.stack(torch._foreach_norm(flat, 2, dtype=torch.float32)).view(len(piece_lists), -1)
        else:
            partial = torch.stack(
                [torch.stack([torch.linalg.vector_norm(x, dtype=torch.float32) for x in pl]) for pl in piece_lists]
            )
        if self.layout.trivial and self.layout.process_group is None:
            return partial
        return self._reduce(partial.square())

    def reduced_norms(self) -> Tensor | None:
        """This subset's norms when a batched ``step()`` reduced them already (phase 3 of
        :class:`~hf_lars.layout.norms_batch.NormsBatch`), else ``None``: callers that compute their own
        partial sums (``optim/fused.py``) then skip that pass."""
        batch = active_batch()
        if batch is None or batch.measure or not batch.covers(self.layout.process_group):
            return None
        sums = batch.take(self)
        return None if sums is None else sums.sqrt().index_select(1, self._layers_on(sums.device))

    def norms_from_squares(self, squares: Tensor) -> Tensor:
        """Global per-layer norms from precomputed local sums of squares, shape ``[number of norms, len(self)]``.

        The same reduction as :meth:`norms` (one all-reduce under sharding) for callers that compute the
        partial sums themselves, e.g. fused into a pass that also writes other tensors (``optim/fused.py``).
        A rank holding no piece of this subset passes a ``[number of norms, 0]`` tensor and still joins.
        """
        reduced = self.reduced_norms()
        if reduced is not None:
            return reduced
        if self.layout.trivial and self.layout.process_group is None:
            return squares.sqrt()
        return self._reduce(squares)

    def _reduce(self, squares: Tensor) -> Tensor:
        """Sum local squares per layer, all-reduce them, and return the norms on the pieces' device.

        The per-layer sums are made where the pieces live; only that small vector (``len(lists)`` floats
        per layer) moves to the collective's device and back when the group has no backend for the pieces'
        device (ZeRO-Offload and FSDP2 CPU offload keep fp32 partitions on the CPU under NCCL).
        """
        device = squares.device
        layers = self._layers_on(device)
        sums = torch.zeros(squares.shape[0], self.layout.num_layers, dtype=torch.float32, device=device)
        sums.index_add_(1, layers, squares)
        if self.layout.process_group is not None:
            batch = active_batch()
            if batch is not None and batch.measure and batch.covers(self.layout.process_group):
                batch.record(self, sums)  # raises Measured: the group's step stops before it writes anything
            sums = self.layout.all_reduce(sums)
        return sums.sqrt().index_select(1, layers)

    def _layers_on(self, device: torch.device) -> Tensor:
        """The layer of each piece as an index tensor on ``device``, built once per layout (no host-to-device
        copy on later steps)."""
        layers = self._layer_index.get(device)
        if layers is None:
            layers = self._layer_index[device] = torch.tensor(self.layers, dtype=torch.long, device=device)
        return layers


# A layout keeps the piece views of this many stable tensor lists (weights and up to three state buffers).
_MAX_CACHED_VIEW_SETS = 8


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
    # A parameter an engine has flattened into its own storage (FSDP1 marks those with ``_fsdp_flattened``)
    # is no longer a whole layer, even though it is still the optimizer's own tensor: the resolver decides.
    if all(id(t) in index and not is_dtensor(t) and not getattr(t, "_fsdp_flattened", False) for t in stepped):
        return [TensorLayout.of_layer(index[id(t)], t) for t in stepped], [p.shape for p in layers]
    if _resolver is None:
        raise RuntimeError(
            "hf_lars: the optimizer steps tensors that are not its own plain parameters (DTensors or engine "
            "partitions), and no layout resolver is registered; `import hf_lars.sharding` registers it."
        )
    return _resolver(stepped, layers, group_params)
