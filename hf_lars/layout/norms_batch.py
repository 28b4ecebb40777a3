"""One all-reduce of per-layer norms per ``step()`` call, across the param groups that share a process group.

Each group's step needs its layers' global norms before it may update anything (docs/design.md, "Layers,
pieces and one all-reduce").  Stepped one group after another, a step over ``G`` sharded groups makes ``G``
latency-bound all-reduces of a few floats per layer.  A :class:`NormsBatch` lets the optimizer take the
step in three phases instead:

1. *measure* (:meth:`NormsBatch.measuring`): every group's step runs up to its norms; there
   :meth:`PieceSubset.norms <hf_lars.layout.PieceSubset.norms>` (or ``norms_from_squares``) records the
   group's local per-layer sums of squares (the ``[norms, layers]`` buffer it would all-reduce) and raises
   :class:`Measured`, which ends that group's measurement before it writes anything;
2. *reduce* (:meth:`NormsBatch.reduce`): the recorded buffers of all groups on one process group are
   concatenated, in the order they were recorded (the groups' order, the same on every rank), and summed in
   one all-reduce per process group;
3. *apply* (:meth:`NormsBatch.applying`): every group steps for real; its norms come from the reduced sums
   (the local norms are not computed again) and it makes no collective of its own.

A rank that holds no adapted piece of a group records the zeros it would have sent (the ``join`` rule), so
every rank contributes the same buffer layout.  For two ranks the sum of each element is the same
``a + b`` as in a per-group all-reduce, so the result is bit-identical; with more ranks a collective's
summation order may depend on the buffer length (ring chunking), a last-bit difference at most.

This module imports only torch and knows nothing of the update rules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hf_lars.layout import PieceSubset

__all__ = ["Measured", "NormsBatch", "active_batch"]

# The batch of the step() call in progress, while it measures or applies (None: each subset reduces alone).
_active: NormsBatch | None = None


class Measured(Exception):
    """Raised by a subset's norms in the measure phase, once its local sums are recorded: the group's step
    stops there (nothing has been written yet), and the optimizer catches it."""


def active_batch() -> NormsBatch | None:
    """The :class:`NormsBatch` of the ``step()`` call in progress, if it measures or applies now."""
    return _active


class NormsBatch:
    """The local per-layer sums of several param groups' norms, reduced together (see the module docstring).

    ``process_groups``: the process groups whose subsets take part (by identity); a subset reduced over any
    other group, or over none, is left alone.
    """

    def __init__(self, process_groups: list[Any]) -> None:
        self._groups = {id(pg) for pg in process_groups}
        self.measure = False
        # subset -> its recorded local sums [norms, layers], in recording order (dicts keep insertion order)
        self._local: dict[PieceSubset, Tensor] = {}
        self._reduced: dict[PieceSubset, Tensor] = {}

    @staticmethod
    def shared(process_groups: list[Any]) -> NormsBatch | None:
        """A batch over the process groups that appear twice or more in ``process_groups`` (one entry per
        param group that joins a collective), or ``None``.  A process group that one param group alone
        reduces over gains nothing (its all-reduce is the step's only one): that group steps as before."""
        counts: dict[int, int] = {}
        for pg in process_groups:
            counts[id(pg)] = counts.get(id(pg), 0) + 1
        shared = [pg for pg in process_groups if counts[id(pg)] > 1]
        return NormsBatch(shared) if shared else None

    def covers(self, process_group: Any) -> bool:
        """Whether subsets reduced over ``process_group`` take part."""
        return process_group is not None and id(process_group) in self._groups

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Phase 1: subsets covered by this batch record their local sums and raise :class:`Measured`."""
        with self._active(measure=True):
            yield

    @contextlib.contextmanager
    def applying(self) -> Iterator[None]:
        """Phase 3: subsets covered by this batch take their norms from :meth:`reduce`'s result."""
        with self._active(measure=False):
            yield

    @contextlib.contextmanager
    def _active(self, *, measure: bool) -> Iterator[None]:
        global _active
        previous, _active, self.measure = _active, self, measure
        try:
            yield
        finally:
            _active = previous

    def record(self, subset: PieceSubset, sums: Tensor) -> None:
        """Keep ``subset``'s local per-layer sums for :meth:`reduce` and stop its group's measurement."""
        if subset in self._local:
            raise RuntimeError(
                "hf_lars: a param group asked twice for the norms of one set of pieces in one step(); the "
                "batched all-reduce expects one request per group (report this as a bug)"
            )
        self._local[subset] = sums
        raise Measured

    def recorded(self, subset: PieceSubset) -> bool:
        return subset in self._local

    def reduce(self) -> None:
        """Phase 2: one all-reduce per process group of the concatenated sums, split back per subset."""
        by_group: dict[int, list[PieceSubset]] = {}
        for subset in self._local:
            by_group.setdefault(id(subset.layout.process_group), []).append(subset)
        for subsets in by_group.values():
            flat = [self._local.pop(s) for s in subsets]
            sizes = [t.numel() for t in flat]
            device = flat[0].device
            wire = torch.cat([t.reshape(-1).to(device) for t in flat])
            total = subsets[0].layout.all_reduce(wire)
            for s, part, local in zip(subsets, total.split(sizes), flat):
                self._reduced[s] = part.view(local.shape).to(local.device)

    def take(self, subset: PieceSubset) -> Tensor | None:
        """The reduced sums of ``subset`` (once), or ``None`` when it did not take part."""
        return self._reduced.pop(subset, None)
