"""A rich progress bar that never makes the host wait for the GPU.

Lightning turns every ``prog_bar=True`` metric into a Python number with ``.item()`` at the end of every training
batch once it has been logged (in its logger connector, progress bar or not), and its progress bars read them again
at every refresh. On a GPU each ``.item()`` waits for all queued work: the queue drains at every step boundary and
the next step's launch overhead is exposed.

``SyncFreeProgressBar`` shows, next to Lightning's own progress-bar metrics, the host-side values a LightningModule
offers through ``progress_bar_host_metrics()`` (a dict of Python floats it can produce without a sync, e.g. from a
non-blocking copy into pinned memory). The example models offer their training loss this way, and log ``train/loss``
as a progress-bar metric only under progress bars that do not read host metrics.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override

from lightning_effi._protocols import HostMetricsModule


class SyncFreeProgressBar(RichProgressBar):
    """``RichProgressBar`` (same arguments) that adds the module's ``progress_bar_host_metrics()`` to what it shows.

    A value that is a step or two old on a GPU (the newest whose copy to the host has finished) is shown instead of
    a device sync per batch; on the CPU it is the current step's.
    """

    #: Read by the example models: with this bar they log no progress-bar metric of their own per step.
    reads_host_metrics = True

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if isinstance(pl_module, HostMetricsModule):
            items.update(pl_module.progress_bar_host_metrics())
        return items
