"""The batch-size ramp (hf_lars/scaling/ramp.py, hf_lars/integrations/batch_ramp.py).

The analytic model of ``dist/ns_common`` has per-example gradient ``x_i`` whatever the weights, so plain SGD
without clipping moves the weights by exactly ``-sum_t lr_t G_t`` with ``G_t`` the mean of the examples step
``t`` consumed: the final weights say which examples (how many micro-batches) each step took and with which
LR, independently of the logs, which are checked too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from dist.ns_common import DIM, GaussianData, GaussianGradModel, training_args
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_lars.integrations.batch_ramp import GLOBAL_BATCH_KEY, SAMPLES_KEY, BatchRampCallback
from hf_lars.integrations.lr_scaling import check_lr_scaling_flags
from hf_lars.integrations.noise_scale import GradientNoiseScaleCallback
from hf_lars.integrations.transformers import LarsTrainer, LarsTrainingArguments
from hf_lars.scaling.ramp import BatchSizeRamp, count_examples, parse_batch_size_schedule
from hf_lars.schedule import OnlineLrScheduler


def _surge(batch: float, b_noise: float) -> float:
    return 2.0 / (math.sqrt(b_noise / batch) + math.sqrt(batch / b_noise))


# ------------------------------------------------------------------------------------------------ core
def test_parse_schedule() -> None:
    assert parse_batch_size_schedule("256:1000,512:3000,1024") == ((256, 1000), (512, 3000), (1024, None))
    assert parse_batch_size_schedule(" 64 ") == ((64, None),)
    assert parse_batch_size_schedule("8 : 2 , 16") == ((8, 2), (16, None))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "Empty batch size schedule"),
        ("256:1000,,1024", "empty entry 2"),
        ("256:10:20,512", "one ':' at most"),
        ("abc:10,512", "batch 'abc' is not an integer"),
        ("256:ten,512", "step 'ten' is not an integer"),
        ("0:10,512", "batch must be positive"),
        ("256:1000,512:3000", "the last entry '512:3000' must be open-ended"),
        ("256,512", "entry '256' needs ':UNTIL_STEP'"),
        ("512:100,256", r"batches must increase \(256 after 512\)"),
        ("256:100,256", r"batches must increase \(256 after 256\)"),
        ("256:100,512:100,1024", r"steps must increase \(100 after 100\)"),
    ],
)
def test_parse_schedule_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_batch_size_schedule(text)
    # each message shows the format, or (for an order error) why the order is required
    assert any(fix in str(err.value) for fix in ('"256:1000,512:3000,1024"', "only grows", "until which"))


def test_schedule_gives_batch_accumulation_and_lr_at_the_right_steps() -> None:
    ramp = BatchSizeRamp(micro_batch=8, processes=2, schedule="16:3,32:5,64", rule="sqrt", ref_batch=16)
    got = []
    for _ in range(7):
        got.append((ramp.step, ramp.batch, ramp.accumulation, ramp.factor))
        ramp.step_done()
    assert got == [
        (0, 16, 1, 1.0), (1, 16, 1, 1.0), (2, 16, 1, 1.0),
        (3, 32, 2, pytest.approx(math.sqrt(2))), (4, 32, 2, pytest.approx(math.sqrt(2))),
        (5, 64, 4, pytest.approx(2.0)), (6, 64, 4, pytest.approx(2.0)),
    ]
    assert ramp.changes == [(0, 16), (3, 32), (5, 64)]
    assert ramp.samples == 3 * 16 + 2 * 32 + 2 * 64
    assert ramp.micro_batches == 3 * 1 + 2 * 2 + 2 * 4
    # surge: the factor is the law's ratio to the batch the launch LR was scaled for
    surge = BatchSizeRamp(micro_batch=8, schedule="16:1,128", rule="surge", ref_batch=64, b_noise=100.0,
                          launch_batch=16)
    surge.step_done()
    assert surge.factor == pytest.approx(_surge(128, 100.0) / _surge(16, 100.0), rel=1e-12)
    assert BatchSizeRamp(micro_batch=8, schedule="16:1,128").law(128) == 1.0  # rule none: LR untouched


def test_steps_for_a_sample_budget() -> None:
    ramp = BatchSizeRamp(micro_batch=1, schedule="256:1000,512:3000,1024")
    assert ramp.steps_for_samples(256 * 1000) == 1000
    assert ramp.steps_for_samples(256 * 1000 + 1) == 1001
    assert ramp.steps_for_samples(256 * 1000 + 512 * 2000 + 1024 * 10) == 3010
    walked, total = 0, 0
    while total < 2_000_000:  # the same by walking the ramp
        total += ramp.batch
        ramp.step_done()
        walked += 1
    assert BatchSizeRamp(micro_batch=1, schedule="256:1000,512:3000,1024").steps_for_samples(2_000_000) == walked


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(schedule="16:2,24"), r"batch size schedule entry 24: not a multiple of micro-batch x processes = 16.*"
                                   r"use 16 or 32"),
        (dict(), "exactly one of schedule"),
        (dict(schedule="16", noise_k=1.0), "exactly one of schedule"),
        (dict(noise_k=1.0, min_batch=16), "needs bounds"),
        (dict(noise_k=1.0, min_batch=32, max_batch=16), "max_batch 16 < min_batch 32"),
        (dict(noise_k=0.0, min_batch=16, max_batch=32), "Invalid noise_k"),
        (dict(noise_k=1.0, min_batch=16, max_batch=40), "max_batch 40: not a multiple .* use 32 or 48"),
        (dict(schedule="16", min_batch=16), "drop --batch_size_min"),
        (dict(schedule="16", rule="surge", ref_batch=16), "Invalid b_noise"),
        (dict(schedule="16", start_step=3), "which a schedule ignores: drop --b_noise_start_step"),
        (dict(noise_k=1.0, min_batch=16, max_batch=32, start_step=1.5), "Invalid start_step: 1.5"),
    ],
)
def test_ramp_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchSizeRamp(micro_batch=8, processes=2, **kwargs)


def test_noise_driven_follows_k_b_noise_within_bounds() -> None:
    """target = floor(k B_noise / unit) unit, clamped to [min, max]; the batch never shrinks; bad estimates
    change nothing."""
    ramp = BatchSizeRamp(micro_batch=4, processes=2, noise_k=0.5, min_batch=16, max_batch=96, rule="linear",
                         ref_batch=16)
    trajectory = [10.0, 70.0, float("nan"), 100.0, 60.0, -3.0, None, 150.0, 1e6, 50.0]
    got = [(ramp.update(b), ramp.batch)[1] for b in trajectory]
    expected, batch = [], 16
    for b in trajectory:
        if b is not None and math.isfinite(b) and b > 0:
            batch = max(batch, min(max(int(0.5 * b // 8) * 8, 16), 96))
        expected.append(batch)
    assert got == expected == [16, 32, 32, 48, 48, 48, 48, 72, 96, 96]
    assert ramp.skipped == 3 and ramp.b_noise == 50.0
    assert ramp.factor == 96 / 16  # linear rule, launch batch = min_batch
    ramp.step_done()
    assert ramp.batch == 96  # steps do not move a noise-driven ramp
    assert BatchSizeRamp(micro_batch=8, schedule="8:1,16").update(1e9) == 1.0  # a schedule ignores estimates


def test_noise_driven_waits_for_its_start_step() -> None:
    """Estimates logged before start_step optimizer steps move nothing (counted in waited); from there on the
    ramp follows them as one without a start would, and the settings travel with the state."""
    ramp = BatchSizeRamp(micro_batch=8, noise_k=1.0, min_batch=16, max_batch=64, start_step=2)
    seen = []
    for b in [60.0, 50.0, 40.0, 70.0]:  # logged after steps 0, 1, 2, 3
        ramp.update(b)
        seen.append(ramp.batch)
        ramp.step_done()
    assert seen == [16, 16, 40, 64] and (ramp.waited, ramp.b_noise) == (2, 70.0)
    again = BatchSizeRamp(micro_batch=8, noise_k=1.0, min_batch=16, max_batch=64, start_step=2)
    again.load_state_dict(ramp.state_dict())
    assert again.state_dict() == ramp.state_dict()
    with pytest.raises(ValueError, match="start_step: now 0, saved 2"):
        BatchSizeRamp(micro_batch=8, noise_k=1.0, min_batch=16, max_batch=64).load_state_dict(ramp.state_dict())


def test_count_examples() -> None:
    assert count_examples(torch.zeros(5, 3), 8) == 5
    assert count_examples({"meta": "x", "input_ids": torch.zeros(3, 16), "labels": torch.zeros(3, 16)}, 8) == 3
    assert count_examples((torch.zeros(()), torch.zeros(2, 7)), 8) == 2
    assert count_examples({"n": 1}, 8) == 8 and count_examples(torch.zeros(()), 8) == 8  # nothing to count


def test_state_round_trip_and_mismatch() -> None:
    ramp = BatchSizeRamp(micro_batch=8, noise_k=1.0, min_batch=8, max_batch=64)
    for b in (20.0, None, 40.0):
        ramp.update(b)
        ramp.step_done()
    again = BatchSizeRamp(micro_batch=8, noise_k=1.0, min_batch=8, max_batch=64)
    again.load_state_dict(ramp.state_dict())
    assert again.state_dict() == ramp.state_dict()
    assert (again.batch, again.step, again.samples, again.changes) == (40, 3, 16 + 16 + 40, [(0, 16), (2, 40)])
    other = BatchSizeRamp(micro_batch=8, noise_k=2.0, min_batch=8, max_batch=64)
    with pytest.raises(ValueError, match=r"other settings \(noise_k: now 2.0, saved 1.0\).*same --batch_size_"):
        other.load_state_dict(ramp.state_dict())


def test_ramp_composes_with_a_schedule_and_checkpoints_through_it() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    ramp = BatchSizeRamp(micro_batch=8, schedule="8:1,32", rule="linear", ref_batch=8)
    sched = OnlineLrScheduler(torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)), ramp)
    opt.step()
    sched.step()
    ramp.step_done()
    assert sched.refresh() == pytest.approx(4.0, rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 2 * 4.0)
    resumed_ramp = BatchSizeRamp(micro_batch=8, schedule="8:1,32", rule="linear", ref_batch=8)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    resumed = OnlineLrScheduler(torch.optim.lr_scheduler.LambdaLR(opt2, lambda t: 1.0 / (1 + t)), resumed_ramp)
    resumed.load_state_dict(sched.state_dict())
    assert (resumed_ramp.batch, resumed_ramp.step) == (32, 1)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


# --------------------------------------------------------------------------------------------- Trainer
MICRO, LR = 8, 0.05
SCHEDULE, STEPS = "8:2,16:4,32", 6
BATCHES = [8, 8, 16, 16, 32, 32]  # the schedule's batch at steps 0..5 (one process)


def _ramp_args(out: Path, **overrides: Any) -> dict[str, Any]:
    kwargs = training_args(str(out), max_steps=STEPS, optim="sgd", learning_rate=LR, logging_steps=1,
                           max_grad_norm=0.0, lr_scheduler_type="linear")
    kwargs.update(lr_scaling="linear", lr_scaling_ref_batch=8, batch_size_schedule=SCHEDULE)
    kwargs.update(overrides)
    return kwargs


def _expected_weights(x: torch.Tensor, batches: list[int], lrs: list[float]) -> torch.Tensor:
    """-sum_t lr_t G_t, step t taking the next batches[t] examples in order (sequential sampling)."""
    w, start = torch.zeros(DIM, dtype=torch.float64), 0
    for batch, lr in zip(batches, lrs):
        w -= lr * x[start : start + batch].double().mean(0)
        start += batch
    return w


def _train(out: Path, data: GaussianData, resume: str | None = None, **overrides: Any) -> LarsTrainer:
    args = LarsTrainingArguments(**_ramp_args(out, **overrides))
    trainer = LarsTrainer(model=GaussianGradModel(), args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_schedule_takes_effect_at_the_right_steps(tmp_path) -> None:
    data = GaussianData(200, seed=3)
    trainer = _train(tmp_path, data)
    logs = [row for row in trainer.state.log_history if "loss" in row]
    expected_lrs = [LR * (1 - t / STEPS) * BATCHES[t] / 8 for t in range(STEPS)]  # linear rule from batch 8
    assert [row["learning_rate"] for row in logs] == pytest.approx(expected_lrs, rel=1e-12)
    assert [row[GLOBAL_BATCH_KEY] for row in logs] == BATCHES
    assert [row["lr_factor"] for row in logs] == pytest.approx([b / 8 for b in BATCHES], rel=1e-12)
    assert [row[SAMPLES_KEY] for row in logs] == [sum(BATCHES[: t + 1]) for t in range(STEPS)]
    # the weights: each step took exactly its batch's micro-batches, at the logged LR
    expected = _expected_weights(data.x, BATCHES, expected_lrs)
    assert torch.allclose(trainer.model.w.detach().double(), expected, rtol=1e-6, atol=1e-8)
    assert isinstance(trainer.lr_scheduler, OnlineLrScheduler)
    assert trainer.args.gradient_accumulation_steps == 1  # Trainer's own stays 1: the ramp bundles


def test_trainer_ramp_spans_epochs(tmp_path) -> None:
    """Data for fewer steps than max_steps at the ramp's batches: Trainer runs enough epochs (the count it
    computes from one micro-batch per step would stop at step 3); each epoch's last step takes what is left."""
    data = GaussianData(36, seed=4)  # 5 micro-batches an epoch, the last one of 4 examples
    trainer = _train(tmp_path, data)
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in logs] == list(range(1, STEPS + 1))
    # epoch 1: 8, 8, 16, then the short last micro-batch (4 of 16); epoch 2: 32, then the last one (4 of 32)
    assert [row[SAMPLES_KEY] for row in logs] == [8, 16, 32, 36, 68, 72]
    w, lrs = torch.zeros(DIM, dtype=torch.float64), [LR * (1 - t / STEPS) * BATCHES[t] / 8 for t in range(STEPS)]
    for lr, (start, stop) in zip(lrs, [(0, 8), (8, 16), (16, 32), (32, 36), (0, 32), (32, 36)]):
        w -= lr * data.x[start:stop].double().mean(0)
    assert torch.allclose(trainer.model.w.detach().double(), w, rtol=1e-6, atol=1e-8)


def test_trainer_resume_mid_ramp_is_bitwise(tmp_path) -> None:
    """Saved at step 3 (inside the 16 phase, after the 8 -> 16 change) and resumed: the same weights, LRs and
    batches as the uninterrupted run, bit for bit (scheduler.pt carries the ramp, the data position is the
    ramp's micro-batch count, not Trainer's one per step)."""
    data = GaussianData(200, seed=5)
    straight = _train(tmp_path / "a", data, save_strategy="steps", save_steps=3)
    resumed = _train(tmp_path / "b", data, resume=str(tmp_path / "a" / "checkpoint-3"))
    assert torch.equal(straight.model.w.detach(), resumed.model.w.detach())
    rows = lambda t: [(r["step"], r["learning_rate"], r[GLOBAL_BATCH_KEY], r[SAMPLES_KEY])  # noqa: E731
                      for r in t.state.log_history if "loss" in r]
    assert rows(resumed)[-3:] == rows(straight)[3:]
    assert [r[0] for r in rows(resumed)][-3:] == [4, 5, 6]


def test_trainer_resume_past_an_epoch_boundary_is_refused(tmp_path) -> None:
    """Trainer would resume epoch 0 (one micro-batch per step), but the ramp's data is in epoch 1: refused,
    naming the fixes, rather than resuming at the wrong data position."""
    data = GaussianData(36, seed=4)  # 5 micro-batches an epoch: steps 1-4 use all of epoch 0
    _train(tmp_path / "a", data, save_strategy="steps", save_steps=4)
    with pytest.raises(ValueError, match="past an epoch boundary.*Trainer resumes epoch 0, the ramp's data is in "
                                         "epoch 1.*--ignore_data_skip"):
        _train(tmp_path / "b", data, resume=str(tmp_path / "a" / "checkpoint-4"))


def test_switched_off_is_bitwise_trainer(tmp_path) -> None:
    """LarsTrainer without --batch_size_* flags (its get_batch_samples/training_step overrides in the loop) is
    bit for bit the stock Trainer with gradient accumulation."""
    data = GaussianData(200, seed=6)
    common = training_args(str(tmp_path / "x"), max_steps=4, optim="sgd", learning_rate=LR, logging_steps=1,
                           gradient_accumulation_steps=2, max_grad_norm=0.0, lr_scheduler_type="linear")
    ours = LarsTrainer(model=GaussianGradModel(), args=LarsTrainingArguments(**common), train_dataset=data)
    ours.train()
    stock = Trainer(model=GaussianGradModel(), args=TrainingArguments(**common), train_dataset=data)
    stock.train()
    assert torch.equal(ours.model.w.detach(), stock.model.w.detach())
    assert not any(isinstance(cb, BatchRampCallback) for cb in ours.callback_handler.callbacks)
    assert all(GLOBAL_BATCH_KEY not in row for row in ours.state.log_history)
    assert not isinstance(ours.lr_scheduler, OnlineLrScheduler)


def test_trainer_noise_driven_follows_the_logged_b_noise(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The noise callback's b_noise (injected) sets the next step's batch: floor(k b / 8) 8 within bounds."""
    injected = [10.0, 40.0, None, 70.0, 100.0, 20.0]
    feed = iter(injected)

    def stats(self, state, logs, **kwargs):
        self.monitor.compute()  # the monitor still runs over the bundles
        value = next(feed)
        return {} if value is None else {"b_noise": value}

    monkeypatch.setattr(GradientNoiseScaleCallback, "training_log_stats", stats)
    data = GaussianData(400, seed=7)
    trainer = _train(tmp_path, data, batch_size_schedule=None, batch_size_noise_k=0.5, batch_size_min=16,
                     batch_size_max=40, b_noise_start_step=0)
    batch, batches = 16, []
    for b in injected:
        batches.append(batch)
        if b is not None:
            batch = max(batch, min(max(int(0.5 * b // 8) * 8, 16), 40))
    assert batches == [16, 16, 16, 16, 32, 40]
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert [row[GLOBAL_BATCH_KEY] for row in logs] == batches
    # launch LR scaled (linear, ref 8) to the launch batch 8 = one micro-batch: lr_t = LR (1 - t/T) B_t / 8
    expected_lrs = [LR * (1 - t / STEPS) * b / 8 for t, b in enumerate(batches)]
    assert [row["learning_rate"] for row in logs] == pytest.approx(expected_lrs, rel=1e-12)
    expected = _expected_weights(data.x, batches, expected_lrs)
    assert torch.allclose(trainer.model.w.detach().double(), expected, rtol=1e-6, atol=1e-8)


def test_trainer_noise_driven_with_the_real_monitor(tmp_path) -> None:
    """Not injected: the noise monitor measures over the bundles (the step's end from sync_gradients, the big
    batch growing with the ramp), its b_noise lands near the model's true B_simple = 64 once the batch has
    grown, and each b_noise logged from the default start on (step 100: no LR warmup, the EMA's window
    1/(1 - 0.99)) sets the next batch by the documented rounding; the one logged at step 50 waits.  (At
    batch 16 = 2 micro-batches the estimate is still 60% high at step 100, and the ramp, which never shrinks,
    keeps the batch it took from it: the noise monitor's small/big batch ratio sets how noisy it is.)"""
    from dist.ns_common import TRUE_B_SIMPLE

    args = LarsTrainingArguments(**training_args(
        str(tmp_path), max_steps=300, optim="sgd", learning_rate=1e-3, logging_steps=50, max_grad_norm=0.0),
        batch_size_noise_k=1.0, batch_size_min=16, batch_size_max=512)
    trainer = LarsTrainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(300 * 80, seed=1))
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 6 and all(abs(row["b_noise"] / TRUE_B_SIMPLE - 1) < 0.15 for row in logs[3:])
    batch = 16
    for row in logs:
        assert row[GLOBAL_BATCH_KEY] == batch
        if row["step"] >= 100:
            batch = max(batch, min(max(int(row["b_noise"] // 8) * 8, 16), 512))
    assert [row[GLOBAL_BATCH_KEY] for row in logs][:2] == [16, 16] and logs[-1][GLOBAL_BATCH_KEY] > 16
    assert logs[0]["b_noise"] > 24  # acting on the step-50 estimate would have moved the batch at step 51


def test_constant_ramp_is_stock_accumulation_on_a_causal_lm(tmp_path) -> None:
    """A one-entry schedule (accumulation 2, as bundles) trains a tiny GPT-2 bit for bit like the stock
    Trainer with --gradient_accumulation_steps 2: the token-normalised loss (num_items_in_batch over the
    whole step), the sync and the FLOP count go through the bundles unchanged."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokens = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    tokens[::3, -4:] = -100  # some padding in the labels, so num_items_in_batch differs between micro-batches

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(tokens)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": tokens[i].clamp(min=0), "labels": tokens[i]}

    def run(trainer_cls: type, args_cls: type, **extra: Any) -> Trainer:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
        args = args_cls(**training_args(str(tmp_path / trainer_cls.__name__), max_steps=4, optim="adamw_torch",
                                        learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1,
                                        max_grad_norm=1.0), **extra)
        trainer = trainer_cls(model=model, args=args, train_dataset=Tokens())
        trainer.train()
        return trainer

    ramped = run(LarsTrainer, LarsTrainingArguments, batch_size_schedule="8")
    stock = run(Trainer, TrainingArguments, gradient_accumulation_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(ramped.model.parameters(), stock.model.parameters()))
    losses = lambda t: [r["loss"] for r in t.state.log_history if "loss" in r]  # noqa: E731
    assert losses(ramped) == losses(stock) and len(losses(stock)) == 4
    assert ramped.state.total_flos == stock.state.total_flos > 0
    assert [r[GLOBAL_BATCH_KEY] for r in ramped.state.log_history if "loss" in r] == [8] * 4


# ------------------------------------------------------------------------------------ DDP and ZeRO
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_two_processes_ramp_at_the_right_steps_and_resume(mode: str, tmp_path) -> None:
    """LarsTrainer on 2 gloo processes (DDP; DeepSpeed ZeRO-2): the batch changes at steps 2 and 4 (logged, and
    under DeepSpeed the engine's train_batch_size / accumulation follow through set_train_batch_size), the
    optimizer steps with the linear rule's LR, and the weights moved by exactly -sum_t lr_t G_t with G_t
    the mean of the step's batch_t examples; resumed from the mid-ramp checkpoint of step 3, the run ends
    with the same weights, bit for bit, and the same LRs, batches and samples."""
    from dist.launch import torchrun
    from dist.ramp_dist import BATCHES, LR, MICRO

    run = torchrun("ramp_dist.py", "--mode", mode, "--dir", str(tmp_path))
    world = run["world"]
    assert world == 2 and run["accumulation_arg"] == 1
    assert run["global_batches"] == BATCHES
    assert run["samples"] == [sum(BATCHES[: t + 1]) for t in range(STEPS)]
    expected_lrs = [LR * (1 - t / STEPS) * b / (MICRO * world) for t, b in enumerate(BATCHES)]
    assert run["lrs"] == pytest.approx(expected_lrs, rel=1e-12)
    assert run["logged_lrs"] == pytest.approx(expected_lrs, rel=1e-12)
    if mode.startswith("zero"):
        assert run["engine_batches"] == [[b, b // (MICRO * world)] for b in BATCHES]
    means = torch.tensor(run["step_means"], dtype=torch.float64)
    expected_w = -(torch.tensor(expected_lrs, dtype=torch.float64)[:, None] * means).sum(0)
    assert torch.allclose(torch.tensor(run["weights"], dtype=torch.float64), expected_w, rtol=1e-5, atol=1e-7)
    resumed = run["resumed"] if mode == "ddp" else torchrun("ramp_dist.py", "--mode", mode, "--dir", str(tmp_path),
                                                           "--resume")
    assert resumed["weights"] == run["weights"]  # bitwise: float64 lists of the same float32 values
    assert resumed["rows"] == run["rows"] and [r[0] for r in resumed["rows"]] == [4, 5, 6]


# ------------------------------------------------------------------------------------------ Accelerate
def test_accelerate_loop_follows_the_ramp() -> None:
    """RampedAccumulation: each step takes the ramp's micro-batches (sync only on the last), the prepared
    scheduler steps once per step, the LR follows the linear rule, and the weights are exactly -sum lr_t G_t."""
    from accelerate import Accelerator

    from hf_lars.integrations.accelerate import RampedAccumulation

    accelerator = Accelerator(cpu=True)
    model = GaussianGradModel()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ramp = BatchSizeRamp(micro_batch=MICRO, schedule=SCHEDULE, rule="linear", ref_batch=8)
    online = OnlineLrScheduler(torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / STEPS), ramp)
    data = GaussianData(200, seed=8)
    loader = torch.utils.data.DataLoader(data, batch_size=MICRO)
    model, opt, loader, scheduler = accelerator.prepare(model, opt, loader, online)
    ramped, batches = RampedAccumulation(accelerator, model, ramp, online), iter(loader)
    lrs, syncs = [], []
    for _ in range(STEPS):
        step_syncs = []
        for batch in ramped.micro_batches(batches):
            step_syncs.append(accelerator.sync_gradients)
            accelerator.backward(model(batch["x"])["loss"] / ramped.fetched)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
        opt.zero_grad()
        ramped.step_done()
        syncs.append(step_syncs)
    assert syncs == [[True], [True], [False, True], [False, True], [False] * 3 + [True], [False] * 3 + [True]]
    expected_lrs = [LR * (1 - t / STEPS) * BATCHES[t] / 8 for t in range(STEPS)]
    assert lrs == pytest.approx(expected_lrs, rel=1e-12)
    assert (ramp.step, ramp.samples) == (STEPS, sum(BATCHES))
    expected = _expected_weights(data.x, BATCHES, expected_lrs)
    assert torch.allclose(model.w.detach().double(), expected, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------ argument errors
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size_schedule="8:2,12"), "--batch_size_schedule: Invalid batch size schedule entry 12: not a "
                                             "multiple of micro-batch x processes = 8"),
        (dict(batch_size_schedule="16:2,8"), r"batches must increase \(8 after 16\)"),
        (dict(batch_size_schedule="8:x"), "step 'x' is not an integer"),
        (dict(gradient_accumulation_steps=2), "sets the gradient accumulation itself.*drop "
                                              "--gradient_accumulation_steps 2"),
        (dict(max_steps=-1, num_train_epochs=1), "needs --max_steps"),
        (dict(batch_size_noise_k=1.0), "two ways of choosing the batch"),
        (dict(batch_size_schedule=None, batch_size_max=64), "add --batch_size_noise_k"),
        (dict(batch_size_schedule=None, batch_size_noise_k=1.0, batch_size_min=8, batch_size_max=64),
         "--batch_size_noise_k needs the gradient noise scale.*--batch_size_min of >= 2 micro-batches"),
        (dict(lr_scaling="surge", b_noise=None, lr_scaling_online=True), "both move the LR factor; use one"),
        (dict(auto_find_batch_size=True), "--auto_find_batch_size changes it"),
        (dict(b_noise_start_step=2), "neither is set: drop it"),
        (dict(batch_size_schedule=None, batch_size_noise_k=1.0, batch_size_min=16, batch_size_max=64,
              b_noise_start_step=STEPS), f"--b_noise_start_step {STEPS} is not before --max_steps {STEPS}"),
    ],
)
def test_bad_ramp_flags_fail_when_the_arguments_are_built(tmp_path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        LarsTrainingArguments(**_ramp_args(tmp_path, **overrides))


def test_registered_parser_takes_the_flags_and_plain_trainer_is_refused(tmp_path, registered) -> None:
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--batch_size_schedule", "8:1,16"]
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    assert args.batch_size_schedule == "8:1,16"
    with pytest.raises(ValueError, match="not a multiple"):
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv[:-1] + ["8:1,20"])
    trainer = Trainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(64))
    with pytest.raises(ValueError, match="needs LarsTrainer.*use hf_lars.LarsTrainer"):
        trainer.train()


def test_check_flags_for_the_launcher() -> None:
    check_lr_scaling_flags("none", batch_size_schedule="256:10,512")
    with pytest.raises(ValueError, match="batches must increase"):
        check_lr_scaling_flags("none", batch_size_schedule="512:10,256")
    with pytest.raises(ValueError, match="Invalid noise_k"):
        check_lr_scaling_flags("none", batch_size_noise_k=-1.0, batch_size_min=8, batch_size_max=16)


def test_hf_lars_run_takes_the_ramp_flags(tmp_path, registered) -> None:
    """`hf-lars run`'s flag list is LrScalingArguments' fields; a ramp without --lr_scaling reaches every
    TrainingArguments built afterwards, checked against the run there."""
    from hf_lars.commands.run import _take_lr_scaling_flags
    from hf_lars.integrations.transformers import set_launch_lr_scaling

    rest, found = _take_lr_scaling_flags(["--batch_size_schedule", "8:1,16", "--x", "1"])
    assert (rest, found) == (["--x", "1"], {"batch_size_schedule": "8:1,16"})
    set_launch_lr_scaling(**found)
    try:
        args = TrainingArguments(**training_args(str(tmp_path), max_steps=2))
        assert args.batch_size_schedule == "8:1,16"
        with pytest.raises(ValueError, match="not a multiple of micro-batch x processes = 16"):
            TrainingArguments(**training_args(str(tmp_path), max_steps=2, per_device_train_batch_size=16))
    finally:
        set_launch_lr_scaling("none")
    assert TrainingArguments(**training_args(str(tmp_path), max_steps=2)).batch_size_schedule is None
