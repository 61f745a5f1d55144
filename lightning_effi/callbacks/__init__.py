"""lightning_effi.callbacks."""
