"""Stacked MoE experts under sharding equal one process: every optimizer under one engine, in one launch.

The model (:class:`MoeNet`) has a router and experts stored as stacked parameters: ``up`` ``[E, F, H]``
(each expert ``(out, in)``), ``down`` ``[E, F, H]`` stored ``(in, out)`` (``transposed``) and
``down_bias`` ``[E, H]``, declared with :func:`hf_lars.registry.declare_stacked` and grouped by
:func:`hf_lars.build_param_groups`.  Expert weights differ 100x in scale.  For each (optimizer, model):
``STEPS`` steps under the engine on 2 ranks (half the global batch each) and the same steps in one process
on the whole batch; recorded: every parameter's relative error, the error of a control run that does not
declare the experts (one ratio per stacked tensor), how many experts a rank holds only part of (ZeRO cuts
them; FSDP2's ``Shard(0)`` never does), the Gradient Centralization slots of cut (in, out) experts, and the
all-reduces per ``step()``.

Layers stored ``(in, out)`` without experts: :class:`ConvNet` holds two of transformers' ``Conv1D`` (GPT-2's
layer, weight ``[in, out]``), found by ``build_param_groups`` without a declaration; its control drops the
``transposed`` key (Gradient Centralization of the wrong axis, so only RangerLARS differs).  ZeRO cuts a
``Conv1D`` weight and FSDP2's ``Shard(0)`` splits its input rows: either way its column sums go through the
one cut-row all-reduce.  Under FSDP2 also: a ``Shard(1)`` placement (``shard_placement_fn``) on ordinary
``nn.Linear`` weights, exact for AdamLARS (norms only) and refused by name for RangerLARS's GC.

Usage: torchrun --nproc_per_node 2 tests/dist/moe_exact.py --engine zero2|zero3|fsdp2 --out result.json
"""

from __future__ import annotations

import traceback
from typing import Any

import _common as C
import torch
import torch.distributed as dist
from torch import Tensor, nn

from hf_lars import LARS, AdamLARS, RangerLARS, build_param_groups
from hf_lars.registry import declare_stacked

STEPS = 10  # RangerLARS: 5 unrectified steps, then 5 real ones
HIDDEN, FFN = 9, 5
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "lars": (LARS, {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-2, "trust_coefficient": 0.02}),
    "adam_lars": (AdamLARS, {"lr": 1e-2, "weight_decay": 1e-2}),
    "ranger_lars": (RangerLARS, {"lr": 1e-2, "weight_decay": 1e-2, "use_gc": True, "k": 3}),
}
# experts per model; 3: FSDP2 gives the ranks 2 and 1; 1: rank 1 holds none; 0: ConvNet (no experts)
MODELS = {"moe3": 3, "moe1": 1, "conv1d": 0}
CONTROLLED = {"moe3": ("up", "down"), "moe1": ("up", "down"), "conv1d": ("c_fc.weight", "c_proj.weight")}


class MoeNet(nn.Module):
    """A dense-routed mixture of ``experts`` experts between two ordinary layers (odd sizes: ZeRO cuts experts)."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.fc = nn.Linear(C.IN_FEATURES, HIDDEN)
        self.router = nn.Linear(HIDDEN, experts)  # an ordinary layer
        scale = torch.logspace(-1, 1, experts).view(-1, 1, 1) if experts > 1 else torch.ones(1, 1, 1)
        self.up = nn.Parameter(0.3 * torch.randn(experts, FFN, HIDDEN) * scale)  # (out, in) per expert
        self.down = nn.Parameter(0.3 * torch.randn(experts, FFN, HIDDEN) * scale)  # (in, out) per expert
        self.down_bias = nn.Parameter(0.1 * torch.randn(experts, HIDDEN))
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x))
        gate = torch.softmax(self.router(h), dim=-1)
        mid = torch.tanh(torch.einsum("bh,efh->bef", h, self.up))
        out = torch.einsum("bef,efh->beh", mid, self.down) + self.down_bias
        return self.head((gate.unsqueeze(-1) * out).sum(dim=1))


class ConvNet(nn.Module):
    """GPT-2's MLP between two ordinary layers: ``Conv1D`` weights stored ``(in, out)`` (odd sizes: ZeRO cuts
    them), their output columns 100x apart in scale."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.fc = nn.Linear(C.IN_FEATURES, HIDDEN)
        self.c_fc = Conv1D(FFN, HIDDEN)  # weight [HIDDEN, FFN]: x @ weight
        self.c_proj = Conv1D(HIDDEN, FFN)  # weight [FFN, HIDDEN]
        with torch.no_grad():
            for conv in (self.c_fc, self.c_proj):
                conv.weight.normal_(0.0, 0.3).mul_(torch.logspace(-1, 1, conv.nf))
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.c_proj(torch.tanh(self.c_fc(torch.tanh(self.fc(x))))))


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MoeNet(MODELS[name]) if MODELS[name] else ConvNet()


def make_optimizer(opt_name: str, model: nn.Module, declare: bool = True) -> torch.optim.Optimizer:
    if declare and isinstance(model, MoeNet):
        declare_stacked(model.up)
        declare_stacked(model.down, transposed=True)
        declare_stacked(model.down_bias, transposed=True)
    cls, kwargs = OPTIMIZERS[opt_name]
    groups = build_param_groups(model, kwargs["weight_decay"])
    if not declare:  # ConvNet's control: its Conv1D weights are found without a declaration
        for group in groups:
            group.pop("transposed", None)
    return cls(groups, **kwargs)


def reference_run(opt_name: str, model_name: str, batches: list, declare: bool) -> dict[str, Tensor]:
    model = make_model(model_name)
    opt = make_optimizer(opt_name, model, declare)
    for x, y in batches:
        C.loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class StepRecorder:
    """Counts the all-reduces inside each ``optimizer.step`` (the instance attribute the engine calls)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer, self._step, self.calls = optimizer, optimizer.step, []
        optimizer.step = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with C.count_all_reduce() as calls:
            out = self._step(*args, **kwargs)
        groups = sum(any(p.grad is not None for p in g["params"]) for g in self.optimizer.param_groups)
        self.calls.append((len(calls), groups))
        return out


def cut_experts(opt: Any) -> tuple[int, int]:
    """(experts this rank holds only part of, GC column-sum slots of cut (in, out) experts) in its layouts."""
    cut, column_slots = 0, 0
    for (group_index, _), (_, layout, *_) in opt._layout_cache.items():
        stacked = opt._stacked.get(group_index)
        shapes = layout.layer_shapes
        for lay in layout.layouts:
            for seg in lay.segments:
                expert = stacked is not None and stacked.expert[seg.layer] is not None
                if expert and (seg.layer_offset, seg.numel) != (0, shapes[seg.layer].numel()):
                    cut += 1
        plan = layout._row_centring
        if plan is not None:
            column_slots += plan.num_slots - plan.num_cut_rows
    return cut, column_slots


def deepspeed_run(stage: int, opt_name: str, model_name: str, batches: list, rank: int) -> tuple[dict, Any, Any]:
    from deepspeed.utils import safe_get_full_fp32_param

    model = make_model(model_name)
    opt = make_optimizer(opt_name, model)
    recorder = StepRecorder(opt)
    engine = C.deepspeed_engine(model, opt, C.ds_config(stage, sub_group_size=80))
    for batch in batches:
        x, y = C.local_slice(batch, rank)
        engine.backward(C.loss_fn(engine(x), y))
        engine.step()
    final = {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}
    cuts = cut_experts(opt)
    engine.destroy()
    return final, recorder.calls, cuts


def fsdp2_run(opt_name: str, model_name: str, batches: list, rank: int) -> tuple[dict, Any, Any]:
    model = C.fsdp2_shard(make_model(model_name))
    opt = make_optimizer(opt_name, model)  # declared on the DTensor parameters fully_shard made
    recorder = StepRecorder(opt)
    for batch in batches:
        x, y = C.local_slice(batch, rank)
        C.loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    final = C.full_state(model)
    return final, recorder.calls, cut_experts(opt)


class ShardNet(nn.Module):
    """Three ``nn.Linear`` layers; ``fc2`` and ``head`` have an even number of inputs (FSDP2 shards dim 1
    only evenly)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(C.IN_FEATURES, 6)
        self.fc2 = nn.Linear(6, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def shard_net() -> ShardNet:
    torch.manual_seed(0)
    return ShardNet()


def shard1_run(opt_name: str, batches: list, rank: int) -> dict[str, Tensor]:
    """FSDP2 with the ``nn.Linear`` weights of an even input width placed ``Shard(1)`` (their input columns
    split across ranks), the others ``Shard(0)``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = shard_net().to(C.device())
    world = dist.get_world_size()
    mesh = init_device_mesh(C.device().type, (world,))

    def placement(p: nn.Parameter) -> Shard:
        return Shard(1) if p.dim() == 2 and p.shape[1] % world == 0 else Shard(0)

    for module in model.children():
        if any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    cls, kwargs = OPTIMIZERS[opt_name]
    opt = cls(build_param_groups(model, kwargs["weight_decay"]), **kwargs)
    for batch in batches:
        x, y = C.local_slice(batch, rank)
        C.loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return C.full_state(model)


def shard1_cases(batches: list, rank: int) -> dict[str, Any]:
    """AdamLARS under ``Shard(1)`` against one process; RangerLARS (GC) refused with the error's text."""
    out: dict[str, Any] = {}
    final = shard1_run("adam_lars", batches, rank)
    model = shard_net()
    opt = AdamLARS(build_param_groups(model, 1e-2), **OPTIMIZERS["adam_lars"][1])
    for x, y in batches:
        C.loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["shard1/adam_lars"] = {"errors": {n: rel_err(final[n], p.detach()) for n, p in model.named_parameters()}}
    try:
        shard1_run("ranger_lars", batches, rank)
        out["shard1/ranger_lars"] = {"refused": None}
    except ValueError as exc:
        out["shard1/ranger_lars"] = {"refused": str(exc)}
    return out


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def main() -> None:
    args = C.parse_args(lambda p: p.add_argument("--engine", required=True, choices=("zero2", "zero3", "fsdp2")))
    rank, world = C.init()
    if C.env_flag("HF_LARS_MOE_DEBUG"):  # stacks of every thread after 120 s: where a mismatched collective waits
        import faulthandler

        faulthandler.dump_traceback_later(120, exit=True)
    batches = C.global_batches(STEPS, world)
    results: dict[str, Any] = {}
    for model_name in MODELS:
        for opt_name in OPTIMIZERS:
            case = f"{opt_name}/{model_name}"
            try:
                if args.engine == "fsdp2":
                    final, calls, (cut, slots) = fsdp2_run(opt_name, model_name, batches, rank)
                else:
                    final, calls, (cut, slots) = deepspeed_run(int(args.engine[-1]), opt_name, model_name, batches, rank)
                totals = torch.tensor([cut, slots], dtype=torch.long)
                dist.all_reduce(totals)
                ref = reference_run(opt_name, model_name, batches, declare=True)
                control = reference_run(opt_name, model_name, batches, declare=False)
                results[case] = {
                    "errors": {n: rel_err(final[n], ref[n]) for n in ref},
                    "control": max(rel_err(final[n], control[n]) for n in CONTROLLED[model_name]),
                    "cut_experts": int(totals[0]),
                    "column_slots": int(totals[1]),
                    "calls_per_group": max(c / max(g, 1) for c, g in calls),
                }
            except Exception:  # noqa: BLE001 - reported per case, the launch goes on
                results[case] = {"error": traceback.format_exc()}
            C.write(args.out, results)
    if args.engine == "fsdp2":
        try:
            results.update(shard1_cases(batches, rank))
        except Exception:  # noqa: BLE001 - reported, the launch goes on
            results["shard1"] = {"error": traceback.format_exc()}
        C.write(args.out, results)
    C.finish()


if __name__ == "__main__":
    main()
