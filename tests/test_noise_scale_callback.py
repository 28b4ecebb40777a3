"""Gradient noise scale during training: the loop monitor and the Trainer callback.

Against an analytic model whose per-example gradients are exactly Gaussian with a known mean and covariance
(``tests/dist/ns_common.py``: true ``B_simple = 64``): the exact per-step norms the hooks must produce (the
loss-scaling derivation of ``hf_lars/integrations/noise_scale.py``), and the estimate after enough steps.
The 2-process DDP version runs ``tests/dist/ns_ddp.py`` under ``torchrun``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from dist.ns_common import (
    DIM,
    TRUE_B_SIMPLE,
    GaussianData,
    GaussianGradModel,
    TokenNormalisedModel,
    expected_norms,
    mean_and_std,
    training_args,
)
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_lars.integrations.noise_scale import (
    NOISE_SCALE_KEYS,
    GradientNoiseScaleCallback,
    GradientNoiseScaleMonitor,
    add_noise_scale_callback,
)

# 200 steps with beta = 0.99: in 100 simulated seeds the estimate of 64 stayed within [57, 75] (b = 8, B = 64);
# the tolerance leaves room for that and fails for any error in the scaling (a missing K gives 8x or 1/8x).
REL_TOL = 0.2


def _draws(n: int, seed: int) -> torch.Tensor:
    mu, std = mean_and_std()
    return mu + torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)) * std


# ----------------------------------------------------------------------------------------- loop monitor
@pytest.mark.parametrize("accumulation", ["mean", "sum"])
def test_monitor_exact_norms_with_accumulation(accumulation: str) -> None:
    micro, accum, steps = 4, 3, 5
    model = GaussianGradModel()
    monitor = GradientNoiseScaleMonitor(model, micro, accumulation=accumulation, keep_history=True)
    x = _draws(steps * accum * micro, seed=1)
    expected = []
    for t in range(steps):
        xs = x[t * accum * micro : (t + 1) * accum * micro]
        for k in range(accum):
            loss = model(xs[k * micro : (k + 1) * micro])["loss"]
            (loss / accum if accumulation == "mean" else loss).backward()
        monitor.step()
        model.zero_grad()
        expected.append(expected_norms(xs, micro, accum, world=1))
    assert monitor.pending_steps == steps
    stats = monitor.compute()
    assert monitor.pending_steps == 0
    assert [(b, B) for _, b, _, B in monitor.history] == [(micro, micro * accum)] * steps
    for (small, _, big, _), (e_small, e_big) in zip(monitor.history, expected):
        assert small == pytest.approx(e_small, rel=1e-5)
        assert big == pytest.approx(e_big, rel=1e-5)
    assert set(stats) == set(NOISE_SCALE_KEYS)


def test_monitor_estimate_with_gradient_accumulation() -> None:
    micro, accum, steps = 8, 8, 200
    model = GaussianGradModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # training changes nothing about the gradient law
    monitor = GradientNoiseScaleMonitor(model, micro)
    x = _draws(steps * accum * micro, seed=2)
    for t in range(steps):
        for k in range(accum):
            i = (t * accum + k) * micro
            (model(x[i : i + micro])["loss"] / accum).backward()
        monitor.step()
        opt.step()
        opt.zero_grad()
        if (t + 1) % 50 == 0:
            monitor.compute()
    assert monitor.estimator.steps == steps
    assert monitor.b_simple == pytest.approx(TRUE_B_SIMPLE, rel=REL_TOL)


def test_monitor_auto_step_runs_at_the_end_of_the_flagged_backward() -> None:
    micro, accum = 2, 2
    model = GaussianGradModel()
    flag = {"sync": False}
    monitor = GradientNoiseScaleMonitor(model, micro, auto_step=lambda: flag["sync"], keep_history=True)
    x = _draws(micro * accum, seed=3)
    for k in range(accum):
        flag["sync"] = k == accum - 1
        (model(x[k * micro : (k + 1) * micro])["loss"] / accum).backward()
    assert monitor.pending_steps == 1  # recorded by the queued callback, not by an explicit step()
    model.zero_grad()
    monitor.compute()
    small, _, big, _ = monitor.history[0]
    assert (small, big) == pytest.approx(expected_norms(x, micro, accum, world=1), rel=1e-5)


def test_monitor_external_big_norm_pairs_with_the_last_step() -> None:
    """The DeepSpeed path: the big-batch norm comes from outside (Trainer's logged grad_norm) for the last step."""
    micro, accum = 2, 2
    model = GaussianGradModel()
    monitor = GradientNoiseScaleMonitor(model, micro, big_norm="external", keep_history=True)
    x = _draws(3 * micro * accum, seed=4)
    truths = []
    for t in range(3):
        xs = x[t * micro * accum : (t + 1) * micro * accum]
        for k in range(accum):
            (model(xs[k * micro : (k + 1) * micro])["loss"] / accum).backward()
        monitor.step()
        model.zero_grad()
        truths.append(expected_norms(xs, micro, accum, world=1))
    monitor.compute(last_big_sq_norm=truths[-1][1])
    assert len(monitor.history) == 1  # the two steps without a big norm are dropped
    assert monitor.history[0][0] == pytest.approx(truths[-1][0], rel=1e-5)
    assert monitor.history[0][2] == pytest.approx(truths[-1][1], rel=1e-5)


def test_monitor_counts_a_tied_parameter_once_and_detaches() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3, bias=False)
            self.b = self.a  # the same Parameter reached twice, like tied embeddings

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)).sum()

    model = Tied()
    monitor = GradientNoiseScaleMonitor(model, 1, keep_history=True, big_norm="grad")
    assert len(monitor.params) == 1
    x = torch.randn(2, 3)
    model(x[:1]).backward()
    model(x[1:]).backward()
    monitor.step(big_sq_norm=1.0)  # explicit big norm: used as given ("mean" convention)
    monitor.compute()
    g = [torch.autograd.grad(model(x[i : i + 1]), model.a.weight)[0] for i in range(2)]
    # "mean" convention: the hooks saw g_k (loss not divided here), K = 2 -> |G_b|^2 = 2 * sum_k |g_k|^2
    assert monitor.history[0][0] == pytest.approx(2 * sum(gi.square().sum().item() for gi in g), rel=1e-5)
    monitor.detach()
    assert not monitor.attached
    model(x).backward()
    assert monitor.pending_steps == 0 and monitor._micro_count == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_monitor_other_dtypes(dtype: torch.dtype) -> None:
    """Norms are accumulated in float32 whatever the gradient dtype (bf16: within bf16 rounding of the inputs)."""
    micro, accum = 4, 2
    model = GaussianGradModel().to(dtype)
    monitor = GradientNoiseScaleMonitor(model, micro, keep_history=True)
    x = _draws(micro * accum, seed=8)
    for k in range(accum):
        (model(x[k * micro : (k + 1) * micro].to(dtype))["loss"] / accum).backward()
    monitor.step()
    monitor.compute()
    exact = expected_norms(x.to(dtype).double(), micro, accum, world=1)
    rel = 1e-6 if dtype == torch.float64 else 3e-2
    small, _, big, _ = monitor.history[0]
    assert (small, big) == pytest.approx(exact, rel=rel)


def test_monitor_single_batch_size_warns_and_measures_nothing(caplog: pytest.LogCaptureFixture) -> None:
    model = GaussianGradModel()
    monitor = GradientNoiseScaleMonitor(model, 4)
    model(_draws(4, seed=5))["loss"].backward()
    monitor.step()
    with caplog.at_level("WARNING"):
        assert monitor.compute() == {}
    assert "only one batch size" in caplog.text
    assert monitor.estimator.steps == 0


def test_monitor_errors() -> None:
    model = GaussianGradModel()
    with pytest.raises(ValueError, match="micro_batch_size"):
        GradientNoiseScaleMonitor(model, 0)
    with pytest.raises(ValueError, match="accumulation"):
        GradientNoiseScaleMonitor(model, 2, accumulation="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="big_norm"):
        GradientNoiseScaleMonitor(model, 2, big_norm="engine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="world_size"):
        GradientNoiseScaleMonitor(model, 2, world_size=0)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        GradientNoiseScaleMonitor([torch.zeros(2)], 2)
    monitor = GradientNoiseScaleMonitor(model, 2)
    model(_draws(2, seed=6))["loss"].backward()
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="no parameter has a .grad"):
        monitor.step()
    with pytest.raises(ValueError, match="beta"):
        GradientNoiseScaleCallback(beta=1.0)


# ----------------------------------------------------------------------------------------------- Trainer
def _train(
    tmp_path: Path, model: nn.Module, steps: int, accum: int, **overrides: object
) -> tuple[Trainer, GradientNoiseScaleCallback]:
    micro = 8
    args = TrainingArguments(
        **training_args(str(tmp_path), max_steps=steps, gradient_accumulation_steps=accum, **overrides)
    )
    trainer = Trainer(model=model, args=args, train_dataset=GaussianData(steps * accum * micro, seed=7))
    callback = add_noise_scale_callback(trainer, GradientNoiseScaleCallback(keep_history=True))
    trainer.train()
    return trainer, callback


@pytest.mark.parametrize("model_cls", [GaussianGradModel, TokenNormalisedModel], ids=["loss_over_K", "num_items"])
def test_trainer_hooks_see_exact_micro_batch_norms(tmp_path, model_cls: type[nn.Module]) -> None:
    """Trainer scales micro-batch losses by 1/K (or normalises by num_items_in_batch): the recorded norms must
    be the exact micro-batch and accumulated (pre-clip) ones."""
    steps, accum, micro = 6, 4, 8
    trainer, callback = _train(tmp_path, model_cls(), steps, accum, logging_steps=3)
    assert (model_cls is TokenNormalisedModel) == trainer.model_accepts_loss_kwargs
    history = callback.monitor.history
    assert len(history) == steps
    data = GaussianData(steps * accum * micro, seed=7).x
    for t, (small, b, big, big_batch) in enumerate(history):
        e_small, e_big = expected_norms(data[t * accum * micro : (t + 1) * accum * micro], micro, accum, world=1)
        assert (b, big_batch) == (micro, micro * accum)
        assert small == pytest.approx(e_small, rel=1e-5)
        assert big == pytest.approx(e_big, rel=1e-5)  # max_grad_norm=1e-3 clips: pre-clip norm it is


def test_trainer_gradient_accumulation_estimate(tmp_path) -> None:
    trainer, callback = _train(tmp_path, GaussianGradModel(), steps=200, accum=8, logging_steps=50)
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in logged] == [50, 100, 150, 200]
    assert all(set(NOISE_SCALE_KEYS) <= set(row) for row in logged)
    final = logged[-1]
    assert final["b_noise"] == pytest.approx(TRUE_B_SIMPLE, rel=REL_TOL)
    assert final["trace_cov"] / final["grad_sq_norm"] == pytest.approx(final["b_noise"])
    assert callback.monitor.estimator.steps == 200
    assert not callback.monitor.attached  # hooks removed at the end of training


def test_trainer_needs_two_batch_sizes(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs two batch sizes.*gradient_accumulation_steps=1"):
        _train(tmp_path, GaussianGradModel(), steps=1, accum=1)


def test_add_noise_scale_callback_goes_first_once(tmp_path) -> None:
    args = TrainingArguments(**training_args(str(tmp_path), max_steps=1))
    first = GradientNoiseScaleCallback()
    trainer = Trainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(8), callbacks=[first])
    chosen = add_noise_scale_callback(trainer)
    assert chosen is first
    assert trainer.callback_handler.callbacks[0] is first
    assert sum(isinstance(cb, GradientNoiseScaleCallback) for cb in trainer.callback_handler.callbacks) == 1


# ------------------------------------------------------------------------------------------------- DDP
@pytest.mark.distributed
def test_ddp_two_processes() -> None:
    from dist.launch import torchrun

    result = torchrun("ns_ddp.py")
    # plain DDP loop with accumulation (no_sync + auto_step): exact per-step norms, every step
    assert result["loop_steps"] == result["loop_expected_steps"]
    for (small, big), (e_small, e_big) in zip(result["loop_norms"], result["loop_expected"]):
        assert small == pytest.approx(e_small, rel=1e-5)
        assert big == pytest.approx(e_big, rel=1e-5)
    assert result["loop_batches"] == [4, 16]  # b = micro batch, B = micro x accumulation x 2 processes
    # Trainer under DDP: the estimate, logged identically on both ranks
    assert result["trainer_batches"] == [8, 64]  # 8 per device x accumulation 4 x 2 processes
    assert result["trainer_b_noise_rank1"] == result["trainer_b_noise"]
    assert result["trainer_b_noise"] == pytest.approx(TRUE_B_SIMPLE, rel=REL_TOL)
    assert math.isfinite(result["trainer_grad_sq_norm"])


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes(stage: int) -> None:
    """Trainer + ZeRO: hooks give the local micro-batch norms, Trainer's logged pre-clip grad_norm the global one."""
    from dist.launch import torchrun

    result = torchrun("ns_zero.py", "--stage", str(stage))
    assert len(result["pairs"]) == len(result["expected"]) == 60  # logging_steps=1: a pair per step
    for (small, big), (e_small, e_big) in zip(result["pairs"], result["expected"]):
        assert small == pytest.approx(e_small, rel=1e-5)
        assert big == pytest.approx(e_big, rel=1e-5)
    assert result["batches"] == [8, 32]  # 8 per device x accumulation 2 x 2 processes
    assert result["b_noise"] == pytest.approx(TRUE_B_SIMPLE, rel=REL_TOL)
    if stage == 3:
        assert result["partitioned"] == [True]


# ------------------------------------------------------------------------------------ the evidence recipe
def test_surge_sweep_quick(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``recipes/surge_sweep.py --quick``: the whole pipeline (grid, online noise scale, fit, CSVs, PNG) in seconds."""
    import csv
    import importlib.util
    import sys

    monkeypatch.setenv("HF_LARS_CACHE", str(tmp_path / "cache"))
    path = Path(__file__).resolve().parents[1] / "recipes" / "surge_sweep.py"
    spec = importlib.util.spec_from_file_location("_recipe_surge_sweep", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path / "results"
    summary = module.main(["--quick", "--out-dir", str(out)])

    with (out / "surge_grid.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["batch_size", "lr", "loss"]
    assert {(int(r["batch_size"]), float(r["lr"])) for r in rows} == {
        (b, lr) for b in (4, 8, 16) for lr in (3e-3, 1e-2, 3e-2)
    }
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    with (out / "surge_noise.csv").open() as f:
        noise = list(csv.DictReader(f))
    assert len(noise) == 9 * 3  # every step of every run (log_every=1 in quick mode)
    assert any(r["b_noise"] not in ("", "nan") for r in noise)
    assert [int(g["batch_size"]) for g in summary["best"]] == [4, 8, 16]
    assert (out / "surge_fit.png").stat().st_size > 10_000
    assert (out / "surge_best.csv").read_text().startswith("batch_size,best_lr")
    assert summary["online_b_noise_ref"]["batch_size"] == 8


def test_trainer_checkpoint_resume_continues_the_emas_exactly(tmp_path) -> None:
    """Saved at step 3 (between logging steps 2 and 4), resumed to step 6: the same EMAs as one straight run."""
    common = dict(save_strategy="steps", save_steps=3, logging_steps=2)
    straight, cb_straight = _train(tmp_path / "straight", GaussianGradModel(), steps=6, accum=2, **common)
    saved = json.loads((tmp_path / "straight" / "checkpoint-3" / "trainer_state.json").read_text())
    stored = saved["stateful_callbacks"]["GradientNoiseScaleCallback"]["attributes"]["monitor_state"]
    assert stored["steps"] == 3  # the step after the last log (2) is folded in before the save

    args = TrainingArguments(**training_args(str(tmp_path / "resumed"), max_steps=6, gradient_accumulation_steps=2,
                                             **common))
    trainer = Trainer(model=GaussianGradModel(), args=args, train_dataset=GaussianData(6 * 2 * 8, seed=7))
    cb_resumed = add_noise_scale_callback(trainer, GradientNoiseScaleCallback())
    trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    assert cb_resumed.monitor.state_dict() == pytest.approx(cb_straight.monitor.state_dict(), rel=1e-6)
    assert cb_resumed.monitor.state_dict()["steps"] == 6


def test_callback_state_round_trip() -> None:
    """``ExportableState``: the constructor arguments and the EMAs, restored by Trainer's own mechanism too."""
    callback = GradientNoiseScaleCallback(beta=0.9)
    exported = callback.state()
    assert exported == {"args": {"beta": 0.9, "keep_history": False}, "attributes": {"monitor_state": None}}
    rebuilt = GradientNoiseScaleCallback(**exported["args"])
    rebuilt.monitor_state = {"beta": 0.9, "steps": 4, "ema_g2": 1.0, "ema_trace": 2.0}
    assert rebuilt.state()["attributes"]["monitor_state"]["steps"] == 4
