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
    "GradHookInstaller",
    "register_grad_hook_installer",
    "install_grad_centralization_hooks",
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
    """

    layer: int
    start: int
    numel: int


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

    def __init__(self, layouts: Sequence[TensorLayout], num_layers: int) -> None:
        self.layouts = list(layouts)
        self.num_layers = num_layers
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
            return partial if self.layout.process_group is None else self._reduce(partial)  # zeros: squares too
        if foreach:
            partial = torch.stack([torch.stack(torch._foreach_norm(list(pl), 2, dtype=torch.float32)) for pl in piece_lists])
        else:
            partial = torch.stack(
                [torch.stack([torch.linalg.vector_norm(x, dtype=torch.float32) for x in pl]) for pl in piece_lists]
            )
        if self.layout.trivial and self.layout.process_group is None:
            return partial
        return self._reduce(partial.square())

    def norms_from_squares(self, squares: Tensor) -> Tensor:
        """Global per-layer norms from precomputed local sums of squares, shape ``[number of norms, len(self)]``.

        The same reduction as :meth:`norms` (one all-reduce under sharding) for callers that compute the
        partial sums themselves, e.g. fused into a pass that also writes other tensors (``optim/fused.py``).
        A rank holding no piece of this subset passes a ``[number of norms, 0]`` tensor and still joins.
        """
        if self.layout.trivial and self.layout.process_group is None:
            return squares.sqrt()
        return self._reduce(squares)

    def _reduce(self, squares: Tensor) -> Tensor:
        device = squares.device
        layers = self._layer_index.get(device)
        if layers is None:  # built once per layout: no host-to-device copy on later steps
            layers = self._layer_index[device] = torch.tensor(self.layers, dtype=torch.long, device=device)
        sums = torch.zeros(squares.shape[0], self.layout.num_layers, dtype=torch.float32, device=device)
        sums.index_add_(1, layers, squares)
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


# TEMPORARY: RangerLARS centres gradients under DeepSpeed ZeRO with autograd hooks that hf_lars.sharding
# installs (it alone recognises ZeRO parameters).  This plug-in only keeps optim/ from importing sharding/;
# it goes away when Gradient Centralization moves into step() (docs/design.md, "Gradient Centralization").
GradHookInstaller = Callable[[Sequence[Tensor], Callable[[Tensor], Tensor]], Any]
_grad_hook_installer: GradHookInstaller | None = None


def register_grad_hook_installer(installer: GradHookInstaller) -> None:
    """TEMPORARY (see above): plug in the installer of the ZeRO Gradient Centralization hooks."""
    global _grad_hook_installer
    _grad_hook_installer = installer


def install_grad_centralization_hooks(layers: Sequence[Tensor], centralize: Callable[[Tensor], Tensor]) -> Any:
    """TEMPORARY (see above): have the registered installer hook ``centralize`` onto ``layers``' gradients.

    Raises:
        RuntimeError: no installer is registered (``import hf_lars.sharding`` registers it).
    """
    if _grad_hook_installer is None:
        raise RuntimeError(
            "hf_lars: Gradient Centralization needs the ZeRO gradient hooks of hf_lars.sharding, which is not "
            "imported; `import hf_lars.sharding` registers them."
        )
    return _grad_hook_installer(layers, centralize)
