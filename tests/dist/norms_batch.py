"""One all-reduce per ``step()`` under FSDP2 with several adapted groups, bit-identical to one per group.

For each optimizer and implementation (per-tensor, foreach), the same FSDP2 model (the ``scaled`` model's
three Trainer-style groups, all adapted: ``adapt_excluded=True``; rank 1 holds an empty shard of the
one-element ``logit_scale`` group) is trained twice: with the batched step (``layout.NormsBatch``) and with it
switched off (one all-reduce per group, the path every earlier release took).  A GradScaler-style skipped
step (``found_inf`` = 1 on the device) comes in the middle.  Recorded per case: whether the final weights,
the optimizer state and the last trust ratios are bitwise equal between the two runs, whether the skipped
step left weights and state bitwise unchanged, and the all-reduce calls per ``step()`` of each run.

Usage: torchrun --nproc_per_node 2 tests/dist/norms_batch.py --out result.json
"""

from __future__ import annotations

import traceback
from typing import Any

import _common as C
import torch
import torch.distributed as dist
from torch import Tensor

import hf_lars.layout.norms_batch as norms_batch
from hf_lars import LARS, AdamLARS, RangerLARS

STEPS = 8  # RangerLARS: 5 unrectified steps, then 3 that move the weights (k=3: one Lookahead sync)
SKIPPED = 6  # the step whose found_inf is 1
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "lars": (LARS, {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-2, "trust_coefficient": 0.02}),
    "adam_lars": (AdamLARS, {"lr": 1e-2, "weight_decay": 1e-2}),
    "ranger_lars": (RangerLARS, {"lr": 1e-2, "weight_decay": 1e-2, "k": 3}),
}


def local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[Tensor]:
    out = [local(p.detach()).clone() for p in model.parameters()]
    for p in model.parameters():
        out += [local(v).clone() for _, v in sorted(opt.state[p].items()) if isinstance(v, Tensor)]
    return out


def train(opt_name: str, foreach: bool, batched: bool, rank: int, world: int) -> dict[str, Any]:
    cls, kwargs = OPTIMIZERS[opt_name]
    model = C.fsdp2_shard(C.make_model("scaled"))
    opt = cls(C.param_groups(model, split=True), **kwargs, adapt_excluded=True, foreach=foreach)
    shared = norms_batch.NormsBatch.shared
    if not batched:  # the per-group path: no process group is ever shared
        norms_batch.NormsBatch.shared = staticmethod(lambda process_groups: None)  # type: ignore[method-assign]
    calls, skip_kept = [], None
    try:
        for step, (x, y) in enumerate(C.global_batches(STEPS, world)):
            x, y = C.local_slice((x, y), rank)
            C.loss_fn(model(x), y).backward()
            skipped = step == SKIPPED
            before = snapshot(model, opt) if skipped else None
            with C.count_all_reduce() as made:
                opt.step(found_inf=torch.ones(()) if skipped else None)
            calls.append(len(made))
            if before is not None:
                skip_kept = all(torch.equal(a, b) for a, b in zip(before, snapshot(model, opt)))
            opt.zero_grad(set_to_none=True)
    finally:
        norms_batch.NormsBatch.shared = shared  # type: ignore[method-assign]
    ratios = {k: v.clone() for k, v in opt.trust_ratios().items()}
    return {"state": snapshot(model, opt), "ratios": ratios, "calls": calls, "skip_kept": skip_kept,
            "groups": len(opt.param_groups)}


def main() -> None:
    args = C.parse_args()
    rank, world = C.init()
    results: dict[str, Any] = {"world": world, "cases": {}}
    for opt_name in OPTIMIZERS:
        for foreach in (False, True):
            key = f"{opt_name}/{'foreach' if foreach else 'per_tensor'}"
            record: dict[str, Any] = {}
            try:
                a = train(opt_name, foreach, True, rank, world)
                b = train(opt_name, foreach, False, rank, world)
                record = {
                    "calls_batched": a["calls"],
                    "calls_per_group": b["calls"],
                    "groups": a["groups"],
                    "equal_state": all(torch.equal(x, y) for x, y in zip(a["state"], b["state"])),
                    "equal_ratios": a["ratios"].keys() == b["ratios"].keys()
                    and all(torch.equal(a["ratios"][k], b["ratios"][k]) for k in a["ratios"]),
                    "ratios": len(a["ratios"]),
                    "skip_kept": [a["skip_kept"], b["skip_kept"]],
                    # the weights moved between the first snapshot and the end: the comparison is not void
                    "moved": max(float((x - y).norm()) for x, y in zip(a["state"], train_init(opt_name))),
                }
            except Exception as err:
                record["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}"
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, record)
            results["cases"][key] = gathered
            C.write(args.out, results)
    C.finish()


def train_init(opt_name: str) -> list[Tensor]:
    """This rank's initial local weights (no state yet: compared with the weights part of a snapshot)."""
    model = C.fsdp2_shard(C.make_model("scaled"))
    return [local(p.detach()).clone() for p in model.parameters()]


if __name__ == "__main__":
    main()
