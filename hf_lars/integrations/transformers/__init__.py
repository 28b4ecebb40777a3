"""Hugging Face Trainer integration: ``--optim lars``, ``--lr_scheduler_type warmup_poly``, trust-ratio logs.

Three ways in, all reading the one registry (:mod:`hf_lars.registry`):

1. :func:`register` (also ``hf_lars.register()``): afterwards plain ``TrainingArguments``, ``HfArgumentParser``
   and ``Trainer`` accept every registry name for ``optim`` (``lars``, ``larc``, ``nlars``, ``adam_lars``,
   ``lamb``, ``ranger_lars``) and ``warmup_poly`` for ``lr_scheduler_type``.
2. ``hf-lars run SCRIPT.py [args]``: calls :func:`register`, then runs an unmodified script as ``__main__``.
3. :class:`LarsTrainingArguments` + :class:`LarsTrainer`: subclasses that need no patching at all.

One module per job:

==================  ==========================================================================================
``names``           which ``optim`` / ``lr_scheduler_type`` values are ours; the names transformers accepts
``optim_args``      ``--optim_args "k=v,..."`` typed from the optimizer's signature
``factory``         (class, kwargs) from ``TrainingArguments``; Trainer's param groups; the optimizer itself
``scheduler``       ``warmup_poly`` for ``get_scheduler`` and for ``LarsTrainer``
``launch``          what plain ``TrainingArguments`` get at build time: flag checks, ``--lr_scaling``, CPU state
``patches``         the only module touching transformers internals: their table, tested versions, the check
``registration``    :func:`register` / :func:`unregister`, built from ``patches``
``trainer``         :class:`LarsTrainingArguments`, :class:`LarsTrainer`
==================  ==========================================================================================

Hyper-parameters: ``--learning_rate`` -> ``lr``; ``--weight_decay`` -> ``weight_decay`` of the decay group;
``--adam_beta1/2`` -> ``betas`` and ``--adam_epsilon`` -> ``eps`` for the Adam forms only (classes with
``betas``); ``--optim_args "k=v,k=v"`` sets any other constructor argument, typed from the class signature
(:func:`parse_optim_args`).
"""

from __future__ import annotations

from hf_lars.integrations.callbacks import TrustRatioCallback, add_trust_ratio_callback
from hf_lars.integrations.transformers import patches
from hf_lars.integrations.transformers.factory import (
    create_trainer_optimizer,
    optimizer_cls_and_kwargs,
    trainer_param_groups,
)
from hf_lars.integrations.transformers.launch import set_launch_lr_scaling
from hf_lars.integrations.transformers.names import SCHEDULER_NAME, WARMUP_POLY_KWARGS, hf_lars_optim_name
from hf_lars.integrations.transformers.optim_args import optimizer_hyperparameters, parse_optim_args
from hf_lars.integrations.transformers.patches import (
    PRIVATE_NAMES,
    SUPPORTED_TRANSFORMERS,
    TESTED_TRANSFORMERS,
    check_transformers_version,
)
from hf_lars.integrations.transformers.registration import is_registered, register, unregister
from hf_lars.integrations.transformers.scheduler import create_warmup_poly_scheduler
from hf_lars.integrations.transformers.trainer import LarsTrainer, LarsTrainingArguments

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "TESTED_TRANSFORMERS",
    "PRIVATE_NAMES",
    "SCHEDULER_NAME",
    "WARMUP_POLY_KWARGS",
    "register",
    "unregister",
    "is_registered",
    "check_transformers_version",
    "hf_lars_optim_name",
    "optimizer_hyperparameters",
    "parse_optim_args",
    "optimizer_cls_and_kwargs",
    "trainer_param_groups",
    "create_trainer_optimizer",
    "create_warmup_poly_scheduler",
    "set_launch_lr_scaling",
    "LarsTrainingArguments",
    "LarsTrainer",
    "TrustRatioCallback",
    "add_trust_ratio_callback",
    "patches",
]
