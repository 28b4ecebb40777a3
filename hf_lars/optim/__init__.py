"""The update rules: one optimizer per module, all built on :mod:`hf_lars.optim.trust`."""

from hf_lars.optim._base import TrustRatioOptimizer
from hf_lars.optim.adam_lars import AdamLARS
from hf_lars.optim.lars import LARS
from hf_lars.optim.ranger_lars import RangerLARS

__all__ = ["LARS", "AdamLARS", "RangerLARS", "TrustRatioOptimizer"]
