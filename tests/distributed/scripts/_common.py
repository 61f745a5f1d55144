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


def rows(data, wrap=None):
    """A map-style dataset over the rows of ``data`` (each passed through ``wrap`` when given)."""
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int):
            return wrap(data[i]) if wrap else data[i]

    return Rows()


def save_at_epoch_end(step: int, path):
    """A callback saving a checkpoint at the end of the epoch that reaches ``step`` (an end-of-epoch checkpoint)."""
    import lightning.pytorch as pl

    class SaveAtEpochEnd(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.global_step == step:
                trainer.save_checkpoint(path)

    return SaveAtEpochEnd()


def count_all_reduces_per_step(optimizer, record: list) -> None:
    """Append to ``record`` the number of ``torch.distributed.all_reduce`` calls inside each ``optimizer.step``.
    Step hooks rather than a wrapper around ``step``: EffiFSDPStrategy keeps its local-shard Adam step only for a
    step nothing else wraps."""
    import torch.distributed as dist

    real, n = dist.all_reduce, [0]

    def counted(*a, **k):
        n[0] += 1
        return real(*a, **k)

    def before_step(opt, args, kwargs):
        n[0] = 0
        dist.all_reduce = counted

    def after_step(opt, args, kwargs):
        dist.all_reduce = real
        record.append(n[0])

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)
