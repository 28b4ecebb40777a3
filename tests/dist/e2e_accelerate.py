"""Accelerate end to end on 2 CPU processes: ``recipes/train_accelerate.py`` under ZeRO-3/ZeRO-2 and DDP, DummyOptim.

Run by ``tests/test_e2e_zero.py`` as ``accelerate launch --config_file recipes/accelerate/zero3.yaml
tests/dist/e2e_accelerate.py --out OUT`` (the real launcher: it starts the processes with torchrun and passes the
yaml's DeepSpeed settings as ``ACCELERATE_*`` environment variables).  Rank 0 writes one entry per case:

* ``recipe_zero3``: the recipe's ``main()`` as launched, i.e. ``ds_configs/zero3.json`` with ``zero3_init_flag``
  (the model is built inside ``deepspeed.zero.Init``), ``--optimizer adam_lars``.
* ``recipe_zero2``: the same process switched to what ``recipes/accelerate/zero2.yaml`` sets
  (``ds_configs/zero2.json``), ``--optimizer lars``.
* ``dummy_zero2``: a custom ``Accelerator`` loop with ``DummyOptim`` and ``"optimizer": {"type": "AdamLARS",
  "params": {"lr": "auto", "weight_decay": "auto"}}`` in ``ds_configs/zero2.json`` (after ``hf_lars.register()``),
  the plugin configured in code (``DeepSpeedPlugin(hf_ds_config=...)``).
* ``recipe_ddp_<optimizer>`` / ``custom_ddp``: the references, plain DDP on the same 2 processes (what
  ``ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/ddp.yaml`` sets), same global batch.
* ``fsdp2_forced_cpu``: ``e2e_fsdp2.compare`` -- Accelerate's real FSDP2 ``prepare`` branch (``fully_shard`` per
  ``recipes/accelerate/fsdp2.yaml``'s settings, the optimizer's tensors swapped for DTensors) with the state switched
  to FSDP by hand, since Accelerate 1.15 enables FSDP only on GPU backends; each hf_lars optimizer against an
  unsharded run.  The GPU test runs the same code with the state Accelerate itself builds from the yaml.

ZeRO-3 builds the model inside ``zero.Init``, which draws the random init in another order than a plain build with
the same seed: the recipe's model builder is wrapped so that every later run starts from the ZeRO-3 run's
initial weights; and ``end_training()``'s destruction of the process group is skipped (the process goes on).
Each recipe entry has the logged per-step ``losses``, ``learning_rates``, trust-ratio stats and the final
``eval_loss``; the DummyOptim entries the per-step losses and the final weights' ``max_abs_diff``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import _common as C
import torch
import torch.distributed as dist
from hf_common import TokenBlocks, tiny_model

RECIPES = C.REPO / "recipes"
TINY_MODEL = ["--vocab_size", "300", "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2",
              "--block_size", "16"]
RECIPE_ARGS = [*TINY_MODEL, "--max_train_samples", "120", "--max_eval_samples", "20", "--max_steps", "4",
               "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--logging_steps", "1",
               "--warmup_steps", "1", "--disable_tqdm", "--no_trust_ratio_jsonl"]
OPTIMIZERS = {
    "adam_lars": ["--optimizer", "adam_lars", "--learning_rate", "0.01"],
    # clipping that acts (the gradient norm is about 0.5): DDP clips in the loop, DeepSpeed from its config
    "lars": ["--optimizer", "lars", "--learning_rate", "1.0", "--optim_args", "trust_coefficient=0.002",
             "--max_grad_norm", "0.05"],
}
DUMMY_STEPS, DUMMY_LR, DUMMY_WD = 4, 1e-2, 0.01
DEEPSPEED_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO3_INIT",
                 "ACCELERATE_CONFIG_DS_FIELDS")


def load_recipe() -> Any:
    sys.path.insert(0, str(RECIPES))  # train_accelerate imports pretrain_clm
    spec = importlib.util.spec_from_file_location("recipe_train_accelerate", RECIPES / "train_accelerate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank: ZeRO-3 gathered, ZeRO-1/2 from the fp32 masters."""
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().float().clone() for n, p in params}
    if any(hasattr(p, "_hp_mapping") for _, p in params):
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in params}
    return {n: p.detach().float().clone() for n, p in params}


class InitFromFirst:
    """Wraps the recipe's model builder: the first model's initial weights are loaded into every later one."""

    def __init__(self, build: Any) -> None:
        self.build, self.init, self.built_in_zero_init = build, None, []

    def __call__(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        model = self.build(*args, **kwargs)
        self.built_in_zero_init.append(any(hasattr(p, "ds_id") for p in model.parameters()))
        if self.init is None:
            self.init = full_weights(model)
        else:
            model.load_state_dict(self.init, strict=False)
        return model


def run_recipe(recipe: Any, out_dir: Path, optimizer: str) -> dict[str, Any]:
    from accelerate.state import AcceleratorState

    metrics = recipe.main(["--output_dir", str(out_dir), *OPTIMIZERS[optimizer], *RECIPE_ARGS])
    state = AcceleratorState()
    plugin = state.deepspeed_plugin
    history = []
    if dist.get_rank() == 0:
        history = json.loads((out_dir / "trainer_state.json").read_text())["log_history"]
    rows = [r for r in history if "loss" in r]
    return {
        "distributed_type": str(state.distributed_type),
        "num_processes": state.num_processes,
        "zero_stage": plugin.deepspeed_config["zero_optimization"]["stage"] if plugin else 0,
        "gradient_clipping": plugin.deepspeed_config.get("gradient_clipping") if plugin else None,
        "losses": [r["loss"] for r in rows],
        "learning_rates": [r["learning_rate"] for r in rows],
        "trust_ratio": [[r.get(k) for k in ("trust_ratio_min", "trust_ratio_median", "trust_ratio_max")] for r in rows],
        "steps": [r["step"] for r in rows],
        "eval_loss": metrics["eval_loss"],
    }


def custom_loop(accelerator: Any, model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A minimal Accelerate training loop (constant lr) on the tiny Llama; per-step losses, final weights."""
    from torch.utils.data import DataLoader

    dl = DataLoader(TokenBlocks(64, seed=0), batch_size=4, shuffle=False)
    model, optimizer, dl = accelerator.prepare(model, optimizer, dl)
    losses = []
    for step, batch in enumerate(dl):
        if step == DUMMY_STEPS:
            break
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    engine = model
    result = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "engine": type(engine).__name__,
        "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0,
        "optimizer": type(getattr(engine, "basic_optimizer", None) or optimizer.optimizer).__name__,
        "losses": losses,
    }
    weights = full_weights(getattr(engine, "module", engine))
    if hasattr(engine, "destroy"):
        engine.destroy()
    return result, weights


def dummy_zero2() -> tuple[dict[str, Any], dict[str, Any]]:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    cfg = json.loads((C.REPO / "ds_configs" / "zero2.json").read_text())
    cfg["optimizer"] = {"type": "AdamLARS", "params": {"lr": "auto", "weight_decay": "auto"}}
    plugin = DeepSpeedPlugin(hf_ds_config=cfg, gradient_clipping=0.0)  # "auto" would become Accelerate's 1.0
    accelerator = Accelerator(deepspeed_plugin=plugin)
    model = tiny_model(seed=0)
    return custom_loop(accelerator, model, DummyOptim(list(model.parameters()), lr=DUMMY_LR, weight_decay=DUMMY_WD))


def custom_ddp() -> tuple[dict[str, Any], dict[str, Any]]:
    from accelerate import Accelerator

    from hf_lars import create_optimizer

    accelerator = Accelerator(cpu=True)
    model = tiny_model(seed=0)
    return custom_loop(accelerator, model, create_optimizer(model, "adam_lars", lr=DUMMY_LR, weight_decay=DUMMY_WD))


def fsdp2_forced_cpu() -> dict[str, Any]:
    """Accelerate's FSDP2 branch of ``prepare`` on the CPU (the state switched by hand): see ``e2e_fsdp2.py``."""
    import e2e_fsdp2

    return e2e_fsdp2.compare(e2e_fsdp2.make_accelerator(force_cpu=True))


def main() -> None:
    args = C.parse_args()
    torch.set_num_threads(1)
    import hf_lars
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_lars.register()
    # The recipe ends with accelerator.end_training(), which destroys the process group: keep it for the next case.
    AcceleratorState.destroy_process_group = lambda self, group=None: None
    recipe = load_recipe()
    builder = InitFromFirst(recipe.build_clm_model)
    recipe.build_clm_model = builder
    results: dict[str, Any] = {"launch_env": {k: os.environ.get(k) for k in DEEPSPEED_ENV}}
    weights: dict[str, Any] = {}

    def case(name: str, fn: Any, *fn_args: Any) -> None:
        try:
            out = fn(*fn_args)
            if isinstance(out, tuple):
                out, weights[name] = out
            results[name] = out
        except Exception as err:  # noqa: BLE001 - recorded; a rank that fails alone ends in the watchdog
            results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        AcceleratorState._reset_state()  # the next case brings its own plugin / state
        unset_hf_deepspeed_config()
        C.write(args.out, results)

    with tempfile.TemporaryDirectory() as tmp, C.watchdog(600, lambda: C.write(args.out, results)):
        tmp_dir = Path(tmp)
        # As launched: recipes/accelerate/zero3.yaml (ds_configs/zero3.json, zero3_init_flag: true).
        case("recipe_zero3", run_recipe, recipe, tmp_dir / "z3", "adam_lars")
        # What recipes/accelerate/zero2.yaml sets instead.
        os.environ.update(
            ACCELERATE_DEEPSPEED_CONFIG_FILE="ds_configs/zero2.json", ACCELERATE_DEEPSPEED_ZERO3_INIT="false"
        )
        case("recipe_zero2", run_recipe, recipe, tmp_dir / "z2", "lars")
        case("dummy_zero2", dummy_zero2)
        # Plain DDP over gloo: what `ACCELERATE_USE_CPU=true accelerate launch --config_file ddp.yaml` sets.
        for key in DEEPSPEED_ENV:
            os.environ.pop(key, None)
        os.environ["ACCELERATE_USE_CPU"] = "true"
        AcceleratorState._reset_state(reset_partial_state=True)
        for optimizer in OPTIMIZERS:
            case(f"recipe_ddp_{optimizer}", run_recipe, recipe, tmp_dir / f"ddp_{optimizer}", optimizer)
        case("custom_ddp", custom_ddp)
        # Last: it switches the shared state to FSDP by hand.
        case("fsdp2_forced_cpu", fsdp2_forced_cpu)
    results["built_in_zero_init"] = builder.built_in_zero_init
    if "dummy_zero2" in weights and "custom_ddp" in weights:
        a, b = weights["dummy_zero2"], weights["custom_ddp"]
        results["dummy_zero2"]["max_abs_diff"] = max((a[n] - b[n]).abs().max().item() for n in b)
        results["dummy_zero2"]["moved"] = max(
            (b[n] - p.detach()).abs().max().item() for n, p in tiny_model(seed=0).named_parameters()
        )
    C.write(args.out, results)
    C.finish()


if __name__ == "__main__":
    main()
