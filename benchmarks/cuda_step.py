"""optimizer.step() on one CUDA GPU: time and kernel launches, ours against torch's SGD/AdamW (foreach, fused).

    python benchmarks/cuda_step.py [--blocks 24] [--width 1024] [--steps 20] [--dtype fp32|bf16] [--markdown PATH]

A Llama-like parameter set (embedding, ``blocks`` x (q, k, v, o, gate, up, down, two norms), final norm,
head).  Time: median of ``--steps`` steps with CUDA events after warm-up.  Launches: CUDA kernels per step
counted with ``torch.profiler`` (what ``tests/launch_counter.py`` estimates on the CPU).  Needs CUDA.
NOT YET RUN ON A GPU (written on a CPU-only machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from hf_lars import LARS, AdamLARS, RangerLARS

MAKERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "torch SGD foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "torch SGD fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    "LARS foreach": lambda ps: LARS(ps, lr=0.1, weight_decay=1e-4, foreach=True),
    "LARS per-tensor": lambda ps: LARS(ps, lr=0.1, weight_decay=1e-4, foreach=False),
    "AdamLARS foreach": lambda ps: AdamLARS(ps, foreach=True),
    "AdamLARS per-tensor": lambda ps: AdamLARS(ps, foreach=False),
    "RangerLARS foreach": lambda ps: RangerLARS(ps, foreach=True),
    "RangerLARS per-tensor": lambda ps: RangerLARS(ps, foreach=False),
}


def llama_like(blocks: int, width: int, dtype: torch.dtype) -> list[nn.Parameter]:
    d, vocab = width, 8 * width
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(blocks):
        shapes += [(d, d)] * 4 + [(4 * d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]
    shapes += [(d,), (vocab, d)]
    params = [nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def measure(name: str, blocks: int, width: int, steps: int, dtype: torch.dtype) -> tuple[float, int]:
    """(median ms per step, CUDA kernels per step)."""
    params = llama_like(blocks, width, dtype)
    opt = MAKERS[name](params)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    kernels = sum(
        e.count
        for e in prof.key_averages()
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and not e.key.startswith("Memcpy")
    )
    del opt, params
    torch.cuda.empty_cache()
    return statistics.median(times), kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_step.py needs CUDA", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    n_params = sum(p.numel() for p in llama_like(args.blocks, args.width, dtype))
    torch.cuda.empty_cache()
    lines = [
        f"### optimizer.step() on {torch.cuda.get_device_name()} ({args.dtype}, {9 * args.blocks + 3} tensors, "
        f"{n_params / 1e6:.0f}M parameters)",
        "",
        "| optimizer | ms / step | CUDA kernels / step |",
        "|---|---:|---:|",
    ]
    for name in MAKERS:
        ms, kernels = measure(name, args.blocks, args.width, args.steps, dtype)
        lines.append(f"| {name} | {ms:.2f} | {kernels} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.markdown is not None:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
