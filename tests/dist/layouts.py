"""Layer maps under DeepSpeed ZeRO-1/2/3 (+ bf16) and FSDP2: pieces gathered over ranks rebuild every layer.

A probe optimizer (no update) asks :func:`hf_lars.sharding.tensor_layouts` for the layout of what the
engine hands it at ``step()``, cuts weights and gradients into pieces, and records them.  Rank 0 then
concatenates, per layer, the pieces of all ranks in rank order (and step-call order) and compares them
with the layer's full initial weights (bitwise) and the full-batch gradient of an unsharded copy.

Usage: torchrun --nproc_per_node 2 tests/dist/layouts.py --out result.json
(``HF_LARS_TEST_BACKEND=nccl``: one GPU per rank; the pieces are copied to the CPU before they are gathered.)
"""

from __future__ import annotations

import time
from typing import Any

import _common as C
import torch
import torch.distributed as dist
from torch import Tensor

from hf_lars import sharding
from hf_lars.layout import StepLayout
from hf_lars.optim.ranger_lars import centralize_gradient


class Probe(torch.optim.Optimizer):
    """Records, at each ``step()``, the pieces of the stepped tensors; never changes anything."""

    def __init__(self, groups: list[dict[str, Any]], gc: bool = False) -> None:
        super().__init__(groups, {})
        self.gc = gc  # record the gradients centred by the layout's RowCentring (RangerLARS's GC)
        # Keyed by the group dict: DeepSpeed ZeRO-1/2 step one group at a time with
        # ``optimizer.param_groups = [group]``, so positions in param_groups are not stable.
        self.layers = {
            id(g): (i, list(g["params"]), list(g.get("param_names", []))) for i, g in enumerate(self.param_groups)
        }
        self.calls: list[dict[str, Any]] = []

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            stepped = [p for p in group["params"] if p.grad is not None]
            if not stepped:
                continue
            g_idx, layers, names = self.layers[id(group)]
            layouts = sharding.tensor_layouts(stepped, layers, group["params"])
            layout = StepLayout(layouts, num_layers=len(layers), layer_shapes=[sharding.layer_shape(p) for p in layers])
            weights = [w.float() for w in layout.pieces(stepped)]
            local_grads = [g.float() for g in layout.local([p.grad for p in stepped])]
            cut_rows = 0
            if self.gc:
                plan = layout.row_centring()
                local_grads = plan.centre(local_grads, centralize_gradient)
                cut_rows = plan.num_cut_rows
            grads = list(layout.pieces(local_grads))
            sizes = [p.to_local().numel() if lay.dtensor else p.numel() for p, lay in zip(stepped, layouts)]
            groups = {dist.get_world_size(lay.process_group) if lay.process_group is not None else 1 for lay in layouts}
            self.calls.append(
                {
                    "group": g_idx,
                    "names": names,
                    "layers": list(layout.piece_layer),
                    # copies on the CPU (gathered there; the engine reuses its buffers)
                    "weights": [w.to("cpu", copy=True) for w in weights],
                    "grads": [g.to("cpu", copy=True) for g in grads],
                    "cut_rows": cut_rows,
                    "stepped_numel": sum(sizes),
                    "whole_rows": [lay.whole_rows for lay in layouts],
                    "dtensor": [lay.dtensor for lay in layouts],
                    "group_sizes": sorted(groups),
                }
            )


def reference(model_name: str, batch: tuple[Tensor, Tensor], gc: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Initial weights and full-batch gradients of an unsharded copy (gradients centred if ``gc``)."""
    model = C.make_model(model_name)
    out = model(batch[0])
    C.loss_fn(out, batch[1]).backward()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if gc:
        grads = {n: centralize_gradient(g) for n, g in grads.items()}
    return weights, grads


def run_deepspeed(case: dict[str, Any], rank: int, batch: tuple[Tensor, Tensor]) -> list[dict[str, Any]]:
    config = case["config"]
    if case.get("zero_init"):
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=config):
            model = C.make_model(case["model"])
    else:
        model = C.make_model(case["model"])
    # gc "reference": only the reference is centred (a control)
    probe = Probe(C.param_groups(model, split=case.get("split", True)), gc=case.get("gc") is True)
    engine = C.deepspeed_engine(model, probe, config)
    x, y = (t.to(engine.device) for t in C.local_slice(batch, rank))
    x = x.to(next(engine.module.parameters()).dtype)
    loss = C.loss_fn(engine(x), y)
    engine.backward(loss)
    engine.step()
    calls = probe.calls
    for call in calls:
        call["wrapper"] = type(engine.optimizer).__name__
    engine.destroy()
    return calls


def run_fsdp2(case: dict[str, Any], rank: int, batch: tuple[Tensor, Tensor]) -> list[dict[str, Any]]:
    model = C.make_model(case["model"])
    if case.get("swap"):
        # The optimizer is built on the plain parameters, then (as Accelerate's
        # fsdp2_switch_optimizer_parameters does) its params are replaced by the new DTensors in order.
        probe = Probe(C.param_groups(model, split=case.get("split", True)), gc=case.get("gc") is True)
        old = {n: p for n, p in model.named_parameters()}
        C.fsdp2_shard(model)
        new = dict(model.named_parameters())
        by_old = {id(p): new[n] for n, p in old.items()}
        for group in probe.param_groups:
            group["params"] = [by_old[id(p)] for p in group["params"]]
    else:
        C.fsdp2_shard(model)
        probe = Probe(C.param_groups(model, split=case.get("split", True)), gc=case.get("gc") is True)
    x, y = (t.to(C.device()) for t in C.local_slice(batch, rank))
    C.loss_fn(model(x), y).backward()
    probe.step()
    return probe.calls


def assemble(
    all_calls: list[list[dict[str, Any]]], ref_w: dict[str, Tensor], ref_g: dict[str, Tensor], bf16: bool
) -> dict[str, Any]:
    """Rank 0: rebuild each layer from the pieces of every rank, compare with the reference."""
    n_calls = {len(c) for c in all_calls}
    result: dict[str, Any] = {"calls_per_rank": sorted(n_calls)}
    if len(n_calls) != 1:
        result["error"] = "ranks made different numbers of step() calls"
        return result
    pieces_w: dict[str, list[Tensor]] = {}
    pieces_g: dict[str, list[Tensor]] = {}
    ranks_of: dict[str, set[int]] = {}
    same_group = True
    padding = 0
    whole_rows: set[bool] = set()
    wrappers: set[str] = set()
    group_sizes: set[int] = set()
    cut_rows: set[int] = set()
    for rank, calls in enumerate(all_calls):
        for c_idx, call in enumerate(calls):
            if call["group"] != all_calls[0][c_idx]["group"]:
                same_group = False
            covered = 0
            for layer, w, g in zip(call["layers"], call["weights"], call["grads"]):
                name = call["names"][layer]
                pieces_w.setdefault(name, []).append(w.reshape(-1))
                pieces_g.setdefault(name, []).append(g.reshape(-1))
                ranks_of.setdefault(name, set()).add(rank)
                covered += w.numel()
            padding += call["stepped_numel"] - covered
            whole_rows.update(call["whole_rows"])
            wrappers.add(call.get("wrapper", "none"))
            group_sizes.update(call["group_sizes"])
            cut_rows.add(call["cut_rows"])
    w_err = 0.0
    g_err = 0.0
    missing = sorted(set(ref_w) - set(pieces_w))
    wrong_numel = []
    for name, ref in ref_w.items():
        if name not in pieces_w:
            continue
        w = torch.cat(pieces_w[name])
        g = torch.cat(pieces_g[name])
        if w.numel() != ref.numel():
            wrong_numel.append(f"{name}: {w.numel()} != {ref.numel()}")
            continue
        expect_w = ref.reshape(-1).to(torch.bfloat16).float() if bf16 else ref.reshape(-1)
        w_err = max(w_err, (w - expect_w).abs().max().item())
        gr = ref_g[name].reshape(-1)
        g_err = max(g_err, ((g - gr).norm() / gr.norm().clamp_min(1e-12)).item())
    result.update(
        {
            "layers": len(ref_w),
            "missing_layers": missing,
            "wrong_numel": wrong_numel,
            "max_abs_weight_err": w_err,
            "max_rel_grad_err": g_err,
            "same_group_order": same_group,
            "split_layers": sorted(n for n, r in ranks_of.items() if len(r) > 1),
            "padding_elements": padding,
            "step_calls": len(all_calls[0]),
            "whole_rows": sorted(whole_rows),
            "group_sizes": sorted(group_sizes),
            "wrappers": sorted(wrappers),
            "cut_rows": sorted(cut_rows),  # per step() call: rows cut by a partition boundary (GC cases)
        }
    )
    return result


def dtensor_checks() -> dict[str, Any]:
    """HSDP and error cases of :func:`hf_lars.sharding.fsdp.dtensor_layout` on a (1, 2) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    world = dist.get_world_size()
    full = torch.arange(35.0, device=C.device()).reshape(7, 5)
    mesh1 = init_device_mesh(C.device().type, (world,))
    mesh2 = init_device_mesh(C.device().type, (1, world), mesh_dim_names=("replicate", "shard"))
    out: dict[str, Any] = {}
    d = distribute_tensor(full, mesh2, [Replicate(), Shard(0)])
    hsdp = sharding.tensor_layouts([d], [d])[0]
    out["hsdp_group_size"] = dist.get_world_size(hsdp.process_group)
    out["hsdp_whole_rows"] = hsdp.whole_rows
    d = distribute_tensor(full, mesh1, [Shard(1)])
    col = sharding.tensor_layouts([d], [full], [d])[0]  # found by position: same global shape
    out["shard1_whole_rows"] = col.whole_rows
    d = distribute_tensor(full, mesh1, [Replicate()])
    rep = sharding.tensor_layouts([d], [d])[0]
    out["replicate_group"] = rep.process_group is None and rep.dtensor
    for name, placements, mesh in (
        ("two_shard_dims", [Shard(0), Shard(1)], mesh2),
        ("partial", [Partial()], mesh1),
    ):
        t = DTensor.from_local(full.clone(), mesh, placements, run_check=False)
        try:
            sharding.tensor_layouts([t], [t])
            out[name] = "no error"
        except ValueError as err:
            out[name] = str(err)
    d = distribute_tensor(full, mesh1, [Shard(0)])
    try:
        sharding.tensor_layouts([d], [full.t()], [d])  # position matches, shape does not
        out["wrong_shape"] = "no error"
    except ValueError as err:
        out["wrong_shape"] = str(err)
    return out


def main() -> None:
    args = C.parse_args()
    rank, world = C.init()
    results: dict[str, Any] = {}
    bf16_optimizer = {**C.ds_config(1, bf16=True), "data_types": {"grad_accum_dtype": "fp32"}}
    cases: list[dict[str, Any]] = [
        {"name": "zero1", "model": "net", "config": C.ds_config(1)},
        {"name": "zero2", "model": "net", "config": C.ds_config(2)},
        {"name": "zero3", "model": "net", "config": C.ds_config(3, sub_group_size=40)},
        # "net": the ZeRO-1/2 partition boundary cuts a row of fc2.weight
        {"name": "zero1_gc", "model": "net", "config": C.ds_config(1), "gc": True},
        {"name": "zero2_gc", "model": "net", "config": C.ds_config(2), "gc": True},
        {"name": "zero3_gc", "model": "wide", "config": C.ds_config(3, sub_group_size=30), "split": False, "gc": True},
        {"name": "zero2_gc_control", "model": "wide", "config": C.ds_config(2), "split": False, "gc": "reference"},
        {
            "name": "zero3_init_gc",
            "model": "net",
            "config": C.ds_config(3, sub_group_size=40),
            "zero_init": True,
            "gc": True,
        },
        {"name": "zero2_bf16", "model": "net", "config": C.ds_config(2, bf16=True), "bf16": True},
        {"name": "zero3_bf16", "model": "net", "config": C.ds_config(3, bf16=True, sub_group_size=40), "bf16": True},
        {"name": "zero1_bf16_optimizer", "model": "net", "config": bf16_optimizer, "bf16": True, "gc": True},
        {"name": "fsdp2", "model": "net", "config": None, "gc": True},
        {"name": "fsdp2_swapped", "model": "net", "config": None, "swap": True},
        {"name": "fsdp2_wide", "model": "wide", "config": None, "split": False},
    ]
    for case in cases:
        t0 = time.perf_counter()
        out_features = 3 if case["model"] == "wide" else 1
        batch = C.global_batches(1, world, out_features=out_features)[0]
        ref_w, ref_g = reference(case["model"], batch, gc=bool(case.get("gc", False)))
        calls = run_fsdp2(case, rank, batch) if case["config"] is None else run_deepspeed(case, rank, batch)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, calls)
        if rank == 0:
            results[case["name"]] = assemble(gathered, ref_w, ref_g, case.get("bf16", False))
            results[case["name"]]["seconds"] = time.perf_counter() - t0
    results["dtensor"] = dtensor_checks()
    C.write(args.out, results)
    C.finish()


if __name__ == "__main__":
    main()
