"""Gradient noise scale under 2-process DDP (gloo): a plain loop and Trainer.  Run by test_noise_scale_callback.py.

1. Plain DDP loop with gradient accumulation (``no_sync`` on the first micro-batch, ``auto_step`` on the last):
   every step's ``(|G_b|^2, |G_B|^2)`` against the exact values (mean over ranks and micro-batches of the
   micro-batch norm; the norm of the global mean), i.e. the hooks saw local un-reduced gradients and the big
   norm was taken after DDP's averaging.
2. Trainer (DDP through accelerate), ``b = 8``, accumulation 4, 2 processes (``B = 64``), 200 steps: ``b_noise``
   logged at the last step on both ranks (one all_reduce per logging step).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, init, parse_args, write  # noqa: E402
from ns_common import GaussianData, GaussianGradModel, expected_norms, training_args  # noqa: E402

from hf_lars.integrations.noise_scale import (  # noqa: E402
    GradientNoiseScaleCallback,
    GradientNoiseScaleMonitor,
    add_noise_scale_callback,
)


def plain_loop(rank: int, world: int) -> dict[str, object]:
    micro, accum, steps = 4, 2, 4
    model = GaussianGradModel()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    flag = {"sync": False}
    monitor = GradientNoiseScaleMonitor(model, micro, auto_step=lambda: flag["sync"], keep_history=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = GaussianData(steps * world * accum * micro, seed=11).x
    per_step = world * accum * micro
    expected = []
    for t in range(steps):
        xs = data[t * per_step : (t + 1) * per_step]
        local = xs[rank * accum * micro : (rank + 1) * accum * micro]
        for k in range(accum):
            flag["sync"] = k == accum - 1
            ctx = contextlib.nullcontext() if flag["sync"] else ddp.no_sync()
            with ctx:
                (ddp(local[k * micro : (k + 1) * micro])["loss"] / accum).backward()
        opt.step()
        opt.zero_grad()
        expected.append(expected_norms(xs, micro, accum, world))
    steps_recorded = monitor.pending_steps
    monitor.compute()
    monitor.detach()
    return {
        "loop_steps": steps_recorded,
        "loop_expected_steps": steps,
        "loop_norms": [[s, b] for s, _, b, _ in monitor.history],
        "loop_expected": [list(e) for e in expected],
        "loop_batches": [monitor.history[0][1], monitor.history[0][3]],
    }


def trainer_run(rank: int, world: int) -> dict[str, object]:
    from transformers import Trainer, TrainingArguments

    steps, accum, micro = 200, 4, 8
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            **training_args(tmp, max_steps=steps, gradient_accumulation_steps=accum, logging_steps=100)
        )
        trainer = Trainer(
            model=GaussianGradModel(), args=args, train_dataset=GaussianData(steps * accum * micro * world, seed=12)
        )
        callback = add_noise_scale_callback(trainer, GradientNoiseScaleCallback(keep_history=True))
        trainer.train()
    last = [row for row in trainer.state.log_history if "loss" in row][-1]
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, last.get("b_noise"))
    history = callback.monitor.history
    return {
        "trainer_b_noise": last.get("b_noise"),
        "trainer_b_noise_rank1": gathered[1],
        "trainer_grad_sq_norm": last.get("grad_sq_norm"),
        "trainer_batches": [history[0][1], history[0][3]],
    }


def main() -> None:
    args = parse_args()
    rank, world = init()
    result = plain_loop(rank, world)
    result.update(trainer_run(rank, world))
    write(args.out, result)
    finish()


if __name__ == "__main__":
    main()
