"""Shared pieces of the distributed test scripts (run under ``torchrun``, 2 processes; gloo on CPU, or NCCL).

The backend comes from ``HF_LARS_TEST_BACKEND`` (``gloo`` unless set; ``dist.launch.torchrun(...,
backend="nccl")`` sets it): under NCCL each rank uses GPU ``LOCAL_RANK`` (:func:`device`).

Every script: ``init()`` first, ``finish()`` last, from a frame that holds no model (a barrier before destroying the
process group: without it about one run in eight aborts at exit; see :func:`finish` for the model), results written
by rank 0 as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # appended: a PYTHONPATH entry (e.g. an installed checkout) wins
    sys.path.append(str(REPO))

MICRO_BATCH = 4  # per rank
IN_FEATURES = 7


def parse_args(extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def backend() -> str:
    """The process-group backend of this run: ``HF_LARS_TEST_BACKEND`` (``gloo`` or ``nccl``)."""
    name = os.environ.get("HF_LARS_TEST_BACKEND", "gloo")
    if name not in ("gloo", "nccl"):
        raise ValueError(f"HF_LARS_TEST_BACKEND={name!r}: use 'gloo' (CPU) or 'nccl' (one GPU per rank)")
    return name


def device() -> torch.device:
    """Where this rank's model and data live: GPU ``LOCAL_RANK`` under NCCL, else the CPU."""
    if backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_process_group(**kwargs: Any) -> None:
    """``dist.init_process_group`` with this run's backend (and, under NCCL, this rank's GPU selected)."""
    if backend() == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(backend(), **kwargs)


def init() -> tuple[int, int]:
    torch.set_num_threads(1)
    if not dist.is_initialized():
        init_process_group()
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return dist.get_rank(), dist.get_world_size()


def finish() -> None:
    """Close the process group once the models are gone: call it where no DDP model is still referenced.

    A DDP ``Reducer`` freed after ``destroy_process_group`` holds the last reference to the gloo group and frees it
    with the GIL held; the group's destructor then waits for a worker thread that waits for the GIL (a hang, about
    one loaded run in ten).  ``gc.collect()`` frees the models that reference cycles keep, while the group is
    still registered.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def write(path: str, payload: Any) -> None:
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(payload, indent=1, sort_keys=True))


class Net(nn.Module):
    """Odd sizes so that layers straddle ranks and every engine pads: 266 elements in 8 layers.

    ``head`` has one output row, so under FSDP2 rank 1 holds an empty shard of it, and its bias has one
    element, so under ZeRO-3 rank 1's partition of it is pure padding.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, 13)
        self.norm = nn.LayerNorm(13)
        self.fc2 = nn.Linear(13, 9)
        self.head = nn.Linear(9, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.norm(self.fc1(x))))))


class WideNet(nn.Module):
    """Layers with rows of different sizes, a zero-initialised matrix and a large block of 1-D layers.

    The 1-D parameters of the root module (``gain``, ``shift``: 304 elements; ``named_parameters`` lists
    them first) fill more than half of a one-group ZeRO-1/2 flat buffer, so with two ranks rank 0's
    partition holds pieces of excluded (1-D) layers only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, 11)
        self.norm = nn.LayerNorm(11)
        self.fc2 = nn.Linear(11, 6)
        self.zero = nn.Linear(6, 5)
        nn.init.zeros_(self.zero.weight)
        self.head = nn.Linear(5, 3, bias=False)
        self.gain = nn.Parameter(torch.ones(3) + 0.1 * torch.randn(3))
        self.shift = nn.Parameter(0.05 * torch.randn(301))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.fc1(x)))
        h = torch.tanh(self.zero(torch.tanh(self.fc2(h))))
        return self.head(h) * self.gain + self.shift[:3] + 0.01 * self.shift.sum()


class ScaledNet(Net):
    """``Net`` times a learned one-element scale (CLIP's ``logit_scale``), which gets a param group of its own.

    A one-element group sits entirely on rank 0 under ZeRO-1/2/3: the other ranks hold only padding.
    """

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full((1,), 0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.logit_scale.exp()


MODELS: dict[str, Callable[[], nn.Module]] = {"net": Net, "wide": WideNet, "scaled": ScaledNet}


def make_model(name: str = "net", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()


def global_batches(
    steps: int, world: int, seed: int = 1234, out_features: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same global batches on every rank: ``steps`` x (world * MICRO_BATCH) samples."""
    g = torch.Generator().manual_seed(seed)
    n = world * MICRO_BATCH
    return [(torch.randn(n, IN_FEATURES, generator=g), torch.randn(n, out_features, generator=g)) for _ in range(steps)]


def local_slice(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.float() - y).square().mean()


def param_groups(model: nn.Module, split: bool = True) -> list[dict[str, Any]]:
    """Groups the way Trainer builds them (matrices / 1-D; ``logit_scale`` alone), or one group with everything."""
    named = list(model.named_parameters())
    if not split:
        return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
    alone = [(n, p) for n, p in named if n == "logit_scale"]
    mats = [(n, p) for n, p in named if p.dim() > 1]
    vecs = [(n, p) for n, p in named if p.dim() <= 1 and n != "logit_scale"]
    return [
        {"params": [p for _, p in group], "param_names": [n for n, _ in group]}
        for group in (mats, vecs, alone)
        if group
    ]


def ds_config(
    stage: int, *, bf16: bool = False, sub_group_size: int | None = None, world: int = 2, **zero: Any
) -> dict[str, Any]:
    """A raw DeepSpeed config for the tests: no clipping (references do not clip), tiny buckets."""
    zero_cfg: dict[str, Any] = {"stage": stage, **zero}
    if stage in (1, 2):
        zero_cfg.setdefault("reduce_bucket_size", 64)
        zero_cfg.setdefault("allgather_bucket_size", 64)
    if stage == 3:
        zero_cfg.setdefault("sub_group_size", sub_group_size or 40)
        zero_cfg.setdefault("stage3_param_persistence_threshold", 20)
        zero_cfg.setdefault("reduce_bucket_size", 64)
        zero_cfg.setdefault("stage3_prefetch_bucket_size", 64)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO_BATCH * world,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero_cfg,
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def fsdp2_shard(model: nn.Module, offload: bool = False) -> nn.Module:
    """``fully_shard`` each child with parameters, then the root, over all ranks.

    ``offload``: FSDP2 CPU offload (``CPUOffloadPolicy``): the sharded parameters, their gradients and so the
    optimizer step live on the CPU, whatever the backend; memory is pinned only where there is a GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(device().type, (dist.get_world_size(),))
    model.to(device())
    kwargs: dict[str, Any] = {"mesh": mesh}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device().type == "cuda")
    for module in model.children():
        if any(True for _ in module.parameters()):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def clip_local_shards_(model: nn.Module, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for FSDP2 ``Shard(0)`` parameters whose shards may live on the CPU.

    Under NCCL with CPU offload torch's version all-reduces CPU tensors over a group without a CPU backend
    (users there create ``"cuda:nccl,cpu:gloo"``); this one sums the local shards' squares, all-reduces that
    one number on this rank's device and scales the local gradients with torch's coefficient.
    """
    grads = [p.grad.to_local() for p in model.parameters() if p.grad is not None]
    local = torch.stack([g.float().square().sum() for g in grads]).sum()
    total = local.to(device())
    dist.all_reduce(total)
    norm = total.sqrt().to(local.device)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)
    return norm


def full_state(model: nn.Module, engine: Any = None) -> dict[str, torch.Tensor]:
    """Full fp32 parameters on every rank, whatever the engine (ZeRO-3 gathers, DTensors are made full)."""
    from torch.distributed.tensor import DTensor

    if engine is not None and getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    if engine is not None and hasattr(engine, "optimizer") and hasattr(model.parameters().__next__(), "_hp_mapping"):
        # ZeRO-1/2 / bf16: read the fp32 masters (the bf16 model weights are rounded copies).
        out = {}
        for n, p in model.named_parameters():
            out[n] = p.get_full_hp_param() if hasattr(p, "get_full_hp_param") else p.detach().float().clone()
        return {n: t.detach().float().clone() for n, t in out.items()}
    out = {}
    for n, p in model.named_parameters():
        t = p.detach()
        if isinstance(t, DTensor):
            if t.to_local().device.type != t.device_mesh.device_type:  # CPU-offloaded shard: gather on the device
                t = DTensor.from_local(
                    t.to_local().to(device()), t.device_mesh, t.placements, shape=t.shape, stride=t.stride()
                )
            t = t.full_tensor()
        out[n] = t.float().cpu().clone()
    return out


@contextmanager
def watchdog(seconds: float, on_timeout: Callable[[], None]) -> Iterator[None]:
    """Call ``on_timeout`` (from a thread) and end the process if the block runs longer than ``seconds``.

    A collective that one rank skips leaves the others waiting forever (gloo's timeout does not fire
    once the ranks' collectives are mismatched); this turns such a hang into a prompt, reported failure.
    """
    import threading

    def fire() -> None:
        try:
            on_timeout()
        finally:
            os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@contextmanager
def count_all_reduce() -> Iterator[list[int]]:
    """Count ``torch.distributed.all_reduce`` calls (and their payload sizes) made inside the block."""
    calls: list[int] = []
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


def reference_model(name: str) -> nn.Module:
    return copy.deepcopy(make_model(name))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
