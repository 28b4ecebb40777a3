"""The update rules: one optimizer per module, all built on the trust-ratio core (:mod:`hf_lars.optim.trust`).

Modules: :mod:`.base` (the public base class :class:`TrustRatioOptimizer`), :mod:`.trust` (the step plan,
ratios and the trust-ratio update), :mod:`.moments` (Adam's moments, per-step scalars and the host step
counts), :mod:`.lamb_form` (the step AdamLARS and RangerLARS share), :mod:`.working_copies` (fp32 copies of
low-precision tensors, a chunk at a time), :mod:`.fused` (the compiled step), and one module per rule.  Nothing here imports the ``sharding/`` or
``integrations/`` packages: layouts come from :func:`hf_lars.layout.resolve_layouts`.
"""

from hf_lars.optim.adam_lars import AdamLARS
from hf_lars.optim.base import TrustRatioOptimizer
from hf_lars.optim.lars import LARS
from hf_lars.optim.ranger_lars import RangerLARS

__all__ = ["LARS", "AdamLARS", "RangerLARS", "TrustRatioOptimizer"]
