"""Route 3 (LarsTrainingArguments / LarsTrainer, no patching), TrustRatioCallback output, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist.hf_common import TokenBlocks, tiny_args, tiny_cli_args, tiny_model
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_lars
from hf_lars.integrations import transformers as hft
from hf_lars.integrations.callbacks import (
    STAT_KEYS,
    TRUST_RATIO_FILE,
    TrustRatioCallback,
    TrustRatioWriter,
    add_trust_ratio_callback,
    find_trust_ratio_optimizer,
    summarize_trust_ratios,
)
from hf_lars.optim import LARS, RangerLARS


@pytest.fixture
def unpatched() -> None:
    """transformers exactly as installed for the test; registration restored afterwards if it was on."""
    was = hft.is_registered()
    hft.unregister()
    yield
    if was:
        hft.register()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------- route 3
def test_lars_trainer_needs_no_patching(unpatched: None, tmp_path: Path) -> None:
    parser = HfArgumentParser(hft.LarsTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        tiny_cli_args(tmp_path, optim="ranger_lars", max_steps=4, logging_steps=2, learning_rate=1e-2)
        + ["--warmup_ratio", "0.25", "--optim_args", "k=2,alpha=0.6", "--lr_scheduler_kwargs", '{"power": 1.0}']
    )
    assert args.optim == "ranger_lars" and args.optim.value == "ranger_lars"
    assert args.lr_scheduler_type == "warmup_poly" and args.warmup_steps == 0.25
    trainer = hft.LarsTrainer(model=tiny_model(), args=args, train_dataset=TokenBlocks())
    trainer.train()
    inner = trainer.optimizer.optimizer
    assert type(inner) is RangerLARS and inner.defaults["k"] == 2 and inner.defaults["alpha"] == 0.6
    assert inner.param_groups[1]["excluded"] is True and inner.param_groups[1]["adapt_excluded"] is False
    lrs = [r["learning_rate"] for r in trainer.state.log_history if "loss" in r]
    # warmup 1 step, then linear decay (power 1) over 3: steps 2 and 4 used lr(t=1) and lr(t=3)
    assert lrs == pytest.approx([1e-2, 1e-2 / 3])
    assert (tmp_path / TRUST_RATIO_FILE).is_file()
    assert not hft.is_registered() and "ranger_lars" not in OptimizerNames._value2member_map_
    assert json.loads(args.to_json_string())["optim"] == "ranger_lars"


def test_lars_trainer_keeps_transformers_behaviour_for_other_names(unpatched: None, tmp_path: Path) -> None:
    args = hft.LarsTrainingArguments(**tiny_args(tmp_path, optim="adamw_torch", lr_scheduler_type="linear", max_steps=2))
    trainer = hft.LarsTrainer(model=tiny_model(), args=args, train_dataset=TokenBlocks())
    trainer.train()
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW
    assert not any(isinstance(cb, TrustRatioCallback) for cb in trainer.callback_handler.callbacks)
    assert not (tmp_path / TRUST_RATIO_FILE).exists()


def test_lars_training_arguments_fail_early(unpatched: None) -> None:
    with pytest.raises(ValueError) as info:
        hft.LarsTrainingArguments(output_dir="x", optim="adamlarss")
    assert "Unknown optim 'adamlarss'" in str(info.value)
    for name in [*hf_lars.list_optimizers(), "adamw_torch"]:
        assert name in str(info.value)
    with pytest.raises(ValueError, match=r"Invalid trust_coefficient value: -1\.0"):
        hft.LarsTrainingArguments(output_dir="x", optim="lars", optim_args="trust_coefficient=-1")
    with pytest.raises(ValueError, match="Unknown key 'beta' in --optim_args for lars"):
        hft.LarsTrainingArguments(output_dir="x", optim="lars", optim_args="beta=1")
    with pytest.raises(ValueError, match="Unknown lr_scheduler_kwargs for warmup_poly: end"):
        hft.LarsTrainingArguments(output_dir="x", lr_scheduler_kwargs={"end": 0.1})
    with pytest.raises(ValueError, match=r"Unknown lr_scheduler_type 'poly'\. Valid names: linear, .*warmup_poly"):
        hft.LarsTrainingArguments(output_dir="x", lr_scheduler_type="poly")
    with pytest.raises(SystemExit):
        HfArgumentParser(hft.LarsTrainingArguments).parse_args_into_dataclasses(["--output_dir", "x", "--optim", "sgdd"])


def test_lars_trainer_adds_callback_for_a_given_optimizer(unpatched: None, tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = hf_lars.create_optimizer(model, "lars", lr=0.1)
    args = TrainingArguments(**tiny_args(tmp_path, max_steps=2))
    trainer = hft.LarsTrainer(model=model, args=args, train_dataset=TokenBlocks(), optimizers=(optimizer, None))
    assert isinstance(trainer.callback_handler.callbacks[0], TrustRatioCallback)
    trainer.train()
    rows = _rows(tmp_path / TRUST_RATIO_FILE)
    assert [r["step"] for r in rows] == [1, 2]


# ------------------------------------------------------------------------------------------ callback
def test_callback_logs_stats_and_per_layer_jsonl(tmp_path: Path) -> None:
    hf_lars.register()
    args = TrainingArguments(**tiny_args(tmp_path, optim="lars", learning_rate=0.5, max_steps=4, logging_steps=2))
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=TokenBlocks())
    trainer.train()
    inner = trainer.optimizer.optimizer
    # LARS adapts its excluded (no-decay) group too: every layer has a ratio, group by group
    adapted = [n for g in inner.param_groups for n in g["param_names"]]

    rows = _rows(tmp_path / TRUST_RATIO_FILE)
    assert [r["step"] for r in rows] == [2, 4]
    assert all(list(r["trust_ratios"]) == adapted for r in rows)  # adapted layers only, in group order
    final = {k: v.item() for k, v in inner.trust_ratios().items()}
    assert rows[-1]["trust_ratios"] == pytest.approx(final, rel=1e-6)
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for log, row in zip(logged, rows):
        assert {k: log[k] for k in STAT_KEYS} == pytest.approx(summarize_trust_ratios(row["trust_ratios"]))
    eval_like = [r for r in trainer.state.log_history if "train_runtime" in r]
    assert eval_like and not any(k in eval_like[0] for k in STAT_KEYS)


def test_callback_on_its_own_with_plain_trainer(unpatched: None, tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = hf_lars.create_optimizer(model, "adam_lars", lr=1e-2)
    callback = TrustRatioCallback(per_layer=False)

    class Seen(TrainerCallback):  # a stand-in for a report_to integration registered before our callback
        keys: list[set[str]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
            self.keys.append(set(logs or {}))

    args = TrainingArguments(**tiny_args(tmp_path, max_steps=2))
    trainer = Trainer(
        model=model, args=args, train_dataset=TokenBlocks(), optimizers=(optimizer, None), callbacks=[Seen, callback]
    )
    assert add_trust_ratio_callback(trainer) is callback  # moved in front of the integrations, not duplicated
    assert trainer.callback_handler.callbacks[0] is callback
    assert sum(isinstance(cb, TrustRatioCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert all(set(STAT_KEYS) <= keys for keys in Seen.keys if "loss" in keys)
    assert all(set(STAT_KEYS) <= set(r) for r in trainer.state.log_history if "loss" in r)
    assert not (tmp_path / TRUST_RATIO_FILE).exists()  # per_layer=False


def test_callback_ignores_other_optimizers(tmp_path: Path) -> None:
    model = tiny_model()
    args = TrainingArguments(**tiny_args(tmp_path, max_steps=2, optim="sgd"))
    trainer = Trainer(model=model, args=args, train_dataset=TokenBlocks(), callbacks=[TrustRatioCallback()])
    trainer.train()
    assert not any(k in r for r in trainer.state.log_history for k in STAT_KEYS)
    assert not (tmp_path / TRUST_RATIO_FILE).exists()


def test_find_trust_ratio_optimizer_unwraps() -> None:
    optimizer = LARS([torch.zeros(2, 2, requires_grad=True)], lr=0.1)

    class Wrapper:
        def __init__(self, inner: object) -> None:
            self.optimizer = inner

    assert find_trust_ratio_optimizer(optimizer) is optimizer
    assert find_trust_ratio_optimizer(Wrapper(Wrapper(optimizer))) is optimizer  # Accelerate( ZeRO( ours ))
    assert find_trust_ratio_optimizer(Wrapper(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1))) is None
    assert find_trust_ratio_optimizer(None) is None


def test_writer_drops_rows_after_the_resume_step(tmp_path: Path) -> None:
    writer = TrustRatioWriter(tmp_path / "t.jsonl")
    writer.start(0)
    for step in (1, 2, 3, 4):
        writer.write(step, {"w": float(step)})
    TrustRatioWriter(tmp_path / "t.jsonl").start(2)
    assert [r["step"] for r in _rows(tmp_path / "t.jsonl")] == [1, 2]
    TrustRatioWriter(tmp_path / "t.jsonl").start(0)
    assert (tmp_path / "t.jsonl").read_text() == ""
    assert summarize_trust_ratios({"a": 1.0, "b": 4.0, "c": 2.0, "d": 3.0}) == dict(
        trust_ratio_min=1.0, trust_ratio_median=2.5, trust_ratio_max=4.0
    )


# -------------------------------------------------------------------------------------------- resume
class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


@pytest.mark.parametrize(
    ("optim", "optim_args", "lr"),
    [("lars", None, 0.5), ("adam_lars", None, 1e-2), ("ranger_lars", "k=2", 1e-2)],  # k=2: Lookahead syncs at 2, 4, 6
)
def test_resume_matches_uninterrupted_run(tmp_path: Path, optim: str, optim_args: str | None, lr: float) -> None:
    hf_lars.register()
    common = dict(optim=optim, optim_args=optim_args, learning_rate=lr, max_steps=6, lr_scheduler_type="warmup_poly",
                  warmup_steps=2, weight_decay=0.01)

    full = Trainer(model=tiny_model(), args=TrainingArguments(**tiny_args(tmp_path / "full", **common)),
                   train_dataset=TokenBlocks())
    full.train()

    interrupted = Trainer(model=tiny_model(), args=TrainingArguments(**tiny_args(tmp_path / "run", **common)),
                          train_dataset=TokenBlocks(), callbacks=[_StopAt(3)])
    interrupted.train()
    assert (tmp_path / "run" / "checkpoint-3").is_dir()
    if optim == "ranger_lars":
        saved = torch.load(tmp_path / "run" / "checkpoint-3" / "optimizer.pt", weights_only=True)
        assert all("slow_buffer" in s for s in saved["state"].values())  # Lookahead state is checkpointed

    resumed = Trainer(model=tiny_model(seed=1), args=TrainingArguments(**tiny_args(tmp_path / "run", **common)),
                      train_dataset=TokenBlocks())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))

    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    loss = lambda t: [r["loss"] for r in t.state.log_history if "loss" in r]  # noqa: E731
    assert loss(resumed)[-3:] == loss(full)[-3:]
    ratios = [r["trust_ratio_max"] for r in resumed.state.log_history if "loss" in r]
    assert ratios[-3:] == [r["trust_ratio_max"] for r in full.state.log_history if "loss" in r][-3:]
    # the per-layer log of the resumed run has each step once
    assert [r["step"] for r in _rows(tmp_path / "run" / TRUST_RATIO_FILE)] == [1, 2, 3, 4, 5, 6]


def test_nan_trust_ratio_is_logged_as_nan_and_warned_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A NaN gradient gives a NaN ratio: the logged statistics are NaN (never a healthy-looking summary), a
    count of the bad layers is logged, and one warning per run names them."""
    from transformers import TrainerControl, TrainerState

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    opt = LARS(list(model.named_parameters()), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[1].weight.grad[0, 0] = float("nan")
    opt.step()
    callback = TrustRatioCallback(per_layer=False)
    args, state, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, optimizer=opt)
    logs = [{"loss": 1.0}, {"loss": 1.0}]
    with caplog.at_level("WARNING", logger="hf_lars.integrations.callbacks"):
        for log in logs:
            callback.on_log(args, state, control, logs=log, optimizer=opt)
    assert all(torch.isnan(torch.tensor(log[k])) for log in logs for k in STAT_KEYS)
    assert logs[0]["trust_ratio_nonfinite"] == 1.0  # 1.weight (1.bias shares none of its gradient)
    warnings = [r for r in caplog.records if "non-finite trust ratio" in r.getMessage()]
    assert len(warnings) == 1 and "1.weight" in warnings[0].getMessage() and "0.weight" not in warnings[0].getMessage()
    assert summarize_trust_ratios({"a": 1.0, "b": float("inf")})["trust_ratio_nonfinite"] == 1.0
