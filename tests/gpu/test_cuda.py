"""The optimizers on one CUDA GPU: sync-free steps, GPU == CPU, bf16, GradScaler, CUDA graphs, NCCL offload,
and the fused step (``fused=True``): equal to the eager step, sync-free, generated as Triton kernels.

Skipped without CUDA (marked ``gpu``); ``scripts/gpu_check.sh`` runs them with the NCCL variants of the
distributed tests and the step benchmark.  NOT YET RUN ON A GPU: written and reviewed on a CPU-only machine
(their CPU halves are in ``tests/test_gpu_readiness.py`` and ``tests/test_launch_counts.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from hf_lars import LARS, AdamLARS, RangerLARS
from optim_cases import assert_close_scaled

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOL = 1e-5
STEPS = 10

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "LARS": (LARS, dict(lr=0.5, weight_decay=1e-3, trust_coefficient=0.02)),
    "AdamLARS": (AdamLARS, dict(lr=1e-2)),
    "RangerLARS": (RangerLARS, dict(lr=1e-2, k=3)),
}
CASES = [(name, foreach) for name in OPTIMIZERS for foreach in (False, True)]
IDS = [f"{n}-{'foreach' if f else 'per_tensor'}" for n, f in CASES]


@contextmanager
def sync_is_an_error() -> Iterator[None]:
    """Any host synchronization (``.item()``, ``bool(t)``, a D2H copy, ``nonzero``) raises inside."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _layers(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 16), (16,), (16, 16), (16,), (4, 16), (4,), (8, 4, 3, 3)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _grads(step: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(t.shape, generator=g).to(t.dtype) for t in like]


def _train(name: str, foreach: bool, device: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    cls, kwargs = OPTIMIZERS[name]
    params = [nn.Parameter(t.to(device)) for t in _layers(dtype)]
    opt = cls(params, foreach=foreach, **kwargs)
    for step in range(STEPS):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g.to(device)
        opt.step()
    return [p.detach().float().cpu() for p in params]


@pytest.mark.parametrize(("name", "foreach"), CASES, ids=IDS)
def test_gpu_equals_cpu(name: str, foreach: bool) -> None:
    cpu, gpu = _train(name, foreach, "cpu"), _train(name, foreach, "cuda")
    init = _layers()
    for c, g, w0 in zip(cpu, gpu, init):
        assert (c - w0).norm() > 0, "training did not move the weights: the comparison is void"
        assert ((g - c).norm() / c.norm()).item() <= TOL


@pytest.mark.parametrize(("name", "foreach"), CASES, ids=IDS)
def test_bf16_parameters_on_gpu(name: str, foreach: bool) -> None:
    """bf16 weights stepped through fp32 working copies: equal to the CPU run to bf16 rounding."""
    cpu = _train(name, foreach, "cpu", torch.bfloat16)
    gpu = _train(name, foreach, "cuda", torch.bfloat16)
    for c, g in zip(cpu, gpu):
        assert torch.isfinite(g).all()
        assert ((g - c).norm() / c.norm()).item() <= 2e-2  # a few bf16 ulps over 10 steps


@pytest.mark.parametrize(("name", "foreach"), CASES, ids=IDS)
def test_steady_state_step_has_no_host_sync(name: str, foreach: bool) -> None:
    cls, kwargs = OPTIMIZERS[name]
    params = [nn.Parameter(t.cuda()) for t in _layers()]
    opt = cls(params, foreach=foreach, **kwargs)
    for step in range(6):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g.cuda()
        if step < 2:  # state creation and first-step caches (index tensors) happen here
            opt.step()
            continue
        with sync_is_an_error():
            opt.step()
            ratios = opt.trust_ratios()
    assert all(r.device.type == "cuda" for r in ratios.values())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_overflow_skip_without_sync(name: str) -> None:
    cls, kwargs = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    opt = cls(model.parameters(), foreach=True, **kwargs)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    x = torch.randn(8, 16, device="cuda")
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        if step == 3:
            model[0].weight.grad[0, 0] = float("inf")
        before = [t.clone() for t in model.parameters()]
        state_before = [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        with sync_is_an_error():
            scaler.step(opt)
        scaler.update()
        if step == 3:
            for a, b in zip(model.parameters(), before):
                assert torch.equal(a, b)
            state_after = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
            assert all(torch.equal(a, b) for a, b in zip(state_after, state_before))
        elif step > 0:
            assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert scaler.get_scale() < 2.0**12  # the overflow halved the scale


def test_cuda_graph_capture_is_refused_and_eager_steps_still_work() -> None:
    params = [nn.Parameter(t.cuda()) for t in _layers()]
    opt = AdamLARS(params, foreach=True)
    for p, g in zip(params, _grads(0, params)):
        p.grad = g.cuda()
    opt.step()  # warm (state exists), as capture requires
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
            with torch.cuda.graph(graph, stream=stream):
                opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(params, before))


def _probe(script: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a probe script in a fresh process (its own process group / DeepSpeed engine); its JSON."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"hf_lars_{script}_{os.getpid()}.json"
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    child_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(HERE / script), "--out", str(out), *args],
        env=child_env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("init", ["nccl", "none", "cuda:nccl,cpu:gloo"])
def test_cpu_partitions_all_reduce_under_nccl(init: str) -> None:
    """ZeRO-Offload's situation on one GPU: fp32 pieces on the CPU, a group created three ways.  The partial
    sums travel to the GPU and back; the norms equal the local ones (1 rank); no set_device was called."""
    result = _probe("nccl_offload_probe.py", "--init", init)
    # NCCL only: over NCCL on GPU LOCAL_RANK; the other two have a CPU backend (gloo) for CPU pieces.
    assert result["collective_device"] == {"nccl": "cuda:0", "none": "cpu", "cuda:nccl,cpu:gloo": "cpu"}[init]
    assert result["max_abs_err"] <= 1e-6, result
    assert result["empty_rank_ok"], result


def test_deepspeed_fp16_overflow_skips_the_step() -> None:
    """DeepSpeed fp16 (ZeRO-2, one GPU) with a huge initial loss scale: the first steps overflow and are
    skipped by DeepSpeed (our step() is not called), then training proceeds with finite weights."""
    result = _probe("ds_fp16_probe.py")
    assert result["skipped_steps"] >= 1, result
    assert result["unchanged_while_skipped"], result
    assert result["moved_after"] and result["finite"], result


# ------------------------------------------------------------------------------------------ fused step
FUSED_RTOL = 1e-6  # tests/test_optim_fused.py's tolerance on the CPU: fp32 rounding of reordered sums


def _stepped_pair(
    name: str,
) -> tuple[list[nn.Parameter], list[nn.Parameter], torch.optim.Optimizer, torch.optim.Optimizer]:
    """The same CUDA parameters under the eager step (foreach, CUDA's default) and the fused step."""
    cls, kwargs = OPTIMIZERS[name]
    eager = [nn.Parameter(t.cuda()) for t in _layers()]
    fused = [nn.Parameter(t.cuda()) for t in _layers()]
    return eager, fused, cls(eager, foreach=True, **kwargs), cls(fused, fused=True, **kwargs)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_equals_eager_on_cuda(name: str) -> None:
    """``STEPS`` (10) steps: weights and every state tensor of the fused step equal the eager step's to
    ``FUSED_RTOL`` of each tensor's scale; RangerLARS's 10 steps cross its unrectified phase."""
    eager, fused, opt_e, opt_f = _stepped_pair(name)
    init = [p.detach().clone() for p in eager]
    for step in range(STEPS):
        for pe, pf, g in zip(eager, fused, _grads(step, eager)):
            pe.grad, pf.grad = g.cuda(), g.cuda()
        opt_e.step()
        opt_f.step()
    assert any(not torch.equal(p, w0) for p, w0 in zip(eager, init)), "training did not move the weights"
    for i, (pe, pf) in enumerate(zip(eager, fused)):
        assert_close_scaled(pf, pe, FUSED_RTOL, f"{name} parameter {i}")
        for key, value in opt_e.state[pe].items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert_close_scaled(opt_f.state[pf][key], value, FUSED_RTOL, f"{name} parameter {i} {key}")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_steady_state_step_has_no_host_sync(name: str) -> None:
    _, fused, _, opt = _stepped_pair(name)
    for step in range(4):
        for p, g in zip(fused, _grads(step, fused)):
            p.grad = g.cuda()
        if step < 2:  # compilation and first-step caches
            opt.step()
            continue
        with sync_is_an_error():
            opt.step()


def test_fused_step_is_generated_as_triton_kernels() -> None:
    """inductor's output code for the first fused step (compiled afresh: caches off) holds Triton kernels."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    params = [nn.Parameter(torch.randn(24, 40, device="cuda")), nn.Parameter(torch.randn(40, device="cuda"))]
    opt = AdamLARS(params, lr=1e-2, fused=True)  # shapes no other test compiles
    for p in params:
        p.grad = torch.randn_like(p)
    with inductor_config.patch(force_disable_caches=True):
        _, codes = run_and_get_code(opt.step)
    assert codes, "no code was generated: the fused step did not compile"
    assert any("@triton.jit" in code for code in codes), codes[0][:2000]
