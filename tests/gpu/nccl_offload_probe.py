"""One process, one GPU: per-layer norms of CPU pieces all-reduced over a group made with ``--init``.

``nccl``: ``init_process_group("nccl")`` (the group has no CPU backend: the ZeRO-Offload crash);
``none``: ``init_process_group()`` (``get_backend`` says ``'undefined'``); ``cuda:nccl,cpu:gloo``.
``set_device`` is deliberately never called.  Writes JSON to ``--out``.  Run by tests/gpu/test_cuda.py.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from hf_lars.layout import Segment, StepLayout, TensorLayout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--init", choices=["nccl", "none", "cuda:nccl,cpu:gloo"], required=True)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + os.getpid() % 300), LOCAL_RANK="0")
    backend = None if args.init == "none" else args.init
    dist.init_process_group(backend=backend, rank=0, world_size=1)
    group = dist.group.WORLD
    layout = TensorLayout((Segment(0, 0, 6), Segment(1, 6, 4)), process_group=group, whole_rows=False)
    step = StepLayout([layout], num_layers=2, device=torch.device("cpu"))
    flat = torch.arange(10.0)
    norms = step.select([True, True]).norms(step.pieces([flat]), step.pieces([flat]))
    expected = torch.stack([flat[:6].norm(), flat[6:].norm()])
    empty = StepLayout([layout], num_layers=2, device=torch.device("cpu")).select([False, False]).norms([], [])
    result = {
        "backend": str(dist.get_backend(group)),
        "collective_device": str(step.collective_device(torch.device("cpu"))),
        "max_abs_err": float((norms - expected).abs().max()),
        "norms_device": str(norms.device),
        "empty_rank_ok": tuple(empty.shape) == (2, 0) and empty.device.type == "cpu",
    }
    dist.barrier()
    dist.destroy_process_group()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
