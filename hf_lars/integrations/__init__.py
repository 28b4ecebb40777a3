"""Front doors: Trainer (``--optim``), DeepSpeed JSON, Accelerate.  None of them re-implements an update rule.

:func:`register` is the one call that makes the registry's names known everywhere.
"""

from __future__ import annotations

import importlib.util
import logging

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register() -> None:
    """Make hf_lars's optimizer and scheduler names usable by transformers and DeepSpeed.

    After this, ``TrainingArguments(optim="lars")``, ``--optim adam_lars`` on the command line,
    ``--lr_scheduler_type warmup_poly`` and DeepSpeed JSON ``"optimizer": {"type": "AdamLARS"}`` work.
    Idempotent.  DeepSpeed is wired only when it is installed.  An accelerate YAML's
    ``deepspeed_config_file: zero2`` (``ACCELERATE_DEEPSPEED_CONFIG_FILE``) naming a config shipped with hf_lars
    is pointed at it (:func:`hf_lars.integrations.deepspeed.resolve_accelerate_config_env`).
    """
    from hf_lars.integrations import transformers as hf_transformers
    from hf_lars.integrations.deepspeed import resolve_accelerate_config_env

    resolve_accelerate_config_env()

    hf_transformers.register()
    if importlib.util.find_spec("deepspeed") is not None:
        from hf_lars.integrations import deepspeed as hf_deepspeed

        hf_deepspeed.register()
