"""hf_lars: layer-wise trust-ratio optimizers for large-batch training, exact under sharding."""

from __future__ import annotations

__version__ = "0.1.0"

from hf_lars.optim import LARS, AdamLARS, RangerLARS  # noqa: E402
from hf_lars.registry import build_param_groups, create_optimizer, get_optimizer_info, list_optimizers  # noqa: E402

__all__ = [
    "__version__",
    "LARS",
    "AdamLARS",
    "RangerLARS",
    "list_optimizers",
    "create_optimizer",
    "get_optimizer_info",
    "build_param_groups",
]
