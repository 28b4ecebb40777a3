r"""The batch-size ramp: the global batch grows during training, the micro-batch does not.

Critical Batch Size Revisited (arXiv 2505.23971) measured that starting small and growing the batch reaches
the same loss in fewer optimizer steps; the surge paper (arXiv 2405.14578) explains why: ``B_noise`` grows as
training proceeds.  The batch grows by raising gradient accumulation, so memory stays flat::

    batch(t)        = unit x accumulation(t)          unit = micro_batch x processes
    lr(t)           = schedule(t) x factor(t)
    factor(t)       = law(batch(t)) / law(launch_batch)        law(B) = scaled_lr(rule, ref_batch, 1, B, b_noise)

Two ways of choosing ``batch(t)``:

- **schedule** (``"256:1000,512:3000,1024"``, :func:`parse_batch_size_schedule`): 256 for optimizer steps
  0-999, 512 for 1000-2999, 1024 from step 3000 on.  Batches strictly increase; the last entry is open-ended.
- **noise-driven** (``noise_k``, ``min_batch``, ``max_batch``): after each ``B_noise`` estimate,
  ``target = k x B_noise`` is rounded *down* to a multiple of ``unit``, clamped to ``[min_batch, max_batch]``
  and the batch becomes ``max(batch, target)``: it never shrinks (a smaller batch would undo the noise
  averaging the run already paid for, and the estimate is noisy).  It starts at ``min_batch``.  A
  non-finite or non-positive estimate changes nothing (``skipped`` counts them), and neither does one logged
  before optimizer step ``start_step`` (``waited`` counts them): young estimates are not acted on, as in
  :mod:`hf_lars.scaling.online` (whose :func:`~hf_lars.scaling.online.default_start_step` Trainer uses).

How progress is counted.  The optimizer step stays the unit of ``max_steps``, of the schedule string's
steps, of logging/saving and of the LR schedule (Trainer counts those, and a warmup measured in updates is
what the update rule needs); the examples actually consumed are counted exactly here (``samples``, logged as
``train_samples``) so a run can be read, and stopped, in samples: :meth:`BatchSizeRamp.steps_for_samples`
gives the ``max_steps`` that consumes a sample (token) budget under a schedule.

The LR factor follows the launch's ``--lr_scaling`` rule (``none``: the LR is not touched), relative to the
batch the launch LR was scaled for (``launch_batch``): ``lr(t)`` is then exactly the LR the launch would have
given a fixed batch ``batch(t)``.  :class:`~hf_lars.schedule.OnlineLrScheduler` multiplies it into any
schedule (the ramp has the factor interface: ``factor``, ``update``, ``state_dict``).  Plain Python like the
rest of :mod:`hf_lars.scaling`; the Trainer side is :mod:`hf_lars.integrations.batch_ramp`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hf_lars.scaling._common import _check_saved_settings, _start_step
from hf_lars.scaling._common import _positive_number as _check_positive
from hf_lars.scaling.laws import B_NOISE_RULES, canonical_rule, scaled_lr

__all__ = ["parse_batch_size_schedule", "BatchSizeRamp", "count_examples"]

_SCHEDULE_HELP = 'write it as "BATCH:UNTIL_STEP,...,BATCH", e.g. "256:1000,512:3000,1024"'


def _positive_int(text: str, what: str, entry: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"Invalid batch size schedule entry {entry!r}: {what} {text!r} is not an integer "
                         f"({_SCHEDULE_HELP})") from None
    if value < 1:
        raise ValueError(f"Invalid batch size schedule entry {entry!r}: {what} must be positive ({_SCHEDULE_HELP})")
    return value


def parse_batch_size_schedule(text: str) -> tuple[tuple[int, int | None], ...]:
    """``"256:1000,512:3000,1024"`` -> ``((256, 1000), (512, 3000), (1024, None))``: (batch, until step).

    Raises:
        ValueError: an empty string or entry, a part that is not a positive integer, an open-ended entry that
            is not the last (or a last one with a step), batches that do not strictly increase, steps that do
            not strictly increase; the message names the entry and shows the format.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"Empty batch size schedule {text!r}: {_SCHEDULE_HELP}")
    entries = [e.strip() for e in text.split(",")]
    out: list[tuple[int, int | None]] = []
    for i, entry in enumerate(entries):
        last = i == len(entries) - 1
        if not entry:
            raise ValueError(f"Invalid batch size schedule {text!r}: empty entry {i + 1} ({_SCHEDULE_HELP})")
        parts = entry.split(":")
        if len(parts) > 2:
            raise ValueError(f"Invalid batch size schedule entry {entry!r}: one ':' at most ({_SCHEDULE_HELP})")
        batch = _positive_int(parts[0], "batch", entry)
        until = _positive_int(parts[1], "step", entry) if len(parts) == 2 else None
        if last and until is not None:
            raise ValueError(f"Invalid batch size schedule {text!r}: the last entry {entry!r} must be open-ended "
                             f"(a batch without ':STEP'; it lasts to the end of training) ({_SCHEDULE_HELP})")
        if not last and until is None:
            raise ValueError(f"Invalid batch size schedule {text!r}: entry {entry!r} needs ':UNTIL_STEP' (only the "
                             f"last entry is open-ended) ({_SCHEDULE_HELP})")
        if out and batch <= out[-1][0]:
            raise ValueError(f"Invalid batch size schedule {text!r}: batches must increase ({batch} after "
                             f"{out[-1][0]}); the ramp only grows the batch")
        if out and until is not None and until <= out[-1][1]:  # type: ignore[operator]
            raise ValueError(f"Invalid batch size schedule {text!r}: steps must increase ({until} after "
                             f"{out[-1][1]}): each entry says until which optimizer step its batch lasts")
        out.append((batch, until))
    return tuple(out)


def count_examples(batch: Any, default: int) -> int:
    """The examples in one collated micro-batch: the first dimension of its first tensor (``default`` if none).

    A tensor, or a mapping / list / tuple of them (what data loaders yield); duck-typed on ``.shape``, so any
    array library works.  The last micro-batch of an epoch may be short: the ramp counts what it holds.
    """
    if hasattr(batch, "shape"):
        return int(batch.shape[0]) if len(batch.shape) else default
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if hasattr(value, "shape") and len(value.shape):
            return int(value.shape[0])
    return default


class BatchSizeRamp:
    """Which global batch, accumulation and LR factor at which optimizer step (module docstring).

    Args:
        micro_batch: examples per process per forward/backward (``per_device_train_batch_size``).
        processes: data-parallel processes.
        schedule: a schedule string or :func:`parse_batch_size_schedule`'s tuple; or ``None`` for noise-driven.
        noise_k: noise-driven: the batch tracks ``noise_k x B_noise``.
        min_batch, max_batch: noise-driven bounds (multiples of ``micro_batch x processes``); the run starts
            at ``min_batch``.
        rule, ref_batch, b_noise: the launch's ``--lr_scaling`` rule and its values (``"none"``: factor 1).
        launch_batch: the global batch the launch LR was scaled for (default: the first batch).
        start_step: noise-driven: estimates logged before this many optimizer steps are not acted on (0: the
            first is).

    Raises:
        ValueError: both or neither of ``schedule`` and ``noise_k``; a batch or bound that is not a multiple
            of ``micro_batch x processes`` (the message gives the nearest valid ones); bad bounds; a rule that
            needs ``ref_batch``/``b_noise`` without them.
    """

    def __init__(
        self,
        *,
        micro_batch: int,
        processes: int = 1,
        schedule: str | tuple[tuple[int, int | None], ...] | None = None,
        noise_k: float | None = None,
        min_batch: int | None = None,
        max_batch: int | None = None,
        rule: str = "none",
        ref_batch: float | None = None,
        b_noise: float | None = None,
        launch_batch: float | None = None,
        start_step: int = 0,
    ) -> None:
        for name, value in (("micro_batch", micro_batch), ("processes", processes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (must be a positive integer)")
        self.micro_batch, self.processes = micro_batch, processes
        self.unit = micro_batch * processes
        if (schedule is None) == (noise_k is None):
            raise ValueError("A batch size ramp follows either a schedule or the noise scale: give exactly one of "
                             "schedule (--batch_size_schedule) and noise_k (--batch_size_noise_k)")
        if schedule is not None:
            if min_batch is not None or max_batch is not None:
                raise ValueError("min_batch/max_batch bound the noise-driven ramp; a schedule names its batches "
                                 "itself: drop --batch_size_min/--batch_size_max")
            if start_step:
                raise ValueError("start_step delays acting on B_noise estimates, which a schedule ignores: drop "
                                 "--b_noise_start_step, or use --batch_size_noise_k")
            self.schedule = parse_batch_size_schedule(schedule) if isinstance(schedule, str) else tuple(schedule)
            for batch, _ in self.schedule:
                self._check_multiple("batch size schedule entry", batch)
            self.noise_k = None
            self.min_batch, self.max_batch = self.schedule[0][0], self.schedule[-1][0]
        else:
            self.schedule = None
            self.noise_k = _check_positive("noise_k", noise_k)
            if min_batch is None or max_batch is None:
                raise ValueError("The noise-driven ramp needs bounds: set --batch_size_min (where it starts) and "
                                 "--batch_size_max (the most it grows to)")
            self.min_batch = self._check_multiple("min_batch", min_batch)
            self.max_batch = self._check_multiple("max_batch", max_batch)
            if self.max_batch < self.min_batch:
                raise ValueError(f"Invalid bounds: max_batch {max_batch} < min_batch {min_batch}")
        self.rule = canonical_rule(rule)
        if self.rule != "none":
            _check_positive("ref_batch", ref_batch)
            if self.rule in B_NOISE_RULES:
                _check_positive("b_noise", b_noise)
        self.ref_batch, self.b_noise_law = ref_batch, b_noise
        self.launch_batch = float(self.min_batch if launch_batch is None else _check_positive("launch_batch",
                                                                                              launch_batch))
        self.start_step = _start_step(start_step)
        self.step = 0  # optimizer steps done
        self.samples = 0  # examples consumed by them
        self.micro_batches = 0  # per-process micro-batches consumed by them
        self.batch = self.min_batch
        self.b_noise: float | None = None  # the last estimate used (noise-driven)
        self.skipped = 0
        self.waited = 0  # estimates before start_step
        self.changes: list[tuple[int, int]] = [(0, self.batch)]  # (first step, batch)

    def _check_multiple(self, name: str, batch: Any) -> int:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"Invalid {name} {batch!r}: must be a positive integer")
        if batch % self.unit:
            low = max(self.unit, batch // self.unit * self.unit)
            raise ValueError(
                f"Invalid {name} {batch}: not a multiple of micro-batch x processes = {self.unit} (the ramp grows "
                f"the batch by gradient accumulation); use {low} or {low + self.unit}, or change "
                "--per_device_train_batch_size"
            )
        return batch

    # ------------------------------------------------------------------------------ queries
    @property
    def accumulation(self) -> int:
        """Micro-batches per process in the current optimizer step."""
        return self.batch // self.unit

    def batch_at(self, step: int) -> int:
        """Schedule: the batch of optimizer step ``step``; noise-driven: the current batch."""
        if self.schedule is None:
            return self.batch
        for batch, until in self.schedule:
            if until is None or step < until:
                return batch
        raise AssertionError("unreachable: the last entry is open-ended")

    def law(self, batch: float) -> float:
        """The rule's LR at ``batch`` relative to the reference LR (1 for ``none``)."""
        if self.rule == "none":
            return 1.0
        return float(scaled_lr(self.rule, self.ref_batch, 1.0, batch, self.b_noise_law))

    @property
    def factor(self) -> float:
        """``law(batch) / law(launch_batch)``: what the schedule's LR is multiplied by now."""
        return self.law(self.batch) / self.law(self.launch_batch)

    def steps_for_samples(self, samples: int) -> int:
        """Schedule: the fewest optimizer steps whose batches add up to at least ``samples`` examples."""
        if self.schedule is None:
            raise ValueError("steps_for_samples needs a schedule: a noise-driven ramp's batches are not known ahead")
        steps, total, start = 0, 0, 0
        for batch, until in self.schedule:
            span = math.inf if until is None else until - start
            need = math.ceil((samples - total) / batch)
            if need <= span:
                return steps + max(need, 0)
            steps, total, start = steps + int(span), total + int(span) * batch, int(until)  # type: ignore[arg-type]
        raise AssertionError("unreachable: the last entry is open-ended")

    # ------------------------------------------------------------------------------ updates
    def step_done(self, samples: int | None = None, micro_batches: int | None = None) -> bool:
        """Count one optimizer step (``samples`` examples, default the batch); whether the batch changed.

        ``micro_batches`` is what each process consumed (default the accumulation; fewer at the end of an
        epoch).  A schedule moves to the next step's batch here; the noise-driven ramp moves in :meth:`update`.
        """
        self.samples += self.batch if samples is None else int(samples)
        self.micro_batches += self.accumulation if micro_batches is None else int(micro_batches)
        self.step += 1
        return self._set(self.batch_at(self.step))

    def update(self, b_noise: float | None, step: int | None = None) -> float:
        """Noise-driven: fold in one ``B_noise`` estimate (effective from the next step); the LR factor.

        The estimate counts as logged after :attr:`step` optimizer steps (the ramp counts them itself; ``step``
        is accepted so the ramp can stand where an :class:`~hf_lars.scaling.online.OnlineLrFactor` stands).
        A schedule ignores estimates (returns the factor unchanged).
        """
        if self.noise_k is None:
            return self.factor
        if self.step < self.start_step:
            self.waited += 1
            return self.factor
        if b_noise is None or isinstance(b_noise, bool) or not math.isfinite(b_noise) or b_noise <= 0:
            self.skipped += 1
            return self.factor
        self.b_noise = float(b_noise)
        target = int(self.noise_k * self.b_noise // self.unit) * self.unit
        self._set(max(self.batch, min(max(target, self.min_batch), self.max_batch)))
        return self.factor

    def _set(self, batch: int) -> bool:
        if batch == self.batch:
            return False
        self.batch = batch
        if self.changes[-1][0] == self.step:  # moved again before that step ran
            self.changes[-1] = (self.step, batch)
        else:
            self.changes.append((self.step, batch))
        return True

    # ------------------------------------------------------------------------------ checkpoints
    def _config(self) -> dict[str, Any]:
        return {
            "unit": self.unit, "schedule": [list(e) for e in self.schedule] if self.schedule else None,
            "noise_k": self.noise_k, "min_batch": self.min_batch, "max_batch": self.max_batch, "rule": self.rule,
            "ref_batch": self.ref_batch, "b_noise_law": self.b_noise_law, "launch_batch": self.launch_batch,
            "start_step": self.start_step,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the ramp stands (step, samples, micro-batches, batch, last estimate) and its settings."""
        return {**self._config(), "step": self.step, "samples": self.samples, "micro_batches": self.micro_batches,
                "batch": self.batch, "b_noise": self.b_noise, "skipped": self.skipped,
                "waited": self.waited, "changes": [list(c) for c in self.changes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if it was saved with other settings."""
        _check_saved_settings(self._config(), state, "batch size ramp has",
                              "resume with the same --batch_size_* and --lr_scaling flags, processes and micro-batch, "
                              "or start a fresh run")
        self.step, self.samples = int(state["step"]), int(state["samples"])
        self.micro_batches, self.batch = int(state["micro_batches"]), int(state["batch"])
        self.b_noise, self.skipped, self.waited = state["b_noise"], int(state["skipped"]), int(state["waited"])
        self.changes = [(int(s), int(b)) for s, b in state["changes"]]

    def __repr__(self) -> str:
        mode = f"schedule={self.schedule!r}" if self.schedule else f"noise_k={self.noise_k:g}"
        return f"BatchSizeRamp({mode}, step={self.step}, batch={self.batch}, accumulation={self.accumulation})"
