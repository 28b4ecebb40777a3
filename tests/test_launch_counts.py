"""Kernel launches per steady-state foreach step, counted on the CPU with ATen's CUDA fast-path rule.

On CUDA a step of hundreds of small tensors is bound by launches, not bytes.  ``launch_counter`` counts
one launch per computing aten op and, for a foreach op, one per tensor when CUDA's multi-tensor fast path
would refuse it (e.g. a list of 0-d per-layer ratios paired with a list of matrices).  Baseline: torch's
AdamW(foreach=True) on the same Llama-like parameter set.
"""

from __future__ import annotations

import pytest
import torch

from hf_lars import LARS, AdamLARS, RangerLARS
from launch_counter import LaunchCounter


def _llama_like(n_blocks: int, dtype: torch.dtype, d: int = 8) -> list[torch.nn.Parameter]:
    """Embedding, n_blocks x (q, k, v, o, gate, up, down, two norms), final norm, head: 9 * n + 3 tensors."""
    shapes: list[tuple[int, ...]] = [(64, d)]
    for _ in range(n_blocks):
        shapes += [(d, d)] * 4 + [(2 * d, d), (2 * d, d), (d, 2 * d), (d,), (d,)]
    shapes += [(d,), (64, d)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


MAKERS = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, foreach=True),
    "LARS": lambda ps: LARS(ps, lr=0.1, weight_decay=1e-4, foreach=True),
    "AdamLARS": lambda ps: AdamLARS(ps, foreach=True),
    "RangerLARS": lambda ps: RangerLARS(ps, foreach=True),
}


def _launches(name: str, n_blocks: int, dtype: torch.dtype) -> tuple[int, int]:
    params = _llama_like(n_blocks, dtype)
    opt = MAKERS[name](params)
    opt.step(), opt.step()  # steady state: state exists, caches are warm
    with LaunchCounter() as counter:
        opt.step()
    gc_ops = 2 * counter.by_op["mean"]  # Gradient Centralization (a mean and a sub per tensor): no foreach form
    return counter.launches, gc_ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_launches_per_step_do_not_grow_with_the_number_of_tensors(dtype):
    """48 Llama-like blocks (435 tensors) against 24 (219): the same launch count, GC aside; LARS within 3x
    of torch's foreach AdamW, AdamLARS within 4.5x (its bias corrections are device tensors where AdamW's
    are host floats; the ratio itself costs ~8 tiny kernels), RangerLARS (GC aside) within 9x (RAdam's
    rectification and the Lookahead sync add ~40 tiny scalar kernels)."""
    counts = {name: _launches(name, 48, dtype) for name in MAKERS}
    halves = {name: _launches(name, 24, dtype) for name in MAKERS}
    adamw = counts["AdamW"][0]
    casts = 3 if dtype != torch.float32 else 0  # fp32 working copies of w and g, and the write-back
    for name in ("LARS", "AdamLARS", "RangerLARS"):
        full, gc_full = counts[name]
        half, gc_half = halves[name]
        assert full - gc_full == half - gc_half, (name, counts[name], halves[name])
    assert counts["LARS"][0] <= 3 * adamw, counts
    assert counts["AdamLARS"][0] <= 4.5 * adamw + casts, counts
    ranger, gc_ops = counts["RangerLARS"]
    assert ranger - gc_ops <= 9 * adamw + casts, counts
    assert gc_ops == 2 * sum(1 for p in _llama_like(48, dtype) if p.dim() > 1), counts


def test_the_counter_sees_the_slow_path():
    """A list of 0-d scalars paired with matrices is one launch per tensor; one 0-d tensor is one launch."""
    xs = [torch.ones(3, 2) for _ in range(5)]
    with LaunchCounter() as slow:
        torch._foreach_mul_(xs, [torch.tensor(2.0) for _ in xs])
    with LaunchCounter() as fast:
        torch._foreach_mul_(xs, torch.tensor(2.0))
    assert (slow.launches, fast.launches) == (5, 1)
