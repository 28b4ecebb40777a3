"""Kernel launches per steady-state foreach step, counted on the CPU with ATen's CUDA fast-path rule.

On CUDA a step of hundreds of small tensors is bound by launches, not bytes.  ``launch_counter`` counts
one launch per computing aten op and, for a foreach op, one per tensor when CUDA's multi-tensor fast path
would refuse it (e.g. a list of 0-d per-layer ratios paired with a list of matrices).  Baseline: torch's
AdamW(foreach=True) on the same Llama-like parameter set.
"""

from __future__ import annotations

import copy

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


# fp32 working copies of the weights and gradients and the write-back: three ``_foreach_copy_`` per chunk for
# bf16/fp16 parameters.  They are real passes over memory that torch's AdamW on bf16 parameters does not make,
# because it keeps bf16 state and does its math in bf16; ours keeps fp32 state and does fp32 math
# (docs/design.md, "Mixed precision"), so the bf16 weights and gradients must be read into fp32 and written
# back once per step whatever the launch count.  (The bf16 Adam forms also compute their direction in the
# gradient copies' memory, one copy and one in-place op more than a new temporary: within the same bound.)
CASTS = {torch.float32: 0, torch.bfloat16: 3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_launches_per_step_do_not_grow_with_the_number_of_tensors(dtype):
    """48 Llama-like blocks (435 tensors) against 24 (219): the same launch count, GC aside; LARS and
    AdamLARS within 3x of torch's foreach AdamW (issue 10), RangerLARS within that plus its Gradient
    Centralization (2 launches per matrix: it has no foreach form); bf16 adds its casts (see ``CASTS``)."""
    counts = {name: _launches(name, 48, dtype) for name in MAKERS}
    halves = {name: _launches(name, 24, dtype) for name in MAKERS}
    adamw = counts["AdamW"][0]
    for name in ("LARS", "AdamLARS", "RangerLARS"):
        full, gc_full = counts[name]
        half, gc_half = halves[name]
        assert full - gc_full == half - gc_half, (name, counts[name], halves[name])
    assert counts["LARS"][0] <= 3 * adamw + CASTS[dtype], counts
    assert counts["AdamLARS"][0] <= 3 * adamw + CASTS[dtype], counts
    ranger, gc_ops = counts["RangerLARS"]
    assert ranger - gc_ops <= 3 * adamw + CASTS[dtype], counts
    assert gc_ops == 2 * sum(1 for p in _llama_like(48, dtype) if p.dim() > 1), counts


def _three_steps(opt: torch.optim.Optimizer) -> None:
    for _ in range(3):
        opt.step()


@pytest.mark.parametrize("name", ["AdamLARS", "RangerLARS"])
def test_step_counts_are_known_on_the_host_after_a_checkpoint_load(name):
    """A state dict in the format every release so far saves (``state["step"]`` a 0-d fp32 tensor), loaded
    into a fresh optimizer: the next step counts as few launches as an uninterrupted run's (the counts are
    read once at load, not on the device every step) and gives the same bits."""
    torch.manual_seed(0)
    params = _llama_like(2, torch.float32)
    opt = MAKERS[name](params)
    _three_steps(opt)
    saved, saved_weights = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    assert all(s["step"].shape == () and s["step"].dtype == torch.float32 for s in saved["state"].values())
    with LaunchCounter() as uninterrupted:
        opt.step()

    fresh_params = [torch.nn.Parameter(w) for w in saved_weights]
    for p, q in zip(fresh_params, params):
        p.grad = q.grad.clone()
    fresh = MAKERS[name](fresh_params)
    fresh.load_state_dict(saved)
    with LaunchCounter() as resumed:
        fresh.step()
    assert resumed.launches == uninterrupted.launches, (resumed.by_op, uninterrupted.by_op)
    for a, b in zip(fresh_params, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["AdamLARS", "RangerLARS"])
def test_a_step_count_written_by_someone_else_is_read_on_the_device(name):
    """``state["step"]`` changed behind the optimizer's back (its version counter moves): the next step
    uses the new count, exactly as an optimizer that was at that step all along."""
    torch.manual_seed(0)
    a, b = _llama_like(2, torch.float64), _llama_like(2, torch.float64)
    for p, q in zip(a, b):
        p.data.copy_(q)
        p.grad = q.grad.clone()
    opt_a, opt_b = MAKERS[name](a), MAKERS[name](b)
    opt_a.step(), opt_b.step()
    for state in opt_b.state.values():
        state["step"].fill_(7.0)  # e.g. a tool that rewrites the count
    with LaunchCounter() as device_read:
        opt_b.step()
    for state in opt_a.state.values():
        state["step"] = torch.tensor(7.0)  # a new tensor: unknown too
    opt_a.step()
    assert all(float(s["step"]) == 8 for s in opt_b.state.values())
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert device_read.by_op["stack"] >= 2  # the counts were stacked and read on the device


def test_the_counter_sees_the_slow_path():
    """A list of 0-d scalars paired with matrices is one launch per tensor; one 0-d tensor is one launch."""
    xs = [torch.ones(3, 2) for _ in range(5)]
    with LaunchCounter() as slow:
        torch._foreach_mul_(xs, [torch.tensor(2.0) for _ in xs])
    with LaunchCounter() as fast:
        torch._foreach_mul_(xs, torch.tensor(2.0))
    assert (slow.launches, fast.launches) == (5, 1)
