"""lightning_effi: cheaper transformer training for PyTorch Lightning."""

__version__ = "0.1.0"
