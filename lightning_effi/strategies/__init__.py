"""lightning_effi.strategies: FSDP2 and DeepSpeed ZeRO strategies configured from one source of truth.

Importing this package registers the strategy names with Lightning's StrategyRegistry.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_effi.strategies.deepspeed import EffiDeepSpeedStrategy
from lightning_effi.strategies.fsdp import EffiFSDPStrategy

EffiDeepSpeedStrategy.register_strategies(StrategyRegistry)
EffiFSDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["EffiDeepSpeedStrategy", "EffiFSDPStrategy"]
