"""Step time of the exact sharded path vs the naive one vs unsharded, 2 CPU processes (gloo).

For ZeRO-2, ZeRO-3 and FSDP2 and each optimizer, three runs on the same model:

* ``exact``: hf_lars as shipped: per-layer norms from :mod:`hf_lars.sharding` layouts, one all-reduce;
* ``naive``: :func:`hf_lars.sharding.tensor_layouts` replaced by "each flat partition / local shard is one
  layer" (what other LAMB/LARS implementations do: local norms, no collective; numerically wrong);
* ``unsharded``: the optimizer on the plain model in every process (DDP-like: each rank steps every
  parameter), no engine.

Timed: the optimizer's ``step()`` (the part the layouts change; wrapped on the instance, so under ZeRO it
covers each per-group / per-sub-group call; ranks are lined up by an untimed barrier first), the time spent
inside ``torch.distributed.all_reduce`` during those calls (the exact path's one collective per group, and
RangerLARS's cut-row sums under ZeRO; it includes waiting for the other rank), and the whole training step
(forward, backward, engine step; includes those barriers for all three runs).
Exact and naive engines live side by side and are stepped alternately so both see the same machine load.
Medians over ``--steps`` steps after ``--warmup``; the load average is printed before and after (the
machine may be shared: compare ratios, not milliseconds, across runs).

Usage:  python benchmarks/bench_sharded.py            (launches itself with torchrun --nproc_per_node 2)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from hf_lars import LARS, AdamLARS, RangerLARS  # noqa: E402
from recipes._naive_layout import naive_layouts  # noqa: E402

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "LARS": (LARS, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
    "AdamLARS": (AdamLARS, {"lr": 1e-3, "weight_decay": 1e-2}),
    "RangerLARS": (RangerLARS, {"lr": 1e-3, "weight_decay": 1e-2}),
}
MICRO_BATCH = 16


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.norm(self.lin(x)))


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(width) for _ in range(depth)], nn.Linear(width, 10))


class Timed:
    """Wraps ``optimizer.step`` (the instance attribute an engine calls) and records its wall time.

    A barrier (not timed) lines the ranks up first: otherwise the exact path's all-reduce would absorb
    the ranks' skew from backward, which the naive path pays later, inside DeepSpeed's all-gather.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, sync: bool) -> None:
        self.optimizer, self._step, self.sync = optimizer, optimizer.step, sync
        self.times: list[float] = []
        self.all_reduce_times: list[float] = []  # per step() call: seconds inside dist.all_reduce
        optimizer.step = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.sync:
            dist.barrier()
        original, spent = dist.all_reduce, [0.0]

        def timed_all_reduce(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t

        dist.all_reduce = timed_all_reduce
        t0 = time.perf_counter()
        try:
            out = self._step(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - t0)
            dist.all_reduce = original
        self.all_reduce_times.append(spent[0])
        return out

    def clear(self) -> None:
        self.times.clear()
        self.all_reduce_times.clear()


class Runner:
    """One training setup: ``step()`` runs one training step and returns its wall time."""

    def __init__(self, kind: str, opt_name: str, args: argparse.Namespace, naive: bool = False) -> None:
        cls, kwargs = OPTIMIZERS[opt_name]
        model = make_model(args.width, args.depth)
        self.kind = kind
        if kind == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for block in model:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        params: Any = list(model.named_parameters())
        if args.groups == "blocks":  # one param group per block, as layer-wise LR decay builds them
            params = [{"params": list(child.named_parameters())} for child in model]
        opt = cls(params, **kwargs, foreach=args.foreach, fused=True if args.fused else None)
        self.timer = Timed(opt, sync=True)
        if kind.startswith("zero"):
            import deepspeed

            config = {
                "train_micro_batch_size_per_gpu": MICRO_BATCH,
                "gradient_accumulation_steps": 1,
                "train_batch_size": MICRO_BATCH * dist.get_world_size(),
                "gradient_clipping": 0.0,
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
                "zero_optimization": {"stage": int(kind[-1]), "sub_group_size": args.sub_group_size},
            }
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            self.model = self.engine
        else:
            self.engine, self.model, self.opt = None, model, opt
        g = torch.Generator().manual_seed(1 + dist.get_rank())
        self.x = torch.randn(MICRO_BATCH, args.width, generator=g)
        self.y = torch.randint(0, 10, (MICRO_BATCH,), generator=g)
        self.total: list[float] = []
        with naive_layouts(enabled=naive):
            self.step()  # the first step builds (and caches) the layouts
        self.timer.clear()
        self.total.clear()

    def step(self) -> None:
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.total.append(time.perf_counter() - t0)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def bench(kind: str, opt_name: str, args: argparse.Namespace) -> dict[str, float]:
    runners = {"exact": Runner(kind, opt_name, args), "naive": Runner(kind, opt_name, args, naive=True)}
    runners["unsharded"] = Runner("plain", opt_name, args)
    for _ in range(args.warmup):
        for r in runners.values():
            r.step()
    for r in runners.values():
        r.timer.clear()
        r.total.clear()
    for _ in range(args.steps):
        for r in runners.values():  # interleaved: the same machine load for all three
            r.step()
    out = {}
    for name, r in runners.items():
        # per training step: all the optimizer.step() calls the engine made in it
        calls = len(r.timer.times) // args.steps
        per_step = [sum(r.timer.times[i * calls : (i + 1) * calls]) for i in range(args.steps)]
        in_all_reduce = [sum(r.timer.all_reduce_times[i * calls : (i + 1) * calls]) for i in range(args.steps)]
        out[f"{name}_opt_ms"] = median_ms(per_step)
        out[f"{name}_all_reduce_ms"] = median_ms(in_all_reduce)
        out[f"{name}_total_ms"] = median_ms(r.total)
        r.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sub-group-size", type=int, default=400_000, help="ZeRO-3 sub-group size (elements)")
    parser.add_argument("--engines", default="zero2,zero3,fsdp2")
    parser.add_argument(
        "--foreach",
        choices=["auto", "on", "off"],
        default="auto",
        help="the optimizers' foreach flag (auto: their default, the per-tensor loop on CPU)",
    )
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument(
        "--groups", choices=["one", "blocks"], default="one",
        help="one param group, or one per block (depth + 1 groups: layer-wise LR decay's shape)",
    )
    parser.add_argument(
        "--fused", action="store_true", help="fused=True for all three runs (compiles per run: minutes on 2 cores)"
    )
    args = parser.parse_args()
    if args.fused and args.foreach != "auto":
        parser.error("--fused and --foreach on/off are two implementations; give one")
    args.foreach = {"auto": None, "on": True, "off": False}[args.foreach]
    if "RANK" not in os.environ:  # launch ourselves on 2 processes
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            __file__,
            *sys.argv[1:],
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        sys.exit(subprocess.call(cmd, env=env))
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    load_before = os.getloadavg()
    n_params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
    rows = []
    for kind in args.engines.split(","):
        for opt_name in args.optimizers.split(","):
            r = bench(kind, opt_name, args)
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, r)
            # the slowest rank sets the pace
            rows.append((kind, opt_name, {k: max(g[k] for g in gathered) for k in r}))
    if rank == 0:
        layers = 3 * args.depth + 2
        print(
            f"\nhf_lars sharded step time: {n_params / 1e6:.2f}M parameters in {layers} layers, 2 CPU processes "
            f"(gloo), batch {MICRO_BATCH}/rank, median of {args.steps} steps (ms; slowest rank)\n"
        )
        print(f"load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, "
              f"after: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}\n")
        head = (
            f"{'engine':7} {'optimizer':11} | {'optimizer step()':^50} | {'training step':^32}\n"
            f"{'':7} {'':11} | {'unsharded':>9} {'naive':>8} {'exact':>8} {'all-red.':>8} {'exact/naive':>12} | "
            f"{'naive':>8} {'exact':>8} {'exact/naive':>12}"
        )
        print(head)
        print("-" * len(head.splitlines()[1]))
        for kind, opt_name, r in rows:
            opt_ratio = r["exact_opt_ms"] / r["naive_opt_ms"]
            total_ratio = r["exact_total_ms"] / r["naive_total_ms"]
            print(
                f"{kind:7} {opt_name:11} | {r['unsharded_opt_ms']:9.2f} {r['naive_opt_ms']:8.2f} "
                f"{r['exact_opt_ms']:8.2f} {r['exact_all_reduce_ms']:8.2f} {opt_ratio:11.3f}x | "
                f"{r['naive_total_ms']:8.2f} {r['exact_total_ms']:8.2f} {total_ratio:11.3f}x"
            )
        print("\nunsharded: every process steps all parameters (DDP-like), no engine, not timed as a training step.")
        print("all-red.: of the exact step(), the time inside torch.distributed.all_reduce (waiting included).")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
