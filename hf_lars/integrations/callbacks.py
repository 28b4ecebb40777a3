"""Trust-ratio logging: a Trainer callback and the pieces an Accelerate loop uses to do the same.

Every hf_lars optimizer keeps the last step's per-layer trust ratios as device tensors
(:meth:`~hf_lars.optim.TrustRatioOptimizer.trust_ratios`).  Nothing here reads them except at a logging
step, so training never waits on a host sync for logging's sake.  At a logging step the ratios are summarised
into ``trust_ratio_min`` / ``trust_ratio_median`` / ``trust_ratio_max`` (one device-to-host copy) and,
optionally, written per layer to ``trust_ratios.jsonl``, one line per logging step::

    {"step": 20, "trust_ratios": {"model.layers.0.self_attn.q_proj.weight": 0.0041, ...}}

``hf-lars plot-trust OUTPUT_DIR`` draws that file as a heatmap.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_lars.optim import TrustRatioOptimizer

__all__ = [
    "TRUST_RATIO_FILE",
    "STAT_KEYS",
    "TrustRatioCallback",
    "TrustRatioWriter",
    "add_trust_ratio_callback",
    "find_trust_ratio_optimizer",
    "trust_ratio_values",
    "summarize_trust_ratios",
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


def summarize_trust_ratios(values: Mapping[str, float]) -> dict[str, float]:
    """``{"trust_ratio_min", "trust_ratio_median", "trust_ratio_max"}`` of per-layer ratios (empty if none).

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
    return dict(zip(STAT_KEYS, (ordered[0], median, ordered[-1])))


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


def _is_training_log(logs: Mapping[str, Any]) -> bool:
    # Trainer logs training steps with "loss"; evaluation/prediction metrics and the end-of-training summary
    # ("train_runtime", ...) carry other keys.  Only training logs get trust ratios.
    return "loss" in logs


def _add_to_training_log(logs: dict[str, Any], state: Any, stats: Mapping[str, Any]) -> None:
    """Add ``stats`` to a training log in ``on_log``, and to the copy Trainer already put in ``log_history``.

    Trainer appends a copy of ``logs`` to ``state.log_history`` just before calling ``on_log``: completing that
    copy too makes the statistics land in ``trainer_state.json`` whatever the callback's position.
    """
    logs.update(stats)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        entry = state.log_history[-1]
        if all(entry.get(k) == v for k, v in logs.items() if k not in stats):
            entry.update(stats)


class TrustRatioCallback(TrainerCallback):
    """Log layer-wise trust ratios of an hf_lars optimizer at every Trainer logging step.

    Adds ``trust_ratio_min``, ``trust_ratio_median`` and ``trust_ratio_max`` to the training logs, so they
    reach every ``report_to`` integration that runs after this callback and ``trainer_state.json``
    (``log_history``), and optionally writes all layers to ``output_dir/trust_ratios.jsonl``.  The optimizer's
    ratios are read only at logging steps.  Wrappers (Accelerate, DeepSpeed) are looked through to find the
    hf_lars optimizer; with any other optimizer the callback does nothing.

    :class:`~hf_lars.LarsTrainer`, and ``Trainer`` after :func:`hf_lars.register`, add it automatically when
    an hf_lars optimizer is used.  To add it yourself, prefer :func:`add_trust_ratio_callback`, which puts it
    before the reporting integrations (``Trainer(callbacks=[...])`` appends callbacks after them, so they
    would not see the new keys; ``log_history`` and the JSONL file get them either way).

    Args:
        per_layer: write ``trust_ratios.jsonl`` in ``args.output_dir`` (world process zero only).
        filename: name of that file.
        gather: merge the layers of all ranks before summarising (needed under ZeRO/FSDP, where each rank
            holds only some layers).  A collective: every rank must log at the same steps, as Trainer does.
    """

    def __init__(self, per_layer: bool = True, filename: str = TRUST_RATIO_FILE, gather: bool = False) -> None:
        self.per_layer = per_layer
        self.filename = filename
        self.gather = gather
        self._writer: TrustRatioWriter | None = None
        self._warned_nonfinite = False

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self._writer = None
        self._warned_nonfinite = False
        ours = find_trust_ratio_optimizer(optimizer) is not None
        if ours and self.per_layer and state.is_world_process_zero and args.output_dir:
            self._writer = TrustRatioWriter(Path(args.output_dir) / self.filename)
            self._writer.start(state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or not _is_training_log(logs):
            return
        if find_trust_ratio_optimizer(optimizer) is None:
            return
        values = trust_ratio_values(optimizer, gather=self.gather)
        stats = summarize_trust_ratios(values)
        if not stats:
            return
        if "trust_ratio_nonfinite" in stats and not self._warned_nonfinite:
            self._warn_nonfinite(values, state.global_step)
        _add_to_training_log(logs, state, stats)
        if self._writer is not None:
            self._writer.write(state.global_step, values)

    def _warn_nonfinite(self, values: Mapping[str, float], step: int) -> None:
        """Once per run: the layers whose trust ratio is not finite (their weights are NaN/inf now)."""
        self._warned_nonfinite = True
        bad = [name for name, v in values.items() if not math.isfinite(v)]
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        logger.warning(
            "hf_lars: non-finite trust ratio at step %d in %d layer(s): %s. Their gradients or weights are NaN "
            "or infinite (the optimizer propagates them, as torch's optimizers do): lower the learning rate, "
            "enable gradient clipping, or use bf16/loss scaling.  Warned once per run.",
            step,
            len(bad),
            shown,
        )


def add_trust_ratio_callback(trainer: Any, callback: TrustRatioCallback | None = None) -> TrustRatioCallback:
    """Give ``trainer`` a :class:`TrustRatioCallback` placed before the ``report_to`` integrations.

    An existing instance (passed in ``callbacks=[...]``) is moved to the front instead of adding a second
    one.  Returns the callback in use.
    """
    handler = trainer.callback_handler
    existing = [cb for cb in handler.callbacks if isinstance(cb, TrustRatioCallback)]
    chosen = callback or (existing[0] if existing else TrustRatioCallback())
    handler.callbacks = [cb for cb in handler.callbacks if not isinstance(cb, TrustRatioCallback)]
    handler.callbacks.insert(0, chosen)
    return chosen
