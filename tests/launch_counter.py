"""Count the kernel launches one optimizer step would make on CUDA, on the CPU (a dispatch-mode op counter).

Every aten op that computes something counts one launch; views and allocations count none.  A foreach op
counts one launch when ATen's CUDA fast path (multi-tensor apply) takes it and one per tensor otherwise:
the fast path needs, per index, tensors of equal shape, strides and dtype across the tensor lists, all dense
(a list of 0-d tensors paired with a list of matrices is the slow path; one 0-d tensor or Python scalars
are fine).  That is the rule in ATen's ``ForeachUtils.h`` (``can_use_fast_route``), simplified.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCounter"]

# No kernel: allocation and metadata.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
         "_local_scalar_dense", "set_", "resize_", "_record_function_enter_new", "_record_function_exit"}


def _is_view(func: Any) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns) or func.is_view


def _lists(args: tuple, kwargs: dict) -> list[list[torch.Tensor]]:
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            out.append(list(a))
    return out


def _fast_route(lists: list[list[torch.Tensor]], cast_ok: bool = False) -> bool:
    """``cast_ok``: ``_foreach_copy_`` takes the fast path across dtypes (a cast is its purpose)."""
    first = lists[0]
    for lst in lists:
        if len(lst) != len(first):
            return False
        for a, b in zip(lst, first):
            if a.shape != b.shape or a.stride() != b.stride() or (a.dtype != b.dtype and not cast_ok) or not a.is_contiguous():
                return False
    return True


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as c: opt.step()``; then ``c.launches`` and ``c.by_op`` (a Counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def launches(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name not in _FREE and not _is_view(func):
            n = 1
            if name.startswith("_foreach_"):
                lists = _lists(args, kwargs)
                n = 1 if not lists or _fast_route(lists, cast_ok=name == "_foreach_copy_") else len(lists[0])
            self.by_op[name] += n
        return func(*args, **kwargs)
