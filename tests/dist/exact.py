"""Sharded training equals unsharded training: every optimizer under one engine, in one launch.

For each (optimizer, model) case: train ``STEPS`` steps under the engine on 2 ranks (each rank gets half of
the global batch), and the same steps in one process on the whole global batch without sharding; record
the relative error of every layer's final weights.  Also record, for every ``step()`` call the engine
makes, the ``torch.distributed.all_reduce`` calls made inside it and their payload, and run a negative
control where :func:`hf_lars.sharding.tensor_layouts` is replaced by the naive layout every other LAMB
uses (each flat partition / local shard is one layer, norms are local).

With ``--fused`` each optimizer also runs once with ``fused=True`` (the compiled two-pass step) on each of
``--fused-models`` (default ``mixed``), against the same eager unsharded reference (keys
``<optimizer>/<model>/fused``; ZeRO-3 then uses one sub-group per group, so that each rank compiles one
function per pass).

Usage: torchrun --nproc_per_node 2 tests/dist/exact.py --engine zero2 [--bf16] [--fused] --out result.json
(``HF_LARS_TEST_BACKEND=nccl``: one GPU per rank, 1 or 2 ranks; ``--engine zero2_offload`` / ``zero3_offload`` keep
ZeRO's fp32 partitions on the CPU, ``fsdp2_offload`` FSDP2's sharded parameters (``CPUOffloadPolicy``).)
"""

from __future__ import annotations

import copy
import os
import time
import traceback
from datetime import timedelta
from typing import Any

import _common as C
import torch
import torch.distributed as dist
from torch import Tensor, nn

import hf_lars.sharding
from hf_lars import LARS, AdamLARS, RangerLARS
from hf_lars.sharding import is_dtensor
from recipes._naive_layout import naive_tensor_layouts

STEPS = 10  # RangerLARS takes no step in its first 5 (unrectified) steps, then 5 real ones
# Gradient clipping on in every run (as by default in Trainer and DeepSpeed), small enough that it clips at
# every step: the references clip the global gradient norm (torch.nn.utils.clip_grad_norm_), the engines
# use DeepSpeed's `gradient_clipping`.  The pre-clip norms are recorded (min_grad_norm) and asserted > CLIP.
CLIP = 0.1
# Per-case limits: the first DeepSpeed case may JIT-build DeepSpeed's shared-memory op (~30 s to 2 min).
CASE_LIMIT_S = 60.0
FIRST_CASE_LIMIT_S = 600.0
FUSED_CASE_LIMIT_S = 600.0  # compiles two passes per rank (cold inductor cache on 2 busy cores: minutes)
FUSED_MODEL = "mixed"

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    # Large enough steps that a wrong norm shows: LARS moves each layer by ~lr*eta*||w|| = 2% per step.
    "lars": (LARS, {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-2, "trust_coefficient": 0.02}),
    "adam_lars": (AdamLARS, {"lr": 1e-2, "weight_decay": 1e-2}),
    # k=3: the Lookahead synchronisation happens twice within STEPS.
    "ranger_lars": (RangerLARS, {"lr": 1e-2, "weight_decay": 1e-2, "use_gc": True, "k": 3}),
}

# (model, split into Trainer-style decay / no-decay groups?)
MODELS: dict[str, tuple[str, bool]] = {
    "groups": ("scaled", True),  # matrices / 1-D layers / a one-element group that lives on rank 0 only
    "mixed": ("wide", False),  # one group: 1-D layers, a zero-initialised matrix, a rank with only 1-D pieces
    "single": ("net", False),  # one group, every rank holds adapted pieces (used by the multi-node test)
    # "groups" with every group adapted (adapt_excluded=True: LARS's default, AdamLARS's and RangerLARS's
    # option): three groups that take the trust ratio in one step() call, the logit_scale group's on rank 0
    # only, so under FSDP2 the three groups' norms share one all-reduce and rank 1 sends zeros for the third.
    "groups_adapted": ("scaled", True),
}
# Optimizer arguments a model key adds (to the sharded run and its reference alike).
MODEL_OVERRIDES: dict[str, dict[str, Any]] = {"groups_adapted": {"adapt_excluded": True}}


class StepCounter:
    """Wraps ``optimizer.step`` (the instance attribute the engine calls) to count all-reduces inside it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.layers_per_group = {id(g): len(g["params"]) for g in optimizer.param_groups}
        self.records: list[dict[str, int]] = []
        self._step = optimizer.step
        optimizer.step = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        groups = [g for g in self.optimizer.param_groups if any(p.grad is not None for p in g["params"])]
        keys = [self._layout_key(g) for g in groups]
        with C.count_all_reduce() as calls:
            out = self._step(*args, **kwargs)
        plans = [self._row_centring(key) for key in keys]
        self.records.append(
            {
                "calls": len(calls),
                "groups": len(groups),
                "adapted_groups": sum(self._has_adapted_layer(g) for g in groups),
                # Gradient Centralization's all-reduce of cut-row sums (RangerLARS under ZeRO)
                "gc_collectives": sum(p is not None and p.collective for p in plans),
                "cut_rows": sum(p.num_cut_rows for p in plans if p is not None),
                "payload": max(calls, default=0),
                # two floats per layer of every group: the groups' norms share one all-reduce
                "max_payload": 2 * sum(self.layers_per_group.get(id(g), 0) for g in groups),
            }
        )
        return out

    def _layout_key(self, group: dict[str, Any]) -> tuple[int, tuple[int, ...]]:
        """The optimizer's layout-cache key of this group's step (``TrustRatioOptimizer._step_layout``)."""
        group_index = self.optimizer._group_index[id(group)]
        return group_index, tuple(id(p) for p in group["params"] if p.grad is not None)

    def _row_centring(self, key: tuple[int, tuple[int, ...]]) -> Any:
        cached = self.optimizer._layout_cache.get(key)
        return None if cached is None else cached[1]._row_centring

    def _has_adapted_layer(self, group: dict[str, Any]) -> bool:
        """Whether the group has a layer that takes the trust ratio (else no rank needs to communicate)."""
        from hf_lars.sharding import layer_shape

        opt = self.optimizer
        layers = opt._layers[opt._group_index[id(group)]]
        return any(opt._layer_roles(group, layer_shape(p))[0] for p in layers)


def make_optimizer(opt_name: str, model: nn.Module, split: bool, **overrides: Any) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[opt_name]
    kwargs = {**kwargs, **overrides}
    groups = []
    for g in C.param_groups(model, split):
        groups.append({"params": list(zip(g["param_names"], g["params"]))})
    return cls(groups, **kwargs)


def reference_run(
    opt_name: str, model_name: str, split: bool, batches: list, bf16: bool, **overrides: Any
) -> tuple[dict[str, Tensor], float]:
    """One process, whole global batch, no sharding, clip then step (bf16: a bf16 model stepped through fp32
    masters).  Returns the final weights and the smallest pre-clip global gradient norm of the run."""
    model = C.make_model(model_name)
    norms = []
    if not bf16:
        opt = make_optimizer(opt_name, model, split, **overrides)
        with C.count_all_reduce() as calls:
            for x, y in batches:
                C.loss_fn(model(x), y).backward()
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
                opt.step()
                opt.zero_grad(set_to_none=True)
        assert not calls, "the unsharded reference must not communicate"
        return {n: p.detach().clone() for n, p in model.named_parameters()}, min(norms)
    # DeepSpeed's bf16 arithmetic, emulated: each rank's bf16 gradient of its half batch, divided by the
    # world size and summed in bf16, accumulated into fp32 masters, clipped in fp32.  Gradient
    # Centralization (RangerLARS) runs in the step, on the reduced fp32 gradient, as under ZeRO.
    model = model.to(torch.bfloat16)
    master = copy.deepcopy(model).float()  # DeepSpeed's masters start from the bf16 weights
    opt = make_optimizer(opt_name, master, split, **overrides)
    pairs = list(zip(model.parameters(), master.parameters()))
    world = len(batches[0][0]) // C.MICRO_BATCH
    for batch in batches:
        total = [None] * len(pairs)
        for r in range(world):
            x, y = C.local_slice(batch, r)
            C.loss_fn(model(x.to(torch.bfloat16)), y).backward()
            for i, (p, _) in enumerate(pairs):
                part = p.grad / world
                total[i] = part if total[i] is None else total[i] + part
                p.grad = None
        for (_, m), g in zip(pairs, total):
            m.grad = g.float()
        norms.append(float(torch.nn.utils.clip_grad_norm_(master.parameters(), CLIP)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in pairs:
                p.copy_(m)
    return {n: p.detach().clone() for n, p in master.named_parameters()}, min(norms)


def deepspeed_run(
    engine_name: str,
    opt_name: str,
    model_name: str,
    split: bool,
    batches: list,
    rank: int,
    bf16: bool,
    fused: bool = False,
    **overrides: Any,
) -> tuple[dict[str, Tensor], list[dict[str, int]], list[list[str]]]:
    from deepspeed.utils import safe_get_full_fp32_param

    stage = int(engine_name.split("_")[0][-1])
    zero: dict[str, Any] = {}
    if engine_name.endswith("_offload"):  # ZeRO-Offload: fp32 partitions on the CPU, the client optimizer kept
        zero = {"offload_optimizer": {"device": "cpu"}}
    sub_group_size = 10**4 if fused else 60 if model_name == "wide" else 40  # fused: one ZeRO-3 sub-group
    config = C.ds_config(stage, bf16=bf16, sub_group_size=sub_group_size, world=dist.get_world_size(), **zero)
    if zero:
        config["zero_force_ds_cpu_optimizer"] = False
    config["gradient_clipping"] = CLIP
    model = C.make_model(model_name)
    opt = make_optimizer(opt_name, model, split, fused=fused, **overrides)
    counter = StepCounter(opt)
    engine = C.deepspeed_engine(model, opt, config)
    dtype = torch.bfloat16 if bf16 else torch.float32
    for batch in batches:
        x, y = (t.to(engine.device) for t in C.local_slice(batch, rank))
        loss = C.loss_fn(engine(x.to(dtype)), y)
        engine.backward(loss)
        engine.step()
    final = {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}
    held = _held_layers(engine.module)
    engine.destroy()
    return final, counter.records, held


def _held_layers(model: nn.Module) -> list[list[str]]:
    """Per rank, the layers of which the rank holds at least one element of the optimizer's partition."""
    mine = []
    for n, p in model.named_parameters():
        if hasattr(p, "_hp_mapping"):  # ZeRO-1/2
            held = p._hp_mapping is not None
        elif hasattr(p, "ds_numel"):  # ZeRO-3
            held = p.ds_numel - dist.get_rank() * p.partition_numel() > 0
        elif is_dtensor(p):
            held = p.to_local().numel() > 0
        else:
            held = True
        if held:
            mine.append(n)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def fsdp2_run(
    opt_name: str, model_name: str, split: bool, batches: list, rank: int, offload: bool = False, fused: bool = False,
    **overrides: Any,
) -> tuple[dict[str, Tensor], list[dict[str, int]], list[list[str]]]:
    model = C.fsdp2_shard(C.make_model(model_name), offload=offload)
    opt = make_optimizer(opt_name, model, split, fused=fused, **overrides)
    counter = StepCounter(opt)
    for batch in batches:
        x, y = (t.to(C.device()) for t in C.local_slice(batch, rank))
        C.loss_fn(model(x), y).backward()
        if offload:  # CPU shards under NCCL: torch's clip would all-reduce CPU tensors over NCCL
            C.clip_local_shards_(model, CLIP)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # DTensor gradients: the global norm
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: t.cpu() for n, t in C.full_state(model).items()}, counter.records, _held_layers(model)


def compare(got: dict[str, Tensor], ref: dict[str, Tensor], init: dict[str, Tensor]) -> dict[str, Any]:
    """Per layer: ||got - ref|| / ||ref||, and how far training moved the layer (||ref - init|| / ||ref||)."""
    errs, moved = {}, {}
    for name, r in ref.items():
        scale = r.norm().clamp_min(1e-12)
        errs[name] = ((got[name] - r).norm() / scale).item()
        moved[name] = ((r - init[name]).norm() / scale).item()
    # A NaN error must not hide behind max() (which keeps whichever of NaN and a number comes first).
    worst = float("nan") if any(e != e for e in errs.values()) else max(errs.values())
    return {"max_rel_err": worst, "rel_err": errs, "moved": moved}


def run_case(
    engine: str, opt_name: str, model_key: str, naive: bool, bf16: bool, rank: int, world: int, fused: bool = False
) -> dict:
    """One case; exceptions are recorded (and asserted on by the pytest side), not raised."""
    model_name, split = MODELS[model_key]
    overrides = MODEL_OVERRIDES.get(model_key, {})
    batches = C.global_batches(STEPS, world, out_features=3 if model_name == "wide" else 1)
    record: dict[str, Any] = {}
    real_layouts = hf_lars.sharding.tensor_layouts
    try:
        init = {n: p.detach().clone() for n, p in C.make_model(model_name).named_parameters()}
        ref, record["min_grad_norm"] = reference_run(opt_name, model_name, split, batches, bf16, **overrides)
        hf_lars.sharding.tensor_layouts = naive_tensor_layouts if naive else real_layouts
        if engine.startswith("fsdp2"):
            offload = engine == "fsdp2_offload"
            got, steps, held = fsdp2_run(opt_name, model_name, split, batches, rank, offload, fused, **overrides)
        else:
            got, steps, held = deepspeed_run(engine, opt_name, model_name, split, batches, rank, bf16, fused,
                                             **overrides)
        record.update(compare(got, ref, init))
        record["step_calls"] = steps
        record["held"] = held
    except Exception as err:
        record["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-2500:]}"
    finally:
        hf_lars.sharding.tensor_layouts = real_layouts
    return record


def main() -> None:
    args = C.parse_args(
        lambda p: (
            p.add_argument(
                "--engine",
                required=True,
                choices=["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "fsdp2", "fsdp2_offload"],
            ),
            p.add_argument("--bf16", action="store_true", help="also run every case in bf16"),
            p.add_argument("--fused", action="store_true", help="also run each optimizer fused (--fused-models)"),
            p.add_argument("--fused-models", default=FUSED_MODEL, help="model keys of the fused cases"),
            p.add_argument("--optimizers", default=",".join(OPTIMIZERS)),
            p.add_argument("--models", default="groups,mixed", help="model keys; negative controls run with 'mixed'"),
        )
    )
    torch.set_num_threads(1)
    C.init_process_group(timeout=timedelta(seconds=300))
    rank, world = C.init()
    results: dict[str, Any] = {
        "engine": args.engine,
        "steps": STEPS,
        "world": world,
        "nodes": int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", "1"))),
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        "cases": {},
    }
    names = args.optimizers.split(",")
    dtypes = [False, True] if args.bf16 else [False]
    # Cases that cannot hang first (an optimizer that skips the collective on a rank without adapted
    # pieces deadlocks the "mixed" cases; results are written after every case).
    models = args.models.split(",")
    # (optimizer, model, naive, bf16, fused)
    cases = [(o, m, False, bf16, False) for m in models if m != "mixed" for bf16 in dtypes for o in names]
    if "mixed" in models:
        cases += [(o, "mixed", True, False, False) for o in names]  # negative controls: no collective at all
        cases += [(o, "mixed", False, bf16, False) for bf16 in dtypes for o in names]
    if args.fused:  # last: a slow compile never holds up the eager cases' results
        cases += [(o, m, False, False, True) for m in args.fused_models.split(",") for o in names]
    for opt_name, model_key, naive, bf16, fused in cases:
        key = f"{opt_name}/{model_key}" + ("/bf16" if bf16 else "") + ("/naive" if naive else "")
        key += "/fused" if fused else ""
        limit = FUSED_CASE_LIMIT_S if fused else FIRST_CASE_LIMIT_S if not results["cases"] else CASE_LIMIT_S

        def hung(key: str = key, limit: float = limit) -> None:
            results["cases"][key] = {
                "error": f"no progress for {limit:.0f} s: a collective deadlock (did one rank skip the all-reduce "
                "the others made?)"
            }
            C.write(args.out, results)

        t0 = time.perf_counter()
        with C.watchdog(limit, hung):
            record = run_case(args.engine, opt_name, model_key, naive, bf16, rank, world, fused)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, record.get("error"))
        record["errors_by_rank"] = gathered
        record["seconds"] = time.perf_counter() - t0
        results["cases"][key] = record
        C.write(args.out, results)  # after every case: a later hang still leaves the earlier results
    C.finish()


if __name__ == "__main__":
    main()
