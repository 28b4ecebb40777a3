"""Route 1: ``hf_lars.register()`` makes plain TrainingArguments / HfArgumentParser / Trainer accept hf_lars names."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from dist.hf_common import TokenBlocks, tiny_args, tiny_cli_args, tiny_model
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

import hf_lars
from hf_lars.integrations import transformers as hft
from hf_lars.optim import LARS, AdamLARS, RangerLARS
from hf_lars.registry import list_optimizers
from hf_lars.schedule import get_warmup_poly_schedule

CLASSES = {"lars": LARS, "adam_lars": AdamLARS, "ranger_lars": RangerLARS}


@pytest.fixture
def registered() -> None:
    hf_lars.register()
    yield
    hf_lars.register()  # a test may have unregistered; leave the process registered as most tests expect


def _norm_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if "norm" in n}


def test_register_is_idempotent_and_accepts_every_name(registered: None) -> None:
    n_members = len(OptimizerNames)
    hf_lars.register()
    hf_lars.register()
    assert len(OptimizerNames) == n_members
    for name in list_optimizers():
        args = TrainingArguments(output_dir="unused", optim=name, lr_scheduler_type="warmup_poly")
        assert args.optim == OptimizerNames(name) and args.optim.value == name
        assert hft.hf_lars_optim_name(args.optim) == name
    assert SchedulerType("warmup_poly").value == "warmup_poly"
    # transformers' own names stay transformers'
    assert hft.hf_lars_optim_name(OptimizerNames.ADAMW_TORCH) is None
    assert hft.hf_lars_optim_name("sgd") is None


def test_hf_argument_parser_accepts_names(registered: None) -> None:
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "unused", "--optim", "ranger_lars", "--lr_scheduler_type", "warmup_poly",
         "--lr_scheduler_kwargs", '{"power": 3.0, "lr_end": 1e-5}']
    )
    assert args.optim.value == "ranger_lars"
    assert args.lr_scheduler_type.value == "warmup_poly"
    assert args.lr_scheduler_kwargs == {"power": 3.0, "lr_end": 1e-5}


def test_unknown_optim_lists_every_valid_name(registered: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(["--output_dir", "x", "--optim", "nope"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err
    for name in [*list_optimizers(), "adamw_torch", "sgd"]:
        assert f"'{name}'" in err
    with pytest.raises(ValueError) as info:
        TrainingArguments(output_dir="x", optim="nope")
    for name in list_optimizers():
        assert f"'{name}'" in str(info.value)


@pytest.mark.parametrize("name", ["lars", "adam_lars", "ranger_lars"])
def test_trainer_run_with_registered_name(registered: None, tmp_path, name: str) -> None:
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # RangerLARS takes no step in its first 5 (unrectified) steps by default; this 4-step run checks that it
    # trains, so it takes RAdam's fallback (and shows that --optim_args reaches that option).
    extra = {"optim_args": "degenerated_to_sgd=True"} if name == "ranger_lars" else {}
    args = TrainingArguments(
        **tiny_args(tmp_path, optim=name, weight_decay=0.05, learning_rate=0.5 if name == "lars" else 1e-2, **extra)
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenBlocks())
    trainer.train()

    inner = trainer.optimizer.optimizer  # Accelerate's wrapper around ours
    assert type(inner) is CLASSES[name]
    decay, no_decay = inner.param_groups
    # Trainer's split, with names; the no-decay group (norm weights) is excluded: no weight decay, and the
    # trust ratio only for the LARS family (adapt_excluded's class default)
    assert set(no_decay["param_names"]) == _norm_names(model)
    assert no_decay["excluded"] is True and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 0.05 and decay["excluded"] is False
    assert set(decay["param_names"]) == {n for n, _ in model.named_parameters()} - _norm_names(model)
    adapted = set(decay["param_names"]) | (set(no_decay["param_names"]) if CLASSES[name] is LARS else set())
    assert set(inner.trust_ratios()) == adapted
    # it trained: every tensor moved, losses finite, trust ratios logged at each logging step
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(0 < r["trust_ratio_min"] <= r["trust_ratio_median"] <= r["trust_ratio_max"] for r in rows)
    assert isinstance(trainer.callback_handler.callbacks[0], hf_lars.TrustRatioCallback)


def test_hyperparameters_map_from_training_arguments(registered: None) -> None:
    args = TrainingArguments(
        output_dir="x", optim="adam_lars", learning_rate=3e-3, weight_decay=0.02, adam_beta1=0.8, adam_beta2=0.99,
        adam_epsilon=1e-7, optim_args="trust_clip=true,trust_bounds=(0.01,10)",
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is AdamLARS
    assert kwargs == dict(lr=3e-3, weight_decay=0.02, betas=(0.8, 0.99), eps=1e-7, trust_clip=True, trust_bounds=(0.01, 10.0))
    # LARS takes no betas and keeps its own eps (adam_epsilon is for the Adam forms only)
    args = TrainingArguments(output_dir="x", optim="larc", learning_rate=2.0, optim_args="trust_coefficient=0.002,momentum=0.95")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is LARS
    assert kwargs == dict(trust_clip=True, lr=2.0, weight_decay=0.0, trust_coefficient=0.002, momentum=0.95)
    # other optimizers still go to transformers
    cls, _ = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(output_dir="x", optim="sgd"))
    assert cls is torch.optim.SGD


@pytest.mark.parametrize(
    ("optim", "optim_args", "message"),
    [
        ("lars", "trust_coef=0.1", "Unknown key 'trust_coef' in --optim_args for lars"),
        ("lars", "momentum=fast", "Invalid value 'fast' for 'momentum'"),
        ("lars", "nesterov=maybe", "expected a boolean"),
        ("ranger_lars", "k=2.5", "expected an integer"),
        ("adam_lars", "trust_bounds=(1,2,3)", "expected 2 values"),
        ("lars", "lr=1", "use --learning_rate"),
        ("adam_lars", "eps=1e-3", "use --adam_epsilon"),
        ("lars", "momentum", "expected key=value"),
    ],
)
def test_optim_args_errors_name_the_valid_keys(optim: str, optim_args: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        hft.parse_optim_args(optim_args, optim)
    text = str(info.value)
    assert message in text
    assert "Valid keys: " in text
    keys = {"lars": ["momentum (float, default 0.9)", "trust_coefficient", "nesterov (bool"],
            "adam_lars": ["bias_correction", "trust_bounds"], "ranger_lars": ["k (int, default 6)", "alpha"]}[optim]
    for key in keys:
        assert key in text


def test_optim_args_typed_values() -> None:
    parsed = hft.parse_optim_args(" trust_coefficient = 2e-3 , momentum=0.95,nesterov=True,foreach=none", "lars")
    assert parsed == {"trust_coefficient": 0.002, "momentum": 0.95, "nesterov": True, "foreach": None}
    assert hft.parse_optim_args("k=3,use_gc=0,alpha=0.6", "ranger_lars") == {"k": 3, "use_gc": False, "alpha": 0.6}
    assert hft.parse_optim_args("trust_bounds=0.1:10", "lamb") == {"trust_bounds": (0.1, 10.0)}
    assert hft.parse_optim_args("trust_bounds=None", "adam_lars") == {"trust_bounds": None}
    assert hft.parse_optim_args("", "lars") == {} and hft.parse_optim_args(None, "lars") == {}


def test_out_of_range_optim_args_fail_when_the_arguments_are_built(registered: None, tmp_path) -> None:
    """Before any data or model work: the optimizer's own range check runs in TrainingArguments.__post_init__."""
    with pytest.raises(ValueError, match="--optim lars --optim_args 'momentum=1.5': Invalid momentum value: 1.5"):
        TrainingArguments(**tiny_args(tmp_path, optim="lars", optim_args="momentum=1.5"))


def test_warmup_poly_reproduces_get_warmup_poly_schedule(registered: None, tmp_path) -> None:
    steps, lr = 8, 0.5
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        tiny_cli_args(tmp_path, optim="lars", learning_rate=lr, max_steps=steps, lr_scheduler_type="warmup_poly",
                      lr_scheduler_kwargs='{"power": 2.0, "lr_end": 1e-5}', warmup_steps=0.25)
    )
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=TokenBlocks())
    trainer.train()
    logged = [r["learning_rate"] for r in trainer.state.log_history if "loss" in r]

    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = get_warmup_poly_schedule(reference, num_warmup_steps=2, num_training_steps=steps, power=2.0, lr_end=1e-5)
    expected = []
    for _ in range(steps):  # Trainer logs the learning rate the step used
        expected.append(schedule.get_last_lr()[0])
        reference.step()
        schedule.step()
    assert logged == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert expected[0] == 0.0 and expected[2] == pytest.approx(lr) and expected[-1] < expected[3]


def test_warmup_poly_works_without_optimizer_defaults(registered: None) -> None:
    """DeepSpeed's ZeRO optimizers have no ``.defaults``; transformers' own polynomial schedule needs it."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # AcceleratedOptimizer reads the accelerator state

    base = LARS([torch.zeros(2, 2, requires_grad=True)], lr=1.0)

    class ZeroLike:  # what DeepSpeed hands back: param_groups, step, state_dict; no defaults, not an Optimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups

        def step(self, closure=None):  # noqa: ANN001, ANN202
            return None

        def zero_grad(self, set_to_none: bool = True) -> None:
            pass

        def state_dict(self):  # noqa: ANN202
            return {}

        def load_state_dict(self, state) -> None:  # noqa: ANN001
            pass

    zero = ZeroLike(base)
    with pytest.raises(AttributeError):
        transformers.get_scheduler("polynomial", optimizer=zero, num_warmup_steps=1, num_training_steps=4)
    schedule = transformers.get_scheduler(
        "warmup_poly", optimizer=zero, num_warmup_steps=1, num_training_steps=4, scheduler_specific_kwargs={"power": 1.0}
    )
    lrs = []
    for _ in range(4):
        lrs.append(base.param_groups[0]["lr"])
        schedule.step()
    assert lrs == pytest.approx([0.0, 1.0, 2 / 3, 1 / 3])
    # Accelerate's wrapper as Trainer sees it under DeepSpeed
    wrapped = AcceleratedOptimizer(ZeroLike(LARS([torch.zeros(2, 2, requires_grad=True)], lr=1.0)), device_placement=False)
    schedule = transformers.get_scheduler("warmup_poly", optimizer=wrapped, num_warmup_steps=0, num_training_steps=2)
    assert schedule.get_last_lr() == [1.0]
    with pytest.raises(ValueError, match="Valid keys: power, lr_end, warmup, warmup_start"):
        transformers.get_scheduler(
            "warmup_poly", optimizer=zero, num_warmup_steps=1, num_training_steps=4, scheduler_specific_kwargs={"pow": 2}
        )


def test_version_guard_names_the_supported_range(registered: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for version in ("4.40.0", "6.0.0"):
        with pytest.raises(RuntimeError, match=r"supports transformers >=4\.46,<6, found"):
            hft.check_transformers_version(version)
    hft.check_transformers_version("4.46.0")
    hft.check_transformers_version(transformers.__version__)

    hft.unregister()
    monkeypatch.setattr(hft.patches, "_installed_version", lambda: "6.1.0")
    with pytest.raises(RuntimeError, match=r"pip install 'transformers>=4\.46,<6'"):
        hft.register()
    assert not hft.is_registered() and "lars" not in OptimizerNames._value2member_map_  # nothing half-patched


def test_unregister_restores_transformers(registered: None) -> None:
    original_create = Trainer.__dict__["create_optimizer"].__hf_lars_original__
    hft.unregister()
    assert not hft.is_registered()
    assert Trainer.__dict__["create_optimizer"] is original_create
    assert "lars" not in OptimizerNames._value2member_map_ and "warmup_poly" not in SchedulerType._value2member_map_
    with pytest.raises(ValueError, match="not a valid OptimizerNames"):
        TrainingArguments(output_dir="x", optim="lars")
    hft.register()
    assert TrainingArguments(output_dir="x", optim="lars").optim.value == "lars"


def test_args_with_registered_names_serialize(registered: None, tmp_path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), optim="adam_lars", lr_scheduler_type="warmup_poly")
    data = json.loads(args.to_json_string())
    assert data["optim"] == "adam_lars" and data["lr_scheduler_type"] == "warmup_poly"


def test_subclass_decay_split_is_honoured(registered: None, tmp_path) -> None:
    class NoDecayEmbeddings(Trainer):
        def get_decay_parameter_names(self, model):  # noqa: ANN001, ANN201
            return [n for n in super().get_decay_parameter_names(model) if "embed" not in n]

    args = TrainingArguments(**tiny_args(tmp_path, optim="lamb", weight_decay=0.1))
    trainer = NoDecayEmbeddings(model=tiny_model(), args=args, train_dataset=TokenBlocks())
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is AdamLARS
    decay, no_decay = optimizer.param_groups
    assert "model.embed_tokens.weight" in no_decay["param_names"] and no_decay["excluded"] is True
    assert "model.embed_tokens.weight" not in decay["param_names"] and decay["weight_decay"] == 0.1


def test_register_checks_every_private_name_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """patches.PRIVATE_NAMES is checked before anything is touched; a missing entry is named in the error."""
    was_registered = hft.is_registered()
    hft.unregister()
    try:
        bogus = ("transformers.Trainer.no_such_hook_anymore", "function")
        monkeypatch.setattr(hft.patches, "PRIVATE_NAMES", (*hft.patches.PRIVATE_NAMES, bogus))
        with pytest.raises(RuntimeError, match=r"missing function transformers\.Trainer\.no_such_hook_anymore"):
            hft.register()
        assert not hft.is_registered() and "lars" not in OptimizerNames._value2member_map_
        monkeypatch.undo()
        hft.check_transformers_version()  # every real entry resolves on the installed transformers
        assert {"5.23", "5.24"} <= set(hft.TESTED_TRANSFORMERS)
    finally:
        if was_registered:
            hft.register()
