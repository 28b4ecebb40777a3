"""Where the all-reduce of per-layer partial sums runs: the collective-device rule.

Part of the layout contract (:mod:`hf_lars.layout`, which re-exports both functions), in its own module for
size: :meth:`hf_lars.layout.StepLayout.collective_device` asks :func:`collective_device` once per layout and
local device (docs/design.md, "Layers, pieces and one all-reduce", "The collective's device").  Imports only
torch and the standard library.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["collective_device", "group_device_types"]


def group_device_types(group: Any) -> list[str]:
    """The device types ``group`` has a backend for, e.g. ``["cuda", "cpu"]`` for ``"cuda:nccl,cpu:gloo"``.

    Read from the group itself (``ProcessGroup._device_types``, what
    ``torch.distributed.distributed_c10d._device_capability`` returns), which is right for every way of
    creating a group: ``backend="nccl"`` (cuda), ``"gloo"`` (cpu and cuda), ``"cuda:nccl,cpu:gloo"``, and no
    backend at all (``get_backend`` then says ``'undefined'`` and the group has the default backend of
    every available device type).  Falls back to parsing ``get_backend(group)`` for objects without it.
    """
    types = getattr(group, "_device_types", None)
    if types:
        return [torch.device(t).type for t in types]
    import torch.distributed as dist

    name = str(dist.get_backend(group)).lower()
    out: list[str] = []
    for part in name.split(","):
        device, _, backend = part.strip().rpartition(":")
        if device:
            out.append(device)
        elif backend == "nccl":
            out.append("cuda")
        elif backend == "gloo":
            out += ["cpu", "cuda"]
        elif backend in ("mpi", "ucc"):
            out.append("cpu")
    if not out:
        raise ValueError(
            f"hf_lars: cannot tell which devices process group {group!r} (backend {name!r}) supports; create it "
            "with an explicit backend (init_process_group(backend='nccl') or 'cuda:nccl,cpu:gloo')."
        )
    return out


def collective_device(group: Any, local: torch.device) -> torch.device:
    """The device to all-reduce per-layer partial sums made on ``local`` over ``group``.

    The rule (docs/design.md, "Layers, pieces and one all-reduce"): the pieces' own device when the group
    has a backend for its type (no copy); otherwise the group's accelerator, with the index from, in turn,
    the group's bound device (``init_process_group(device_id=...)``), ``LOCAL_RANK`` (torchrun, deepspeed
    and accelerate set it; right even when the script never called ``set_device``), then the current
    device; otherwise the CPU.  Every rank of a run keeps its stepped tensors on the same device type, so
    every rank, one that holds no piece included (it passes the stepped tensors' device), picks the same
    device type and joins the same backend.
    """
    local = torch.device(local)
    types = group_device_types(group)
    if local.type in types:
        return local
    accelerators = [t for t in types if t != "cpu"]
    if not accelerators:
        return torch.device("cpu")
    kind = accelerators[0]
    bound = getattr(group, "bound_device_id", None)
    if bound is not None and torch.device(bound).type == kind and torch.device(bound).index is not None:
        return torch.device(bound)
    module = getattr(torch, kind, None)
    count = module.device_count() if module is not None and hasattr(module, "device_count") else 0
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and local_rank.isdigit() and int(local_rank) < max(count, 1):
        return torch.device(kind, int(local_rank))
    if module is not None and hasattr(module, "current_device") and count > 0:
        return torch.device(kind, module.current_device())
    return torch.device(kind, 0)
