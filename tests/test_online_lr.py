"""``--lr_scaling_online``: the LR follows the measured gradient noise scale (hf_lars/scaling/online.py).

The factor is checked against the surge and SGD laws written out here (not through ``scaled_lr``), along an
injected ``B_noise`` trajectory: in isolation, composed with schedulers, and through Trainer, where the LR
each optimizer step used is read back from the parameter updates of plain SGD.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from dist.ns_common import GaussianData, GaussianGradModel, training_args
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_lars.integrations.lr_scaling import check_lr_scaling_flags
from hf_lars.integrations.noise_scale import GradientNoiseScaleCallback
from hf_lars.integrations.online_lr import LR_FACTOR_KEY, OnlineLrScalingCallback
from hf_lars.integrations.transformers import LarsTrainer, LarsTrainingArguments
from hf_lars.scaling.online import OnlineLrFactor, default_start_step
from hf_lars.schedule import OnlineLrScheduler


def _surge(batch: float, b_noise: float) -> float:
    """Li et al. 2024: eps_opt / eps_max = 2 / (sqrt(B_noise / B) + sqrt(B / B_noise))."""
    return 2.0 / (math.sqrt(b_noise / batch) + math.sqrt(batch / b_noise))


def _sgd(batch: float, b_noise: float) -> float:
    return 1.0 / (1.0 + b_noise / batch)


TRAJECTORY = [300.0, float("nan"), 800.0, -5.0, 2000.0, 20000.0, None, 1e6]


def _expected_factors(law, ref: float, batch: float, launch: float | None, lo: float, hi: float, smooth: float):
    launch_law = 1.0 if launch is None else law(batch, launch) / law(ref, launch)
    factor, out = 1.0, []
    for b in TRAJECTORY:
        if b is not None and math.isfinite(b) and b > 0:
            target = min(max(law(batch, b) / law(ref, b) / launch_law, lo), hi)
            factor = min(max(math.exp(smooth * math.log(factor) + (1 - smooth) * math.log(target)), lo), hi)
        out.append(factor)
    return out


@pytest.mark.parametrize(
    "rule, law, launch, bounds, smoothing",
    [
        ("surge", _surge, 1000.0, (0.25, 4.0), 0.0),
        ("adam", _surge, None, (0.5, 1.5), 0.5),
        ("sgd", _sgd, 400.0, (0.1, 10.0), 0.3),
    ],
)
def test_factor_follows_an_injected_trajectory(rule, law, launch, bounds, smoothing) -> None:
    factor = OnlineLrFactor(rule, ref_batch=256, batch=2048, b_noise=launch, min_factor=bounds[0],
                            max_factor=bounds[1], smoothing=smoothing)
    got = [factor.update(b) for b in TRAJECTORY]
    expected = _expected_factors(law, 256, 2048, launch, *bounds, smoothing)
    assert got == pytest.approx(expected, rel=1e-12)
    assert (factor.updates, factor.skipped) == (5, 3)  # NaN, a negative estimate and None change nothing
    assert factor.b_noise == 1e6
    assert min(got) >= bounds[0] and max(got) <= bounds[1]
    assert len({round(f, 9) for f in got}) > 2  # it moved


def test_factor_state_round_trip_and_mismatch() -> None:
    factor = OnlineLrFactor("surge", ref_batch=256, batch=1024, b_noise=500)
    factor.update(3000.0)
    again = OnlineLrFactor("surge", ref_batch=256, batch=1024, b_noise=500)
    again.load_state_dict(factor.state_dict())
    assert again.state_dict() == factor.state_dict()
    other = OnlineLrFactor("surge", ref_batch=256, batch=2048, b_noise=500)
    with pytest.raises(ValueError, match=r"other settings \(batch: now 2048.0, saved 1024.0\).*same --lr_scaling"):
        other.load_state_dict(factor.state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rule="linear"), "only the rules surge, adam, sgd depend on; got 'linear'"),
        (dict(rule="surge", min_factor=2.0), r"min_factor <= 1 <= max_factor"),
        (dict(rule="surge", max_factor=0.5), r"min_factor <= 1 <= max_factor"),
        (dict(rule="surge", min_factor=0.0), "Invalid min_factor: 0.0"),
        (dict(rule="surge", smoothing=1.0), r"Invalid smoothing: 1.0 \(must be in \[0, 1\)\)"),
        (dict(rule="sgd", b_noise=-1.0), "Invalid b_noise: -1.0"),
    ],
)
def test_factor_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OnlineLrFactor(kwargs.pop("rule"), ref_batch=256, batch=512, **kwargs)


def test_factor_waits_for_its_start_step() -> None:
    """Estimates logged before start_step optimizer steps leave the factor at 1 and are counted; the first one
    at start_step acts, exactly as a factor without a start acts on it; without ``step`` it refuses."""
    waiting = OnlineLrFactor("surge", ref_batch=256, batch=2048, b_noise=1000.0, start_step=3)
    eager = OnlineLrFactor("surge", ref_batch=256, batch=2048, b_noise=1000.0)
    got = [waiting.update(b, step=t) for t, b in enumerate([9000.0, 8000.0, 7000.0, 300.0, 800.0], start=1)]
    assert got[:2] == [1.0, 1.0] and (waiting.waited, waiting.updates) == (2, 3)
    assert got[2:] == [eager.update(7000.0), eager.update(300.0), eager.update(800.0)]
    assert got[2] != 1.0
    with pytest.raises(ValueError, match=r"waits until step 3 .*pass update\(b_noise, step="):
        waiting.update(500.0)
    resumed = OnlineLrFactor("surge", ref_batch=256, batch=2048, b_noise=1000.0, start_step=3)
    resumed.load_state_dict(waiting.state_dict())
    assert resumed.state_dict() == waiting.state_dict()
    with pytest.raises(ValueError, match=r"start_step: now 0, saved 3"):
        OnlineLrFactor("surge", ref_batch=256, batch=2048, b_noise=1000.0).load_state_dict(waiting.state_dict())
    with pytest.raises(ValueError, match="Invalid start_step: -1"):
        OnlineLrFactor("surge", ref_batch=256, batch=2048, start_step=-1)


@pytest.mark.parametrize(
    "warmup, beta, per, expected",
    [(0, 0.99, 1, 100), (250, 0.99, 1, 250), (30, 0.9, 1, 30), (0, 0.95, 1, 20), (0, 0.99, 10, 1000), (0, 0.0, 1, 1)],
)
def test_default_start_step(warmup: int, beta: float, per: int, expected: int) -> None:
    """The later of the LR warmup's end and the EMA's window, steps_per_estimate / (1 - beta)."""
    assert default_start_step(warmup, beta, per) == expected


def _sgd_opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


@pytest.mark.parametrize("kind", ["lambda", "chained"])
def test_scheduler_composes_with_any_step_schedule(kind: str) -> None:
    """LR = the schedule's own LR x the factor, for a closed-form (LambdaLR) and a chainable (ExponentialLR)
    schedule: the factor never compounds into the schedule."""
    opt = _sgd_opt()
    if kind == "lambda":
        inner = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        schedule = [0.1 / (1 + t) for t in range(len(TRAJECTORY) + 1)]
    else:
        inner = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        schedule = [0.1 * 0.9**t for t in range(len(TRAJECTORY) + 1)]
    sched = OnlineLrScheduler(inner, OnlineLrFactor("surge", ref_batch=256, batch=2048, b_noise=1000.0))
    factors = _expected_factors(_surge, 256, 2048, 1000.0, 0.25, 4.0, 0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(schedule[0])
    for t, b in enumerate(TRAJECTORY):
        sched.update(b)
        assert opt.param_groups[0]["lr"] == pytest.approx(schedule[t] * factors[t], rel=1e-12)  # applied at once
        opt.step()
        sched.step()
        assert sched.get_last_lr() == pytest.approx([schedule[t + 1] * factors[t]], rel=1e-12)
        assert opt.param_groups[0]["lr"] == pytest.approx(schedule[t + 1] * factors[t], rel=1e-12)
        assert inner.get_last_lr() == pytest.approx([schedule[t + 1]], rel=1e-12)


def test_scheduler_state_dict_round_trip_and_refusals() -> None:
    opt = _sgd_opt()
    sched = OnlineLrScheduler(torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t), OnlineLrFactor(
        "sgd", ref_batch=64, batch=512))
    sched.update(900.0)
    for _ in range(3):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    opt2 = _sgd_opt()
    resumed = OnlineLrScheduler(torch.optim.lr_scheduler.LambdaLR(opt2, lambda t: 0.5**t), OnlineLrFactor(
        "sgd", ref_batch=64, batch=512))
    resumed.load_state_dict(saved)
    assert resumed.get_last_lr() == sched.get_last_lr()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert resumed.last_epoch == 3
    with pytest.raises(ValueError, match="saved without --lr_scaling_online"):
        resumed.load_state_dict(saved["scheduler"])
    with pytest.raises(ValueError, match="ReduceLROnPlateau steps on metrics"):
        OnlineLrScheduler(torch.optim.lr_scheduler.ReduceLROnPlateau(opt), OnlineLrFactor(
            "sgd", ref_batch=64, batch=512))
    with pytest.raises(ValueError, match="already follows"):
        OnlineLrScheduler(sched, OnlineLrFactor("sgd", ref_batch=64, batch=512))


# ----------------------------------------------------------------------------------------------- Trainer
MICRO, ACCUM, REF_BATCH, LR = 8, 4, 8, 0.05  # global batch 32, reference batch 8


def _online_args(tmp_path: Path, steps: int, **overrides: Any) -> dict[str, Any]:
    kwargs = training_args(
        str(tmp_path), max_steps=steps, gradient_accumulation_steps=ACCUM, optim="sgd", learning_rate=LR,
        logging_steps=1, max_grad_norm=0.0, lr_scheduler_type="linear",
    )
    kwargs.update(lr_scaling="surge", lr_scaling_ref_batch=REF_BATCH, lr_scaling_online=True,
                  lr_scaling_max_factor=8.0, b_noise_start_step=0)  # act on the first estimate (tested apart)
    kwargs.update(overrides)
    return kwargs


def _inject(monkeypatch: pytest.MonkeyPatch, values: list[float | None]) -> None:
    """The noise callback logs ``values`` in turn instead of its measurement (the monitor still runs)."""
    feed = iter(values)

    def stats(self, state, logs, **kwargs):
        self.monitor.compute()
        value = next(feed)
        return {} if value is None else {"b_noise": value}

    monkeypatch.setattr(GradientNoiseScaleCallback, "training_log_stats", stats)


@pytest.mark.parametrize("route", ["lars_trainer", "registered"])
def test_trainer_lr_follows_the_injected_b_noise(tmp_path, monkeypatch: pytest.MonkeyPatch, route: str,
                                                 request: pytest.FixtureRequest) -> None:
    """Each logged b_noise sets the factor of the next step: lr(t) = linear_schedule(t) x factor(t - 1)."""
    steps = 6
    injected = [None, 20.0, 80.0, float("nan"), 400.0, 40.0]
    _inject(monkeypatch, injected)
    if route == "lars_trainer":
        args = LarsTrainingArguments(**_online_args(tmp_path, steps))
        trainer = LarsTrainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(steps * 32, seed=3))
    else:  # plain TrainingArguments and Trainer after register(): the patched create_scheduler
        request.getfixturevalue("registered")
        args = TrainingArguments(**_online_args(tmp_path, steps))
        trainer = Trainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(steps * 32, seed=3))
    trainer.train()
    assert args.learning_rate == LR  # no launch b_noise: the launch LR is the reference LR
    logs = [row for row in trainer.state.log_history if "loss" in row]
    factor, expected_factors, expected_lrs = 1.0, [], []
    for t, b in enumerate(injected):
        expected_lrs.append(LR * (1 - t / steps) * factor)
        if b is not None and math.isfinite(b):
            factor = min(max(_surge(32, b) / _surge(REF_BATCH, b), 0.25), 8.0)
        expected_factors.append(factor)
    assert [row["learning_rate"] for row in logs] == pytest.approx(expected_lrs, rel=1e-9)
    assert [row[LR_FACTOR_KEY] for row in logs] == pytest.approx(expected_factors, rel=1e-12)
    assert len(set(expected_factors)) >= 4
    callbacks = trainer.callback_handler.callbacks
    noise = next(i for i, cb in enumerate(callbacks) if isinstance(cb, GradientNoiseScaleCallback))
    assert isinstance(callbacks[noise + 1], OnlineLrScalingCallback)
    assert isinstance(trainer.lr_scheduler, OnlineLrScheduler)


@pytest.mark.parametrize("warmup, beta, start", [(4, 0.5, 4), (2, 0.8, 5)], ids=["warmup-ends-later",
                                                                              "noise-window-ends-later"])
def test_trainer_waits_for_the_default_start(tmp_path, monkeypatch: pytest.MonkeyPatch, warmup: int, beta: float,
                                             start: int) -> None:
    """Without --b_noise_start_step the factor ignores the b_noise logged before the later of the LR warmup's
    end and the noise EMA's window 1/(1 - beta) (the callback given to Trainer), and acts from there on."""
    steps = 7
    injected = [20.0, 400.0, 30.0, 300.0, 40.0, 80.0, 500.0]
    _inject(monkeypatch, injected)
    args = LarsTrainingArguments(**_online_args(tmp_path, steps, b_noise_start_step=None, warmup_steps=warmup))
    trainer = LarsTrainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(steps * 32, seed=3),
                          callbacks=[GradientNoiseScaleCallback(beta=beta)])
    trainer.train()
    assert trainer.lr_scheduler.factor.start_step == start
    logs = [row for row in trainer.state.log_history if "loss" in row]
    factor, expected_factors, expected_lrs = 1.0, [], []
    for t, b in enumerate(injected):  # the log after step t + 1
        schedule = t / warmup if t < warmup else (steps - t) / (steps - warmup)
        expected_lrs.append(LR * schedule * factor)
        if t + 1 >= start:
            factor = min(max(_surge(32, b) / _surge(REF_BATCH, b), 0.25), 8.0)
        expected_factors.append(factor)
    assert [row[LR_FACTOR_KEY] for row in logs] == pytest.approx(expected_factors, rel=1e-12)
    assert expected_factors[start - 2] == 1.0 != expected_factors[start - 1]  # it waited, then acted
    assert [row["learning_rate"] for row in logs] == pytest.approx(expected_lrs, rel=1e-9)
    assert trainer.lr_scheduler.factor.waited == start - 1


def test_a_start_after_the_run_is_refused_before_training(tmp_path) -> None:
    """The default start (100 steps of the EMA's window at beta 0.99) on a 6-step run: refused at
    create_scheduler, naming the start, why, and the flag that fixes it; nothing trained."""
    args = LarsTrainingArguments(**_online_args(tmp_path, 6, b_noise_start_step=None))
    trainer = LarsTrainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(6 * 32, seed=3))
    with pytest.raises(ValueError, match=r"--lr_scaling_online would never act: .* until optimizer step 100 \(the "
                                         r"default: .*step 0, and the noise EMA's window, 1/\(1 - beta=0.99\) "
                                         r"steps\), and the run has 6 steps: pass --b_noise_start_step below 6"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_start_step_under_deepspeed_counts_logging_steps() -> None:
    """Under DeepSpeed the EMA folds one estimate per logging step: the window is logging_steps x 1/(1-beta)
    (a fractional logging_steps is a share of the run, as Trainer reads it)."""
    from types import SimpleNamespace

    from hf_lars.integrations.lr_scaling import b_noise_start_step

    args = SimpleNamespace(b_noise_start_step=None, lr_scaling_online=True, logging_steps=5,
                           get_warmup_steps=lambda n: 40)
    assert b_noise_start_step(args, 1000, 0.99) == 100
    assert b_noise_start_step(args, 1000, 0.99, deepspeed=True) == 500
    args.logging_steps = 0.01  # 10 steps of a 1000-step run
    with pytest.raises(ValueError, match=r"until optimizer step 1000 \(.*10 x 1/\(1 - beta=0.99\) steps\)"):
        b_noise_start_step(args, 1000, 0.99, deepspeed=True)
    args.b_noise_start_step = 7  # given: taken as is
    assert b_noise_start_step(args, 1000, 0.99, deepspeed=True) == 7


def test_trainer_factor_from_the_real_monitor(tmp_path) -> None:
    """Without injection: every logged lr_factor is the law's ratio at the b_noise logged beside it, and the
    parameters moved by exactly the LR that factor implies (SGD: delta w = -lr g)."""
    steps = 5
    args = LarsTrainingArguments(**_online_args(tmp_path, steps, lr_scheduler_type="constant", b_noise=16.0,
                                                lr_scaling_min_factor=0.01, lr_scaling_max_factor=100.0))
    launch = LR * _surge(32, 16.0) / _surge(REF_BATCH, 16.0)
    assert args.learning_rate == pytest.approx(launch, rel=1e-12)
    trainer = LarsTrainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(steps * 32, seed=4))
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    launch_law = _surge(32, 16.0) / _surge(REF_BATCH, 16.0)
    previous = 1.0
    for row in logs:
        assert row["learning_rate"] == pytest.approx(launch * previous, rel=1e-9)
        previous = _surge(32, row["b_noise"]) / _surge(REF_BATCH, row["b_noise"]) / launch_law
        assert row[LR_FACTOR_KEY] == pytest.approx(previous, rel=1e-9)
    assert len({round(row[LR_FACTOR_KEY], 6) for row in logs}) >= 3


def test_switched_off_changes_nothing(tmp_path) -> None:
    steps = 3
    common = dict(max_steps=steps, gradient_accumulation_steps=ACCUM, optim="sgd", learning_rate=LR,
                  logging_steps=1, max_grad_norm=0.0)
    off = LarsTrainingArguments(**training_args(str(tmp_path / "off"), **common), lr_scaling="surge",
                                lr_scaling_ref_batch=REF_BATCH, b_noise=50.0)
    trainer = LarsTrainer(model=GaussianGradModel(), args=off, train_dataset=GaussianData(steps * 32, seed=3))
    trainer.train()
    assert not isinstance(trainer.lr_scheduler, OnlineLrScheduler)
    assert not any(isinstance(cb, (GradientNoiseScaleCallback, OnlineLrScalingCallback))
                   for cb in trainer.callback_handler.callbacks)
    assert all(LR_FACTOR_KEY not in row for row in trainer.state.log_history)


def test_trainer_resume_restores_the_factor(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saved at step 3 and resumed: the same LRs and factors as the straight run (scheduler.pt carries it)."""
    injected = [20.0, 80.0, 400.0, 40.0, 100.0, 30.0]
    steps = 6

    def run(out: Path, resume: str | None, values: list[float]) -> list[dict[str, Any]]:
        _inject(monkeypatch, values)
        args = LarsTrainingArguments(**_online_args(out, steps, save_strategy="steps", save_steps=3))
        trainer = LarsTrainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(steps * 32, seed=5))
        trainer.train(resume_from_checkpoint=resume)
        return [row for row in trainer.state.log_history if "loss" in row]

    straight = run(tmp_path / "straight", None, injected)
    resumed = run(tmp_path / "resumed", str(tmp_path / "straight" / "checkpoint-3"), injected[3:])
    assert [r["step"] for r in resumed][-3:] == [4, 5, 6]
    for a, b in zip(straight[3:], resumed[-3:]):
        assert (a["learning_rate"], a[LR_FACTOR_KEY]) == (b["learning_rate"], b[LR_FACTOR_KEY])


# -------------------------------------------------------------------------------- launch-time errors
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(gradient_accumulation_steps=1), "needs the gradient noise scale.*gradient_accumulation_steps=1"),
        (dict(lr_scaling="linear"), "only the surge and sgd rules depend on; --lr_scaling linear"),
        (dict(lr_scaling_min_factor=1.5), "--lr_scaling_online: .*min_factor <= 1 <= max_factor"),
        (dict(lr_scaling_smoothing=-0.1), "--lr_scaling_online: Invalid smoothing"),
        (dict(b_noise_start_step=2), "--b_noise_start_step 2 is not before --max_steps 2: B_noise would never"),
        (dict(b_noise_start_step=-1), "--b_noise_start_step: Invalid start_step: -1"),
        (dict(lr_scaling_online=False, b_noise=50.0, b_noise_start_step=1), "neither is set: drop it"),
    ],
)
def test_bad_online_flags_fail_when_the_arguments_are_built(tmp_path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        LarsTrainingArguments(**_online_args(tmp_path, 2, **overrides))


def test_registered_parser_takes_the_flags_and_checks_them(tmp_path, registered) -> None:
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--lr_scaling", "surge",
            "--lr_scaling_ref_batch", "8", "--gradient_accumulation_steps", "2", "--lr_scaling_online",
            "--lr_scaling_max_factor", "3"]
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    assert (args.lr_scaling_online, args.lr_scaling_max_factor, args.lr_scaling_min_factor) == (True, 3.0, 0.25)
    with pytest.raises(ValueError, match="needs the gradient noise scale"):
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv[:-5] + ["--lr_scaling_online"])


def test_check_flags_for_the_launcher() -> None:
    check_lr_scaling_flags("surge", 256, None, lr_scaling_online=True)  # online: b_noise is optional
    with pytest.raises(ValueError, match="needs b_noise"):
        check_lr_scaling_flags("surge", 256, None)
    with pytest.raises(ValueError, match="Invalid lr_scaling_online: 'yes'"):
        check_lr_scaling_flags("surge", 256, None, lr_scaling_online="yes")


def test_hf_lars_run_takes_the_online_flags() -> None:
    from hf_lars.commands.run import _LR_SCALING_FLAGS, _take_lr_scaling_flags
    from hf_lars.integrations.transformers.launch import LR_SCALING_FIELDS

    assert {flag[2:] for flag in _LR_SCALING_FLAGS} == set(LR_SCALING_FIELDS)  # one list of flags
    rest, found = _take_lr_scaling_flags(
        ["--lr_scaling", "surge", "--lr_scaling_online", "--lr_scaling_ref_batch=64", "--x", "1",
         "--lr_scaling_smoothing", "0.5", "--lr_scaling_online", "false"]
    )
    assert rest == ["--x", "1"]
    assert found == {"lr_scaling": "surge", "lr_scaling_online": False, "lr_scaling_ref_batch": 64,
                     "lr_scaling_smoothing": 0.5}
    with pytest.raises(SystemExit, match="invalid value for --lr_scaling_online: 'maybe'"):
        _take_lr_scaling_flags(["--lr_scaling_online", "maybe"])


# ------------------------------------------------------------------------------------ DeepSpeed ZeRO
def _check_zero_run(run: dict[str, Any], injected: list[float | None] | None) -> None:
    """The engine's optimizer stepped with schedule x factor, each factor from the b_noise logged (or
    injected) at the step before, and the weights moved by exactly -sum_t lr_t G_t."""
    from dist.online_lr_zero import LR, REF_BATCH, STEPS

    batch = run["global_batch"]
    assert (batch, run["scheduler"]) == (32, "OnlineLrScheduler")
    b_noise = injected if injected is not None else run["b_noise"]
    factor, expected_lrs, expected_factors = 1.0, [], []
    for t, b in enumerate(b_noise):
        expected_lrs.append(LR * (1 - t / STEPS) * factor)
        if b is not None and math.isfinite(b) and b > 0:
            factor = min(max(_surge(batch, b) / _surge(REF_BATCH, b), 0.25), 8.0)
        expected_factors.append(factor)
    assert run["lrs"] == pytest.approx(expected_lrs, rel=1e-9)
    assert run["logged_lrs"] == pytest.approx(expected_lrs, rel=1e-9)
    assert run["factors"] == pytest.approx(expected_factors, rel=1e-9)
    assert len({round(f, 9) for f in expected_factors}) >= 3  # it moved
    means = torch.tensor(run["step_means"], dtype=torch.float64)
    expected_w = -(torch.tensor(expected_lrs, dtype=torch.float64)[:, None] * means).sum(0)
    assert torch.allclose(torch.tensor(run["weights"], dtype=torch.float64), expected_w, rtol=1e-5, atol=1e-7)


@pytest.mark.distributed
@pytest.mark.parametrize("stage, injected", [(1, False), (2, True), (3, True)], ids=["zero1-measured", "zero2",
                                                                                    "zero3"])
def test_deepspeed_zero_follows_b_noise(stage: int, injected: bool) -> None:
    """Trainer + ZeRO on 2 processes, an injected b_noise trajectory (ZeRO-2, ZeRO-3 with partitioned
    parameters) or the real measurement (ZeRO-1: b_noise from Trainer's logged pre-clip grad_norm)."""
    from dist.launch import torchrun
    from dist.online_lr_zero import INJECTED

    result = torchrun("online_lr_zero.py", "--stage", str(stage), *(["--injected"] if injected else []))
    _check_zero_run(result, INJECTED if injected else None)
    if not injected:
        assert sum(b is not None and math.isfinite(b) and b > 0 for b in result["b_noise"]) >= 3


# ------------------------------------------------------------------------------------------ Accelerate
def test_accelerate_loop_follows_the_monitor() -> None:
    """The loop API: an OnlineLrScheduler through accelerator.prepare (AcceleratedScheduler around it), the
    monitor's b_noise folded in at each "logging step" from start_step on, and the weights moved by exactly
    -sum_t lr_t G_t."""
    from accelerate import Accelerator

    from hf_lars.integrations.noise_monitor import GradientNoiseScaleMonitor

    accum, micro, steps = 4, 8, 6
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model = GaussianGradModel()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    online = OnlineLrScheduler(torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps),
                               OnlineLrFactor("surge", ref_batch=REF_BATCH, batch=micro * accum, start_step=2))
    data = GaussianData(steps * accum * micro, seed=9)
    loader = torch.utils.data.DataLoader(data, batch_size=micro)
    model, opt, loader, scheduler = accelerator.prepare(model, opt, loader, online)
    monitor = GradientNoiseScaleMonitor(model, micro, auto_step=lambda: accelerator.sync_gradients)
    lrs, factors = [], []
    for i, batch in enumerate(loader):
        with accelerator.accumulate(model):
            accelerator.backward(model(batch["x"])["loss"])
            if accelerator.sync_gradients:
                lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            factors.append(online.update(monitor.compute().get("b_noise"), step=len(lrs)))
    monitor.detach()
    assert len(lrs) == steps and len(set(round(f, 9) for f in factors)) >= 3
    assert factors[0] == 1.0 != factors[1]  # the estimate after step 1 waited for start_step=2
    expected_lrs = [LR * (1 - t / steps) * (factors[t - 1] if t else 1.0) for t in range(steps)]
    assert lrs == pytest.approx(expected_lrs, rel=1e-9)
    means = data.x.double().reshape(steps, accum * micro, -1).mean(1)
    expected_w = -(torch.tensor(expected_lrs, dtype=torch.float64)[:, None] * means).sum(0)
    assert torch.allclose(model.w.detach().double(), expected_w, rtol=1e-5, atol=1e-7)
