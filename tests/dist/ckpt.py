"""DeepSpeed checkpoints of hf_lars optimizers: save, load into a fresh engine, continue identically.

Modes:

* ``--mode resume`` (2 ranks): for ZeRO-2 and ZeRO-3 and each optimizer, train ``STEPS`` steps, save,
  train ``STEPS`` more (run A); build a fresh engine from a differently initialised model, load the
  checkpoint, train the same ``STEPS`` (run B).  A and B must end equal: weights, Adam moments, momentum,
  RangerLARS's Lookahead slow weights (k=3, so a synchronisation falls after the save) and step counts.
  Also saves a ZeRO-2 checkpoint of every optimizer under ``--ckpt-dir`` for the universal-checkpoint test.
* ``--mode universal`` (any number of ranks): load the universal checkpoints converted from those
  (``<ckpt-dir>/zero2_<optimizer>/mid_universal``, made by ``python -m deepspeed.checkpoint.ds_to_universal``)
  and train the same ``STEPS`` on the same global batches; rank 0 writes the weights.
"""

from __future__ import annotations

import copy
import time
import traceback
from pathlib import Path
from typing import Any

import _common as C
import torch
import torch.distributed as dist

from hf_lars import LARS, AdamLARS, RangerLARS

STEPS = 4
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "lars": (LARS, {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-2, "trust_coefficient": 0.02}),
    "adam_lars": (AdamLARS, {"lr": 1e-2, "weight_decay": 1e-2}),
    # degenerated_to_sgd: RangerLARS steps from step 1 (by default not in its first 5, unrectified, steps),
    # so the weights and the Lookahead slow weights at the save differ from the initial ones.
    "ranger_lars": (RangerLARS, {"lr": 1e-2, "weight_decay": 1e-2, "k": 3, "degenerated_to_sgd": True}),
}


def build(stage: int, opt_name: str, seed: int, config_extra: dict[str, Any] | None = None) -> Any:
    cls, kwargs = OPTIMIZERS[opt_name]
    model = C.make_model("net", seed=seed)
    # DeepSpeed writes this into the checkpoint (engine.py: getattr(self.module, "universal_checkpoint_info"));
    # ds_to_universal refuses checkpoints without it.  Empty: no tensor-parallel patterns to declare.
    model.universal_checkpoint_info = {}
    opt = cls(list(model.named_parameters()), **kwargs)
    config = C.ds_config(stage, sub_group_size=40)
    config.update(copy.deepcopy(config_extra or {}))
    if config.get("train_batch_size"):  # the world size may differ from 2 (universal checkpoint)
        config["train_batch_size"] = C.MICRO_BATCH * dist.get_world_size()
    return C.deepspeed_engine(model, opt, config)


def train(engine: Any, batches: list, rank: int) -> None:
    for batch in batches:
        x, y = _slice(batch, rank)
        loss = C.loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()


def _slice(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a global batch, for any world size."""
    world = dist.get_world_size()
    x, y = batch
    n = x.shape[0] // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def snapshot(engine: Any) -> dict[str, torch.Tensor]:
    """Full fp32 weights, and every optimizer state tensor of this rank's partitions (by state key)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {f"w/{n}": safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    for i, state in enumerate(base.state.values()):
        for key, value in state.items():
            if torch.is_tensor(value):
                out[f"state{i}/{key}"] = value.detach().clone()
    return out


def resume_case(stage: int, opt_name: str, rank: int, ckpt: Path, batches: list) -> dict[str, Any]:
    engine = build(stage, opt_name, seed=0)
    train(engine, batches[:STEPS], rank)
    engine.save_checkpoint(str(ckpt), tag="mid")
    train(engine, batches[STEPS:], rank)
    a = snapshot(engine)
    a_steps = engine.global_steps
    engine.destroy()

    engine = build(stage, opt_name, seed=1)  # different weights: the load must restore them
    engine.load_checkpoint(str(ckpt), tag="mid")
    loaded_steps = engine.global_steps
    train(engine, batches[STEPS:], rank)
    b = snapshot(engine)
    engine.destroy()
    keys_a, keys_b = sorted(a), sorted(b)
    diff = max(((a[k] - b[k]).abs().max().item() for k in keys_a if k in b), default=float("inf"))
    state_keys = sorted({k.split("/", 1)[1] for k in keys_a if k.startswith("state")})
    return {
        "max_abs_diff": diff,
        "same_keys": keys_a == keys_b,
        "state_keys": state_keys,
        "global_steps": [a_steps, loaded_steps],
    }


def main() -> None:
    args = C.parse_args(
        lambda p: (
            p.add_argument("--mode", choices=["resume", "universal"], required=True),
            p.add_argument("--ckpt-dir", required=True),
            p.add_argument("--optimizers", default=",".join(OPTIMIZERS)),
        )
    )
    rank, world = C.init()
    root = Path(args.ckpt_dir)
    batches = C.global_batches(2 * STEPS, 2)  # the 2-rank run's global batches
    results: dict[str, Any] = {"world": world, "cases": {}}
    for opt_name in args.optimizers.split(","):
        if args.mode == "resume":
            for stage in (2, 3):
                t0 = time.perf_counter()
                try:
                    r = resume_case(stage, opt_name, rank, root / f"zero{stage}_{opt_name}", batches)
                except Exception as err:
                    r = {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}"}
                r["seconds"] = time.perf_counter() - t0
                results["cases"][f"zero{stage}/{opt_name}"] = r
                C.write(args.out, results)
        else:
            t0 = time.perf_counter()
            try:
                engine = build(2, opt_name, seed=1, config_extra={"checkpoint": {"load_universal": True}})
                engine.load_checkpoint(str(root / f"zero2_{opt_name}"), tag="mid_universal")
                train(engine, batches[STEPS:], rank)
                snap = snapshot(engine)
                r = {"weights": {k: v.tolist() for k, v in snap.items() if k.startswith("w/")}}
                engine.destroy()
            except Exception as err:
                r = {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}"}
            r["seconds"] = time.perf_counter() - t0
            results["cases"][opt_name] = r
            C.write(args.out, results)
    if args.mode == "resume":
        # Reference weights after all 2 * STEPS steps, for the universal-checkpoint comparison.
        for opt_name in args.optimizers.split(","):
            engine = build(2, opt_name, seed=0)
            train(engine, batches, rank)
            snap = snapshot(engine)
            results["cases"][f"zero2/{opt_name}"]["final_weights"] = {
                k: v.tolist() for k, v in snap.items() if k.startswith("w/")
            }
            engine.destroy()
        C.write(args.out, results)
    C.finish()


if __name__ == "__main__":
    main()
