"""The batch-size ramp under 2-process DDP and DeepSpeed ZeRO (gloo, CPU).  Run by tests/test_batch_ramp.py.

LarsTrainer with ``--batch_size_schedule`` on the analytic model of ``ns_common``: plain SGD without
clipping moves the weights by exactly ``-sum_t lr_t G_t``, ``G_t`` the mean of step ``t``'s global batch.
Accelerate shards a map-style loader round-robin (global micro-batch ``j`` to rank ``j % world``), so a step
with accumulation ``A_t`` takes the next ``A_t * world`` global micro-batches.  The result holds the LR the
optimizer's groups had at every step, the logged LRs, batches and samples, under DeepSpeed the engine's
``train_batch_size()`` and ``gradient_accumulation_steps()`` at every step, the final weights (gathered under
ZeRO-3) and the ``G_t`` to compare them with.  One Trainer per process: Accelerate refuses a second
DeepSpeed ``Accelerator``.
"""

from __future__ import annotations

import json
import sys
import tempfile
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


def run(mode: str, world: int, tmp: str) -> dict[str, Any]:
    from transformers import TrainerCallback

    from hf_lars.integrations.transformers import LarsTrainer, LarsTrainingArguments

    lrs: list[float] = []
    engine_batches: list[list[int]] = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            lrs.append(float(trainer.optimizer.param_groups[0]["lr"]))
            engine = trainer.model_wrapped
            if hasattr(engine, "train_batch_size"):
                engine_batches.append([engine.train_batch_size(), engine.gradient_accumulation_steps()])

    extra: dict[str, Any] = {}
    if mode.startswith("zero"):
        extra = dict(deepspeed=ds_config(int(mode[-1])), accelerator_config={"use_configured_state": True})
    args = LarsTrainingArguments(
        **training_args(f"{tmp}/{mode}", max_steps=STEPS, logging_steps=1, max_grad_norm=0.0, optim="sgd",
                        learning_rate=LR, lr_scheduler_type="linear", per_device_train_batch_size=MICRO, **extra),
        lr_scaling="linear", lr_scaling_ref_batch=MICRO * world, batch_size_schedule=SCHEDULE,
    )
    data = GaussianData(sum(BATCHES) * 2, seed=41)
    trainer = LarsTrainer(model=GaussianGradModel(), args=args, train_dataset=data, callbacks=[Record()])
    trainer.train()
    params = list(trainer.model.parameters())
    if mode == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            weights = params[0].detach().double().clone().tolist()
    else:
        weights = params[0].detach().double().tolist()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    return {
        "lrs": lrs,
        "logged_lrs": [row["learning_rate"] for row in logs],
        "global_batches": [row["global_batch"] for row in logs],
        "samples": [row["train_samples"] for row in logs],
        "engine_batches": engine_batches,
        "weights": weights,
        "step_means": step_means(data.x, world),
        "world": world,
        "accumulation_arg": trainer.args.gradient_accumulation_steps,
    }


def main() -> None:
    args = parse_args(lambda p: p.add_argument("--mode", choices=["ddp", "zero1", "zero2", "zero3"], required=True))
    if args.mode.startswith("zero"):
        init_cpu_distributed_state(deepspeed=True)
    rank, world = init()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.mode, world, tmp)
    write(args.out, json.loads(json.dumps(result)))
    finish()


if __name__ == "__main__":
    main()
