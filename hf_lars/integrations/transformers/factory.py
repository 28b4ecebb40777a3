"""Building an hf_lars optimizer for a ``Trainer``: one code path for :class:`LarsTrainer` and the patches.

``TrainingArguments`` map onto the constructor (``--learning_rate`` -> ``lr``, ``--weight_decay`` ->
``weight_decay`` of the decay group, ``--adam_beta1/2`` -> ``betas`` and ``--adam_epsilon`` -> ``eps`` for
the Adam forms, ``--optim_args`` for the rest); the groups are Trainer's decay / no-decay split
(:func:`hf_lars.registry.build_param_groups` over ``trainer.get_decay_parameter_names``, so subclass
overrides count), the no-decay group not adapted.  :func:`get_optimizer_cls_and_kwargs` and
:func:`create_optimizer` take the behaviour to fall back on for other names, so ``LarsTrainer`` passes
``super()``'s and the patched ``Trainer`` passes the original method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hf_lars.integrations.callbacks import TrustRatioCallback, add_trust_ratio_callback
from hf_lars.integrations.distributed import is_sharded, refuse_fsdp1
from hf_lars.integrations.transformers.names import hf_lars_optim_name, name_value
from hf_lars.integrations.transformers.optim_args import is_adam_form, optimizer_hyperparameters, parse_optim_args
from hf_lars.optim import TrustRatioOptimizer
from hf_lars.registry import build_param_groups, get_optimizer_info, list_optimizers

__all__ = [
    "optimizer_cls_and_kwargs",
    "trainer_param_groups",
    "create_trainer_optimizer",
    "attach_trust_ratio_callback",
    "get_optimizer_cls_and_kwargs",
    "create_optimizer",
]

logger = logging.getLogger(__name__)


def optimizer_cls_and_kwargs(args: Any, optim: str | None = None) -> tuple[type[TrustRatioOptimizer], dict[str, Any]]:
    """``(class, constructor kwargs)`` for an hf_lars ``optim`` from TrainingArguments-like ``args``.

    Order of precedence (later wins): the registry name's defaults (``larc`` -> ``trust_clip=True``), the
    mapped TrainingArguments (``learning_rate``, ``weight_decay``, and ``adam_beta1/2``, ``adam_epsilon`` for
    classes with ``betas``), then ``optim_args``.
    """
    name = hf_lars_optim_name(args.optim) if optim is None else get_optimizer_info(optim).name
    if name is None:
        raise ValueError(
            f"{name_value(args.optim)!r} is not an hf_lars optimizer. hf_lars names: {', '.join(list_optimizers())}"
        )
    info = get_optimizer_info(name)
    hparams = optimizer_hyperparameters(info.cls)
    kwargs: dict[str, Any] = dict(info.defaults)
    kwargs["lr"] = float(args.learning_rate)
    if "weight_decay" in hparams:
        kwargs["weight_decay"] = float(args.weight_decay)
    if is_adam_form(hparams):
        kwargs["betas"] = (float(args.adam_beta1), float(args.adam_beta2))
        kwargs["eps"] = float(args.adam_epsilon)
    kwargs.update(parse_optim_args(getattr(args, "optim_args", None), name))
    return info.cls, kwargs


def trainer_param_groups(model: nn.Module, decay_parameter_names: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainer's two groups, as ``(name, tensor)`` pairs (:func:`hf_lars.registry.build_param_groups`)."""
    return build_param_groups(model, weight_decay, decay_parameter_names)


def attach_trust_ratio_callback(trainer: Any) -> TrustRatioCallback:
    """Put a :class:`TrustRatioCallback` first in ``trainer``'s callbacks.

    Per-layer JSONL unless ``args.trust_ratio_jsonl`` is false; gathered across ranks under DeepSpeed/FSDP.
    """
    per_layer = bool(getattr(trainer.args, "trust_ratio_jsonl", True))
    return add_trust_ratio_callback(trainer, TrustRatioCallback(per_layer=per_layer, gather=is_sharded(trainer)))


def create_trainer_optimizer(trainer: Any, model: nn.Module | None = None) -> torch.optim.Optimizer:
    """Build ``trainer.optimizer`` for an hf_lars ``trainer.args.optim`` (what ``create_optimizer`` does for ours).

    Class and kwargs come from ``trainer.get_optimizer_cls_and_kwargs`` (so overrides count), the groups from
    :func:`trainer_param_groups` over ``trainer.get_decay_parameter_names``.  Adds a
    :class:`TrustRatioCallback` (:func:`attach_trust_ratio_callback`) before the reporting integrations.
    """
    opt_model = trainer.model if model is None else model
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, opt_model)
    kwargs = dict(kwargs)
    kwargs.pop("params", None)
    groups = trainer_param_groups(
        opt_model, trainer.get_decay_parameter_names(opt_model), kwargs.get("weight_decay", trainer.args.weight_decay)
    )
    counts = [(len(g["params"]), bool(g.get("excluded"))) for g in groups]
    trainer.optimizer = cls(groups, **kwargs)
    logger.info(
        "created %s (%s) with %d decay / %d no-decay (excluded, adapt_excluded=%s) tensors",
        cls.__name__,
        hf_lars_optim_name(trainer.args.optim),
        sum(n for n, no_decay in counts if not no_decay),
        sum(n for n, no_decay in counts if no_decay),
        trainer.optimizer.defaults.get("adapt_excluded"),
    )
    attach_trust_ratio_callback(trainer)
    return trainer.optimizer


def get_optimizer_cls_and_kwargs(
    args: Any, model: Any, fallback: Callable[[Any, Any], tuple[Any, Any]]
) -> tuple[Any, Any]:
    """``Trainer.get_optimizer_cls_and_kwargs`` for hf_lars names; ``fallback(args, model)`` for any other."""
    name = hf_lars_optim_name(args.optim)
    if name is not None:
        return optimizer_cls_and_kwargs(args, name)
    return fallback(args, model)


def create_optimizer(
    trainer: Any, fallback: Callable[..., torch.optim.Optimizer], *args: Any, **kwargs: Any
) -> torch.optim.Optimizer:
    """``Trainer.create_optimizer``: ours for an hf_lars name when no optimizer was given, else ``fallback``.

    An FSDP1-wrapped model is refused (:func:`~hf_lars.integrations.distributed.refuse_fsdp1`).
    """
    if (
        trainer.optimizer is None
        and getattr(trainer, "optimizer_cls_and_kwargs", None) is None
        and hf_lars_optim_name(trainer.args.optim) is not None
    ):
        refuse_fsdp1(getattr(trainer, "model_wrapped", None))
        refuse_fsdp1(args[0] if args else kwargs.get("model", trainer.model))
        return create_trainer_optimizer(trainer, *args, **kwargs)
    return fallback(*args, **kwargs)
