"""``--lr_scaling_online`` under Trainer + DeepSpeed ZeRO-1/2/3 (2 CPU processes, gloo).  Run by test_online_lr.py.

The analytic model of ``ns_common`` has per-example gradient ``x_i`` whatever the weights, so plain SGD
without clipping moves the weights by exactly ``-sum_t lr_t G_t`` (``G_t`` the mean of step ``t``'s global
batch, reconstructed from accelerate's round-robin sharding).  Each stage trains with an injected ``b_noise``
trajectory (``--injected``) or the real measurement (``b_noise`` from Trainer's logged ``grad_norm``); the result
holds the LR the engine's optimizer groups had at every step, the logged factors and ``b_noise``, and the final
weights (gathered under ZeRO-3) to compare with ``-sum_t lr_t G_t``.  One Trainer per process: Accelerate
refuses a second DeepSpeed ``Accelerator``.
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
from hf_lars.integrations.noise_scale import GradientNoiseScaleCallback  # noqa: E402

STEPS, ACCUM, MICRO, LR, REF_BATCH = 6, 2, 8, 0.05, 8
INJECTED = [20.0, 80.0, None, 400.0, 40.0, 100.0]


def _inject(values: list[float | None]) -> None:
    feed = iter(values)
    original = GradientNoiseScaleCallback.training_log_stats

    def stats(self: GradientNoiseScaleCallback, state: Any, logs: Any, **kwargs: Any) -> dict[str, float]:
        original(self, state, logs, **kwargs)  # the monitor still runs
        value = next(feed)
        return {} if value is None else {"b_noise": value}

    GradientNoiseScaleCallback.training_log_stats = stats  # type: ignore[method-assign]


def step_means(x: torch.Tensor, world: int) -> list[list[float]]:
    """``G_t`` per step: the mean of the step's ``ACCUM * world`` consecutive global micro-batches."""
    micro = x.double().reshape(-1, MICRO, DIM)
    per_step = ACCUM * world
    return [micro[t * per_step : (t + 1) * per_step].reshape(-1, DIM).mean(0).tolist() for t in range(STEPS)]


def run(stage: int, world: int, tmp: str, injected: bool) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import hf_lars

    hf_lars.register()
    original_stats = GradientNoiseScaleCallback.training_log_stats
    if injected:
        _inject(INJECTED)
    lrs: list[float] = []

    class RecordLr(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            lrs.append(float(trainer.optimizer.param_groups[0]["lr"]))

    try:
        args = TrainingArguments(
            **training_args(
                f"{tmp}/{stage}-{injected}", max_steps=STEPS, gradient_accumulation_steps=ACCUM, logging_steps=1,
                deepspeed=ds_config(stage), accelerator_config={"use_configured_state": True}, max_grad_norm=0.0,
                optim="sgd", learning_rate=LR, lr_scheduler_type="linear",
            ),
            lr_scaling="surge", lr_scaling_ref_batch=REF_BATCH, lr_scaling_online=True, lr_scaling_max_factor=8.0,
            b_noise_start_step=0,
        )
        data = GaussianData(STEPS * ACCUM * MICRO * world, seed=31)
        trainer = Trainer(model=GaussianGradModel(), args=args, train_dataset=data, callbacks=[RecordLr()])
        trainer.train()
    finally:
        GradientNoiseScaleCallback.training_log_stats = original_stats  # type: ignore[method-assign]
    params = list(trainer.model.parameters())
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            weights = params[0].detach().double().clone().tolist()
    else:
        weights = params[0].detach().double().tolist()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    return {
        "lrs": lrs,
        "logged_lrs": [row["learning_rate"] for row in logs],
        "factors": [row.get("lr_factor") for row in logs],
        "b_noise": [row.get("b_noise") for row in logs],
        "weights": weights,
        "step_means": step_means(data.x, world),
        "global_batch": MICRO * ACCUM * world,
        "scheduler": type(trainer.lr_scheduler).__name__,
    }


def main() -> None:
    args = parse_args(lambda p: (p.add_argument("--stage", type=int, required=True),
                                 p.add_argument("--injected", action="store_true")))
    init_cpu_distributed_state(deepspeed=True)
    rank, world = init()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.stage, world, tmp, injected=args.injected)
    write(args.out, json.loads(json.dumps(result)))
    finish()


if __name__ == "__main__":
    main()
