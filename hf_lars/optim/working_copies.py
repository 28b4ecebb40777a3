"""The working tensors of one group's step: local shards, fp32 copies of low-precision tensors, pieces, and
the chunks a step is taken in.

All update math runs in fp32 (docs/design.md, "Mixed precision"); this module is where bf16/fp16 (and fp64)
parameters meet that rule.  The fp32 copies and the step's temporaries are made one *chunk* of tensors at
a time (:func:`step_in_chunks`), so a step's transient memory is bounded by a chunk, not by the group.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from hf_lars.layout import StepLayout, is_dtensor
from hf_lars.optim.trust import Ratios, StepPlan

__all__ = [
    "CHUNK_ELEMENTS",
    "StepTensors",
    "active_inv_scale",
    "chunk_plans",
    "restore_if_skipped",
    "save_for_skip",
    "step_in_chunks",
    "unscaled_gradients",
]

# The inverse loss scale of the step in progress (None: gradients carry no scale); set by the base class's
# step() from GradScaler's ``grad_scale`` for the duration of one group's update.
_inv_scale: Tensor | None = None

# Chunks of whole layers (chunk_plans).  The largest tensor is a chunk of its own: its fp32 weight and
# gradient copies (8 bytes per element; the step's other temporaries reuse the gradient copy) are the floor of
# any eager step.  A chunk of several tensors takes up to 20 bytes per element (those copies, plus one
# broadcast of per-layer values, ``expand_scalars``, with its int64 index), so it holds at most 2/5 of the
# largest tensor's elements: never more memory than the largest tensor's own chunk.  And at least
# CHUNK_ELEMENTS: on CUDA a foreach op over 1M elements moves >= 8 MB, long beside its launch, so chunking
# costs no launch-bound time, and sets of small tensors (where launches count) fit in one chunk.
CHUNK_ELEMENTS = 1 << 20


@contextlib.contextmanager
def unscaled_gradients(grad_scale: Tensor | None) -> Iterator[None]:
    """Inside this block, :class:`StepTensors` divides gradients by ``grad_scale`` (a device tensor).

    The division happens on the fp32 working gradients, a ``_foreach_mul`` by ``1 / grad_scale`` (one 0-d
    tensor: CUDA's fast path) per device, so ``p.grad`` is never written and the host never reads the scale.
    """
    global _inv_scale
    previous = _inv_scale
    _inv_scale = None if grad_scale is None else grad_scale.float().reciprocal()
    try:
        yield
    finally:
        _inv_scale = previous


def active_inv_scale() -> Tensor | None:
    """The inverse loss scale of the step in progress (inside :func:`unscaled_gradients`), else ``None``.

    For step implementations that read gradients without :class:`StepTensors` (the fused path multiplies
    by it inside its compiled passes).
    """
    return _inv_scale


def _unscale(grads: list[Tensor], originals: Sequence[Tensor], inv_scale: Tensor) -> list[Tensor]:
    """``grads / scale`` without writing the caller's gradients: fp32 copies are scaled in place, the
    caller's own fp32 gradients into new tensors; one foreach op of each kind per device."""
    out = list(grads)
    by_device: dict[tuple[torch.device, bool], list[int]] = {}
    for i, (g, original) in enumerate(zip(grads, originals)):
        by_device.setdefault((g.device, g is original), []).append(i)
    for (device, borrowed), idx in by_device.items():
        inv = inv_scale.to(device, non_blocking=True)
        if borrowed:
            for i, scaled in zip(idx, torch._foreach_mul([grads[i] for i in idx], inv)):
                out[i] = scaled
        else:
            torch._foreach_mul_([grads[i] for i in idx], inv)
    return out


def _fp32(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Non-fp32 tensors (bf16, fp16, and fp64 too: docs/design.md keeps all update math in fp32) as fp32
    copies, fp32 ones as themselves.  The copies are made by one ``_foreach_copy_`` (one kernel on CUDA for
    the whole list, not one cast per tensor)."""
    out = list(tensors)
    low = [i for i, t in enumerate(out) if t.dtype != torch.float32]
    if low:
        copies = [torch.empty_like(out[i], dtype=torch.float32) for i in low]
        torch._foreach_copy_(copies, [out[i] for i in low])
        for i, c in zip(low, copies):
            out[i] = c
    return out


class StepTensors:
    """Weights and gradients of (a chunk of) the stepped tensors as fp32 local tensors, cut into pieces on
    demand.

    Low-precision (bf16/fp16) parameters are updated through an fp32 copy that :meth:`write_back` casts
    back; fp32 parameters are updated in place.  Gradients are never modified: a rule that transforms them
    (e.g. Gradient Centralization) replaces entries of :attr:`grads` with new tensors.
    """

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor], layout: StepLayout) -> None:
        self.layout = layout
        self._params = layout.local(params)
        self.weights = _fp32(self._params)
        self._caller_grads = layout.local(grads)
        self.grads = _fp32(self._caller_grads)
        if _inv_scale is not None:
            self.grads = _unscale(self.grads, self._caller_grads, _inv_scale)

    def owns_grad(self, i: int) -> bool:
        """Whether ``grads[i]`` is a temporary of this step (an fp32 or unscaled copy, a centred gradient)
        that may be overwritten once it has been read, rather than the caller's own gradient."""
        return self.grads[i] is not self._caller_grads[i]

    def release_grads(self) -> None:
        """Drop the working gradients (their copies die at once) when the rest of the step does not read
        them: the step's next temporaries then reuse their memory."""
        self.grads = []

    def pieces(self, local_tensors: Sequence[Tensor]) -> list[Tensor]:
        """Pieces of local fp32 tensors parallel to the stepped ones (e.g. :attr:`weights`).

        The views of tensors that live across steps (fp32 parameters) are cut once per layout and cached.
        """
        stable = local_tensors is self.weights and all(w is p for w, p in zip(self.weights, self._params))
        return self.layout.pieces(local_tensors, cache=stable)

    def state_local(self, state: Sequence[Tensor]) -> list[Tensor]:
        """Optimizer state tensors (possibly DTensors) parallel to the stepped ones, as local tensors."""
        return self.layout.local(state)

    def state_pieces(self, state: Sequence[Tensor]) -> list[Tensor]:
        """Pieces of optimizer state tensors (fp32, possibly DTensors) parallel to the stepped ones."""
        return self.layout.pieces(self.layout.local(state), cache=True)

    def write_back(self) -> None:
        """Cast updated fp32 copies back into low-precision parameters."""
        pairs = [(p, w) for p, w in zip(self._params, self.weights) if p is not w]
        if pairs:  # one _foreach_copy_ for the whole list
            torch._foreach_copy_([p for p, _ in pairs], [w for _, w in pairs])


# layout -> (adapt, decay) -> chunks: built once per layout (the base class keeps its layouts across steps).
_CHUNKS: "weakref.WeakKeyDictionary[StepLayout, dict[tuple, list[tuple[slice, StepPlan]]]]" = (
    weakref.WeakKeyDictionary()
)


def chunk_plans(plan: StepPlan, numels: Sequence[int]) -> list[tuple[slice, StepPlan]]:
    """The chunks a step over ``plan`` is taken in: ``(tensors, plan of those tensors)``, in order.

    Only whole, unsharded layers (``layout.trivial``) can be stepped a chunk at a time: every layer's norms
    are then inside its chunk.  Consecutive tensors join a chunk while it holds at most
    ``max(CHUNK_ELEMENTS, 2/5 of the largest tensor)`` elements; a tensor above that is a chunk of its own.  Any other layout (pieces of layers cut across tensors or ranks, whose
    norms need every piece and one collective before any update) is one chunk.
    """
    layout = plan.layout
    if not layout.trivial:
        return [(slice(0, len(numels)), plan)]
    per_layout = _CHUNKS.setdefault(layout, {})
    key = (plan.adapt, plan.decay, tuple(numels))
    chunks = per_layout.get(key)
    if chunks is None:
        limit = max(CHUNK_ELEMENTS, 2 * max(numels, default=0) // 5)
        bounds, start, total = [], 0, 0
        for i, n in enumerate(numels):
            if i > start and (total + n > limit or n > limit):
                bounds.append(slice(start, i))
                start, total = i, 0
            total += n
        bounds.append(slice(start, len(numels)))
        if len(bounds) == 1:
            chunks = [(bounds[0], plan)]
        else:
            chunks = [
                (span, StepPlan(StepLayout(layout.layouts[span], layout.num_layers, device=layout.device,
                                           layer_shapes=layout.layer_shapes, layer_transposed=layout.layer_transposed,
                                           layer_names=layout.layer_names), plan.adapt[span], plan.decay[span]))
                for span in bounds
            ]
        per_layout[key] = chunks
    return chunks


def step_in_chunks(
    plan: StepPlan,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    step_chunk: Callable[[StepTensors, StepPlan, slice], Ratios | None],
) -> Ratios | None:
    """Run ``step_chunk(work, chunk plan, tensors)`` on each chunk (:func:`chunk_plans`) with its fp32
    working tensors, writing each chunk back before the next one's copies are made; returns the ratios of
    all chunks (layer ids in order)."""
    results = []
    for span, sub in chunk_plans(plan, [p.numel() for p in params]):
        work = StepTensors(params[span], grads[span], sub.layout)
        result = step_chunk(work, sub, span)
        work.write_back()
        del work  # this chunk's copies die before the next chunk's are made
        if result is not None:
            results.append(result)
    if len(results) <= 1:
        return results[0] if results else None
    return [layer for layers, _ in results for layer in layers], torch.cat([r for _, r in results])


# ------------------------------------------------------------------ GradScaler's skip, on the device
def save_for_skip(stepped: Sequence[Tensor], state: dict[Tensor, dict[str, Any]]) -> list[tuple[Tensor, Tensor]]:
    """Copies of the local data of every stepped tensor and of its existing state, to undo a skipped step.

    GradScaler's skip must happen without reading ``found_inf`` on the host, so the step runs and is then
    undone on the device.  Costs one transient copy of the group's parameters and state (what torch's
    fused kernels avoid by testing the flag inside the kernel).  The state must exist already (the base class's ``_init_state``).
    """
    saved = []
    for p in stepped:
        tensors = [p] + [v for v in state.get(p, {}).values() if isinstance(v, Tensor)]
        for t in [x.to_local() if is_dtensor(x) else x for x in tensors]:
            saved.append((t, t.clone()))
    return saved


def restore_if_skipped(found_inf: Tensor, saved: list[tuple[Tensor, Tensor]]) -> None:
    """``t = old if found_inf else t`` for every saved pair, on the device (``torch.where``: exact, NaN-safe)."""
    flags: dict[torch.device, Tensor] = {}
    for t, old in saved:
        flag = flags.get(t.device)
        if flag is None:
            flag = flags[t.device] = found_inf.to(t.device, non_blocking=True) != 0
        t.copy_(torch.where(flag, old, t))
