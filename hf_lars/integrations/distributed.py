"""The one "is this run sharded" test and the one CPU process-state helper every front door uses.

Trust ratios need a gather across ranks when the optimizer state is sharded (DeepSpeed ZeRO, FSDP), and the
noise-scale monitor must know which engine runs; both ask :func:`sharding_engine`.  On CPU, Accelerate and
Trainer only see a multi-process DeepSpeed launch when a gloo state exists first:
:func:`init_cpu_distributed_state` creates it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

__all__ = ["ShardingEngine", "sharding_engine", "is_sharded", "init_cpu_distributed_state", "refuse_fsdp1"]

ShardingEngine = Literal["deepspeed", "fsdp"]
_ENGINES: dict[str, ShardingEngine] = {"DEEPSPEED": "deepspeed", "FSDP": "fsdp"}


def _from_distributed_type(distributed_type: Any) -> ShardingEngine | None:
    return _ENGINES.get(str(getattr(distributed_type, "value", distributed_type) or "").upper())


def _from_accelerator_state() -> ShardingEngine | None:
    try:
        from accelerate.state import AcceleratorState

        return _from_distributed_type(getattr(AcceleratorState(), "distributed_type", None))
    except Exception:  # noqa: BLE001 - no accelerator state yet: nothing is sharded
        return None


def sharding_engine(source: Any) -> ShardingEngine | None:
    """Which engine shards this run's optimizer state: ``"deepspeed"``, ``"fsdp"`` or ``None``.

    ``source`` is what the caller has at hand: a ``Trainer`` (its ``is_deepspeed_enabled`` /
    ``is_fsdp_enabled``), an ``Accelerator`` (its ``distributed_type``), or ``TrainingArguments`` (their
    ``deepspeed`` / ``fsdp`` settings, else the process's ``AcceleratorState``, which Trainer creates before
    the callbacks run).
    """
    if hasattr(source, "is_deepspeed_enabled") or hasattr(source, "is_fsdp_enabled"):  # a Trainer
        if getattr(source, "is_deepspeed_enabled", False):
            return "deepspeed"
        return "fsdp" if getattr(source, "is_fsdp_enabled", False) else None
    if hasattr(source, "distributed_type"):  # an Accelerator or its state
        return _from_distributed_type(source.distributed_type)
    if source is None:
        return None
    if getattr(source, "deepspeed", None) or getattr(source, "deepspeed_plugin", None) is not None:
        return "deepspeed"
    if getattr(source, "fsdp", None):
        return "fsdp"
    return _from_accelerator_state()


def is_sharded(source: Any) -> bool:
    """Whether DeepSpeed or FSDP shards the optimizer state (see :func:`sharding_engine` for ``source``)."""
    return sharding_engine(source) is not None


def init_cpu_distributed_state(deepspeed: bool = False) -> Any:
    """On a multi-process CPU launch, create Accelerate's state over gloo first; otherwise do nothing.

    Under DeepSpeed on CPU, Accelerate (and Trainer) otherwise believe each rank is alone.  Call it before the
    ``Accelerator`` or ``TrainingArguments`` is created; with Trainer also set
    ``accelerator_config={"use_configured_state": True}`` when it returns a state.  GPU runs and single
    processes are left to Accelerate's defaults.

    Args:
        deepspeed: the run uses DeepSpeed (``TrainingArguments(deepspeed=...)``, launched with ``torchrun``):
            the state is then created as a DeepSpeed one, which Trainer requires.  ``accelerate launch`` with a
            DeepSpeed config says so itself (``ACCELERATE_USE_DEEPSPEED``).

    Returns:
        The ``accelerate.PartialState`` it created, or ``None``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return None
    from accelerate import PartialState

    if not deepspeed and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        # Plain multi-process CPU (DDP): Accelerate's CPU state is distributed over gloo by itself; a bare
        # gloo state would leave it "not distributed" and the model would never be wrapped in DDP.
        return PartialState(cpu=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    return PartialState(backend="gloo")


def refuse_fsdp1(model: Any) -> None:
    """Raise ``ValueError`` when ``model`` is (or holds) an FSDP1 ``FullyShardedDataParallel`` module.

    FSDP1 flattens each wrapped module's parameters into one ``FlatParameter`` shard per rank; with
    ``use_orig_params=True`` the optimizer sees views of that shard, and hf_lars has no layout for it, so the
    per-layer norms would be per-shard norms: silently wrong trust ratios.  FSDP2 (``fully_shard``) keeps one
    ``DTensor`` per parameter, which hf_lars reduces exactly.
    """
    if model is None or not hasattr(model, "modules"):
        return
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    flat = any(type(p).__name__ == "FlatParameter" for p in model.parameters())
    if flat or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "hf_lars does not support FSDP1 (FullyShardedDataParallel / FlatParameter): its per-layer norms would "
            "be computed per flat shard.  Use FSDP2: torch.distributed.fsdp.fully_shard, Accelerate's "
            "fsdp_version: 2 (recipes/accelerate/fsdp2.yaml) or Trainer's --fsdp with fsdp_config "
            '{"fsdp_version": 2}.'
        )
