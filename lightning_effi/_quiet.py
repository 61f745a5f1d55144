"""Quiet defaults: upstream messages that tell a user of this package nothing they can act on.

Installed when ``lightning_effi`` is imported, unless the environment sets ``EFFI_VERBOSE=1`` (``effi --verbose``
sets it, so the ranks a launcher spawns inherit it). Each rule matches one message exactly; anything else, including
every warning about the user's own code, still shows. Nothing here imports torch, so the import stays cheap.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "EFFI_VERBOSE"

# (category, message regex): deprecations raised inside upstream code about upstream calls.
_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # Lightning's own pytree helper builds torch's deprecated LeafSpec on every batch it flattens.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # DeepSpeed's ZeRO partitioning calls torch's old collective names.
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
)

# logger name -> message prefixes dropped from it.
_LOG_RECORDS: dict[str, tuple[str, ...]] = {
    # Lightning advertises its hosted logger on every fit that does not use it.
    # ...and says it skipped its default model summary when the effi command supplies one.
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",
                                              "Trainer already configured with model summary callbacks"),
    "lightning.fabric.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),
    # DeepSpeed's accelerator probe warns on every CPU-only import; running on CPU is the point there.
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def verbose() -> bool:
    """Whether the quiet defaults are off (``EFFI_VERBOSE`` set to a non-empty value other than ``0``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def install() -> None:
    """Silence the messages above (idempotent); a no-op when :func:`verbose`."""
    if verbose() or _installed:
        return
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in _LOG_RECORDS.items():
        logger = logging.getLogger(name)
        f = _DropPrefixes(prefixes)
        logger.addFilter(f)
        _installed.append((logger, f))


def uninstall() -> None:
    """Show everything again (``effi --verbose`` in a process that already imported the package)."""
    for category, message in _WARNINGS:
        kept = [f for f in warnings.filters
                if not (f[0] == "ignore" and f[2] is category and getattr(f[1], "pattern", None) == message)]
        warnings.filters[:] = kept  # type: ignore[index]  # a list at run time, typed as a Sequence
    for logger, f in _installed:
        logger.removeFilter(f)
    _installed.clear()
