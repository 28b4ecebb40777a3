"""The public base class of LARS, AdamLARS and RangerLARS: everything they share outside their update rules.

Param-group validation, the original layers of each group (so a sharding engine that swaps
``group["params"]`` for flat partitions can still be mapped back to layers), the per-step
:class:`~hf_lars.layout.StepLayout` (asked of :func:`hf_lars.layout.resolve_layouts`), the per-layer
exclusion decisions (docs/design.md, "Exclusion: two decisions"), the ``step()`` loop, and the last
step's trust ratios.  The update rules
themselves are pure functions in each optimizer's module.
"""

from __future__ import annotations

import abc
import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from hf_lars.layout import NORMS_PER_LAYER, StepLayout, resolve_layouts
from hf_lars.layout.stacked import (
    LAYER_KEYS,
    StackedLayers,
    check_stacked,
    check_stacked_keys,
    split_stacked,
    stacked_layers,
)
from hf_lars.layout.norms_batch import Measured, NormsBatch
from hf_lars.optim.fused import check_fused
from hf_lars.optim.hyper import HyperParameters, check_bool, check_range, constructor_defaults
from hf_lars.optim.moments import HostStepCounts
from hf_lars.optim.trust import Ratios, StepPlan
from hf_lars.optim.working_copies import restore_if_skipped, save_for_skip, unscaled_gradients

__all__ = [
    "HyperParameters",
    "TrustRatioOptimizer",
    "check_bool",
    "check_range",
    "constructor_defaults",
    "default_foreach",
]

# Group keys every optimizer accepts besides its hyper-parameters: a group's tensors may stack layers along
# dim 0 or hold layers stored (in, out) (``stacked_dim``, ``transposed``: docs/design.md, "Mixture-of-experts:
# stacked layers").
_STRUCTURAL_KEYS = frozenset({"params", "param_names", "initial_lr", *LAYER_KEYS})
# Boolean hyper-parameters (whichever an optimizer has): a non-bool is rejected, since ``'no'`` or ``0``
# would otherwise silently mean True or False.  ``foreach`` and ``fused`` also accept None (auto).
_BOOL_KEYS = ("nesterov", "trust_clip", "use_gc", "bias_correction", "degenerated_to_sgd", "adapt_excluded",
              "exclude_1d", "excluded")
_OPTIONAL_BOOL_KEYS = ("foreach", "fused")
# Hyper-parameters every rule has, each >= 0.
_NON_NEGATIVE_KEYS = ("lr", "eps", "weight_decay")
_REMOVED_ADAPT = (
    "The param group key 'adapt' was replaced by two decisions: mark a group's layers excluded with "
    "'excluded': True (excluded layers never take weight decay), and choose whether excluded layers take the "
    "trust ratio with 'adapt_excluded' (constructor argument or group key).  Old adapt=False: "
    "{'excluded': True, 'adapt_excluded': False}; old adapt=True: {'exclude_1d': False} "
    "(docs/design.md, 'Exclusion: two decisions')."
)


def default_foreach(params: Sequence[Tensor]) -> bool:
    """Pick the faster implementation for the device: foreach on accelerators, the per-tensor loop on CPU.

    Measured with torch 2.13 on CPU (``hf-lars bench``, ~24M parameters): the per-tensor loop beats the
    foreach kernels by 1.2-1.6x for torch's own SGD and AdamW and by 2.4-3.3x for ours, because CPU foreach
    ops are loops over the same per-tensor kernels plus list overhead and live temporaries.
    """
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    supported = set(_get_foreach_kernels_supported_devices())
    return bool(params) and all(p.device.type in supported for p in params)


class TrustRatioOptimizer(Optimizer, abc.ABC):
    """Base class: see the module docstring.  Subclasses implement ``_validate_group`` and ``_step_group``.

    Integrations that need "any hf_lars optimizer" (callbacks reading :meth:`trust_ratios`, the Trainer
    front door) test ``isinstance(optimizer, TrustRatioOptimizer)``.
    """

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        # The group's original parameters as weak references plus their shapes and dtypes: a strong
        # reference would keep every original tensor alive after an engine swaps group["params"] for its
        # own (FSDP2 DTensors, Accelerate), i.e. a full unsharded copy of the model on every rank.
        self._layer_refs: list[list[weakref.ref[Tensor]]] = []
        self._layer_specs: list[list[tuple[torch.Size, torch.dtype]]] = []
        # id(group dict) -> index into _layers.  DeepSpeed ZeRO-1/2 step one group at a time by setting
        # ``optimizer.param_groups = [group]``, so a position in param_groups is not the group's index.
        self._group_index: dict[int, int] = {}
        # (group index, stepped ids) -> (stepped, their layout, the plan over it, join a collective)
        self._layout_cache: dict[
            tuple[int, tuple[int, ...]], tuple[list[weakref.ref[Tensor]], StepLayout, StepPlan, bool]
        ] = {}
        # What this optimizer wrote into its ``state["step"]`` tensors, known on the host (moments.py).
        self._step_counts = HostStepCounts()
        # (group index, layer ids) -> (names, ratios) of the last step: ZeRO-3 steps a group's sub-groups in
        # separate step() calls, each with its own layers.
        # (group index, layers) -> that step's ratios; named only when read (trust_ratios), not in step().
        self._last_ratios: dict[tuple[int, tuple[int, ...]], Tensor] = {}
        # group index -> its layers when its tensors stack layers (set with the group's first layout).
        self._stacked: dict[int, StackedLayers] = {}
        defaults = {**defaults, "excluded": False}
        # The hyper-parameters every saved group must hold (``defaults`` may gain keys later: wrappers such
        # as Trainer's add torch's ``differentiable``, which old checkpoints lack).
        self._hyperparameter_keys = frozenset(defaults)
        self._validate_hyperparameters(defaults)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------- groups
    @abc.abstractmethod
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming any hyper-parameter of ``group`` outside its allowed range."""

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        """The checks every optimizer shares (the boolean switches, ``fused``, and ``lr``, ``eps`` and
        ``weight_decay`` >= 0, which every rule has), then the subclass's ranges."""
        for key in _BOOL_KEYS:
            if key in group:
                check_bool(key, group[key])
        for key in _OPTIONAL_BOOL_KEYS:
            if key in group:
                check_bool(key, group[key], optional=True)
        check_stacked_keys(group.get("stacked_dim"), group.get("transposed", False))
        check_fused(group)
        for key in _NON_NEGATIVE_KEYS:
            check_range(key, group[key], 0.0)
        self._validate_group(group)

    def _check_group_keys(self, group: dict[str, Any]) -> None:
        if "adapt" in group:
            raise ValueError(_REMOVED_ADAPT)
        unknown = sorted(set(group) - set(self.defaults) - _STRUCTURAL_KEYS)
        if unknown:
            valid = ", ".join(sorted(set(self.defaults) - {"foreach"}) + ["foreach", *LAYER_KEYS])
            raise ValueError(
                f"Unknown param group key(s) for {type(self).__name__}: {', '.join(unknown)}. Valid keys: {valid}"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group, then add it; a rejected group leaves the optimizer exactly as it was."""
        self._check_group_keys(param_group)
        self._validate_hyperparameters({**self.defaults, **param_group})
        count = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        complex_params = [p for p in group["params"] if p.is_complex()]
        if complex_params:
            del self.param_groups[count:]  # torch appended it: take it back so the optimizer stays usable
            raise ValueError(f"{type(self).__name__} does not support complex parameters")
        names = group.get("param_names") or []
        for i, p in enumerate(group["params"]):
            if p.numel() == 0:  # an engine's empty placeholder (ZeRO-3): checked on its real shape at the first step
                continue
            what = f"parameter {names[i]!r}" if i < len(names) else f"parameter {i} of the group"
            try:
                check_stacked(p.shape, group.get("stacked_dim"), group.get("transposed", False), what=what)
            except ValueError:
                del self.param_groups[count:]
                raise
        self._layer_refs.append([weakref.ref(p) for p in group["params"]])
        self._layer_specs.append([(p.shape, p.dtype) for p in group["params"]])
        self._group_index[id(group)] = len(self._layer_refs) - 1

    @property
    def _layers(self) -> list[list[Tensor]]:
        """The original parameters of every group; see :meth:`_group_layers` for those no longer alive."""
        return [self._group_layers(i) for i in range(len(self._layer_refs))]

    def _group_layers(self, group_index: int) -> list[Tensor]:
        """The original parameters of group ``group_index``, in construction order.

        One that is no longer alive (an engine replaced it and dropped it) is stood in for by a meta tensor
        of its shape and dtype: nothing can step it any more, and the layout resolver only needs its shape
        to match its replacement by position in ``group["params"]``.
        """
        out = []
        for ref, (shape, dtype) in zip(self._layer_refs[group_index], self._layer_specs[group_index]):
            p = ref()
            out.append(p if p is not None else torch.empty(shape, dtype=dtype, device="meta"))
        return out

    # ------------------------------------------------------------------------------------ trust ratios
    @torch.no_grad()
    def trust_ratios(self) -> dict[str, Tensor]:
        """The last step's per-layer trust ratios, ``{layer name or global index: 0-d tensor}``.

        Only adapted layers appear (excluded layers have ratio 1 by definition).  The tensors stay on the
        device: nothing synchronizes until the caller reads a value.  Under sharding a rank reports the
        layers it holds a piece of; the ratios are global (computed from all-reduced norms).
        """
        out: dict[str, Tensor] = {}
        for (group_index, layers), ratios in self._last_ratios.items():
            names = self._layer_names(self.param_groups[group_index], group_index)
            out.update(zip([names[i] for i in layers], ratios.unbind(0)))
        return out

    def _layer_names(self, group: dict[str, Any], group_index: int) -> list[str]:
        """Parameter names (or global parameter indices); ``name[e]`` for expert ``e`` of a stacked one."""
        names = group.get("param_names")
        if names is None or len(names) != len(self._layer_refs[group_index]):
            offset = sum(len(layers) for layers in self._layer_refs[:group_index])
            names = [str(offset + i) for i in range(len(self._layer_refs[group_index]))]
        stacked = self._stacked.get(group_index)
        return list(names) if stacked is None else stacked.names(names)

    def _record_ratios(self, group_index: int, layers: Sequence[int], ratios: Tensor) -> None:
        new = set(layers)
        for key in [k for k in self._last_ratios if k[0] == group_index and new.intersection(k[1])]:
            del self._last_ratios[key]  # superseded (disjoint entries are other ZeRO-3 sub-groups: kept)
        self._last_ratios[(group_index, tuple(layers))] = ratios.detach()

    # -------------------------------------------------------------------------------------- layouts
    def _step_layout(self, group: dict[str, Any], group_index: int, stepped: list[Tensor]) -> tuple[StepPlan, bool]:
        """The plan of this step (layout of the stepped tensors, per piece whether it is adapted and whether
        it decays) and whether to join a collective.

        The second item is true when the norms are reduced over a process group and the group has adapted
        layers: then every rank must take part in the all-reduce, even one that holds no adapted piece (its
        partition may hold only excluded layers or padding).  Built once per set of stepped tensors and
        cached (ZeRO-3 steps several sub-group tensors in turn, so the cache holds one entry per tensor set).
        The decisions use each layer's real shape (``resolve_layouts`` returns ZeRO-3's ``ds_shape``, not the
        empty placeholder that reports ``ndim == 1``).
        """
        key = (group_index, tuple(id(t) for t in stepped))
        cached = self._layout_cache.get(key)
        if cached is not None and all(a() is b for a, b in zip(cached[0], stepped)):  # ids can be reused
            return cached[2], cached[3]
        layers = self._group_layers(group_index)
        layouts, shapes = resolve_layouts(stepped, layers, group["params"])
        # A group whose tensors stack layers (MoE experts): one layer per expert, the pieces cut at experts.
        names = group.get("param_names") or []
        stacked = stacked_layers(
            shapes, group.get("stacked_dim"), group.get("transposed", False), names=names
        )
        layouts = split_stacked(layouts, shapes, stacked)  # also marks tensors of layers stored (in, out)
        if stacked.stacked:
            self._stacked[group_index] = stacked
        shapes = list(stacked.shapes)
        layout = StepLayout(
            layouts, num_layers=len(shapes), device=stepped[0].device, layer_shapes=shapes,
            layer_transposed=stacked.transposed, layer_names=self._layer_names(group, group_index),
        )  # device: a DTensor's is its shard's
        roles = [self._layer_roles(group, shape) for shape in shapes]
        plan = StepPlan.of(layout, [roles[layer][0] for layer in layout.piece_layer],
                           [roles[layer][1] for layer in layout.piece_layer])
        join = layout.process_group is not None and any(adapted for adapted, _ in roles)
        self._layout_cache[key] = ([weakref.ref(t) for t in stepped], layout, plan, join)
        return plan, join

    @staticmethod
    def _layer_roles(group: dict[str, Any], shape: torch.Size) -> tuple[bool, bool]:
        """``(adapted, decayed)`` for a layer of ``shape`` in ``group``: exclusion is two decisions.

        A layer is *excluded* when it is 1-D or 0-D (by its real shape) under ``exclude_1d``, or when its
        group says ``excluded=True`` (the no-decay group of Trainer's split).  Excluded layers never take
        weight decay; they take the trust ratio only if ``adapt_excluded``.  Other layers take both.
        """
        excluded = group["excluded"] or (group["exclude_1d"] and len(shape) <= 1)
        if not excluded:
            return True, True
        return group["adapt_excluded"], False

    def _invalidate_layouts(self) -> None:
        self._layout_cache.clear()

    @torch.no_grad()
    def initialize_state(self) -> None:
        """Create every parameter's state as before a first step, without stepping or counting a step.

        For wrappers that build optimizer state eagerly: DeepSpeed's stage-0 fp16/bf16 wrapper calls
        ``step()`` once with zero gradients at ``initialize`` for that purpose, which for a decoupled-decay
        rule would shrink the weights and count step 1; hf_lars routes that call here
        (:mod:`hf_lars.integrations.deepspeed`).
        """
        for group in self.param_groups:
            self._init_state(group, list(group["params"]))

    @abc.abstractmethod
    def _state_keys(self, group: dict[str, Any]) -> frozenset[str]:
        """The state keys every stepped parameter of ``group`` holds (checked by :meth:`load_state_dict`)."""

    def _validate_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Reject, before anything is loaded, state that the next ``step()`` could not use.

        State saved by another optimizer class, or with keys missing, would otherwise fail with a bare
        ``KeyError`` at the next step; hyper-parameters are range-checked like the constructor's.
        """
        name = type(self).__name__
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or "state" not in state_dict:
            raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'")
        for i, saved in enumerate(groups):
            if "adapt" in saved:
                raise ValueError(f"{name}.load_state_dict: param group {i}: {_REMOVED_ADAPT}")
            missing = sorted(self._hyperparameter_keys - set(saved))
            if missing:
                raise ValueError(
                    f"{name}.load_state_dict: param group {i} lacks the hyper-parameter(s) {', '.join(missing)}: "
                    f"the state dict was saved by another optimizer (its keys: {', '.join(sorted(saved))})"
                )
            self._validate_hyperparameters(saved)
            required = self._state_keys(saved)
            for pid in saved.get("params", []):
                state = state_dict["state"].get(pid)
                if not state:  # never stepped: nothing to check
                    continue
                absent = sorted(required - set(state))
                if absent:
                    raise ValueError(
                        f"{name}.load_state_dict: the state of parameter {pid} (group {i}) lacks {', '.join(absent)} "
                        f"(it has {', '.join(sorted(state))}); it was saved by another optimizer or converted "
                        "lossily (e.g. a universal checkpoint that kept only Adam's moments)"
                    )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` after :meth:`_validate_state_dict`; floating state stays fp32."""
        self._validate_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._group_index = {id(group): i for i, group in enumerate(self.param_groups)}  # torch made new dicts
        # torch casts floating-point state to each parameter's dtype (bf16 moments for bf16 parameters, which
        # then fail to step); ours is always fp32, so take the saved tensors again, on the parameter's device.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)
                    if key == "step":  # read once here, so later steps know the count on the host
                        self._step_counts.record([self.state[p][key]], int(value))
        self._invalidate_layouts()

    # ----------------------------------------------------------------------------------------- step
    def _init_state(self, group: dict[str, Any], stepped: list[Tensor]) -> None:
        """Create the missing state of ``stepped`` (lazily, torch's key names).  Called by :meth:`step`
        before :meth:`_step_group`, so that a step GradScaler skips can be undone to exactly this state."""

    @abc.abstractmethod
    def _step_group(self, group: dict[str, Any], stepped: list[Tensor], plan: StepPlan, foreach: bool) -> Ratios | None:
        """Step the group's ``stepped`` tensors (state exists: :meth:`_init_state`) with the rule's functional form.

        ``plan`` cuts them into pieces and says per piece whether it takes the trust ratio and weight decay;
        ``foreach`` picks the implementation.  Returns ``(layer ids, ratios)`` of the adapted layers this
        rank holds, or ``None`` when it holds none; :meth:`step` records them for :meth:`trust_ratios`.
        """

    # torch.amp.GradScaler hands this optimizer the scale and the inf flag on the device (``grad_scale`` /
    # ``found_inf``) instead of reading ``found_inf.item()`` before every step (docs/design.md, "Mixed
    # precision"), as it does for torch's fused optimizers.
    _step_supports_amp_scaling = True

    def _prepare_group(self, group: dict[str, Any], stepped: list[Tensor], layout: StepLayout) -> None:
        """Work a rule does before anything else in a group's step; every rank calls it, with pieces or not.

        Called before the norms' collective, also on ranks that hold no piece (ZeRO padding) or no adapted
        piece, so a collective a rule needs ahead of its norms (RangerLARS: the cut-row sums of Gradient
        Centralization) is made by every rank in the same order.  Default: nothing.
        """

    # State keys a rule writes before it asks for its norms (AdamLARS, RangerLARS: the moments and the step
    # count); a batched step measures on copies of them (:meth:`_measure_group`).
    _written_before_norms: frozenset[str] = frozenset()

    @staticmethod
    def _foreach(group: dict[str, Any], stepped: list[Tensor]) -> bool:
        return group["foreach"] if group["foreach"] is not None else default_foreach(stepped)

    def _measure(self, batch: NormsBatch, group: dict[str, Any], stepped: list[Tensor], plan: StepPlan) -> None:
        """Phase 1 of a batched step for one group: its preparation, then its local norm sums recorded into
        ``batch`` (zeros on a rank holding no adapted piece), with nothing written."""
        layout = plan.layout
        self._prepare_group(group, stepped, layout)
        adapted = layout.select(plan.adapt)
        try:
            if not any(plan.adapt):  # no adapted piece here (only 1-D layers or padding): send zeros
                adapted.norms(*[[] for _ in range(NORMS_PER_LAYER)])
            else:
                self._init_state(group, stepped)
                self._measure_group(group, stepped, plan, self._foreach(group, stepped))
        except Measured:
            pass
        if not batch.recorded(adapted):
            raise RuntimeError(
                f"hf_lars: {type(self).__name__}'s step of a sharded param group did not ask for its norms in the "
                "measure phase of a batched step (report this as a bug)"
            )

    def _measure_group(self, group: dict[str, Any], stepped: list[Tensor], plan: StepPlan, foreach: bool) -> None:
        """Run the group's step up to its norms (which raise :class:`Measured`) without writing anything.

        The step itself, on copies of the state it writes before its norms (:attr:`_written_before_norms`):
        so the recorded sums are those the real step would compute, to the bit.  The copies are one group's
        and die before the next group is measured.
        """
        originals = {p: self.state[p] for p in stepped}
        try:
            for p, state in originals.items():
                copies = {k: v.clone() if k in self._written_before_norms else v for k, v in state.items()}
                if "step" in copies and "step" in self._written_before_norms:
                    count = self._step_counts.known([state["step"]])
                    if count is not None:  # the same host scalars as the real step
                        self._step_counts.record([copies["step"]], count)
                self.state[p] = copies
            self._step_group(group, stepped, plan, foreach)
        finally:
            for p, state in originals.items():
                self.state[p] = state

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> float | None:
        """Perform one optimization step.

        Args:
            closure: a closure that re-evaluates the model and returns the loss (optional).
            grad_scale: the loss scale the gradients still carry (``torch.amp.GradScaler`` sets it as the
                attribute ``self.grad_scale``, which is read when this is ``None``): the step uses
                ``grad / grad_scale``, computed on the device, and never writes ``p.grad``.
            found_inf: a 0-d device tensor, nonzero when some gradient is not finite (GradScaler sets it as
                ``self.found_inf``): the step is then skipped on the device, parameters, state and step
                counts untouched, without a host synchronization.

        Raises:
            RuntimeError: called while a CUDA graph is being captured (see :func:`_refuse_graph_capture`).
        """
        _refuse_graph_capture(type(self).__name__)
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps = []  # (group, its index, stepped tensors, plan, join a collective)
        for position, group in enumerate(self.param_groups):
            stepped = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; use a dense embedding "
                        "(nn.Embedding(sparse=False)) or a sparse-aware optimizer such as torch.optim.SparseAdam"
                    )
                stepped.append(p)
            if stepped:
                group_index = self._group_index.get(id(group), position)
                steps.append((group, group_index, stepped, *self._step_layout(group, group_index, stepped)))
        batch = NormsBatch.shared([plan.layout.process_group for *_, plan, join in steps if join])
        if batch is not None:  # phases 1 and 2 (docs/design.md, "Layers, pieces and one all-reduce")
            with unscaled_gradients(grad_scale), batch.measuring():
                for group, _, stepped, plan, join in steps:
                    if join and batch.covers(plan.layout.process_group):
                        self._measure(batch, group, stepped, plan)
            batch.reduce()
        for group, group_index, stepped, plan, join in steps:
            layout = plan.layout
            if batch is None or not (join and batch.covers(layout.process_group)):
                self._prepare_group(group, stepped, layout)
                if join and not any(plan.adapt):
                    # This rank holds no adapted piece (only 1-D layers or ZeRO padding): join the ranks that do.
                    layout.select(plan.adapt).norms(*[[] for _ in range(NORMS_PER_LAYER)])
            if not layout.num_pieces:
                continue
            self._init_state(group, stepped)
            saved = save_for_skip(stepped, self.state) if found_inf is not None else None
            with unscaled_gradients(grad_scale), batch.applying() if batch is not None else contextlib.nullcontext():
                ratios = self._step_group(group, stepped, plan, self._foreach(group, stepped))
            if saved is not None:
                restore_if_skipped(found_inf, saved)
            if ratios is not None:
                self._record_ratios(group_index, *ratios)
        return loss


def _refuse_graph_capture(name: str) -> None:
    """Refuse ``step()`` inside CUDA graph capture, before anything is recorded.

    The learning rate and every hyper-parameter are Python floats: a captured graph would bake in the
    values of the capture step, so an LR schedule would be silently ignored on replay (torch's answer,
    ``capturable=True`` with a tensor ``lr``, is not offered here).  Checking costs no synchronization.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"hf_lars: {name}.step() was called while a CUDA graph is being captured; its learning rate and "
            "hyper-parameters are Python floats that the graph would freeze, so LR schedules would be silently "
            "ignored on replay.  Fix: capture only the forward and backward passes (e.g. torch.cuda.graphs."
            "make_graphed_callables(model, ...)) and call optimizer.step() outside the graph."
        )
