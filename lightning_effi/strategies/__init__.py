"""lightning_effi.strategies: FSDP2 and DeepSpeed ZeRO strategies configured from one source of truth.

Importing this package registers the strategy names with Lightning's StrategyRegistry. :func:`apply_fsdp` is the
FSDP2 sharding plan on its own, for a module and a device mesh without a Trainer.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_effi.strategies.deepspeed import EffiDeepSpeedStrategy
from lightning_effi.strategies.fsdp import EffiFSDPStrategy
from lightning_effi.strategies.parallelize import FSDPLayout, apply_fsdp

EffiDeepSpeedStrategy.register_strategies(StrategyRegistry)
EffiFSDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["EffiDeepSpeedStrategy", "EffiFSDPStrategy", "FSDPLayout", "apply_fsdp"]
