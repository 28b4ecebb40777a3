"""Accelerate's FSDP2 path (``fsdp_version: 2``) with hf_lars optimizers, against an unsharded run.

On GPUs ``tests/test_gpu_fsdp2_accelerate.py`` runs it as ``accelerate launch --config_file
recipes/accelerate/fsdp2.yaml --num_processes N tests/dist/e2e_fsdp2.py --out OUT`` (N = 1 or 2 GPUs): the FSDP2
plugin comes from the shipped yaml (transformer-based wrap of ``LlamaDecoderLayer``, CPU-RAM-efficient loading,
reshard after forward).

With ``--force-cpu`` (2 CPU processes under torchrun, gloo) the same code runs on the CPU: Accelerate 1.15 turns
FSDP on only for GPU-class backends, so the script builds a MULTI_CPU state and switches it to FSDP by hand with
a plugin of the yaml's settings.  ``Accelerator.prepare`` then takes its real FSDP2 branch (``_prepare_fsdp2``:
``fully_shard`` per the wrap policy, then ``fsdp2_switch_optimizer_parameters`` swapping the optimizer's tensors
for DTensors, which hf_lars maps back to layers by position in ``group["params"]``).

For each optimizer, every rank first trains an unsharded copy (same initial weights, the whole global batch, on
its own device, no communication), then the FSDP2 model on its slice of each global batch.  Rank 0 writes per
optimizer: ``losses`` / ``ref_losses``, the gathered final weights' ``max_abs_diff`` to the unsharded ones and
how far training ``moved`` them, the last step's trust ratios of both runs (``ratio_max_rel_diff``, layer
names), and what ``prepare`` made of the model and the optimizer (DTensor parameters, swapped tensors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import SEQ_LEN, VOCAB, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

STEPS, MICRO_BATCH = 4, 4
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adam_lars": dict(lr=1e-2, weight_decay=0.01),
    "ranger_lars": dict(lr=1e-2, weight_decay=0.01, k=2),  # Gradient Centralization on Shard(0) rows; Lookahead
    "lars": dict(lr=1.0, weight_decay=0.01, trust_coefficient=0.002),
}


def fsdp2_plugin_like_the_yaml() -> Any:
    """``recipes/accelerate/fsdp2.yaml``'s ``fsdp_config`` as a plugin (for the CPU run, which has no launcher)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "recipes" / "accelerate" / "fsdp2.yaml")).fsdp_config
    return FullyShardedDataParallelPlugin(
        fsdp_version=cfg["fsdp_version"],
        auto_wrap_policy=cfg["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[cfg["fsdp_transformer_layer_cls_to_wrap"]],
        reshard_after_forward=cfg["fsdp_reshard_after_forward"],
        state_dict_type=cfg["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=cfg["fsdp_cpu_ram_efficient_loading"],
        cpu_offload=cfg["fsdp_offload_params"],
        activation_checkpointing=cfg["fsdp_activation_checkpointing"],
    )


def make_accelerator(force_cpu: bool) -> Any:
    from accelerate import Accelerator

    if not force_cpu:
        return Accelerator()  # the FSDP2 plugin from the launcher (recipes/accelerate/fsdp2.yaml)
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=True)  # MULTI_CPU over gloo
    # Both shared states: every later AcceleratorState() copies the PartialState's distributed_type.
    accelerator.state.fsdp_plugin = fsdp2_plugin_like_the_yaml()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def global_batches(world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (world * MICRO_BATCH, SEQ_LEN), generator=g) for _ in range(STEPS)]


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = t.detach()
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.float().cpu()


def unsharded(name: str, batches: list[torch.Tensor], device: torch.device) -> dict[str, Any]:
    from hf_lars import create_optimizer
    from hf_lars.integrations.trust_ratios import trust_ratio_values

    model = tiny_model(seed=0).to(device)
    optimizer = create_optimizer(model, name, **OPTIMIZERS[name])
    losses = []
    for ids in batches:
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {
        "losses": losses,
        "weights": {n: full(p) for n, p in model.named_parameters()},
        "ratios": trust_ratio_values(optimizer),
    }


def sharded(accelerator: Any, name: str, batches: list[torch.Tensor]) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from hf_lars import create_optimizer
    from hf_lars.integrations.trust_ratios import trust_ratio_values

    model = tiny_model(seed=0)  # on the CPU, as a script builds it: prepare shards it and places it
    optimizer = create_optimizer(model, name, **OPTIMIZERS[name])
    originals = [p for group in optimizer.param_groups for p in group["params"]]
    model, optimizer = accelerator.prepare(model, optimizer)
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    rank, device = accelerator.process_index, accelerator.device
    losses = []
    for ids in batches:
        local = ids[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH].to(device)
        loss = model(input_ids=local, labels=local).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    return {
        "model_class": type(model).__name__,
        "dtensor_params": all(isinstance(p, DTensor) for p in model.parameters()),
        "placements": sorted({str(tuple(p.placements)) for p in model.parameters() if isinstance(p, DTensor)}),
        "optimizer_swapped": len(stepped) == len(originals)
        and all(isinstance(p, DTensor) and all(p is not o for o in originals) for p in stepped),
        "param_device": str(next(model.parameters()).device),
        "losses": losses,
        "weights": {n: full(p) for n, p in model.named_parameters()},
        "ratios": trust_ratio_values(optimizer, gather=True),  # every rank reports the layers it holds a piece of
    }


def compare(accelerator: Any) -> dict[str, Any]:
    """Every optimizer of :data:`OPTIMIZERS`: FSDP2 through ``accelerator.prepare`` against the unsharded run."""
    state = accelerator.state
    results: dict[str, Any] = {
        "distributed_type": str(state.distributed_type),
        "is_fsdp2": bool(accelerator.is_fsdp2),
        "fsdp_version": getattr(state.fsdp_plugin, "fsdp_version", None),
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
    }
    batches = global_batches(accelerator.num_processes)
    initial = {n: p.detach().float() for n, p in tiny_model(seed=0).named_parameters()}
    for name in OPTIMIZERS:
        ref = unsharded(name, batches, accelerator.device)
        got = sharded(accelerator, name, batches)
        w, r = got.pop("weights"), ref["weights"]
        ratios, ref_ratios = got.pop("ratios"), ref["ratios"]
        got.update(
            ref_losses=ref["losses"],
            names_match=sorted(w) == sorted(r),
            max_abs_diff=max((w[n] - r[n]).abs().max().item() for n in r if n in w),
            moved=max((r[n] - initial[n]).abs().max().item() for n in r),
            ratio_layers=sorted(ratios),
            ref_ratio_layers=sorted(ref_ratios),
            ratio_max_rel_diff=max(
                (abs(ratios[k] - ref_ratios[k]) / max(abs(ref_ratios[k]), 1e-30) for k in ref_ratios if k in ratios),
                default=None,
            ),
        )
        results[name] = got
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--force-cpu", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls in both runs
    torch.backends.cudnn.allow_tf32 = False
    accelerator = make_accelerator(args.force_cpu)
    results = compare(accelerator)
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    accelerator.wait_for_everyone()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
