"""lightning_effi.optim."""
