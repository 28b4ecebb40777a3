"""The Trainer callbacks' shared pieces and :class:`TrustRatioCallback` (trust ratios in Trainer logs).

The framework-free half (reading, summarising and writing trust ratios) is
:mod:`hf_lars.integrations.trust_ratios`; the noise-scale callback is
:mod:`hf_lars.integrations.noise_scale`.  Both callbacks add their keys to a training log with
:func:`add_to_training_log` and are put before the reporting integrations by :func:`add_callback_first`.
"""

from __future__ import annotations

import abc

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_lars.integrations.trust_ratios import (
    STAT_KEYS,
    TRUST_RATIO_FILE,
    TrustRatioWriter,
    find_trust_ratio_optimizer,
    summarize_trust_ratios,
    trust_ratio_values,
)

__all__ = [
    "TRUST_RATIO_FILE",
    "STAT_KEYS",
    "TrainingLogCallback",
    "TrustRatioCallback",
    "TrustRatioWriter",
    "add_callback_first",
    "add_trust_ratio_callback",
    "add_to_training_log",
    "is_training_log",
    "find_trust_ratio_optimizer",
    "trust_ratio_values",
    "summarize_trust_ratios",
]

logger = logging.getLogger(__name__)

_Callback = TypeVar("_Callback", bound=TrainerCallback)


def is_training_log(logs: Mapping[str, Any]) -> bool:
    """Whether an ``on_log`` dict is a training step's log (the only ones that get our statistics)."""
    # Trainer logs training steps with "loss"; evaluation/prediction metrics and the end-of-training summary
    # ("train_runtime", ...) carry other keys.
    return "loss" in logs


def add_to_training_log(logs: dict[str, Any], state: TrainerState, stats: Mapping[str, Any]) -> None:
    """Add ``stats`` to a training log in ``on_log``, and to the copy Trainer already put in ``log_history``.

    Completing that copy too makes the statistics land in ``trainer_state.json`` whatever the callback's
    position; it relies on when Trainer appends to ``log_history``, so it lives with the other reliances on
    transformers internals (:func:`hf_lars.integrations.transformers.patches.complete_last_log_entry`).
    """
    # Imported here: the transformers package imports this module (its factory adds TrustRatioCallback).
    from hf_lars.integrations.transformers.patches import complete_last_log_entry

    logs.update(stats)
    complete_last_log_entry(state, logs, stats)


def add_callback_first(trainer: Any, cls: type[_Callback], callback: _Callback | None = None) -> _Callback:
    """Put a ``cls`` callback first in ``trainer``'s list, before the ``report_to`` integrations.

    ``Trainer(callbacks=[...])`` appends after them, so they would not see the keys the callback adds.
    ``callback`` is used if given, else an existing instance (moved, never doubled), else ``cls()``.
    Returns the callback in use.
    """
    handler = trainer.callback_handler
    existing = [cb for cb in handler.callbacks if isinstance(cb, cls)]
    chosen = callback or (existing[0] if existing else cls())
    handler.callbacks = [cb for cb in handler.callbacks if not isinstance(cb, cls)]
    handler.callbacks.insert(0, chosen)
    # Trainer lists the ExportableState callbacks when it builds its TrainerState (at train()); one added
    # later, e.g. from create_scheduler inside train(), needs an entry there, or saving a checkpoint fails.
    stateful = getattr(getattr(trainer, "state", None), "stateful_callbacks", None)
    if isinstance(chosen, ExportableState) and isinstance(stateful, dict):
        stateful.setdefault(type(chosen).__name__, chosen.state())
    return chosen


class TrainingLogCallback(TrainerCallback, abc.ABC):
    """A callback that adds statistics to every training log: subclasses say which, in ``training_log_stats``.

    ``on_log`` keeps to training logs (:func:`is_training_log`) and puts the statistics in the logs and in
    ``log_history`` (:func:`add_to_training_log`), so the ``report_to`` integrations after it and
    ``trainer_state.json`` see them.
    """

    @abc.abstractmethod
    def training_log_stats(self, state: TrainerState, logs: Mapping[str, Any], **kwargs: Any) -> Mapping[str, Any]:
        """The statistics to add at this logging step (empty: none); ``kwargs`` are ``on_log``'s."""

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or not is_training_log(logs):
            return
        stats = self.training_log_stats(state, logs, **kwargs)
        if stats:
            add_to_training_log(logs, state, stats)


class TrustRatioCallback(TrainingLogCallback):
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

    def training_log_stats(
        self, state: TrainerState, logs: Mapping[str, Any], optimizer: Any = None, **kwargs: Any
    ) -> dict[str, float]:
        if find_trust_ratio_optimizer(optimizer) is None:
            return {}
        values = trust_ratio_values(optimizer, gather=self.gather)
        stats = summarize_trust_ratios(values)
        if "trust_ratio_nonfinite" in stats and not self._warned_nonfinite:
            self._warn_nonfinite(values, state.global_step)
        if stats and self._writer is not None:
            self._writer.write(state.global_step, values)
        return stats

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
    return add_callback_first(trainer, TrustRatioCallback, callback)
