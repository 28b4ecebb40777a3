"""Trainer end to end on 2 CPU processes: ZeRO-3 with ``--optim``, ZeRO-2 with a JSON-named optimizer, against DDP.

Run by ``tests/test_e2e_zero.py`` under ``torchrun --nproc_per_node 2``; rank 0 writes one entry per case:

* ``zero3_adam_lars``: ``--deepspeed ds_configs/zero3.json`` (the shipped file, by path) and ``--optim adam_lars``.
* ``zero3_ranger_lars``: the same file with the tiny model's parameters really partitioned
  (``stage3_param_persistence_threshold`` 0) and split into several optimizer sub-groups (``sub_group_size``),
  ``--optim ranger_lars --optim_args k=2`` (Lookahead syncs inside the run).
* ``zero2_ranger_lars``, ``zero2_lars``: ``ds_configs/zero2.json`` with ``--optim ranger_lars`` / ``lars``.
* ``zero2_json``: ``ds_configs/zero2.json`` plus ``"optimizer": {"type": "AdamLARS", "params": {"lr": "auto",
  "weight_decay": "auto"}}`` after ``hf_lars.register()``: DeepSpeed builds hf_lars's AdamLARS; compared with
  ``ddp_adam_lars`` (the flat parameter list DeepSpeed gets excludes the same 1-D layers as Trainer's no-decay
  group).
* ``ddp_<optim>``: the references, plain DDP (``TrainingArguments(use_cpu=True)``: Accelerate's MULTI_CPU state,
  gloo).  Same global batch (2 x 4), data order, schedule and clipping as the DeepSpeed runs.

Every run clips: ``max_grad_norm`` 0.1 (DeepSpeed's ``gradient_clipping`` "auto" takes it), below every logged
pre-clip gradient norm, so RangerLARS's Gradient Centralization must come after clipping under ZeRO as under DDP.

The DeepSpeed runs come first, on the state ``init_cpu_distributed_state(deepspeed=True)`` creates, with
``accelerator_config={"use_configured_state": True}``.  They build the model *after* ``TrainingArguments`` like a
real script, so under ZeRO-3 transformers creates it inside ``deepspeed.zero.Init``, which draws the random init in
another order than a plain build with the same seed: the first ZeRO-3 run's initial weights are loaded into the
ZeRO-2 and DDP models.  Each entry has the logged ``losses``, ``grad_norms``, ``learning_rates`` and
``trust_ratio_max`` per step, what DeepSpeed built, and for the DeepSpeed runs ``max_abs_diff`` of the final full
weights to the DDP run of the same optimizer and how far training ``moved`` them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import _common as C
import torch
from hf_common import TokenBlocks, tiny_args, tiny_model

STEPS = 4
MAX_GRAD_NORM = 0.1  # clips at every step (the logged pre-clip norms are asserted above it)
COMMON = dict(
    per_device_train_batch_size=4,
    weight_decay=0.01,
    lr_scheduler_type="warmup_poly",
    warmup_steps=1,
    max_grad_norm=MAX_GRAD_NORM,  # DeepSpeed's "gradient_clipping": "auto" is filled from it
    adam_epsilon=1e-6,  # AdamLARS's own default, which the JSON route (no "eps" key) keeps
)
# RangerLARS takes no step in its first 5 (unrectified) steps: 8 steps, 3 of them real, Lookahead syncs at 2k.
OPTIMS = {
    "adam_lars": dict(learning_rate=1e-2, max_steps=STEPS),
    "ranger_lars": dict(learning_rate=0.1, optim_args="k=2", max_steps=8),  # s ~ 0.03: lr 0.1 to move
    "lars": dict(learning_rate=0.5, max_steps=STEPS),
}


def zero3_partitioned() -> dict[str, Any]:
    """ds_configs/zero3.json with the tiny model really partitioned and split into optimizer sub-groups."""
    cfg = json.loads((C.REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"].update(
        stage3_param_persistence_threshold=0, sub_group_size=1000, reduce_bucket_size=500,
        stage3_prefetch_bucket_size=500,
    )
    return cfg


def zero2_json() -> dict[str, Any]:
    cfg = json.loads((C.REPO / "ds_configs" / "zero2.json").read_text())
    cfg["optimizer"] = {"type": "AdamLARS", "params": {"lr": "auto", "weight_decay": "auto"}}
    return cfg


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (ZeRO-3 parameters are gathered)."""
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().float().clone() for n, p in params}
    return {n: p.detach().float().clone() for n, p in params}


def run(
    out_dir: str, optim: str, deepspeed: Any = None, init: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One Trainer run; its result, its initial and its final full weights."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    kwargs = tiny_args(out_dir, **COMMON, **OPTIMS.get(optim, OPTIMS["adam_lars"]))
    if deepspeed is not None:
        AcceleratorState._reset_state()  # drop the previous run's DeepSpeed plugin; keep the gloo PartialState
        kwargs.update(deepspeed=deepspeed, accelerator_config={"use_configured_state": True})
    if optim != "json":
        kwargs["optim"] = optim
    args = TrainingArguments(**kwargs)
    model = tiny_model(seed=0)  # after TrainingArguments: under ZeRO-3 built inside deepspeed.zero.Init
    if init is not None:
        model.load_state_dict(init, strict=False)
    initial = full_weights(model)
    placeholder_1d = all(p.ndim == 1 for p in model.parameters())  # zero.Init: every parameter looks 1-D
    trainer = Trainer(model=model, args=args, train_dataset=TokenBlocks(64, seed=0))
    start = time.perf_counter()
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    wrapped = trainer.model_wrapped
    inner = getattr(wrapped, "optimizer", None)
    basic = getattr(wrapped, "basic_optimizer", None)
    from hf_lars.integrations.callbacks import trust_ratio_values

    ours = basic if basic is not None else trainer.optimizer.optimizer
    ratio_layers = sorted(trust_ratio_values(ours, gather=True))  # a collective: every rank calls run()
    groups = [
        {"names": sorted(g.get("param_names", [])), "excluded": g.get("excluded"), "weight_decay": g["weight_decay"]}
        for g in ours.param_groups
    ]
    result = {
        "world_size": args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "engine": type(wrapped).__name__,
        "zero_stage": wrapped.zero_optimization_stage() if hasattr(wrapped, "zero_optimization_stage") else 0,
        "zero_optimizer": type(inner).__name__ if inner is not None else None,
        "optimizer": type(basic if basic is not None else getattr(trainer.optimizer, "optimizer", None)).__name__,
        "eps": (basic if basic is not None else trainer.optimizer.optimizer).defaults.get("eps"),
        "gradient_clipping": wrapped.gradient_clipping() if hasattr(wrapped, "gradient_clipping") else None,
        "zero3_init": bool(any(hasattr(p, "ds_id") for p in model.parameters()) and init is None),
        "sub_groups": len(getattr(inner, "fp16_groups", [])),  # ZeRO-3: step() runs once per sub-group
        "losses": [r["loss"] for r in rows],
        "grad_norms": [r.get("grad_norm") for r in rows],
        "learning_rates": [r.get("learning_rate") for r in rows],
        "trust_ratio_max": [r.get("trust_ratio_max") for r in rows],
        "ratio_layers": ratio_layers,
        "groups": groups,
        "placeholder_1d": placeholder_1d,
        "train_s": round(time.perf_counter() - start, 2),
    }
    final = full_weights(trainer.model)
    result["two_d_layers"] = sorted(n for n, w in final.items() if w.ndim > 1)
    if hasattr(wrapped, "destroy"):
        wrapped.destroy()
    return result, initial, final


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[n] - b[n]).abs().max().item() for n in a)


def main() -> None:
    args = C.parse_args()
    torch.set_num_threads(1)
    import hf_lars
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from hf_lars.integrations.accelerate import init_cpu_distributed_state

    hf_lars.register()  # --optim names for Trainer, "type" names for DeepSpeed JSON
    results: dict[str, Any] = {}
    finals: dict[str, dict[str, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # DeepSpeed first: Accelerate's state over gloo, created as a DeepSpeed one (hf_lars's helper).
        state = init_cpu_distributed_state(deepspeed=True)
        results["state"] = {"num_processes": state.num_processes, "distributed_type": str(state.distributed_type)}
        # ZeRO-3 runs build the model inside deepspeed.zero.Init, which draws the random init in another order
        # than a plain build with the same seed: the first run's initial weights are every other run's.
        init = None
        cases = {
            "zero3_adam_lars": ("adam_lars", str(C.REPO / "ds_configs" / "zero3.json")),
            "zero3_ranger_lars": ("ranger_lars", zero3_partitioned()),
            "zero2_json": ("json", zero2_json()),
            "zero2_ranger_lars": ("ranger_lars", str(C.REPO / "ds_configs" / "zero2.json")),
            "zero2_lars": ("lars", str(C.REPO / "ds_configs" / "zero2.json")),
        }
        for name, (optim, cfg) in cases.items():
            z3 = name.startswith("zero3")
            result, initial, finals[name] = run(os.path.join(tmp, name), optim, cfg, None if z3 else init)
            if init is None:
                init = initial
            result["init_max_abs_diff"] = max_diff(initial, init)
            unset_hf_deepspeed_config()
            results[name] = result
            C.write(args.out, results)
        # DDP: TrainingArguments without use_configured_state builds its own MULTI_CPU state (gloo, DDP).
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        AcceleratorState._reset_state(reset_partial_state=True)
        for optim in OPTIMS:
            name = f"ddp_{optim}"
            results[name], _, finals[name] = run(os.path.join(tmp, name), optim, init=init)
            C.write(args.out, results)
    references = {
        "zero3_adam_lars": "adam_lars",
        "zero3_ranger_lars": "ranger_lars",
        "zero2_json": "adam_lars",
        "zero2_ranger_lars": "ranger_lars",
        "zero2_lars": "lars",
    }
    for name, ref in references.items():
        results[name]["max_abs_diff"] = max_diff(finals[name], finals[f"ddp_{ref}"])
        results[name]["moved"] = max_diff(finals[name], init)  # how far training moved the weights
    C.write(args.out, results)
    C.finish()


if __name__ == "__main__":
    main()
