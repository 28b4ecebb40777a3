"""Transient memory of one eager step with bf16 parameters, counted on the CPU (issue 12, "Step memory").

:class:`LiveBytes` is a dispatch mode that counts the bytes of every storage an op allocates while the mode
is active, from the op that makes it until the last tensor seeing it dies (a weak reference per tensor), and
keeps the peak: what ``torch.cuda.max_memory_allocated`` would report on a GPU, independent of the C
allocator's caching (which makes a process's resident set a noisy measure).  The bound is the issue's:
torch's AdamW(foreach=True) on the same bf16 parameters, plus the largest layer (as fp32, the size of its
working copy), plus a 5% margin.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hf_lars import LARS, AdamLARS, RangerLARS
from hf_lars.optim.working_copies import CHUNK_ELEMENTS, chunk_plans
from hf_lars.optim.trust import StepPlan


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: opt.step()``; then ``m.peak`` (bytes) and ``m.live`` (still alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[Any]] = {}  # data_ptr -> [bytes, live tensors seeing it]

    def _forget(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            entry = self._storages.get(ptr)
            if entry is None:
                if ptr in inputs or t.untyped_storage().nbytes() == 0:
                    continue  # a view or in-place result of a tensor made before the step
                entry = self._storages[ptr] = [t.untyped_storage().nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._forget, ptr)
        return out


def _params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    return params


# A GPT-2-like set (the benchmark's shapes, scaled down): an embedding (4.3M elements) bigger than a chunk,
# then blocks of matrices and vectors; 6.6M parameters, so the rest spans several chunks.
D = 256
SHAPES = [(16896, D), (256, D)] + 6 * [(D, 3 * D), (3 * D,), (D, D), (D,), (D, 4 * D), (4 * D, D), (D,), (D,)]

MAKERS = {
    "LARS": lambda ps, fe: LARS(ps, lr=0.1, weight_decay=1e-4, foreach=fe),
    "AdamLARS": lambda ps, fe: AdamLARS(ps, foreach=fe),
    "RangerLARS": lambda ps, fe: RangerLARS(ps, foreach=fe),
}


def test_the_set_spans_several_chunks():
    from hf_lars.layout import StepLayout, TensorLayout

    numels = [torch.Size(s).numel() for s in SHAPES]
    layout = StepLayout([TensorLayout.of_layer(i, torch.empty(n)) for i, n in enumerate(numels)], len(numels))
    chunks = chunk_plans(StepPlan.of(layout, [True] * len(numels), [True] * len(numels)), numels)
    assert len(chunks) >= 3 and chunks[0][0] == slice(0, 1)  # the embedding alone, the rest in chunks
    assert all(sum(numels[c]) <= max(CHUNK_ELEMENTS, 2 * numels[0] // 5) for c, _ in chunks[1:])


def _peak(make) -> int:
    params = _params(SHAPES, torch.bfloat16)
    opt = make(params)
    opt.step()  # the state exists before the measured step
    with LiveBytes() as counter:
        opt.step()
    return counter.peak


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_bf16_step_peak_within_adamw_plus_the_largest_layer(name, foreach):
    adamw = _peak(lambda ps: torch.optim.AdamW(ps, foreach=True))
    largest_fp32 = 4 * max(torch.Size(s).numel() for s in SHAPES)
    ours = _peak(lambda ps: MAKERS[name](ps, foreach))
    assert ours <= 1.05 * (adamw + largest_fp32), (name, foreach, ours / 1e6, adamw / 1e6, largest_fp32 / 1e6)


def test_the_counter_sees_temporaries_and_their_end():
    x = torch.ones(1000)
    with LiveBytes() as counter:
        y = x * 2  # 4000 bytes
        z = y + 1  # 4000 more, both alive
        del y
        w = z.view(10, 100)  # a view: no new bytes
        del z, w
    assert counter.peak == 8000 and counter.live == 0
