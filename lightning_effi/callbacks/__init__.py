"""lightning_effi.callbacks."""

from lightning_effi.callbacks._split import replaying
from lightning_effi.callbacks.accumulation import AccumulationScheduler
from lightning_effi.callbacks.failfast import FailFast
from lightning_effi.callbacks.health import TrainingHealthMonitor
from lightning_effi.callbacks.microbatch import AutoMicroBatch
from lightning_effi.callbacks.optimizer import ConfigureOptimizer
from lightning_effi.callbacks.progress import SyncFreeProgressBar
from lightning_effi.callbacks.summary import EffiModelSummary

__all__ = [
    "AccumulationScheduler",
    "AutoMicroBatch",
    "ConfigureOptimizer",
    "EffiModelSummary",
    "FailFast",
    "SyncFreeProgressBar",
    "TrainingHealthMonitor",
    "replaying",
]
