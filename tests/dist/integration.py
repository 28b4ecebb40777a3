"""DeepSpeed front doors with 2 CPU processes: config "type" names, the shipped configs, Accelerate.

Cases (results by name in the JSON):

* ``config_type_<stage>``: raw ``deepspeed.initialize`` with ``"optimizer": {"type": "RangerLARS"}`` after
  ``register()`` builds hf_lars's RangerLARS and trains exactly like the same optimizer passed as a client.
* ``misspelt``: ``"type": "RangerLRAS"``: ``deepspeed.initialize`` (checked after ``register()``) and
  ``check_config`` both give ``check_config``'s listing.
* ``offload_default`` / ``offload_<file>``: ZeRO-Offload with a client optimizer; without
  ``zero_force_ds_cpu_optimizer: false`` DeepSpeed refuses it, with the shipped offload configs it keeps it.
* ``accelerate_dummy``: Accelerate (``init_cpu_distributed_state(deepspeed=True)`` first) with ``DummyOptim`` and
  ``"type": "AdamLARS"``: 2 processes, the engine steps hf_lars's AdamLARS.
* ``accelerate_client_offload``: Accelerate with an hf_lars client optimizer and ``zero2_offload.json``:
  the optimizer is not swapped for DeepSpeedCPUAdam.
* ``stage0_<route>``: stage 0 + bf16 (DeepSpeed's ``FP16_UnfusedOptimizer``), AdamLARS as a client
  optimizer or by config ``"type"``: ``initialize`` counts no step and leaves the weights as they were
  (``deepspeed_patches``); ``stage0_unpatched`` is the control with DeepSpeed's own method.

Backends: gloo on 2 CPU processes, or ``HF_LARS_TEST_BACKEND=nccl`` on 2 GPUs (batches go to each engine's
device; Accelerate then builds its own GPU state, as ``accelerate launch`` would).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import _common as C
import torch

from hf_lars import AdamLARS, RangerLARS
from hf_lars.integrations import deepspeed as hf_ds
from hf_lars.integrations.distributed import init_cpu_distributed_state

STEPS = 4


def fill_auto(cfg: dict[str, Any], world: int) -> dict[str, Any]:
    """What Trainer/Accelerate do to the shipped configs' "auto" values (no clipping: exact comparisons)."""
    cfg = copy.deepcopy(cfg)
    cfg.update(
        train_micro_batch_size_per_gpu=C.MICRO_BATCH,
        gradient_accumulation_steps=1,
        train_batch_size=C.MICRO_BATCH * world,
        gradient_clipping=0.0,
    )
    for key in ("bf16", "fp16"):
        if cfg.get(key, {}).get("enabled") == "auto":
            cfg[key]["enabled"] = False
    return cfg


def train(engine: Any, rank: int, world: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    for batch in C.global_batches(STEPS, world):
        x, y = (t.to(engine.device) for t in C.local_slice(batch, rank))
        loss = C.loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()
    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}


def config_type_case(stage: int, rank: int, world: int) -> dict[str, Any]:
    import deepspeed

    cfg = C.ds_config(stage)
    cfg["optimizer"] = {"type": "RangerLARS", "params": {"lr": 1e-2, "weight_decay": 1e-2, "k": 3}}
    hf_ds.check_config(cfg)
    model = C.make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    built = type(engine.basic_optimizer).__name__
    from_config = train(engine, rank, world)
    engine.destroy()
    model = C.make_model()
    client = RangerLARS(list(model.parameters()), lr=1e-2, weight_decay=1e-2, k=3)
    engine = C.deepspeed_engine(model, client, C.ds_config(stage))
    from_client = train(engine, rank, world)
    engine.destroy()
    diff = max((from_config[n] - from_client[n]).abs().max().item() for n in from_config)
    return {"built": built, "max_abs_diff_vs_client": diff}


def stage0_case(route: str, rank: int) -> dict[str, Any]:
    """Stage 0 + bf16: what ``deepspeed.initialize`` does to AdamLARS's state and weights, and one step."""
    import deepspeed
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from hf_lars.integrations import deepspeed_patches

    hf_ds.register()  # DeepSpeed is imported: this installs the patch
    patched = FP16_UnfusedOptimizer.initialize_optimizer_states
    if route == "unpatched":
        FP16_UnfusedOptimizer.initialize_optimizer_states = patched._hf_lars_original
    try:
        cfg = C.ds_config(0, bf16=True)
        model = C.make_model()
        # The engine casts the model to bf16: compare with the bf16-rounded initial weights.
        before = {n: p.detach().to(torch.bfloat16).float() for n, p in model.named_parameters()}
        if route == "config_type":
            cfg["optimizer"] = {"type": "AdamLARS", "params": {"lr": 0.05, "weight_decay": 0.1}}
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
        else:
            client = AdamLARS(list(model.parameters()), lr=0.05, weight_decay=0.1)
            engine = C.deepspeed_engine(model, client, cfg)
        opt = engine.basic_optimizer
        steps = sorted({float(s["step"]) for s in opt.state.values()})
        # The fp32 master weights (what the optimizer steps; copied to the bf16 model at the next step).
        masters = [p for group in engine.optimizer.fp32_groups for p in group]
        unchanged = len(masters) == len(before) and all(
            torch.equal(b, m.detach().cpu()) for b, m in zip(before.values(), masters)
        )
        out = {
            "wrapper": type(engine.optimizer).__name__,
            "steps_after_initialize": steps,
            "weights_unchanged": unchanged,
            "patch_installed": deepspeed_patches.installed(),
        }
        x, y = (t.to(engine.device) for t in C.local_slice(C.global_batches(1, 2)[0], rank))
        loss = C.loss_fn(engine(x.to(torch.bfloat16)), y.to(torch.bfloat16))
        engine.backward(loss)
        engine.step()
        out["steps_after_one_step"] = sorted({float(s["step"]) for s in opt.state.values()})
        engine.destroy()
        return out
    finally:
        FP16_UnfusedOptimizer.initialize_optimizer_states = patched


def misspelt_case() -> dict[str, Any]:
    import deepspeed

    cfg = C.ds_config(2)
    cfg["optimizer"] = {"type": "RangerLRAS", "params": {"lr": 1e-2}}
    out: dict[str, Any] = {}
    try:
        hf_ds.check_config(cfg)
        out["check_config"] = "no error"
    except ValueError as err:
        out["check_config"] = str(err)
    try:
        model = C.make_model()
        deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
        out["deepspeed"] = "no error"
    except Exception as err:  # check_config's ValueError from the checked deepspeed.initialize
        out["deepspeed"] = f"{type(err).__name__}: {err}"
    return out


def offload_case(cfg: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    model = C.make_model()
    opt = AdamLARS(list(model.named_parameters()), lr=1e-2)
    out: dict[str, Any] = {}
    try:
        hf_ds.check_config(cfg, client_optimizer=True)
        out["check_config"] = "ok"
    except ValueError as err:
        out["check_config"] = str(err)
    try:
        engine = C.deepspeed_engine(model, opt, cfg)
    except Exception as err:
        out["initialize"] = f"{type(err).__name__}: {err}"
        return out
    out["initialize"] = "ok"
    out["basic_optimizer"] = type(engine.basic_optimizer).__name__
    out["offload"] = bool(
        getattr(engine.optimizer, "cpu_offload", False) or getattr(engine.optimizer, "offload_optimizer", False)
    )
    offloaded = train(engine, rank, world)
    engine.destroy()
    # The same training without offload (the path test_sharded_exact checks against one process).
    stage = cfg["zero_optimization"]["stage"]
    model = C.make_model()
    engine = C.deepspeed_engine(model, AdamLARS(list(model.named_parameters()), lr=1e-2), C.ds_config(stage))
    on_device = train(engine, rank, world)
    engine.destroy()
    out["max_rel_diff_vs_no_offload"] = max(
        ((offloaded[n] - on_device[n]).norm() / on_device[n].norm()).item() for n in on_device
    )
    return out


def accelerate_cases(rank: int, world: int) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    out: dict[str, Any] = {}
    state = init_cpu_distributed_state(deepspeed=True)
    if state is None:  # GPUs: Accelerate's own state, as `accelerate launch` with a DeepSpeed config builds it
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        state = PartialState()
    out["num_processes"] = state.num_processes
    x, y = (t.to(C.device()) for t in C.local_slice(C.global_batches(1, world)[0], rank))

    cfg = fill_auto(json.loads((C.REPO / "ds_configs" / "zero2.json").read_text()), world)
    cfg["optimizer"] = {"type": "AdamLARS", "params": {"lr": 1e-2, "weight_decay": "auto"}}
    plugin = DeepSpeedPlugin(hf_ds_config=cfg)
    acc = Accelerator(deepspeed_plugin=plugin)
    model = C.make_model()
    engine, opt = acc.prepare(model, DummyOptim(list(model.parameters()), lr=1e-2, weight_decay=0.0))
    acc.backward(C.loss_fn(engine(x), y))
    opt.step()
    out["dummy"] = {
        "basic_optimizer": type(engine.basic_optimizer).__name__,
        "num_processes": acc.num_processes,
        "stepped": int(engine.global_steps),
    }
    engine.destroy()

    AcceleratorState._reset_state()  # one DeepSpeed plugin per Accelerator; keep the gloo PartialState
    cfg = fill_auto(json.loads((C.REPO / "ds_configs" / "zero2_offload.json").read_text()), world)
    plugin = DeepSpeedPlugin(hf_ds_config=cfg)
    acc = Accelerator(deepspeed_plugin=plugin)
    model = C.make_model()
    engine, opt = acc.prepare(model, AdamLARS(list(model.named_parameters()), lr=1e-2))
    acc.backward(C.loss_fn(engine(x), y))
    opt.step()
    out["client_offload"] = {
        "basic_optimizer": type(engine.basic_optimizer).__name__,
        "stepped": int(engine.global_steps),
    }
    engine.destroy()
    return out


def main() -> None:
    args = C.parse_args()
    rank, world = C.init()
    hf_ds.register()
    results: dict[str, Any] = {}
    for stage in (2, 3):
        results[f"config_type_{stage}"] = config_type_case(stage, rank, world)
    results["misspelt"] = misspelt_case()
    default_offload = C.ds_config(2, offload_optimizer={"device": "cpu"})
    results["offload_default"] = offload_case(default_offload, rank, world)
    for name in ("zero2_offload", "zero3_offload"):
        shipped = fill_auto(json.loads((C.REPO / "ds_configs" / f"{name}.json").read_text()), world)
        results[f"offload_{name}"] = offload_case(shipped, rank, world)
    for route in ("client", "config_type", "unpatched"):
        results[f"stage0_{route}"] = stage0_case(route, rank)
    C.write(args.out, results)
    results["accelerate"] = accelerate_cases(rank, world)
    C.write(args.out, results)
    C.finish()


if __name__ == "__main__":
    main()
