"""The batch-size ramp under 2-process DDP and DeepSpeed ZeRO (gloo, CPU).  Run by tests/test_batch_ramp.py.

LarsTrainer with ``--batch_size_schedule`` on the analytic model of ``ns_common``: plain SGD without
clipping moves the weights by exactly ``-sum_t lr_t G_t``, ``G_t`` the mean of step ``t``'s global batch.
Accelerate shards a map-style loader round-robin (global micro-batch ``j`` to rank ``j % world``), so a step
with accumulation ``A_t`` takes the next ``A_t * world`` global micro-batches.  The result holds the LR the
optimizer's groups had at every step, the logged LRs, batches and samples, under DeepSpeed the engine's
``train_batch_size()`` and ``gradient_accumulation_steps()`` at every step, the final weights (gathered under
ZeRO-3) and the ``G_t`` to compare them with.  Every run saves at step 3 (mid-ramp) into ``--dir``;
``--resume`` trains on from there instead.  Under DDP the resumed run follows in the same processes; under
DeepSpeed the test launches it again (Accelerate refuses a second DeepSpeed ``Accelerator`` per process).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, init, parse_args, write  # noqa: E402
from ns_common import DIM, GaussianData, GaussianGradModel, training_args  # noqa: E402
from ns_zero import ds_config  # noqa: E402

from hf_lars.integrations.accelerate import init_cpu_distributed_state  # noqa: E402

STEPS, MICRO, LR, SCHEDULE = 6, 8, 0.05, "16:2,32:4,64"
BATCHES = [16, 16, 32, 32, 64, 64]  # the schedule's batch at steps 0..5


def step_means(x: torch.Tensor, world: int) -> list[list[float]]:
    """``G_t``: the mean of the step's ``batch_t / MICRO`` consecutive global micro-batches."""
    micro = x.double().reshape(-1, MICRO, DIM)
    out, start = [], 0
    for batch in BATCHES:
        n = batch // MICRO
        out.append(micro[start : start + n].reshape(-1, DIM).mean(0).tolist())
        start += n
    return out


def _rows(trainer: Any) -> list[list[Any]]:
    return [[r["step"], r["learning_rate"], r["global_batch"], r["train_samples"]]
            for r in trainer.state.log_history if "loss" in r]


def _weights(trainer: Any, mode: str) -> list[float]:
    params = list(trainer.model.parameters())
    if mode != "zero3":
        return params[0].detach().double().tolist()
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return params[0].detach().double().clone().tolist()


def run(mode: str, world: int, out: str, resume: bool) -> dict[str, Any]:
    """Train (saving at step 3) or, with ``resume``, train on from that checkpoint; under DDP both."""
    from transformers import TrainerCallback

    from hf_lars.integrations.transformers import LarsTrainer, LarsTrainingArguments

    lrs: list[float] = []
    engine_batches: list[list[int]] = []
    current: dict[str, Any] = {}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            lrs.append(float(current["trainer"].optimizer.param_groups[0]["lr"]))
            engine = current["trainer"].model_wrapped
            if hasattr(engine, "train_batch_size"):
                engine_batches.append([engine.train_batch_size(), engine.gradient_accumulation_steps()])

    extra: dict[str, Any] = dict(save_strategy="steps", save_steps=3)
    if mode.startswith("zero"):
        extra.update(deepspeed=ds_config(int(mode[-1])), accelerator_config={"use_configured_state": True})

    def train(directory: str, checkpoint: str | None) -> Any:
        args = LarsTrainingArguments(
            **training_args(directory, max_steps=STEPS, logging_steps=1, max_grad_norm=0.0, optim="sgd",
                            learning_rate=LR, lr_scheduler_type="linear", per_device_train_batch_size=MICRO,
                            **extra),
            lr_scaling="linear", lr_scaling_ref_batch=MICRO * world, batch_size_schedule=SCHEDULE,
        )
        trained = current["trainer"] = LarsTrainer(model=GaussianGradModel(), args=args, train_dataset=data,
                                                   callbacks=[Record()])
        trained.train(resume_from_checkpoint=checkpoint)
        return trained

    data = GaussianData(sum(BATCHES) * 2, seed=41)
    checkpoint = f"{out}/{mode}/checkpoint-3"  # mid-ramp: batch 32 since step 2
    if resume:
        again = train(f"{out}/{mode}-resumed", checkpoint)
        return {"weights": _weights(again, mode), "rows": _rows(again)[-3:]}
    trainer = train(f"{out}/{mode}", None)
    logs = [row for row in trainer.state.log_history if "loss" in row]
    result = {
        "lrs": lrs,
        "logged_lrs": [row["learning_rate"] for row in logs],
        "global_batches": [row["global_batch"] for row in logs],
        "samples": [row["train_samples"] for row in logs],
        "engine_batches": engine_batches,
        "weights": _weights(trainer, mode),
        "rows": _rows(trainer)[3:],
        "step_means": step_means(data.x, world),
        "world": world,
        "accumulation_arg": trainer.args.gradient_accumulation_steps,
    }
    if mode == "ddp":  # a second Trainer in the same processes (DeepSpeed allows one: the test relaunches)
        result["resumed"] = run(mode, world, out, resume=True)
    return result


def main() -> None:
    args = parse_args(lambda p: (p.add_argument("--mode", choices=["ddp", "zero1", "zero2", "zero3"], required=True),
                                 p.add_argument("--dir", required=True), p.add_argument("--resume", action="store_true")))
    if args.mode.startswith("zero"):
        init_cpu_distributed_state(deepspeed=True)
    rank, world = init()
    result = run(args.mode, world, args.dir, args.resume)
    write(args.out, json.loads(json.dumps(result)))
    finish()


if __name__ == "__main__":
    main()
