r"""The gradient noise scale ``B_simple`` measured in any training loop: the monitor.

McCandlish et al. 2018 (arXiv 1812.06162, App. A) estimate ``B_simple = tr(Sigma) / |G|^2`` from the squared
norms of the gradient at two batch sizes ``b < B``; :class:`~hf_lars.scaling.GradientNoiseScale` holds the
unbiased estimators and their EMAs.  This module gets the two norms out of a running training loop, for
free, and imports neither transformers nor accelerate (the Trainer callback is
:class:`hf_lars.integrations.noise_scale.GradientNoiseScaleCallback`):

- **small batch** ``b`` = one micro-batch on one rank (``per_device_train_batch_size``).  A tensor hook on
  every parameter (``p.register_hook``) sees the gradient of each micro-batch on this rank before it is
  accumulated into ``p.grad`` and before DDP's reducer hooks (those run after ``AccumulateGrad``), so it is
  the local, un-reduced micro-batch gradient.  ``|G_b|^2`` is the mean over the step's micro-batches (and,
  at a logging step, over ranks).
- **big batch** ``B`` = the gradient the optimizer steps with: ``per_device x accumulation x processes``
  examples.  Its squared norm is taken from ``p.grad`` at the end of the step's last backward pass (an
  autograd final callback queued from inside DDP's own final callback, so after DDP averaged the
  gradients), i.e. before any clipping.

Loss scaling under gradient accumulation.  Trainer and Accelerate divide each micro-batch loss by the number
``K`` of micro-batches in the step (Trainer: ``loss / current_gradient_accumulation_steps``; with a model that
takes ``num_items_in_batch`` the loss is ``token_sum / N_total`` times the number of processes, which is the same
``1/K`` when every micro-batch holds the same number of tokens).  A hook therefore sees ``h_k = g_k / K`` where
``g_k`` is the micro-batch mean gradient, and ``p.grad = sum_k h_k`` is the mean over the ``K b`` examples, so::

    |G_b|^2 = mean_k |g_k|^2 = K * sum_k |h_k|^2          |G_B|^2 = |p.grad|^2       ("mean", the default)

With losses summed over micro-batches instead (``accumulation="sum"``: ``h_k = g_k``, ``p.grad = K * mean``)::

    |G_b|^2 = (1/K) * sum_k |h_k|^2                        |G_B|^2 = |p.grad|^2 / K^2

Cost.  One norm per parameter per micro-batch in the hooks and one over all gradients per optimizer step,
all on the device; no host sync per step.  The per-step values stay on the device until :meth:`compute`
(a logging step), which averages the local norms over ranks with one ``all_reduce`` of a vector holding all
the pending steps, copies it to the host once and folds every step into the EMAs in order.

What it cannot measure.

- One process without gradient accumulation: ``b = B``, there is no second batch size (``ValueError``).
- DeepSpeed ZeRO (stages 1, 2 and 3): the hooks still see each rank's full micro-batch gradient (ZeRO-1/2
  partition gradients only after the hooks; ZeRO-3 gathers a parameter for its backward, and the hook on the
  parameter sees the whole local gradient), but ``p.grad`` is never the averaged gradient (ZeRO reduces into
  partitioned buffers and steps inside ``backward``).  The global norm exists only as the engine's
  ``get_global_grad_norm()``, which Trainer logs as ``grad_norm`` (pre-clip).  The callback then pairs the
  logging step's micro-batch norms with that ``grad_norm``: one estimate per logging interval instead of
  one per step (use a small ``logging_steps``).  A loop passes the engine's norm to :meth:`step` itself.
  Checked exactly against an analytic model on 2 CPU ranks for stages 1, 2 and 3 (a partitioned parameter).
- FSDP (FSDP1 flat parameters, FSDP2 DTensor parameters): the hooks see sharded, reduce-scattered
  gradients, not local ones (a ``ValueError`` says so).
- fp16 with dynamic loss scaling: hooks and ``p.grad`` carry the loss scale, which changes between steps and
  would bias the EMAs; use bf16 or fp32 (a warning is logged).
- Reentrant activation checkpointing runs nested backward passes; they are merged into the outer one as
  long as the outer pass reaches a parameter first (true for language models: the head comes first).
- Micro-batches of different sizes (padding, masked labels): ``b`` is taken as the configured micro-batch
  size, so the estimate is approximate.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from hf_lars.scaling.noise import GradientNoiseScale
from hf_lars.sharding import is_dtensor

__all__ = ["NOISE_SCALE_KEYS", "GradientNoiseScaleMonitor"]

logger = logging.getLogger(__name__)

#: Keys added to the training logs: the noise scale and the two EMAs it is the ratio of.
NOISE_SCALE_KEYS: tuple[str, ...] = ("b_noise", "grad_sq_norm", "trace_cov")

_ACCUMULATION_MODES = ("mean", "sum")
_BIG_NORM_SOURCES = ("grad", "external")


_EXACT_DTYPES = (torch.float32, torch.float64)  # norms of other dtypes are accumulated in float32
# Which backward pass (graph task) a hook runs in; nested (reentrant checkpoint) passes have their own.
_current_graph_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: 0)


def _queue_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the current backward pass has finished (after DDP's gradient averaging)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def _total_sq_norm(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``sum |t|^2`` over ``tensors`` in float32, on ``device`` (foreach kernels where the dtype allows)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t.detach())
    total = torch.zeros((), dtype=torch.float32, device=device)
    for (_, dtype), ts in groups.items():
        if dtype in _EXACT_DTYPES:
            norms = torch._foreach_norm(ts)
        else:  # bf16/fp16 norms would be rounded to 8/11 bits: accumulate in float32
            norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in ts]
        total = total + torch.stack([n.float() for n in norms]).square().sum().to(device)
    return total


def _parameters(model_or_params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    out, seen = [], set()
    for p in params:
        if p.requires_grad and id(p) not in seen:  # tied weights appear once
            seen.add(id(p))
            out.append(p)
    return out


class GradientNoiseScaleMonitor:
    r"""Measure ``B_simple`` in any training loop: hooks for the micro-batch norms, :meth:`step` for the big one.

    Use::

        monitor = GradientNoiseScaleMonitor(model, micro_batch_size=8)      # registers the hooks
        for step, batch in enumerate(loader):
            loss = model(**batch).loss / accum
            loss.backward()                                   # (accelerator.backward(loss) in Accelerate)
            if (step + 1) % accum == 0:
                monitor.step()                                # after the last backward, BEFORE clipping
                clip, optimizer.step(), optimizer.zero_grad()
                if (step + 1) % (log_every * accum) == 0:
                    logs.update(monitor.compute())            # a collective under DDP: call on every rank

    With ``auto_step`` (a callable telling whether the current backward pass is the step's last, e.g.
    ``lambda: accelerator.sync_gradients``) the monitor calls :meth:`step` itself at the end of that backward
    pass, after DDP's all-reduce and before any clipping; the loop then only calls :meth:`compute`.

    Batch sizes: ``b = micro_batch_size`` (per rank) and ``B = micro_batch_size * K * world_size`` with ``K``
    the number of backward passes seen since the last :meth:`step` (counted, so a short last step of an
    epoch is handled).  Each step gives one ``(|G_b|^2, b, |G_B|^2, B)`` to the EMAs of
    :class:`~hf_lars.scaling.GradientNoiseScale`.  See the module docstring for the loss-scaling derivation.

    Args:
        model_or_params: the model (its parameters that require grad) or the parameters to watch.  Under DDP
            pass the inner module or the DDP wrapper: the parameters are the same.
        micro_batch_size: examples in one micro-batch on one rank.
        world_size: data-parallel processes; default: the size of ``process_group`` (or of the default group)
            when ``torch.distributed`` is initialised, else 1.
        process_group: the data-parallel group for the ``all_reduce`` in :meth:`compute`.
        beta: EMA coefficient of :class:`~hf_lars.scaling.GradientNoiseScale`.
        accumulation: ``"mean"`` when each micro-batch loss is divided by the number of micro-batches
            (Trainer, Accelerate), ``"sum"`` when the micro-batch losses are simply summed.
        auto_step: called at the end of each backward pass; ``True`` means "this was the step's last", and
            :meth:`step` runs then (after DDP's all-reduce).
        big_norm: ``"grad"`` (the big-batch norm is taken from ``p.grad``) or ``"external"`` (passed to
            :meth:`step` / :meth:`compute` by the caller, e.g. DeepSpeed's ``engine.get_global_grad_norm()``).
        keep_history: keep every step's ``(small_sq_norm, b, big_sq_norm, B)`` in :attr:`history`.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[torch.Tensor],
        micro_batch_size: int,
        *,
        world_size: int | None = None,
        process_group: Any = None,
        beta: float = 0.99,
        accumulation: Literal["mean", "sum"] = "mean",
        auto_step: Callable[[], bool] | None = None,
        big_norm: Literal["grad", "external"] = "grad",
        keep_history: bool = False,
    ) -> None:
        if isinstance(micro_batch_size, bool) or int(micro_batch_size) != micro_batch_size or micro_batch_size < 1:
            raise ValueError(f"Invalid micro_batch_size: {micro_batch_size!r} (must be a positive integer)")
        if accumulation not in _ACCUMULATION_MODES:
            raise ValueError(f"Invalid accumulation: {accumulation!r} (valid: {', '.join(_ACCUMULATION_MODES)})")
        if big_norm not in _BIG_NORM_SOURCES:
            raise ValueError(f"Invalid big_norm: {big_norm!r} (valid: {', '.join(_BIG_NORM_SOURCES)})")
        self.params = _parameters(model_or_params)
        if not self.params:
            raise ValueError("GradientNoiseScaleMonitor: no parameter requires grad")
        if any(is_dtensor(p) for p in self.params):
            raise ValueError(
                "GradientNoiseScaleMonitor does not support FSDP/DTensor parameters: their gradient hooks see "
                "reduce-scattered shards, not each rank's local micro-batch gradient"
            )
        if world_size is None:
            world_size = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
        if int(world_size) != world_size or world_size < 1:
            raise ValueError(f"Invalid world_size: {world_size!r} (must be a positive integer)")
        self.micro_batch_size = int(micro_batch_size)
        self.world_size = int(world_size)
        self.process_group = process_group
        self.accumulation = accumulation
        self.auto_step = auto_step
        self.big_norm = big_norm
        self.keep_history = keep_history
        self.estimator = GradientNoiseScale(beta)
        self.history: list[tuple[float, int, float, int]] = []
        self._device = self.params[0].device
        self._handles: list[Any] = []
        self._open_tasks: set[int] = set()
        self._micro_norms: list[torch.Tensor] = []
        self._step_sum: torch.Tensor | None = None  # sum over this step's micro-batches of sum_p |h_p|^2
        self._micro_count = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []
        self._warned_single_batch = False
        self.attach()

    # ------------------------------------------------------------------------------------------ hooks
    @property
    def attached(self) -> bool:
        """Whether the gradient hooks are registered."""
        return bool(self._handles)

    def attach(self) -> None:
        """Register the gradient hooks (done by the constructor; idempotent)."""
        if not self._handles:
            self._handles = [p.register_hook(self._hook) for p in self.params]

    def detach(self) -> None:
        """Remove the gradient hooks and forget the partial step (the EMAs are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._open_tasks.clear()
        self._micro_norms = []
        self._step_sum = None
        self._micro_count = 0

    def __enter__(self) -> GradientNoiseScaleMonitor:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _hook(self, grad: torch.Tensor) -> None:
        task = _current_graph_task_id()
        if task not in self._open_tasks:
            self._open_tasks.add(task)
            _queue_callback(functools.partial(self._end_backward, task))
        grad = grad.detach()
        if grad.dtype in _EXACT_DTYPES:
            self._micro_norms.append(torch.linalg.vector_norm(grad))
        else:  # bf16/fp16: accumulate in float32
            self._micro_norms.append(torch.linalg.vector_norm(grad, dtype=torch.float32))

    def _end_backward(self, task: int) -> None:
        self._open_tasks.discard(task)
        if self._open_tasks or not self._micro_norms:
            return  # a nested (reentrant checkpoint) pass: the outer one closes the micro-batch
        norms = torch.stack([n.to(self._device, torch.float32) for n in self._micro_norms])
        self._micro_norms = []
        sq = norms.square().sum()
        self._step_sum = sq if self._step_sum is None else self._step_sum + sq
        self._micro_count += 1
        if self.auto_step is not None and self.auto_step():
            # Queued from inside a final callback, so it runs after every callback queued during the backward
            # pass, DDP's gradient averaging included.
            _queue_callback(self.step)

    # ------------------------------------------------------------------------------------------ steps
    @property
    def pending_steps(self) -> int:
        """Steps recorded on the device and not yet folded into the EMAs by :meth:`compute`."""
        return len(self._pending)

    def step(self, big_sq_norm: float | torch.Tensor | None = None) -> None:
        """Close the optimizer step: record this step's norms (on the device; no host sync).

        Call after the step's last backward pass and before clipping (``auto_step`` does it for you).
        ``big_sq_norm``: the squared norm of the step's (averaged, accumulated, unclipped) gradient when it
        does not live in ``p.grad`` (DeepSpeed ZeRO: ``engine.get_global_grad_norm() ** 2``); by default it is
        computed from ``p.grad`` (``big_norm="grad"``) or left for :meth:`compute` (``big_norm="external"``).
        """
        k = self._micro_count
        if k == 0 or self._step_sum is None:
            logger.debug("GradientNoiseScaleMonitor.step() with no backward pass since the last step: ignored")
            return
        small = self._step_sum * k if self.accumulation == "mean" else self._step_sum / k
        big: torch.Tensor | None
        if big_sq_norm is not None:
            big = torch.as_tensor(big_sq_norm, dtype=torch.float32, device=self._device)
        elif self.big_norm == "grad":
            grads = [p.grad for p in self.params if p.grad is not None]
            if not grads:
                raise RuntimeError(
                    "GradientNoiseScaleMonitor.step(): no parameter has a .grad (call it after backward and before "
                    "zero_grad; under DeepSpeed ZeRO pass big_sq_norm=engine.get_global_grad_norm() ** 2)"
                )
            big = _total_sq_norm(grads, self._device)
        else:
            big = None
        if big is not None and self.accumulation == "sum":
            big = big / (k * k)
        self._pending.append((small, big, k))
        self._step_sum = None
        self._micro_count = 0

    def compute(self, last_big_sq_norm: float | None = None) -> dict[str, float]:
        """Fold the pending steps into the EMAs and return the current statistics.

        Averages each pending step's micro-batch norm over the data-parallel ranks (one ``all_reduce`` for
        all of them: every rank must call this at the same point, as Trainer's logging steps do) and copies
        them to the host once.  ``last_big_sq_norm`` fills in the big-batch squared norm of the last pending
        step when ``big_norm="external"`` (steps without one are dropped).

        Returns:
            ``{"b_noise", "grad_sq_norm", "trace_cov"}`` (see :data:`NOISE_SCALE_KEYS`), each only once defined:
            ``b_noise`` needs a positive ``|G|^2`` EMA.
        """
        pending, self._pending = self._pending, []
        if pending:
            if last_big_sq_norm is not None:
                small, _, k = pending[-1]
                big = torch.as_tensor(float(last_big_sq_norm), dtype=torch.float32, device=self._device)
                pending[-1] = (small, big / (k * k) if self.accumulation == "sum" else big, k)
            smalls = torch.stack([s for s, _, _ in pending])
            if self.world_size > 1 and dist.is_available() and dist.is_initialized():
                dist.all_reduce(smalls, group=self.process_group)
                smalls = smalls / self.world_size
            nan = torch.full((), math.nan, dtype=torch.float32, device=self._device)
            bigs = torch.stack([nan if b is None else b.reshape(()) for _, b, _ in pending])
            values = torch.stack([smalls, bigs]).tolist()  # the one host sync
            for small, big, (_, _, k) in zip(values[0], values[1], pending):
                self._fold(small, big, k)
        return self.stats()

    def _fold(self, small: float, big: float, k: int) -> None:
        b = self.micro_batch_size
        big_batch = b * k * self.world_size
        if big_batch <= b:
            if not self._warned_single_batch:
                logger.warning(
                    "gradient noise scale: one process without gradient accumulation has only one batch size "
                    "(b = B = %d); nothing to measure", b,
                )
                self._warned_single_batch = True
            return
        if not (math.isfinite(small) and math.isfinite(big)) or small < 0 or big < 0:
            return  # a skipped step (fp16 overflow), or no big-batch norm (external source, not a logging step)
        self.estimator.update(small, b, big, big_batch)
        if self.keep_history:
            self.history.append((small, b, big, big_batch))

    def stats(self) -> dict[str, float]:
        """The current ``b_noise`` / ``grad_sq_norm`` / ``trace_cov`` (only the defined ones); no collective."""
        out: dict[str, float] = {}
        values = (self.estimator.b_simple, self.estimator.grad_sq_norm, self.estimator.trace_cov)
        for key, value in zip(NOISE_SCALE_KEYS, values):
            if value is not None and math.isfinite(value):
                out[key] = float(value)
        return out

    @property
    def b_simple(self) -> float | None:
        """The current estimate (``None`` until defined); pending steps are not included until :meth:`compute`."""
        return self.estimator.b_simple

    def state_dict(self) -> dict[str, Any]:
        """The EMAs (plain floats) for checkpointing."""
        return self.estimator.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the EMAs from :meth:`state_dict`."""
        self.estimator.load_state_dict(dict(state))

    def __repr__(self) -> str:
        return (
            f"GradientNoiseScaleMonitor(micro_batch_size={self.micro_batch_size}, world_size={self.world_size}, "
            f"steps={self.estimator.steps}, b_simple={self.estimator.b_simple})"
        )
