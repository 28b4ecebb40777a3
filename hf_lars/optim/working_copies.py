"""The working tensors of one group's step: local shards, fp32 copies of low-precision tensors, pieces.

All update math runs in fp32 (docs/design.md, "Mixed precision"); this module is where bf16/fp16 (and fp64)
parameters meet that rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hf_lars.layout import StepLayout

__all__ = ["StepTensors"]


def _fp32(t: Tensor) -> Tensor:
    """Non-fp32 tensors (bf16, fp16, and fp64 too: docs/design.md keeps all update math in fp32) as fp32 copies."""
    return t if t.dtype == torch.float32 else t.float()


class StepTensors:
    """Weights and gradients of the stepped tensors as fp32 local tensors, cut into pieces on demand.

    Low-precision (bf16/fp16) parameters are updated through an fp32 copy that :meth:`write_back` casts
    back; fp32 parameters are updated in place.  Gradients are never modified: a rule that transforms them
    (e.g. Gradient Centralization) replaces entries of :attr:`grads` with new tensors.
    """

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor], layout: StepLayout) -> None:
        self.layout = layout
        self._params = layout.local(params)
        self.weights = [_fp32(p) for p in self._params]
        self.grads = [_fp32(g) for g in layout.local(grads)]

    def pieces(self, local_tensors: Sequence[Tensor]) -> list[Tensor]:
        """Pieces of local fp32 tensors parallel to the stepped ones (e.g. :attr:`weights`)."""
        return self.layout.pieces(local_tensors)

    def state_local(self, state: Sequence[Tensor]) -> list[Tensor]:
        """Optimizer state tensors (possibly DTensors) parallel to the stepped ones, as local tensors."""
        return self.layout.local(state)

    def state_pieces(self, state: Sequence[Tensor]) -> list[Tensor]:
        """Pieces of optimizer state tensors (fp32, possibly DTensors) parallel to the stepped ones."""
        return self.layout.pieces(self.layout.local(state))

    def write_back(self) -> None:
        """Cast updated fp32 copies back into low-precision parameters."""
        for p, w in zip(self._params, self.weights):
            if p is not w:
                p.copy_(w)

