"""lightning_effi.models."""
