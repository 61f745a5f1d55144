"""lightning_effi.plugins."""
