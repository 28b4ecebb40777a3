"""DeepSpeed fp16 + ZeRO-2 on one GPU with AdamLARS and an initial loss scale that overflows.

DeepSpeed checks for overflow itself and skips ``optimizer.step()`` on overflow steps; this probe records
that the weights did not move on skipped steps and did afterwards.  Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn

from hf_lars import AdamLARS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29900 + os.getpid() % 90), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = AdamLARS(model.parameters(), lr=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 2},
        "fp16": {"enabled": True, "initial_scale_power": 40, "loss_scale_window": 1000, "hysteresis": 1},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    x = torch.randn(8, 16, device=engine.device, dtype=torch.half)
    unchanged_while_skipped, moved_after = True, False
    for _ in range(30):
        before = [p.detach().clone() for p in engine.module.parameters()]
        skipped_before = engine.skipped_steps
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        engine.step()
        same = all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
        if engine.skipped_steps > skipped_before:
            unchanged_while_skipped &= same
        else:
            moved_after |= not same
    result = {
        "skipped_steps": int(engine.skipped_steps),
        "unchanged_while_skipped": bool(unchanged_while_skipped),
        "moved_after": bool(moved_after),
        "finite": all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
