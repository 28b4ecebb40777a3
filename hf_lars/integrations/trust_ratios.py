"""Trust-ratio logging without a framework: read, summarise and write an hf_lars optimizer's trust ratios.

Every hf_lars optimizer keeps the last step's per-layer trust ratios as device tensors
(:meth:`~hf_lars.optim.TrustRatioOptimizer.trust_ratios`).  Nothing here reads them except at a logging
step, so training never waits on a host sync for logging's sake.  At a logging step the ratios are summarised
into ``trust_ratio_min`` / ``trust_ratio_median`` / ``trust_ratio_max`` (one device-to-host copy) and,
optionally, written per layer to ``trust_ratios.jsonl``, one line per logging step::

    {"step": 20, "trust_ratios": {"model.layers.0.self_attn.q_proj.weight": 0.0041, ...}}

Each expert of a stacked MoE parameter is a layer of its own, named ``<parameter>[<expert>]``
(``model.layers.0.mlp.experts.gate_up_proj[3]``): the file and the heatmap have one row per expert, and the
summary adds ``trust_ratio_expert_spread``, the largest max/min ratio among the experts of one stacked
parameter (docs/design.md, "Mixture-of-experts: stacked layers").

``hf-lars plot-trust OUTPUT_DIR`` draws that file as a heatmap.  :class:`TrustRatioLogger` is the piece a
custom (Accelerate) loop calls; the Trainer callback (:mod:`hf_lars.integrations.callbacks`) uses the same
functions.  This module imports neither transformers nor accelerate.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hf_lars.integrations.distributed import is_sharded
from hf_lars.optim import TrustRatioOptimizer

__all__ = [
    "TRUST_RATIO_FILE",
    "STAT_KEYS",
    "TrustRatioWriter",
    "TrustRatioLogger",
    "find_trust_ratio_optimizer",
    "trust_ratio_values",
    "summarize_trust_ratios",
    "expert_spread",
    "split_expert_name",
]

logger = logging.getLogger(__name__)

#: File name of the per-layer log, written in ``output_dir``.
TRUST_RATIO_FILE = "trust_ratios.jsonl"
#: Keys added to the logs dict at each logging step.
STAT_KEYS = ("trust_ratio_min", "trust_ratio_median", "trust_ratio_max")

_MAX_UNWRAP = 8


def find_trust_ratio_optimizer(optimizer: Any) -> TrustRatioOptimizer | None:
    """The hf_lars optimizer inside ``optimizer``, or ``None``.

    Follows ``.optimizer`` through the wrappers that sit around it in practice: Accelerate's
    ``AcceleratedOptimizer`` / ``DeepSpeedOptimizerWrapper``, DeepSpeed's ZeRO optimizers (whose ``.optimizer``
    is the client optimizer), and the param-group view of :mod:`hf_lars.schedule` (``._wrapped``).
    """
    for _ in range(_MAX_UNWRAP):
        if optimizer is None or isinstance(optimizer, TrustRatioOptimizer):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            inner = getattr(optimizer, "_wrapped", None)
        optimizer = inner
    return None


def _world() -> tuple[bool, int]:
    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    return ready, (torch.distributed.get_world_size() if ready else 1)


def trust_ratio_values(optimizer: Any, *, gather: bool = False) -> dict[str, float]:
    """The last step's trust ratio of every adapted layer as Python floats (one host sync).

    Args:
        optimizer: an hf_lars optimizer, or a wrapper around one (see :func:`find_trust_ratio_optimizer`).
        gather: merge the layers every rank reports (``all_gather_object``).  Needed under ZeRO and FSDP, where
            a rank only reports the layers it holds a piece of; a collective, so every rank must call it.

    Returns:
        ``{layer name: ratio}``, empty before the first step or if ``optimizer`` holds no hf_lars optimizer.
    """
    inner = find_trust_ratio_optimizer(optimizer)
    values: dict[str, float] = {}
    if inner is not None:
        ratios = inner.trust_ratios()
        if ratios:
            names = list(ratios)
            host = torch.stack([ratios[n].detach().float().reshape(()) for n in names]).cpu().tolist()
            values = dict(zip(names, host))
    ready, world = _world()
    if gather and ready and world > 1:
        parts: list[dict[str, float] | None] = [None] * world
        torch.distributed.all_gather_object(parts, values)
        merged: dict[str, float] = {}
        for part in parts:
            merged.update(part or {})
        values = merged
    return values


_EXPERT = re.compile(r"^(?P<base>.+)\[(?P<expert>\d+)\]$")


def split_expert_name(name: str) -> tuple[str, int | None]:
    """``("...gate_up_proj", 3)`` for the layer name ``"...gate_up_proj[3]"``; ``(name, None)`` for a plain layer."""
    match = _EXPERT.match(name)
    return (name, None) if match is None else (match["base"], int(match["expert"]))


def expert_spread(values: Mapping[str, float]) -> float | None:
    """The largest ``max / min`` trust ratio among the experts of one stacked parameter; ``None`` without experts.

    NaN if an expert's ratio is not finite or not positive (the spread is then unknown, never hidden).
    """
    experts: dict[str, list[float]] = {}
    for name, value in values.items():
        base, expert = split_expert_name(name)
        if expert is not None:
            experts.setdefault(base, []).append(value)
    if not experts:
        return None
    spreads = []
    for ratios in experts.values():
        if not all(math.isfinite(r) and r > 0 for r in ratios):
            return math.nan
        spreads.append(max(ratios) / min(ratios))
    return max(spreads)


def summarize_trust_ratios(values: Mapping[str, float]) -> dict[str, float]:
    """``{"trust_ratio_min", "trust_ratio_median", "trust_ratio_max"}`` of per-layer ratios (empty if none).

    With stacked MoE experts, ``trust_ratio_expert_spread`` (:func:`expert_spread`) is added.
    The median of an even count is the mean of the two middle values.  If any ratio is not finite (a NaN
    or infinite gradient or weight), all three are NaN and ``trust_ratio_nonfinite`` counts those layers: a
    diverging layer must not hide behind healthy-looking statistics.
    """
    if not values:
        return {}
    bad = sum(not math.isfinite(v) for v in values.values())
    if bad:
        return {**dict.fromkeys(STAT_KEYS, math.nan), "trust_ratio_nonfinite": float(bad)}
    ordered = sorted(values.values())
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
    stats = dict(zip(STAT_KEYS, (ordered[0], median, ordered[-1])))
    spread = expert_spread(values)
    if spread is not None:
        stats["trust_ratio_expert_spread"] = spread
    return stats


class TrustRatioWriter:
    """Appends ``{"step": ..., "trust_ratios": {...}}`` lines to a JSONL file.

    :meth:`start` drops lines with a step above the step training (re)starts from, so a run resumed from a
    checkpoint does not keep the interrupted run's rows past that checkpoint (and a fresh run starts a fresh
    file).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def start(self, step: int) -> None:
        """Prepare the file for a run starting at optimizer step ``step`` (0 for a fresh run)."""
        kept: list[str] = []
        if step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Append one logging step's per-layer ratios."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "trust_ratios": dict(values)}) + "\n")


class TrustRatioLogger:
    """Trust-ratio statistics (and an optional per-layer JSONL) for a custom training loop.

    Call :meth:`log` at logging steps on *every* process (it may gather across ranks under DeepSpeed/FSDP);
    only the main process writes ``output_dir/trust_ratios.jsonl``, the same format
    :class:`~hf_lars.TrustRatioCallback` writes, so ``hf-lars plot-trust`` reads both.

    Args:
        accelerator: the ``Accelerator`` (or ``None`` for a single process).
        output_dir: where to write the JSONL; ``None`` for statistics only.
        start_step: the step training (re)starts from (rows after it are dropped).
        gather: merge layers across ranks; default: when the accelerator shards (DeepSpeed, FSDP).
    """

    def __init__(
        self,
        accelerator: Any = None,
        output_dir: str | os.PathLike[str] | None = None,
        *,
        start_step: int = 0,
        gather: bool | None = None,
    ) -> None:
        self.gather = is_sharded(accelerator) if gather is None else gather
        main = accelerator is None or accelerator.is_main_process
        self.writer = TrustRatioWriter(Path(output_dir) / TRUST_RATIO_FILE) if output_dir and main else None
        if self.writer is not None:
            self.writer.start(start_step)

    def log(self, optimizer: Any, step: int) -> dict[str, float]:
        """``{"trust_ratio_min", "trust_ratio_median", "trust_ratio_max"}`` of the last step (empty if none)."""
        if find_trust_ratio_optimizer(optimizer) is None and not self.gather:
            return {}
        values = trust_ratio_values(optimizer, gather=self.gather)
        if values and self.writer is not None:
            self.writer.write(step, values)
        return summarize_trust_ratios(values)
