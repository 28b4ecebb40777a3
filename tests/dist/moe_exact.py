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
MODELS = {"moe3": 3, "moe1": 1}  # 3 experts: FSDP2 gives the ranks 2 and 1; 1 expert: rank 1 holds none


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


def make_model(name: str) -> MoeNet:
    torch.manual_seed(0)
    return MoeNet(MODELS[name])


def make_optimizer(opt_name: str, model: MoeNet, declare: bool = True) -> torch.optim.Optimizer:
    if declare:
        declare_stacked(model.up)
        declare_stacked(model.down, transposed=True)
        declare_stacked(model.down_bias, transposed=True)
    cls, kwargs = OPTIMIZERS[opt_name]
    return cls(build_param_groups(model, kwargs["weight_decay"]), **kwargs)


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
                    "control": max(rel_err(final[n], control[n]) for n in ("up", "down")),
                    "cut_experts": int(totals[0]),
                    "column_slots": int(totals[1]),
                    "calls_per_group": max(c / max(g, 1) for c, g in calls),
                }
            except Exception:  # noqa: BLE001 - reported per case, the launch goes on
                results[case] = {"error": traceback.format_exc()}
            C.write(args.out, results)
    C.finish()


if __name__ == "__main__":
    main()
