"""Runs: how the fused passes write the pieces of flat tensors (see :mod:`hf_lars.optim.fused`).

A *run* is a maximal sequence of consecutive pieces that lie end to end in one flattened local tensor; a
piece that is a whole tensor is a run of its own.  The update passes write one run at a time, per-piece
values spread over it, instead of one piece at a time.  Everything here is traced into the compiled code
(piece structures are static: tuples of ``(tensor index, start, numel, whole)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ratio_slots", "run_pieces", "runs_of", "spread", "with_decay"]

Spec = tuple[tuple[int, int, int, bool], ...]


def runs_of(spec: Spec) -> Spec:
    """The pieces of ``spec`` merged into *runs*: consecutive pieces that lie end to end in one flat tensor.

    The update passes write each run as one tensor.  Writing a flat ZeRO partition piece by piece would
    make every ``copy_`` into a view of the partition a ``slice_scatter`` of the whole partition (one full
    pass over it per piece: LARS's update of 50 pieces of a 1.6M-element partition took 160 ms on 1 CPU
    thread, against 5 ms as one run, as fast as the eager step).
    A run is ``(tensor index, start, numel, whole)`` like a piece; :func:`run_pieces` says which pieces
    it holds.
    """
    runs: list[list[Any]] = []
    for t, start, numel, whole in spec:
        last = runs[-1] if runs else None
        if last is not None and not whole and not last[3] and last[0] == t and last[1] + last[2] == start:
            last[2] += numel
        else:
            runs.append([t, start, numel, whole])
    return tuple((t, start, numel, whole) for t, start, numel, whole in runs)


def run_pieces(spec: Spec, runs: Spec) -> list[list[int]]:
    """The piece indices (into ``spec``) that each run of ``runs`` (``runs_of(spec)``) holds, in order.

    Merged by :func:`runs_of`'s own rule rather than by counting elements, so an empty piece (a rank's empty
    FSDP2 shard, a zero-length ZeRO fragment) belongs to its run like any other: counting elements would
    leave it out, and shift every later piece onto the wrong run.
    """
    out: list[list[int]] = []
    last: tuple[int, int, int, bool] | None = None
    for i, (t, start, numel, whole) in enumerate(spec):
        if last is not None and not whole and not last[3] and last[0] == t and last[1] + last[2] == start:
            out[-1].append(i)
            last = (t, last[1], last[2] + numel, False)
        else:
            out.append([i])
            last = (t, start, numel, whole)
    assert len(out) == len(runs), "run_pieces: runs is not runs_of(spec)"
    return out


def spread(values: Sequence[Tensor | float], numels: Sequence[int], like: Tensor) -> Tensor | float:
    """One value per piece of a run as one per element: a number when all pieces share it (nothing is
    materialised), else one fp32 tensor of the run's size (each value copied, so products are bit-identical
    to multiplying each piece by its own 0-d value)."""
    if all(not isinstance(v, Tensor) for v in values) and len(set(values)) == 1:
        return values[0]  # type: ignore[return-value]
    if len(values) == 1:
        return values[0]
    return torch.cat([
        v.to(torch.float32).expand(n) if isinstance(v, Tensor)
        else torch.full((n,), v, dtype=torch.float32, device=like.device)
        for v, n in zip(values, numels)
    ])


def with_decay(x: Tensor, w32: Tensor, weight_decay: float, decays: Sequence[bool], numels: Sequence[int]) -> Tensor:
    """``x + weight_decay * w32`` on the pieces of a run that decay (``decays``), ``x`` on the others; a
    run mixing both gets a 1-byte mask of its size (not an fp32 one: the update reads it once per element)."""
    if weight_decay == 0 or not any(decays):
        return x
    if all(decays):
        return x + weight_decay * w32
    # uint8 compared with 0, not bool: inductor's CPU code converts a bool load lane by lane (23 ms against 5.5 ms
    # for the partition above)
    mask = torch.cat([torch.full((n,), int(d), dtype=torch.uint8, device=x.device) for d, n in zip(decays, numels)])
    return torch.where(mask != 0, x + weight_decay * w32, x)


def ratio_slots(adapt: Sequence[bool]) -> list[int]:
    """Per piece, its index among the adapted pieces (the position of its trust ratio); -1 if not adapted."""
    slots, j = [], 0
    for a in adapt:
        slots.append(j if a else -1)
        j += int(a)
    return slots
