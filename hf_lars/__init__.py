"""hf_lars: layer-wise trust-ratio optimizers for large-batch training, exact under sharding."""

from __future__ import annotations

__version__ = "0.1.0"

# Importing sharding registers its layout resolver with hf_lars.layout (the optimizers never import it).
# It imports only torch and the layout contract, so this stays cheap.
import hf_lars.sharding  # noqa: E402, F401
from hf_lars.optim import LARS, AdamLARS, RangerLARS  # noqa: E402
from hf_lars.registry import (  # noqa: E402
    build_param_groups,
    create_optimizer,
    declare_stacked,
    declare_transposed,
    get_optimizer_info,
    list_optimizers,
)

# Names whose modules import transformers/accelerate: loaded on first use so `import hf_lars` stays light.
_LAZY = {
    "register": "hf_lars.integrations",
    "LarsTrainingArguments": "hf_lars.integrations.transformers",
    "LarsTrainer": "hf_lars.integrations.transformers",
    "TrustRatioCallback": "hf_lars.integrations.transformers",
    "get_warmup_poly_schedule": "hf_lars.schedule",
    "warmup_poly_factor": "hf_lars.schedule",
    "scaled_lr": "hf_lars.scaling",
    "fit_surge": "hf_lars.scaling",
    "adam_optimal_lr": "hf_lars.scaling",
    "sgd_optimal_lr": "hf_lars.scaling",
    "AdamBatchSizeScaler": "hf_lars.scaling",
    "SGDBatchSizeScaler": "hf_lars.scaling",
    "GradientNoiseScale": "hf_lars.scaling",
    "GradientNoiseScaleCallback": "hf_lars.integrations.noise_scale",
    "OnlineLrFactor": "hf_lars.scaling.online",
    "OnlineLrScheduler": "hf_lars.schedule",
    "BatchSizeRamp": "hf_lars.scaling.ramp",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_lars' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "__version__",
    "LARS",
    "AdamLARS",
    "RangerLARS",
    "list_optimizers",
    "create_optimizer",
    "get_optimizer_info",
    "build_param_groups",
    "declare_stacked",
    "declare_transposed",
    *_LAZY,
]
