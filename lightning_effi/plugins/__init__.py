"""lightning_effi.plugins: loss-scaled mixed precision and bf16 master weights for Lightning.

``DynamicLossScaler`` (``scaler.py``) is pure torch; the Lightning precision plugins (``precision.py``) are thin glue.
"""

from lightning_effi.plugins.precision import LossScalingPrecision, MasterWeightsPrecision
from lightning_effi.plugins.scaler import DynamicLossScaler

__all__ = ["DynamicLossScaler", "LossScalingPrecision", "MasterWeightsPrecision"]
