"""lightning_effi.strategies."""
