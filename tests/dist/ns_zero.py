"""Gradient noise scale under Trainer + DeepSpeed ZeRO (2 CPU processes, gloo).  Run by test_noise_scale_callback.py.

ZeRO never leaves the averaged gradient in ``p.grad``; the callback pairs each logging step's micro-batch norms
(parameter hooks, local gradients) with Trainer's logged pre-clip ``grad_norm`` (the engine's global norm).
With ``logging_steps=1`` every step gives a pair: each is checked against the exact values of the analytic
model (the batches each rank saw are reconstructed from accelerate's round-robin sharding).  Under ZeRO-3 the
parameter is partitioned (persistence threshold 0) and the result reports that it was.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, init, parse_args, write  # noqa: E402
from ns_common import DIM, GaussianData, GaussianGradModel, training_args  # noqa: E402

from hf_lars.integrations.accelerate import init_cpu_distributed_state  # noqa: E402
from hf_lars.integrations.noise_scale import GradientNoiseScaleCallback, add_noise_scale_callback  # noqa: E402

STEPS, ACCUM, MICRO = 60, 2, 8


def ds_config(stage: int) -> dict[str, object]:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        "steps_per_print": 10**9,
    }


def expected_pairs(x: torch.Tensor, world: int) -> list[tuple[float, float]]:
    """Per step: (mean over ranks and micro-batches of |g_micro|^2, |mean of all the step's examples|^2).

    Accelerate shards a map-style loader round-robin: global micro-batch ``j`` goes to rank ``j % world``; an
    optimizer step takes ``ACCUM`` consecutive micro-batches on each rank, i.e. ``ACCUM * world`` consecutive
    global micro-batches."""
    micro = x.double().reshape(-1, MICRO, DIM)
    out = []
    per_step = ACCUM * world
    for t in range(STEPS):
        chunk = micro[t * per_step : (t + 1) * per_step]
        out.append((chunk.mean(1).square().sum(1).mean().item(), chunk.reshape(-1, DIM).mean(0).square().sum().item()))
    return out


def run(stage: int, world: int, tmp: str) -> dict[str, object]:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        **training_args(
            tmp, max_steps=STEPS, gradient_accumulation_steps=ACCUM, logging_steps=1, deepspeed=ds_config(stage),
            accelerator_config={"use_configured_state": True}, max_grad_norm=1e-3,
        )
    )
    data = GaussianData(STEPS * ACCUM * MICRO * world, seed=21)
    trainer = Trainer(model=GaussianGradModel(), args=args, train_dataset=data)
    callback = add_noise_scale_callback(trainer, GradientNoiseScaleCallback(keep_history=True))
    trainer.train()
    last = [row for row in trainer.state.log_history if "loss" in row][-1]
    history = callback.monitor.history
    # ZeRO-3: the parameter really was partitioned (each rank holds half of it outside forward/backward)
    partitioned = [p.ds_tensor.numel() < p.ds_numel for p in trainer.model.parameters() if hasattr(p, "ds_tensor")]
    return {
        "partitioned": partitioned,
        "pairs": [[s, b] for s, _, b, _ in history],
        "expected": [list(p) for p in expected_pairs(data.x, world)],
        "batches": [history[0][1], history[0][3]] if history else None,
        "b_noise": last.get("b_noise"),
    }


def main() -> None:
    args = parse_args(lambda p: p.add_argument("--stage", type=int, required=True))
    init_cpu_distributed_state(deepspeed=True)
    rank, world = init()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.stage, world, tmp)
    write(args.out, json.loads(json.dumps(result)))
    finish()


if __name__ == "__main__":
    main()
