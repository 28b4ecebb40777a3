"""What GPU users need, tested on the CPU: the collective's device, no strong references to original
parameters, GradScaler on the device, CUDA graph capture refused, per-device step-scalar dtype.

The CUDA halves of these (real NCCL groups, sync-free steps under ``set_sync_debug_mode("error")``,
capture) are in ``tests/gpu/`` and run only where CUDA is present (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import gc
import os
import re
import types
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from hf_lars import LARS, AdamLARS, RangerLARS
from hf_lars.layout import Segment, StepLayout, TensorLayout, collective_device, group_device_types
from hf_lars.optim.moments import step_scalar_dtype

OPTIMIZERS = {
    "LARS": (LARS, dict(lr=0.1, weight_decay=1e-4)),
    "AdamLARS": (AdamLARS, dict(lr=1e-2)),
    "RangerLARS": (RangerLARS, dict(lr=1e-2, k=2)),
}


@pytest.fixture(scope="module")
def world() -> dist.ProcessGroup:
    """A 1-rank default group created with no backend (``get_backend`` says ``'undefined'``)."""
    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
        dist.init_process_group(rank=0, world_size=1)
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


def _fake_group(*device_types: str, **attrs) -> types.SimpleNamespace:
    return types.SimpleNamespace(_device_types=[torch.device(t) for t in device_types], **attrs)


# ----------------------------------------------------------------------------- 1-2: collective device
def test_collective_device_from_every_kind_of_real_group(world):
    """No backend ('undefined'), explicit gloo, and a "device:backend" string, each read from the group."""
    assert dist.get_backend(world) == "undefined"  # the case a get_backend() == "nccl" test got wrong
    expected_default = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    assert set(group_device_types(world)) == expected_default
    gloo = dist.new_group(backend="gloo")
    mixed = dist.new_group(backend="cpu:gloo,cuda:gloo")
    assert dist.get_backend(mixed) == "cpu:gloo,cuda:gloo"
    for group in (world, gloo, mixed):
        assert collective_device(group, torch.device("cpu")) == torch.device("cpu")
    for group in (gloo, mixed):
        assert set(group_device_types(group)) == {"cpu", "cuda"}
        assert collective_device(group, torch.device("cuda", 1)) == torch.device("cuda", 1)  # no copy


@pytest.mark.parametrize(
    "backend, types_",
    [("nccl", {"cuda"}), ("cuda:nccl,cpu:gloo", {"cuda", "cpu"}), ("gloo", {"cpu", "cuda"}), ("cpu:gloo", {"cpu"})],
)
def test_device_types_parsed_from_the_backend_string_without_device_types(monkeypatch, backend, types_):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert set(group_device_types(object())) == types_


def test_device_types_of_an_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "undefined")
    with pytest.raises(ValueError, match="explicit backend"):
        group_device_types(object())


def test_cpu_pieces_under_nccl_go_to_the_local_rank_gpu(monkeypatch):
    """ZeRO-Offload: CPU partitions, an NCCL-only group.  The index is LOCAL_RANK, not current_device()."""
    nccl = _fake_group("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # a script that never called set_device
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert collective_device(nccl, torch.device("cpu")) == torch.device("cuda", 3)
    assert collective_device(_fake_group("cuda", bound_device_id=torch.device("cuda", 2)), "cpu") == torch.device(
        "cuda", 2
    )
    monkeypatch.delenv("LOCAL_RANK")
    assert collective_device(nccl, torch.device("cpu")) == torch.device("cuda", 0)
    # The mixed group all-reduces CPU pieces over its CPU backend and GPU pieces over NCCL, with no copy.
    mixed = _fake_group("cuda", "cpu")
    assert collective_device(mixed, torch.device("cpu")) == torch.device("cpu")
    assert collective_device(mixed, torch.device("cuda", 1)) == torch.device("cuda", 1)


def _two_layer_flat_layout(group, device: str = "cpu") -> StepLayout:
    layout = TensorLayout((Segment(0, 0, 6), Segment(1, 6, 4)), process_group=group, whole_rows=False)
    return StepLayout([layout], num_layers=2, device=torch.device(device))


def test_partial_sums_not_partitions_travel_to_the_collective_device_and_back(monkeypatch):
    """Fake CUDA tensors (no GPU needed): pieces on the CPU, an NCCL group.  The all-reduce sees one
    ``[2, layers]`` CUDA tensor; the norms come back to the CPU; a rank with no piece joins on CUDA too."""
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append((t.device, tuple(t.shape))))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        layout = _two_layer_flat_layout(_fake_group("cuda"))
        flat_w, flat_g = torch.randn(10), torch.randn(10)
        sub = layout.select([True, True])
        norms = sub.norms(layout.pieces([flat_w]), layout.pieces([flat_g]))
        assert norms.device == torch.device("cpu") and tuple(norms.shape) == (2, 2)
        empty = _two_layer_flat_layout(_fake_group("cuda")).select([False, False]).norms([], [])
        assert empty.device == torch.device("cpu")
    assert seen == [(torch.device("cuda", 0), (2, 2)), (torch.device("cuda", 0), (2, 2))]


def test_partial_sums_stay_put_when_the_group_serves_their_device(monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append(t.device))
    layout = _two_layer_flat_layout(_fake_group("cpu", "cuda"))
    w = torch.arange(10.0)
    norms = layout.select([True, True]).norms(layout.pieces([w]), layout.pieces([w]))
    assert seen == [torch.device("cpu")]
    torch.testing.assert_close(norms[0], torch.stack([w[:6].norm(), w[6:].norm()]), rtol=0, atol=0)


def test_piece_views_of_stable_tensors_are_cut_once():
    layout = _two_layer_flat_layout(None)
    state = torch.zeros(10)
    first = layout.pieces([state], cache=True)
    again = layout.pieces([state], cache=True)
    assert all(a is b for a, b in zip(first, again))
    fresh = layout.pieces([state])  # per-step tensors: new views, nothing kept
    assert all(a is not b for a, b in zip(first, fresh))


# -------------------------------------------------------------------- 3: no strong refs to originals
def _alive(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(r() is not None for r in refs)


def _swap_like_accelerate(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """What Accelerate's ``fsdp2_switch_optimizer_parameters`` does: the new parameters, in order."""
    new = list(model.parameters())
    for group in optimizer.param_groups:
        group["params"] = [new.pop(0) for _ in group["params"]]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_original_parameter_alive_after_an_accelerate_style_swap(name):
    cls, kwargs = OPTIMIZERS[name]
    counts = {}
    for label, make in [("ours", lambda ps: cls(ps, **kwargs)), ("torch", lambda ps: torch.optim.AdamW(ps))]:
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        opt = make(model.parameters())
        refs = [weakref.ref(p) for p in model.parameters()]
        for mod in model:  # the engine builds new parameters and drops the old ones
            mod.weight = nn.Parameter(mod.weight.detach().clone())
            mod.bias = nn.Parameter(mod.bias.detach().clone())
        _swap_like_accelerate(opt, model)
        counts[label] = _alive(refs)
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()  # the replacements are mapped to their layers by position
        if label == "ours":  # the two matrices, and the two biases where excluded layers are adapted (LARS)
            adapted = 4 if opt.defaults["adapt_excluded"] else 2
            assert len(opt.trust_ratios()) == adapted and all(torch.isfinite(r) for r in opt.trust_ratios().values())
    assert counts == {"ours": 0, "torch": 0}


def test_no_original_parameter_alive_after_fully_shard(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    counts = {}
    for label, make in [("ours", lambda ps: AdamLARS(ps, lr=1e-2)), ("torch", lambda ps: torch.optim.AdamW(ps))]:
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = make(model.parameters())  # built before sharding, as the README shows
        refs = [weakref.ref(p) for p in model.parameters()]
        fully_shard(model, mesh=mesh)
        _swap_like_accelerate(opt, model)
        counts[label] = _alive(refs)
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert counts == {"ours": 0, "torch": 0}


# ------------------------------------------------------------------------------- 5: GradScaler on device
class _NoHostSync:
    """Make ``Tensor.item`` and ``bool(tensor)`` raise while active (what a host sync would be on CUDA)."""

    def __enter__(self):
        self._item, self._bool = torch.Tensor.item, torch.Tensor.__bool__

        def boom(*_a, **_k):
            raise AssertionError("host synchronization inside step()")

        torch.Tensor.item = boom
        torch.Tensor.__bool__ = boom
        return self

    def __exit__(self, *exc):
        torch.Tensor.item, torch.Tensor.__bool__ = self._item, self._bool


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_unscales_and_skips_on_the_device(name, foreach):
    """A finite step equals the unscaled optimizer bit for bit; an inf step changes nothing (state and step
    counts included); neither reads a tensor on the host inside ``step()``; ``p.grad`` is never written."""
    cls, kwargs = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    reference = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    reference.load_state_dict(model.state_dict())
    opt = cls(model.parameters(), foreach=foreach, **kwargs)
    ref_opt = cls(reference.parameters(), foreach=foreach, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x = torch.randn(8, 6)
    for step in range(4):
        model.zero_grad(), reference.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        reference(x).square().mean().backward()
        if step == 2:
            next(model.parameters()).grad[0, 0] = float("inf")
        before = _snapshot(model, opt)
        grads = [p.grad.clone() for p in model.parameters()]
        original_step = opt.step
        with _NoHostSync():
            scaler.step(opt)
        assert opt.step == original_step
        scaler.update()
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
        if step == 2:  # skipped: everything as before, and the reference does not step either
            for a, b in zip(_snapshot(model, opt), before):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert scaler.get_scale() == 2.0**9
            continue
        ref_opt.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    assert all(int(s) == 3 for s in steps)


def test_grad_scale_and_found_inf_as_arguments():
    p = nn.Parameter(torch.ones(3, 2))
    opt = LARS([p], lr=0.1)
    p.grad = torch.full((3, 2), 4.0)
    opt.step(found_inf=torch.tensor(1.0))
    torch.testing.assert_close(p, torch.ones(3, 2), rtol=0, atol=0)
    opt.step(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    q = nn.Parameter(torch.ones(3, 2))
    ref = LARS([q], lr=0.1)
    q.grad = torch.ones(3, 2)
    ref.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert torch.equal(p.grad, torch.full((3, 2), 4.0))


# ------------------------------------------------------------------------- 6: CUDA graph capture refused
def test_step_inside_cuda_graph_capture_is_refused(monkeypatch):
    p = nn.Parameter(torch.ones(2, 2))
    p.grad = torch.ones(2, 2)
    opt = AdamLARS([p])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph is being captured.*outside the graph"):
        opt.step()
    assert not opt.state  # refused before anything was created or changed
    torch.testing.assert_close(p, torch.ones(2, 2), rtol=0, atol=0)


# ------------------------------------------------------------------------- 7: step-scalar dtype per device
@pytest.mark.parametrize(
    "device, dtype",
    [("cpu", torch.float64), ("cuda", torch.float64), ("cuda:1", torch.float64), ("mps", torch.float32),
     ("xla", torch.float32), ("xpu", torch.float32), ("hpu", torch.float32)],
)
def test_step_scalar_dtype_per_device(device, dtype):
    assert step_scalar_dtype(torch.device(device)) == dtype


# ------------------------------------------------------------------------------------ the GPU script
def test_gpu_check_script_reports_that_there_is_no_gpu(tmp_path):
    """``scripts/gpu_check.sh`` where no GPU is visible (hidden with ``CUDA_VISIBLE_DEVICES=""`` on GPU
    machines): a report that says so, and a failing exit status (a check that did not run never passes)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# hf_lars GPU check") and "No CUDA device" in report


def test_gpu_check_dry_run_lists_and_checks_every_part(tmp_path):
    """``scripts/gpu_check.sh --dry-run`` on the CPU: no shell error (``bash -n``), every part listed with its
    command and limit, each pytest selection collects tests, each benchmark parses ``--help``; exit 0."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(script), "--dry-run", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "(dry run: nothing ran on a GPU)" in report and "0 failed" in report, report
    parts = ["gpu_tests", "nccl_exactness", "launch_counts", "bench_fused", "cuda_step_fp32", "cuda_step_bf16",
             "bench_step_cpu"]
    for name in parts:
        assert f"## {name}: would run (limit " in report, name
    collected = [int(n) for n in re.findall(r"^(\d+) tests collected$", report, flags=re.M)]
    assert len(collected) == 3 and min(collected) > 0, collected
    assert "tests/test_sharded_exact.py -k nccl1" in report  # no GPU visible: the one-GPU selection
    assert report.count("--help parses") == 4
