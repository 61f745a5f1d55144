"""Helpers shared by the multi-process scripts (imported by path: scripts run as plain files)."""

from __future__ import annotations

import os
import sys


def clean_exit() -> None:
    """End a distributed script without the gloo exit-time abort.

    Some gloo runs die at interpreter shutdown with "terminate called without an active exception" (a gloo
    worker thread racing Python finalization). A barrier, a flush and ``os._exit(0)`` on every rank skips
    finalization entirely.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
