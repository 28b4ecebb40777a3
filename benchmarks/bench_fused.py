"""Time and memory of the fused step (``fused=True``) against the eager step and torch's fastest optimizers.

    python benchmarks/bench_fused.py [--params-millions 23] [--steps 25] [--threads 1] [--markdown PATH]
    python benchmarks/bench_fused.py --memory [--dtype bf16] [--no-fused]   # transient peak, fresh processes

Time: every contender steps the same parameter shapes (``bench_step.gpt2_like_shape``: the ``hf-lars
bench`` shapes), round-robin in rotating order within the same rounds; each row is the median over the
timed rounds (CUDA: ``torch.cuda.synchronize()`` around each step).  Baselines are torch's SGD(momentum=0.9)
and AdamW at every setting the device supports (for-loop, foreach, fused); ratios are to the fastest of
them.  Ours: ``eager`` (what ``foreach=None`` picks), ``foreach`` (memory only: the eager foreach path
whatever the device) and ``fused``; the fused rows report the compile time
(the first step's wall time, from ``hf_lars.optim.fused.compile_stats``).

Memory (``--memory``): each (optimizer, implementation) runs in a fresh process: parameters and gradients
are made, one step creates the state (and compiles), then the peak resident set is reset
(``/proc/self/clear_refs``, after ``malloc_trim`` returns the first step's freed memory) and one more step
is taken; the row is the peak beyond the resident set before
that step (CUDA: ``torch.cuda.max_memory_allocated`` beyond the allocated bytes).  State bytes are counted
from the optimizer's state tensors.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bench_step import gpt2_like_shape, make_params  # the shapes of bench_step.py (this folder is on sys.path)

from hf_lars import LARS, AdamLARS, RangerLARS
from hf_lars.optim import fused as fused_mod

_OURS: dict[str, tuple[type, dict[str, Any], str]] = {
    "LARS": (LARS, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}, "SGD"),
    "AdamLARS": (AdamLARS, {"lr": 1e-3}, "AdamW"),
    "RangerLARS": (RangerLARS, {"lr": 1e-3}, "AdamW"),
}
_TARGETS = {"LARS": 1.3, "AdamLARS": 1.5, "RangerLARS": 1.7}


def _torch_settings(device: torch.device) -> list[dict[str, bool]]:
    settings = [{"foreach": False}, {"foreach": True}]
    probe = [torch.nn.Parameter(torch.zeros(2, device=device))]
    try:
        torch.optim.SGD(probe, lr=0.1, fused=True)
        settings.append({"fused": True})
    except (RuntimeError, ValueError):
        pass
    return settings


def _make(name: str, impl: str, named: list[tuple[str, torch.Tensor]]) -> torch.optim.Optimizer:
    params = [p for _, p in named]
    if name == "SGD":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, **json.loads(impl))
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-3, **json.loads(impl))
    cls, kwargs = _OURS[name][:2]
    if impl == "foreach":  # the eager foreach path, whatever the device would pick
        return cls(named, **kwargs, foreach=True)
    return cls(named, **kwargs, fused=impl == "fused")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def time_all(params_millions: float, steps: int, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Median step time of every contender (see the module docstring)."""
    shape = gpt2_like_shape(params_millions)
    contenders: list[tuple[str, str]] = []
    for name in ("SGD", "AdamW"):
        contenders += [(name, json.dumps(s)) for s in _torch_settings(device)]
    for name in _OURS:
        contenders += [(name, "eager"), (name, "fused")]
    runs = []
    for name, impl in contenders:
        named, grads = make_params(shape)
        named = [(n, torch.nn.Parameter(p.detach().to(device=device, dtype=dtype))) for n, p in named]
        for (_, p), g in zip(named, grads):
            p.grad = g.to(device=device, dtype=dtype)
        opt = _make(name, impl, named)
        before = fused_mod.compile_stats()["seconds"]
        start = time.perf_counter()
        opt.step()  # state creation (and compilation) outside the timed rounds
        _sync(device)
        first = time.perf_counter() - start
        compile_s = fused_mod.compile_stats()["seconds"] - before if impl == "fused" else 0.0
        runs.append({"name": name, "impl": impl, "opt": opt, "times": [], "compile_s": compile_s, "first_s": first})
    for r in range(steps + 2):
        order = runs[r % len(runs):] + runs[: r % len(runs)]
        for run in order:
            _sync(device)
            start = time.perf_counter()
            run["opt"].step()
            _sync(device)
            if r >= 2:
                run["times"].append(time.perf_counter() - start)
    out = []
    for run in runs:
        out.append({
            "name": run["name"], "impl": run["impl"], "median_ms": 1e3 * statistics.median(run["times"]),
            "compile_s": run["compile_s"], "state_bytes": _state_bytes(run["opt"]),
            "params": shape.num_params, "tensors": shape.num_tensors,
        })
    return out


def _memory_one(name: str, impl: str, params_millions: float, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Transient peak of one step beyond what is resident before it (run in a fresh process)."""
    shape = gpt2_like_shape(params_millions)
    named, grads = make_params(shape)
    named = [(n, torch.nn.Parameter(p.detach().to(device=device, dtype=dtype))) for n, p in named]
    for (_, p), g in zip(named, grads):
        p.grad = g.to(device=device, dtype=dtype)
    del grads
    opt = _make(name, impl, named)
    opt.step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the first step's freed temporaries back to the OS
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set (VmHWM)
            f.write("5")
        base = _proc_status("VmRSS")
        opt.step()
        peak = _proc_status("VmHWM") - base
    return {"name": name, "impl": impl, "peak_bytes": peak, "state_bytes": _state_bytes(opt),
            "param_bytes": sum(p.numel() * p.element_size() for _, p in named)}


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_all(params_millions: float, dtype_name: str, threads: int, no_fused: bool = False) -> list[dict[str, Any]]:
    rows = []
    contenders = [("SGD", json.dumps(s)) for s in _torch_settings(torch.device(_device()))]
    contenders += [("AdamW", json.dumps(s)) for s in _torch_settings(torch.device(_device()))]
    ours = ("eager", "foreach") if no_fused else ("eager", "foreach", "fused")
    contenders += [(n, impl) for n in _OURS for impl in ours]
    # A fixed mmap threshold: glibc then maps every allocation above 64 KiB on its own and unmaps it when freed,
    # so the resident set follows the live tensors (with its default, a dynamic threshold, freed temporaries of
    # a few MB stay resident and are counted in the peak of whichever step comes next).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name, impl in contenders:
        cmd = [sys.executable, __file__, "--memory-one", name, impl, "--params-millions", str(params_millions),
               "--dtype", dtype_name, "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _label(row: dict[str, Any]) -> str:
    impl = row["impl"]
    if impl.startswith("{"):
        impl = ", ".join(f"{k}" for k, v in json.loads(impl).items() if v) or "for-loop"
    return f"{row['name']} ({impl})"


def render_time(rows: list[dict[str, Any]], threads: int) -> str:
    fastest = {b: min(r["median_ms"] for r in rows if r["name"] == b) for b in ("SGD", "AdamW")}
    lines = [f"{rows[0]['params'] / 1e6:.1f}M parameters in {rows[0]['tensors']} tensors, {threads} thread(s), "
             f"device {_device()}, torch {torch.__version__}", "",
             "| optimizer | step ms | x torch's fastest | target | compile s | state MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = "SGD" if r["name"] in ("SGD", "LARS") else "AdamW"
        ratio = r["median_ms"] / fastest[base]
        target = f"<= {_TARGETS[r['name']]}" if r["name"] in _TARGETS and r["impl"] == "fused" else ""
        comp = f"{r['compile_s']:.0f}" if r["impl"] == "fused" else ""
        lines.append(f"| {_label(r)} | {r['median_ms']:.1f} | {ratio:.2f} | {target} | {comp} | "
                     f"{r['state_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)


def render_memory(rows: list[dict[str, Any]], dtype_name: str) -> str:
    lines = [f"Parameters {dtype_name} ({rows[0]['param_bytes'] / 1e6:.0f} MB); transient peak of one step beyond "
             "the resident set before it", "", "| optimizer | transient peak MB | state MB |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {_label(r)} | {r['peak_bytes'] / 1e6:.0f} | {r['state_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-millions", type=float, default=23.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    parser.add_argument("--memory", action="store_true", help="transient peak memory, one fresh process each")
    parser.add_argument("--memory-one", nargs=2, metavar=("NAME", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--no-fused", action="store_true", help="--memory: leave out the fused rows (no compile)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(_device()), _DTYPES[args.dtype]
    if args.memory_one:
        print(json.dumps(_memory_one(*args.memory_one, args.params_millions, device, dtype)))
        return 0
    if args.memory:
        text = render_memory(memory_all(args.params_millions, args.dtype, args.threads, args.no_fused), args.dtype)
    else:
        text = render_time(time_all(args.params_millions, args.steps, device, dtype), args.threads)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
