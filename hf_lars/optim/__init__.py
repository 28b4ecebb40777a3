"""The update rules: one optimizer per module, all built on the trust-ratio core (:mod:`hf_lars.optim.trust`).

Modules: :mod:`.base` (the public base class :class:`TrustRatioOptimizer`), :mod:`.trust` (ratios and the
LAMB-form step), :mod:`.moments` (Adam's moments and per-step scalars), :mod:`.working_copies` (fp32 copies
of low-precision tensors), and one module per rule.  Nothing here imports the ``sharding/`` or
``integrations/`` packages: layouts come from :func:`hf_lars.layout.resolve_layouts`.
"""

from hf_lars.optim.adam_lars import AdamLARS
from hf_lars.optim.base import TrustRatioOptimizer
from hf_lars.optim.lars import LARS
from hf_lars.optim.ranger_lars import RangerLARS

__all__ = ["LARS", "AdamLARS", "RangerLARS", "TrustRatioOptimizer"]
