"""lightning_effi: cheaper transformer training for PyTorch Lightning."""

from lightning_effi import _quiet

__version__ = "0.1.0"

# Upstream tips and deprecations about upstream code are dropped unless EFFI_VERBOSE=1 (see _quiet).
_quiet.install()
