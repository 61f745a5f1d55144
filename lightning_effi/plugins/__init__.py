"""lightning_effi.plugins: loss-scaled mixed precision, bf16 master weights and crash-safe checkpoints for Lightning.

``DynamicLossScaler`` (``scaler.py``) is pure torch; the Lightning precision plugins (``precision.py``) are thin glue.
``AtomicCheckpointIO`` (``checkpoint_io.py``) writes checkpoint files that are complete or absent.
"""

from lightning_effi.plugins.checkpoint_io import AtomicCheckpointIO
from lightning_effi.plugins.precision import LossScalingPrecision, MasterWeightsPrecision
from lightning_effi.plugins.scaler import DynamicLossScaler

__all__ = ["AtomicCheckpointIO", "DynamicLossScaler", "LossScalingPrecision", "MasterWeightsPrecision"]
