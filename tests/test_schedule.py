"""Tests for hf_lars.schedule: warmup + poly decay against its formula, resumption, ZeRO-like optimizers,
agreement with transformers, argument validation, and the batch-size scaling rules."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch

from hf_lars.schedule import get_warmup_poly_schedule, warmup_poly_factor

W, T = 5, 23  # warmup and total steps used throughout; T - W is not a round number on purpose


def _reference_lr(t: int, W: int, T: int, lr0: float, power: float, lr_end: float, warmup: str, ws: float) -> float:
    """The formula of docs/design.md ("Schedules and scaling laws"), written independently of the implementation."""
    if t < W:
        return lr0 * (ws + (1 - ws) * t / W) if warmup == "linear" else lr0 * ws
    if t >= T:
        return lr_end
    return lr_end + (lr0 - lr_end) * (1 - (t - W) / (T - W)) ** power


def _optimizer(lrs: list[float]) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=123.0)  # the default lr must never be used


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def _run(scheduler: Any, optimizer: Any, steps: int) -> list[list[float]]:
    """LRs seen at steps 0..steps-1 (the lr in effect when optimizer.step() is called)."""
    seen = []
    for _ in range(steps):
        seen.append([float(g["lr"]) for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


# ------------------------------------------------------------------------------------------------ formula
@pytest.mark.parametrize(
    "warmup, ws, power, lr_end",
    [
        ("linear", 0.0, 2.0, 0.0),
        ("linear", 0.1, 2.0, 1e-3),
        ("linear", 0.25, 1.0, 0.0),
        ("constant", 0.1, 2.0, 0.0),
        ("constant", 0.5, 0.5, 2e-3),
    ],
)
def test_scheduler_matches_formula_multi_group(warmup: str, ws: float, power: float, lr_end: float) -> None:
    lrs = [0.1, 0.02, 0.5]
    opt = _optimizer(lrs)
    sched = get_warmup_poly_schedule(opt, W, T, power=power, lr_end=lr_end, warmup=warmup, warmup_start=ws)
    seen = _run(sched, opt, T + 4)
    for t, row in enumerate(seen):
        for lr0, lr in zip(lrs, row):
            assert lr == pytest.approx(_reference_lr(t, W, T, lr0, power, lr_end, warmup, ws), rel=1e-12, abs=1e-15)
    # landmarks: start of warmup, peak at W, lr_end at and after T
    for g, lr0 in enumerate(lrs):
        assert seen[0][g] == pytest.approx(lr0 * ws, abs=1e-15)
        assert seen[W][g] == pytest.approx(lr0)
        assert seen[T][g] == pytest.approx(lr_end, abs=1e-15)
        assert seen[-1][g] == pytest.approx(lr_end, abs=1e-15)
    # strictly decreasing over the decay phase, per group
    for g in range(len(lrs)):
        decay = [row[g] for row in seen[W : T + 1]]
        assert all(a > b for a, b in zip(decay, decay[1:]))


def test_constant_warmup_is_flat_then_jumps() -> None:
    opt = _optimizer([1.0])
    sched = get_warmup_poly_schedule(opt, W, T, warmup="constant", warmup_start=0.2)
    seen = [row[0] for row in _run(sched, opt, W + 1)]
    assert seen[:W] == [pytest.approx(0.2)] * W
    assert seen[W] == pytest.approx(1.0)


def test_pure_factor_matches_formula_and_scheduler() -> None:
    lr0 = 0.3
    for warmup, ws in (("linear", 0.0), ("linear", 0.3), ("constant", 0.1)):
        for t in range(T + 3):
            factor = warmup_poly_factor(t, W, T, lr0, 2.0, 1e-3, warmup, ws)
            assert lr0 * factor == pytest.approx(_reference_lr(t, W, T, lr0, 2.0, 1e-3, warmup, ws), rel=1e-12)
    # no warmup: peak at step 0; LARS-paper poly(2) from lr0 to 0
    assert warmup_poly_factor(0, 0, 10, 1.0) == 1.0
    assert warmup_poly_factor(5, 0, 10, 1.0) == pytest.approx(0.25)
    assert warmup_poly_factor(10, 0, 10, 1.0) == 0.0
    # a group with lr 0 stays at 0
    assert warmup_poly_factor(3, 2, 10, 0.0) == 0.0


def test_tensor_lr_group() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=torch.tensor(0.1))
    sched = get_warmup_poly_schedule(opt, W, T)
    seen = _run(sched, opt, T)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    expected = [_reference_lr(t, W, T, 0.1, 2.0, 0.0, "linear", 0.0) for t in range(T)]
    assert [r[0] for r in seen] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_from_state_dict_mid_run() -> None:
    kwargs = dict(power=2.0, lr_end=1e-4, warmup="linear", warmup_start=0.1)
    opt = _optimizer([0.1, 0.05])
    sched = get_warmup_poly_schedule(opt, W, T, **kwargs)
    uninterrupted = _run(sched, opt, T + 2)

    opt = _optimizer([0.1, 0.05])
    sched = get_warmup_poly_schedule(opt, W, T, **kwargs)
    first = _run(sched, opt, 9)
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())

    # Trainer's order: build optimizer and scheduler, then load the optimizer state, then the scheduler's
    opt2 = _optimizer([0.1, 0.05])
    sched2 = get_warmup_poly_schedule(opt2, W, T, **kwargs)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.last_epoch == 9
    rest = _run(sched2, opt2, T + 2 - 9)
    assert _flat(first + rest) == pytest.approx(_flat(uninterrupted))
    assert rest[0][0] != pytest.approx(uninterrupted[0][0])  # really resumed mid-run, not restarted


def test_resume_with_last_epoch() -> None:
    opt = _optimizer([0.1])
    sched = get_warmup_poly_schedule(opt, W, T)
    _run(sched, opt, 11)
    expected = opt.param_groups[0]["lr"]  # lr for step 11
    opt2 = _optimizer([0.1])
    opt2.load_state_dict(opt.state_dict())  # carries initial_lr, as a checkpoint does
    opt2.param_groups[0]["lr"] = 999.0  # must be ignored: lr0 comes from initial_lr
    get_warmup_poly_schedule(opt2, W, T, last_epoch=10)
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected)
    assert expected == pytest.approx(_reference_lr(11, W, T, 0.1, 2.0, 0.0, "linear", 0.0))


# ------------------------------------------------------------------------------------------------ transformers
@pytest.mark.parametrize("power, lr_end", [(1.0, 1e-7), (2.0, 0.0), (3.0, 1e-3)])
def test_agrees_with_transformers_polynomial(power: float, lr_end: float) -> None:
    from transformers import get_polynomial_decay_schedule_with_warmup

    opt_a, opt_b = _optimizer([0.05]), _optimizer([0.05])
    opt_a.defaults["lr"] = opt_b.defaults["lr"] = 0.05  # transformers reads defaults; ours must not need to
    ours = get_warmup_poly_schedule(opt_a, W, T, power=power, lr_end=lr_end)
    theirs = get_polynomial_decay_schedule_with_warmup(opt_b, W, T, lr_end=lr_end, power=power)
    a, b = _run(ours, opt_a, T + 3), _run(theirs, opt_b, T + 3)
    assert _flat(a) == pytest.approx(_flat(b), rel=1e-12, abs=1e-18)


# ------------------------------------------------------------------------------------------------ ZeRO-like optimizers
class _NoDefaultsOptimizer(torch.optim.Optimizer):
    """Mimics Accelerate's AcceleratedOptimizer around a DeepSpeed ZeRO optimizer: an Optimizer instance whose
    param_groups are the inner ones and whose .defaults raises AttributeError (ZeRO optimizers have none)."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:  # no super().__init__, like Accelerate's
        self.inner = inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        raise AttributeError("'DeepSpeedZeroOptimizer' object has no attribute 'defaults'")

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.inner.step()


def test_optimizer_without_defaults() -> None:
    from transformers import get_polynomial_decay_schedule_with_warmup

    opt = _NoDefaultsOptimizer(_optimizer([0.1, 0.2]))
    assert isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "defaults")
    with pytest.raises(AttributeError, match="defaults"):  # the failure this schedule exists to avoid
        get_polynomial_decay_schedule_with_warmup(opt, W, T)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = get_warmup_poly_schedule(opt, W, T, lr_end=1e-3)
        seen = _run(sched, opt, T + 1)
    assert sched.optimizer is opt  # a real Optimizer is used as is, not wrapped
    for t, row in enumerate(seen):
        for lr0, lr in zip([0.1, 0.2], row):
            assert lr == pytest.approx(_reference_lr(t, W, T, lr0, 2.0, 1e-3, "linear", 0.0))
    assert [g["initial_lr"] for g in opt.inner.param_groups] == [0.1, 0.2]


class _ZeroLikeOptimizer:
    """Mimics DeepSpeedZeroOptimizer: not a torch Optimizer, no .defaults, shares param_groups of an inner one."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.optimizer = inner
        self.steps = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def step(self) -> None:
        self.steps += 1
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)


def test_non_optimizer_wrapper_with_only_param_groups() -> None:
    inner = _optimizer([0.1, 0.3])
    wrapper = _ZeroLikeOptimizer(inner)
    assert not hasattr(wrapper, "defaults")
    with pytest.raises(TypeError):  # what plain LambdaLR does with such an object
        torch.optim.lr_scheduler.LambdaLR(wrapper, lambda t: 1.0)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning either
        sched = get_warmup_poly_schedule(wrapper, W, T, warmup="constant", warmup_start=0.1)
        seen = _run(sched, wrapper, T + 1)
    assert wrapper.steps == T + 1
    for t, row in enumerate(seen):  # the lrs landed in the wrapped optimizer's own groups
        for lr0, lr in zip([0.1, 0.3], row):
            assert lr == pytest.approx(_reference_lr(t, W, T, lr0, 2.0, 0.0, "constant", 0.1))
    assert sched.get_last_lr() == [float(g["lr"]) for g in inner.param_groups]
    state = sched.state_dict()
    assert state["last_epoch"] == T + 1 and "optimizer" not in state


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_training_steps=0), r"num_training_steps.*> 0"),
        (dict(num_training_steps=-3, num_warmup_steps=0), r"num_training_steps.*> 0"),
        (dict(num_warmup_steps=-1), r"num_warmup_steps.*>= 0"),
        (dict(num_warmup_steps=10, num_training_steps=10), r"warmup >= total steps"),
        (dict(num_warmup_steps=11, num_training_steps=10), r"warmup >= total steps"),
        (dict(num_warmup_steps=1.5), r"num_warmup_steps.*integer"),
        (dict(power=0.0), r"power.*> 0"),
        (dict(power=-2.0), r"power.*> 0"),
        (dict(power=float("nan")), r"power"),
        (dict(lr_end=-1e-4), r"lr_end.*>= 0"),
        (dict(lr_end=0.05), r"lr_end.*0\.05.*lr=0\.01.*param group 1"),
        (dict(warmup="cosine"), r"warmup.*'linear', 'constant'"),
        (dict(warmup_start=-0.1), r"warmup_start.*\[0, 1\]"),
        (dict(warmup_start=1.5), r"warmup_start.*\[0, 1\]"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = dict(num_warmup_steps=2, num_training_steps=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        get_warmup_poly_schedule(_optimizer([0.1, 0.01]), **args)
    if "lr_end" not in kwargs or kwargs["lr_end"] < 0:  # the pure function validates the same way
        with pytest.raises(ValueError, match=match):
            warmup_poly_factor(0, args.pop("num_warmup_steps"), args.pop("num_training_steps"), 0.1, **args)


def test_bad_step_and_lr0_in_pure_function() -> None:
    with pytest.raises(ValueError, match=r"step.*>= 0"):
        warmup_poly_factor(-1, 2, 10, 0.1)
    with pytest.raises(ValueError, match=r"lr_end.*lr0"):
        warmup_poly_factor(0, 2, 10, 0.1, lr_end=0.2)


def test_bad_optimizer_raises() -> None:
    with pytest.raises(ValueError, match="param_groups"):
        get_warmup_poly_schedule(object(), 2, 10)
