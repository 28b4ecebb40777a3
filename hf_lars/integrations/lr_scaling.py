"""Rescale the learning rate at launch for the global batch size: ``--lr_scaling surge|sgd|linear|sqrt|none``.

``--learning_rate`` is the reference LR, tuned at ``--lr_scaling_ref_batch`` examples per optimizer step; the
run's global batch is ``processes x per_device_train_batch_size x gradient_accumulation_steps``; the LR the
run uses is :func:`hf_lars.scaling.scaled_lr` of the two (the one function every front door calls):

- ``surge`` (alias ``adam``): Li et al. 2024, ``lr ∝ 1 / cosh((ln B - ln B_noise) / 2)``, needs ``--b_noise``;
- ``sgd``: McCandlish et al. 2018, ``lr ∝ 1 / (1 + B_noise / B)``, needs ``--b_noise``;
- ``linear`` (Goyal et al. 2017): ``lr ∝ B``;  ``sqrt``: ``lr ∝ sqrt(B)``;  ``none``: unchanged.

Pieces:

- :class:`LrScalingArguments`: the three fields with help strings, to compose into a ``TrainingArguments``
  subclass or to parse with ``HfArgumentParser`` next to it;
- :func:`global_batch_size`, :func:`apply_lr_scaling`: the Trainer side (sets ``args.learning_rate``,
  idempotent, refreshes a DeepSpeed config whose ``"auto"`` LRs were filled from the unscaled value).
- :func:`batch_size_ramp`: the :class:`~hf_lars.scaling.ramp.BatchSizeRamp` of the ``--batch_size_*`` flags,
  checked against the run (``apply_lr_scaling`` calls it at argument parsing; the Trainer side is
  :mod:`hf_lars.integrations.batch_ramp`).

Accelerate and hand-written loops call :func:`hf_lars.scaling.scaled_lr` itself::

    batch = accelerator.num_processes * per_device_batch * accumulation_steps
    lr = scaled_lr("surge", ref_batch=256, ref_lr=3e-4, batch=batch, b_noise=900)
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from hf_lars.scaling.laws import B_NOISE_RULES, canonical_rule, scaled_lr
from hf_lars.scaling._common import _start_step
from hf_lars.scaling.online import OnlineLrFactor, default_start_step
from hf_lars.scaling.ramp import BatchSizeRamp

__all__ = [
    "LR_SCALING_CHOICES",
    "LrScalingArguments",
    "global_batch_size",
    "apply_lr_scaling",
    "check_lr_scaling_flags",
    "online_lr_factor",
    "batch_size_ramp",
    "ramp_requested",
    "b_noise_start_step",
]

logger = logging.getLogger(__name__)

#: Values accepted by ``--lr_scaling`` (``adam`` is an alias of ``surge``).
LR_SCALING_CHOICES: tuple[str, ...] = ("none", "surge", "adam", "sgd", "linear", "sqrt")
# Private attribute set on the args by apply_lr_scaling: {"ref_lr": ..., "lr": ...}; makes it idempotent.
_APPLIED_ATTR = "_hf_lars_lr_scaling"


@dataclass
class LrScalingArguments:
    """Command-line fields of the LR rescaling and the batch-size ramp (compose into ``TrainingArguments``)."""

    lr_scaling: str = field(
        default="none",
        metadata={
            "help": "Rescale --learning_rate (tuned at --lr_scaling_ref_batch) to this run's global batch size "
            "(processes x per_device_train_batch_size x gradient_accumulation_steps): 'surge' (Adam-style "
            "optimizers, Li et al. 2024; needs --b_noise), 'sgd' (McCandlish et al. 2018; needs --b_noise), "
            "'linear' (Goyal et al. 2017), 'sqrt', or 'none'.",
            "choices": list(LR_SCALING_CHOICES),
        },
    )
    lr_scaling_ref_batch: int | None = field(
        default=None,
        metadata={
            "help": "Global batch size (examples per optimizer step) at which --learning_rate was tuned; required "
            "unless --lr_scaling none."
        },
    )
    b_noise: float | None = field(
        default=None,
        metadata={
            "help": "Gradient noise scale B_noise in examples (the peak of the surge law, the knee of the SGD law), "
            "e.g. from 'hf-lars scale fit' or the b_noise logged by GradientNoiseScaleCallback; required by "
            "--lr_scaling surge and sgd."
        },
    )
    lr_scaling_online: bool = field(
        default=False,
        metadata={
            "help": "Follow the gradient noise scale while training: at every logging step the LR is re-derived by "
            "the --lr_scaling law (surge or sgd) from the b_noise measured online (a GradientNoiseScaleCallback is "
            "added; it needs >= 2 processes or gradient_accumulation_steps >= 2) and multiplies the schedule's LR "
            "(logged as lr_factor, saved in checkpoints). --b_noise, if given, is the launch estimate."
        },
    )
    lr_scaling_min_factor: float = field(
        default=0.25,
        metadata={"help": "With --lr_scaling_online: the smallest factor applied to the launch LR (<= 1)."},
    )
    lr_scaling_max_factor: float = field(
        default=4.0,
        metadata={"help": "With --lr_scaling_online: the largest factor applied to the launch LR (>= 1)."},
    )
    lr_scaling_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "With --lr_scaling_online: weight of the previous factor in a log-space average, in [0, 1) "
            "(0 follows each logged b_noise at once; b_noise itself is already an EMA)."
        },
    )
    b_noise_start_step: int | None = field(
        default=None,
        metadata={
            "help": "With --lr_scaling_online or --batch_size_noise_k: the first optimizer step whose measured "
            "b_noise is acted on (earlier estimates are measured, not used: the first ones average only a few noisy "
            "steps). Default: the later of the LR warmup's end and the noise EMA's window (100 steps for its beta "
            "0.99; logging_steps times that under DeepSpeed, which measures once per log). 0 acts on the first."
        },
    )
    batch_size_schedule: str | None = field(
        default=None,
        metadata={
            "help": "Grow the global batch during training by raising gradient accumulation (the micro-batch, and "
            "so memory, stays): 'BATCH:UNTIL_STEP,...,BATCH', e.g. '256:1000,512:3000,1024' (256 for optimizer "
            "steps 0-999, 512 until step 2999, then 1024). Batches increase, each a multiple of processes x "
            "per_device_train_batch_size; the LR is rescaled by the --lr_scaling rule at each change. Needs "
            "--max_steps and LarsTrainer; leave --gradient_accumulation_steps at 1."
        },
    )
    batch_size_noise_k: float | None = field(
        default=None,
        metadata={
            "help": "Grow the global batch to track k x B_noise measured while training (instead of a schedule): "
            "at each logging step k x b_noise is rounded down to a multiple of processes x "
            "per_device_train_batch_size and clamped to [--batch_size_min, --batch_size_max]; the batch never "
            "shrinks. Needs a noise source (>= 2 processes, or --batch_size_min above one micro-batch)."
        },
    )
    batch_size_min: int | None = field(
        default=None,
        metadata={"help": "With --batch_size_noise_k: the global batch the run starts at (its smallest)."},
    )
    batch_size_max: int | None = field(
        default=None,
        metadata={"help": "With --batch_size_noise_k: the largest global batch the ramp grows to."},
    )


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ValueError(f"Invalid {name}: {value!r} (must be a positive integer)")
    if value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be a positive integer)")
    return int(value)


def global_batch_size(args: Any, world_size: int) -> int:
    """``world_size x args.per_device_train_batch_size x args.gradient_accumulation_steps``.

    ``world_size`` is the number of data-parallel processes (``args.world_size`` under Trainer,
    ``accelerator.num_processes`` under Accelerate).
    """
    world = _check_positive_int("world_size", world_size)
    per_device = _check_positive_int("per_device_train_batch_size", args.per_device_train_batch_size)
    accum = _check_positive_int("gradient_accumulation_steps", getattr(args, "gradient_accumulation_steps", 1))
    return world * per_device * accum


def _is_positive_number(value: Any) -> bool:
    return (
        not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    )


def _validate(rule: str, ref_batch: Any, b_noise: Any, online: bool = False) -> str:
    """The canonical rule; ``ValueError`` with a clear message for every bad combination.

    With ``online`` (``--lr_scaling_online``) ``b_noise`` is optional: the launch estimate, if any.
    """
    try:
        canon = canonical_rule(rule)
    except ValueError:
        raise ValueError(
            f"Unknown lr_scaling rule {rule!r}; valid rules: {', '.join(LR_SCALING_CHOICES)}"
        ) from None
    if canon == "none":
        return canon
    if ref_batch is None:
        raise ValueError(
            f"lr_scaling={rule!r} needs lr_scaling_ref_batch, the global batch size --learning_rate was tuned at"
        )
    if not _is_positive_number(ref_batch):
        raise ValueError(f"Invalid lr_scaling_ref_batch: {ref_batch!r} (must be a positive number of examples)")
    if online and canon not in B_NOISE_RULES:
        raise ValueError(
            f"--lr_scaling_online follows the measured B_noise, which only the surge and sgd rules depend on; "
            f"--lr_scaling {rule} fixes the LR at launch: use --lr_scaling surge (Adam-style) or sgd, or drop "
            "--lr_scaling_online"
        )
    if canon in B_NOISE_RULES:
        if b_noise is None and not online:
            raise ValueError(
                f"lr_scaling={rule!r} needs b_noise (the gradient noise scale in examples: fit it with "
                "'hf-lars scale fit' or read the b_noise logged by GradientNoiseScaleCallback)"
            )
        if b_noise is not None and not _is_positive_number(b_noise):
            raise ValueError(f"Invalid b_noise: {b_noise!r} (must be a positive number of examples)")
    return canon


def _online_factor(
    rule: str, ref_batch: Any, batch: Any, b_noise: Any, min_factor: Any, max_factor: Any, smoothing: Any,
    start_step: int = 0,
) -> OnlineLrFactor:
    """The :class:`OnlineLrFactor` of these flags, its errors naming the ``--lr_scaling_*`` flag."""
    try:
        return OnlineLrFactor(
            rule, ref_batch=ref_batch, batch=batch, b_noise=b_noise, min_factor=min_factor,
            max_factor=max_factor, smoothing=smoothing, start_step=start_step,
        )
    except ValueError as err:
        raise ValueError(f"--lr_scaling_online: {err} (set by --lr_scaling_min_factor, --lr_scaling_max_factor, "
                         "--lr_scaling_smoothing)") from None


def check_lr_scaling_flags(
    lr_scaling: str,
    lr_scaling_ref_batch: Any = None,
    b_noise: Any = None,
    *,
    lr_scaling_online: bool = False,
    lr_scaling_min_factor: Any = 0.25,
    lr_scaling_max_factor: Any = 4.0,
    lr_scaling_smoothing: Any = 0.0,
    batch_size_schedule: str | None = None,
    batch_size_noise_k: Any = None,
    batch_size_min: Any = None,
    batch_size_max: Any = None,
    b_noise_start_step: Any = None,
) -> None:
    """Check the ``--lr_scaling*`` / ``--b_noise*`` / ``--batch_size_*`` flags without a run (at launch).

    What needs the run (processes, micro-batch, accumulation) is checked when the arguments are built.

    Raises:
        ValueError: what :func:`apply_lr_scaling` would raise for these flags, naming the flag and the fix.
    """
    if not isinstance(lr_scaling_online, bool):
        raise ValueError(f"Invalid lr_scaling_online: {lr_scaling_online!r} (must be true or false)")
    rule = _validate(str(lr_scaling), lr_scaling_ref_batch, b_noise, lr_scaling_online)
    if lr_scaling_online:
        _online_factor(rule, lr_scaling_ref_batch, lr_scaling_ref_batch, b_noise, lr_scaling_min_factor,
                       lr_scaling_max_factor, lr_scaling_smoothing)
    ramp = _RampFlags(batch_size_schedule, batch_size_noise_k, batch_size_min, batch_size_max)
    if ramp.requested:
        _check_ramp_combination(ramp, lr_scaling_online)
        _ramp(ramp, micro_batch=1, processes=1, rule=rule, ref_batch=lr_scaling_ref_batch, b_noise=b_noise,
              launch_batch=None)
    _check_start_flag(b_noise_start_step, lr_scaling_online, ramp)


def _check_start_flag(value: Any, online: bool, ramp: _RampFlags, max_steps: Any = None) -> None:
    """``--b_noise_start_step``: a non-negative int, with something that acts on B_noise, before ``max_steps``."""
    if value is None:
        return
    if not online and ramp.noise_k is None:
        raise ValueError("--b_noise_start_step says when --lr_scaling_online or --batch_size_noise_k start acting on "
                         "the measured B_noise, and neither is set: drop it (a --batch_size_schedule ignores B_noise)")
    try:
        _start_step(value)
    except ValueError as err:
        raise ValueError(f"--b_noise_start_step: {err}") from None
    if isinstance(max_steps, int) and 0 < max_steps <= value:
        raise ValueError(f"--b_noise_start_step {value} is not before --max_steps {max_steps}: B_noise would never be "
                         "acted on; lower it, or drop the online switch")


def b_noise_start_step(args: Any, num_training_steps: int, beta: float, *, deepspeed: bool = False) -> int:
    """The first optimizer step whose ``B_noise`` estimate ``--lr_scaling_online`` / ``--batch_size_noise_k`` act on.

    ``--b_noise_start_step`` if given, else :func:`~hf_lars.scaling.online.default_start_step` of the LR warmup
    (``args.get_warmup_steps(num_training_steps)``) and the noise EMA's ``beta``; under DeepSpeed
    (``deepspeed``) the EMA folds one estimate per logging step, so its window is ``logging_steps`` times longer.

    Raises:
        ValueError: a start at or after ``num_training_steps`` (nothing would ever act), naming why and the fix.
    """
    explicit = getattr(args, "b_noise_start_step", None)
    flag = "--lr_scaling_online" if getattr(args, "lr_scaling_online", False) else "--batch_size_noise_k"
    if explicit is not None:
        start, why = _start_step(explicit), "--b_noise_start_step"
    else:
        warmup = int(args.get_warmup_steps(num_training_steps))
        per = 1
        if deepspeed:
            logging = float(args.logging_steps)
            per = max(1, math.ceil(logging * num_training_steps) if logging < 1 else int(logging))
        start = default_start_step(warmup, beta, per)
        window = f"{per} x " if per > 1 else ""
        why = (f"the default: the later of the LR warmup's end, step {warmup}, and the noise EMA's window, "
               f"{window}1/(1 - beta={beta:g}) steps")
    if start >= num_training_steps:
        raise ValueError(
            f"{flag} would never act: it waits for B_noise estimates until optimizer step {start} ({why}), and the "
            f"run has {num_training_steps} steps: pass --b_noise_start_step below {num_training_steps} to act on "
            "younger estimates, or train longer"
        )
    return start


@dataclass(frozen=True)
class _RampFlags:
    schedule: Any = None
    noise_k: Any = None
    min_batch: Any = None
    max_batch: Any = None

    @classmethod
    def of(cls, args: Any) -> _RampFlags:
        return cls(*(getattr(args, name, None) for name in
                     ("batch_size_schedule", "batch_size_noise_k", "batch_size_min", "batch_size_max")))

    @property
    def requested(self) -> bool:
        return any(v is not None for v in (self.schedule, self.noise_k, self.min_batch, self.max_batch))


def ramp_requested(args: Any) -> bool:
    """Whether ``args`` ask for a batch-size ramp (any ``--batch_size_*`` flag set)."""
    return _RampFlags.of(args).requested


def _check_ramp_combination(ramp: _RampFlags, online: bool) -> None:
    if ramp.schedule is not None and ramp.noise_k is not None:
        raise ValueError("--batch_size_schedule and --batch_size_noise_k are two ways of choosing the batch: "
                         "give one of them")
    if ramp.schedule is None and ramp.noise_k is None:
        raise ValueError("--batch_size_min/--batch_size_max bound the noise-driven ramp: add --batch_size_noise_k "
                         "(or use --batch_size_schedule)")
    if online:
        raise ValueError("--lr_scaling_online and a batch size ramp both move the LR factor; use one: the ramp "
                         "rescales the LR by --lr_scaling at each batch change")


def _ramp(ramp: _RampFlags, **kwargs: Any) -> BatchSizeRamp:
    """The :class:`BatchSizeRamp` of these flags; its errors name the ``--batch_size_*`` flags."""
    flag = "--batch_size_schedule" if ramp.schedule is not None else "--batch_size_noise_k"
    try:
        if ramp.schedule is not None:
            return BatchSizeRamp(schedule=str(ramp.schedule), **kwargs)
        return BatchSizeRamp(noise_k=ramp.noise_k, min_batch=ramp.min_batch, max_batch=ramp.max_batch, **kwargs)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def _zero_offload(args: Any) -> bool:
    """Whether the args' DeepSpeed config offloads the optimizer (its ``zero_optimization.offload_optimizer``)."""
    config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if not isinstance(config, dict):
        return False
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() not in ("none", "")


def batch_size_ramp(args: Any, world_size: int, start_step: int = 0) -> BatchSizeRamp | None:
    """The :class:`~hf_lars.scaling.ramp.BatchSizeRamp` the ``--batch_size_*`` flags ask for (``None``: off).

    Checks what only the run knows: batches that divide into ``per_device_train_batch_size x world_size``,
    ``--gradient_accumulation_steps`` left at 1 (the ramp sets it), ``--max_steps``, no ZeRO-Offload (its
    buffers follow the accumulation fixed at init), and for the noise-driven ramp a noise source (the
    ``--lr_scaling_online`` check, on the starting batch).  The LR factor is relative to the batch the launch
    LR was scaled for (``global_batch_size(args, world_size)``).  ``start_step``: the noise-driven ramp's, see
    :func:`b_noise_start_step`.
    """
    ramp = _RampFlags.of(args)
    if not ramp.requested:
        return None
    online = bool(getattr(args, "lr_scaling_online", False))
    _check_ramp_combination(ramp, online)
    flag = "--batch_size_schedule" if ramp.schedule is not None else "--batch_size_noise_k"
    accum = int(getattr(args, "gradient_accumulation_steps", 1))
    if accum != 1:
        raise ValueError(f"{flag} sets the gradient accumulation itself (batch / (processes x "
                         f"per_device_train_batch_size)): drop --gradient_accumulation_steps {accum}")
    if int(getattr(args, "max_steps", -1)) <= 0:
        raise ValueError(f"{flag} needs --max_steps (optimizer steps): with a growing batch an epoch is no longer a "
                         "fixed number of steps, so --num_train_epochs cannot size the run or its LR schedule")
    if _zero_offload(args):
        raise ValueError(f"{flag} cannot run under ZeRO-Offload: its CPU gradient buffers are chosen for the "
                         "accumulation fixed at init (deepspeed/runtime/zero/stage_1_and_2.py): drop "
                         "offload_optimizer from the DeepSpeed config, or drop the ramp")
    if getattr(args, "auto_find_batch_size", False):
        raise ValueError(f"{flag} keeps the micro-batch fixed; --auto_find_batch_size changes it: drop one")
    if str(getattr(args, "include_num_input_tokens_seen", "no")).lower() not in ("no", "false"):
        raise ValueError(f"{flag} does not count input tokens yet (train_samples counts examples): drop "
                         "--include_num_input_tokens_seen")
    rule = "none" if getattr(args, "lr_scaling", None) is None else str(args.lr_scaling)
    built = _ramp(
        ramp, micro_batch=_check_positive_int("per_device_train_batch_size", args.per_device_train_batch_size),
        processes=_check_positive_int("world_size", world_size), rule=rule,
        ref_batch=getattr(args, "lr_scaling_ref_batch", None), b_noise=getattr(args, "b_noise", None),
        launch_batch=global_batch_size(args, world_size), start_step=start_step,
    )
    if ramp.noise_k is not None:
        _check_noise_source(args, world_size, flag=flag, accumulation=built.accumulation,
                            accumulation_fix="--batch_size_min of >= 2 micro-batches")
    return built


def _is_main_process() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover - torch always installed with hf_lars
        pass
    return int(os.environ.get("RANK", "0")) == 0


def _scaled_lr(rule: str, ref_lr: float, ref_batch: Any, batch: int, b_noise: Any, online: bool = False) -> float:
    """:func:`hf_lars.scaling.scaled_lr` after the launch-flag checks, logged on the main process.

    Online without a launch ``b_noise``: the reference LR (the online factor does the rescaling).
    """
    canon = _validate(rule, ref_batch, b_noise, online)
    if not _is_positive_number(ref_lr):
        raise ValueError(f"Invalid learning_rate: {ref_lr!r} (the reference LR must be positive)")
    if canon == "none":
        return float(ref_lr)
    if canon in B_NOISE_RULES and b_noise is None:
        if _is_main_process():
            logger.info("lr starts at the reference %g; the online factor rescales it from the measured B_noise", ref_lr)
        return float(ref_lr)
    lr = float(scaled_lr(canon, ref_batch, ref_lr, batch, b_noise if canon in B_NOISE_RULES else None))
    if _is_main_process():
        noise = f", B_noise={b_noise:g}" if canon in B_NOISE_RULES else ""
        logger.info(
            "lr scaled from %g at batch %g to %g at batch %g (rule %s%s)", ref_lr, ref_batch, lr, batch, rule, noise
        )
    return lr


def _check_noise_source(
    args: Any, world_size: int, *, flag: str = "--lr_scaling_online", accumulation: int | None = None,
    accumulation_fix: str = "--gradient_accumulation_steps >= 2",
) -> None:
    """``flag`` needs the noise monitor: two batch sizes, and gradients it can see (not FSDP).

    ``accumulation``: the run's first (default ``args.gradient_accumulation_steps``; a ramp's starting one).
    """
    accum = int(getattr(args, "gradient_accumulation_steps", 1)) if accumulation is None else accumulation
    if world_size * accum < 2:
        raise ValueError(
            f"{flag} needs the gradient noise scale, measured from two batch sizes: run on >= 2 "
            f"data-parallel processes or with {accumulation_fix} (got {world_size} process(es) "
            f"and gradient_accumulation_steps={accum})"
        )
    # From the arguments and the launcher's environment only: at argument parsing no Accelerate state exists
    # yet, and creating one here would pre-empt Trainer's.
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise ValueError(
            f"{flag} needs the gradient noise scale, which cannot be measured under FSDP (the "
            f"gradient hooks see reduce-scattered shards): use DDP or DeepSpeed ZeRO, or drop {flag}"
        )


def online_lr_factor(args: Any, world_size: int, start_step: int = 0) -> OnlineLrFactor | None:
    """The :class:`OnlineLrFactor` ``--lr_scaling_online`` asks for (``None`` when it is off).

    ``start_step``: see :func:`b_noise_start_step` (what the run resolves it to).
    """
    if not getattr(args, "lr_scaling_online", False):
        return None
    return _online_factor(
        str(args.lr_scaling), args.lr_scaling_ref_batch, global_batch_size(args, world_size), args.b_noise,
        args.lr_scaling_min_factor, args.lr_scaling_max_factor, args.lr_scaling_smoothing, start_step,
    )


def apply_lr_scaling(args: Any, world_size: int) -> float:
    """Set ``args.learning_rate`` to the LR scaled for this run's global batch and return it.

    ``args`` carries the :class:`LrScalingArguments` fields (``lr_scaling``, ``lr_scaling_ref_batch``,
    ``b_noise``, the ``lr_scaling_online`` ones) and Trainer's ``learning_rate`` (the reference LR),
    ``per_device_train_batch_size`` and ``gradient_accumulation_steps``.  Call it before the optimizer is
    created.  With ``lr_scaling_online`` the online settings and the noise source are checked here too (the
    factor itself is applied by the scheduler, :mod:`hf_lars.integrations.online_lr`).

    Idempotent: a second call on the same ``args`` scales from the original reference LR again (unless
    ``learning_rate`` was changed in between, which then counts as the new reference).  When the args carry a
    DeepSpeed config (``args.hf_deepspeed_config``, built in ``TrainingArguments.__post_init__`` with the
    unscaled LR filling ``"auto"``), it is rebuilt from ``args.deepspeed`` with the scaled LR, the way
    Trainer's hyperparameter search does.

    Raises:
        ValueError: unknown rule (the valid ones are listed), ``lr_scaling_ref_batch`` missing or not positive,
            ``b_noise`` missing or not positive for ``surge``/``sgd`` (optional online), a non-positive LR,
            ``world_size`` or batch; online: a rule that ignores ``B_noise``, bad bounds or smoothing, no noise
            source (one process without accumulation, FSDP).
    """
    rule = getattr(args, "lr_scaling", "none")
    rule = "none" if rule is None else str(rule)
    ref_batch = getattr(args, "lr_scaling_ref_batch", None)
    b_noise = getattr(args, "b_noise", None)
    online = bool(getattr(args, "lr_scaling_online", False))
    batch = global_batch_size(args, world_size)
    applied = getattr(args, _APPLIED_ATTR, None)
    ref_lr = float(args.learning_rate)
    if applied is not None and math.isclose(ref_lr, applied["lr"], rel_tol=1e-12, abs_tol=0.0):
        ref_lr = applied["ref_lr"]
    lr = _scaled_lr(rule, ref_lr, ref_batch, batch, b_noise, online)  # checks the rule and its values
    batch_size_ramp(args, world_size)  # the --batch_size_* flags, before any data or model work
    _check_start_flag(getattr(args, "b_noise_start_step", None), online, _RampFlags.of(args),
                      int(getattr(args, "max_steps", -1)))
    if online:
        online_lr_factor(args, world_size)  # the bounds and smoothing, likewise
        _check_noise_source(args, world_size)
    changed = lr != float(args.learning_rate)
    args.learning_rate = lr
    object.__setattr__(args, _APPLIED_ATTR, {"ref_lr": ref_lr, "lr": lr})
    if changed and getattr(args, "hf_deepspeed_config", None) is not None and getattr(args, "deepspeed", None):
        _refresh_deepspeed_config(args)
    return lr


def _refresh_deepspeed_config(args: Any) -> None:
    """Rebuild the DeepSpeed config so its ``"auto"`` LRs take the scaled value (as Trainer's HP search does)."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)

