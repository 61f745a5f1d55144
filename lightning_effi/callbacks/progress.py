"""A rich progress bar that never makes the host wait for the GPU, and counts what ``max_steps`` counts.

Lightning turns every ``prog_bar=True`` metric into a Python number with ``.item()`` at the end of every training
batch once it has been logged (in its logger connector, progress bar or not), and its progress bars read them again
at every refresh. On a GPU each ``.item()`` waits for all queued work: the queue drains at every step boundary and
the next step's launch overhead is exposed.

``SyncFreeProgressBar`` shows, next to Lightning's own progress-bar metrics, the host-side values a LightningModule
offers through ``progress_bar_host_metrics()`` (a dict of Python floats it can produce without a sync, e.g. from a
non-blocking copy into pinned memory). The example models offer their training loss this way, and log ``train/loss``
as a progress-bar metric only under progress bars that do not read host metrics.

Lightning's bar counts micro-batches against ``max_steps`` (optimizer steps), so under gradient accumulation it runs
past its total and its clock stops there. With ``max_steps`` set this bar counts optimizer steps
(``trainer.global_step``) in one task for the whole run, and its time left is the remaining micro-batches (from the
accumulation schedule) over the measured micro-batch rate, so it stays right while a ramp changes the factor.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import (
    CustomTimeColumn,
    ProcessingSpeedColumn,
    RichProgressBarTheme,
)
from lightning.pytorch.utilities.types import STEP_OUTPUT
from rich.progress import ProgressColumn, Task
from rich.style import Style
from rich.text import Text
from typing_extensions import override

from lightning_effi._protocols import HostMetricsModule
from lightning_effi.callbacks.accumulation import AccumulationScheduler
from lightning_effi.callbacks.schedule import factor_sum

# Rate window, as rich's own speed estimate: long enough to smooth validation pauses and logging steps, short enough
# to follow a factor change.
_RATE_WINDOW_S = 30.0


class SyncFreeProgressBar(RichProgressBar):
    """``RichProgressBar`` that adds the module's ``progress_bar_host_metrics()`` and counts optimizer steps.

    A value that is a step or two old on a GPU (the newest whose copy to the host has finished) is shown instead of
    a device sync per batch; on the CPU it is the current step's.

    With ``Trainer(max_steps=N)`` the training bar is ``global_step/N`` for the whole run, its speed is in optimizer
    steps per second, and its time left is the remaining micro-batches over the micro-batch rate (exact for a
    step-keyed ``AccumulationScheduler``; other units use the current factor). Without ``max_steps`` it counts the
    epoch's micro-batches, as Lightning's. The accumulation factor is shown as ``accum`` when it is above 1 or an
    ``AccumulationScheduler`` sets it; an epoch total only when ``max_epochs`` is set.

    Args:
        refresh_rate, leave, theme, console_kwargs: as for ``RichProgressBar``.
        show_version: show the logger's version as ``v_num`` (Lightning's default). Default ``False``.
    """

    #: Read by the example models: with this bar they log no progress-bar metric of their own per step.
    reads_host_metrics = True

    def __init__(
        self,
        refresh_rate: int = 100,
        leave: bool = False,
        theme: RichProgressBarTheme = RichProgressBarTheme(),  # noqa: B008 - Lightning's default, never mutated
        console_kwargs: dict[str, Any] | None = None,
        show_version: bool = False,
    ) -> None:
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ValueError(f"Invalid refresh_rate {refresh_rate!r}: must be an int >= 0 (batches between two "
                             "refreshes; 0 disables the bar)")
        if not isinstance(show_version, bool):
            raise TypeError(f"Invalid show_version {show_version!r}: must be True or False")
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme, console_kwargs=console_kwargs)
        self.show_version = show_version
        self._scheduler: AccumulationScheduler | None = None
        self._samples: deque[tuple[float, int]] = deque()  # (host clock, micro-batches run in this fit)
        self._micro_batches = 0
        self._since_step = 0  # micro-batches since the last optimizer step (no AccumulationScheduler)
        self._last_step = 0

    # ------------------------------------------------------------------------------------------------- metrics
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        self._scheduler = next((c for c in callbacks if isinstance(c, AccumulationScheduler)), None)

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        version = items.pop("v_num", None)
        if self.show_version and version is not None:
            items = {"v_num": str(version), **items}  # a string: the metrics format would print 0 as 0.000
        if trainer.state.fn == "fit":
            factor = self.accumulation_factor(trainer)
            if factor > 1 or self._scheduler is not None:
                items["accum"] = str(factor)  # a string: an int would print as 4.000
        if isinstance(pl_module, HostMetricsModule):
            items.update(pl_module.progress_bar_host_metrics())
        return items

    def accumulation_factor(self, trainer: pl.Trainer) -> int:
        """Micro-batches per optimizer step now: the ``AccumulationScheduler``'s window size when one is present
        (``trainer.accumulate_grad_batches`` holds a loop value there, not always the factor), else the Trainer's."""
        if self._scheduler is not None:
            return self._scheduler.factor
        return max(int(trainer.accumulate_grad_batches), 1)

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's appends max_epochs - 1, which reads "Epoch 0/-2" when max_steps alone bounds the run.
        description = f"Epoch {current_epoch}"
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        # the same width as "Validation", so the bars do not flicker between the two
        return f"{description:{len(self.validation_description)}}"

    # ------------------------------------------------------------------------------------------------ columns
    @override
    def configure_columns(self, trainer: pl.Trainer) -> list:
        swap = {CustomTimeColumn: _ElapsedAndLeftColumn(style=self.theme.time),
                ProcessingSpeedColumn: _SpeedColumn(style=self.theme.processing_speed)}
        return [swap.get(type(column), column) for column in super().configure_columns(trainer)]

    # --------------------------------------------------------------------------------------- optimizer steps
    @staticmethod
    def _counts_steps(trainer: pl.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._samples.clear()
        self._micro_batches = self._since_step = 0
        self._last_step = trainer.global_step

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._counts_steps(trainer):
            super().on_train_epoch_start(trainer, pl_module)
            return
        # One task for the whole run (no reset per epoch, which would restart its clock): only the epoch changes.
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self._add_step_task(trainer)
        else:
            self.progress.update(self.train_progress_bar_id, description=self._styled_train_description(trainer),
                                 visible=True)
        self.refresh()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT,
                           batch: Any, batch_idx: int) -> None:
        if not self._counts_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        self._count_micro_batch(trainer)
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:  # resumed mid-epoch: no epoch start was seen
            self._add_step_task(trainer)
        assert self.train_progress_bar_id is not None
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, unit="step",
                             time_left=self.time_left(trainer))
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def _styled_train_description(self, trainer: pl.Trainer) -> str:
        description = self._get_train_description(trainer.current_epoch)
        return f"[{self.theme.description}]{description}" if self.theme.description else description

    def _add_step_task(self, trainer: pl.Trainer) -> None:
        assert self.progress is not None
        # completed= at creation (not an update), so a resumed run's first steps do not count as speed
        self.train_progress_bar_id = self.progress.add_task(
            self._styled_train_description(trainer), total=trainer.max_steps, completed=trainer.global_step,
            unit="step", time_left=None)

    def _count_micro_batch(self, trainer: pl.Trainer) -> None:
        now = time.monotonic()
        self._micro_batches += 1
        self._samples.append((now, self._micro_batches))
        while len(self._samples) > 2 and self._samples[0][0] < now - _RATE_WINDOW_S:
            self._samples.popleft()
        if trainer.global_step != self._last_step:
            self._last_step, self._since_step = trainer.global_step, 0
        else:
            self._since_step += 1

    def micro_batch_rate(self) -> float | None:
        """Micro-batches per second on the host clock over the last half minute; None before two batches."""
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def remaining_micro_batches(self, trainer: pl.Trainer) -> int:
        """Micro-batches per rank until ``max_steps``: the rest of the open window plus the schedule's factors for
        the steps after it (a step-keyed schedule is summed exactly; other units repeat the current factor)."""
        step, stop = trainer.global_step, trainer.max_steps
        scheduler = self._scheduler
        if scheduler is None:
            return max(self.accumulation_factor(trainer) * (stop - step) - self._since_step, 0)
        done, size = scheduler.window_progress
        in_window = size - done if done < size else 0
        after = step + 1 if in_window else step
        if scheduler.unit == "step" and scheduler.global_batch_size is None:
            future = factor_sum(after, stop, schedule=scheduler.schedule, ramp=scheduler.ramp)
        else:
            future = scheduler.factor * max(stop - after, 0)
        return in_window + future

    def time_left(self, trainer: pl.Trainer) -> float | None:
        """Seconds until ``max_steps`` at the current micro-batch rate; None until there is a rate."""
        rate = self.micro_batch_rate()
        return None if not rate else self.remaining_micro_batches(trainer) / rate


class _ElapsedAndLeftColumn(ProgressColumn):
    """``elapsed • left``; left is the task's ``time_left`` field when the bar sets one (optimizer steps under an
    accumulation schedule), else rich's estimate from the task's own speed."""

    max_refresh = 0.5  # as Lightning's time column: no jitter

    def __init__(self, style: str | Style) -> None:
        self.style = style
        super().__init__()

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        left = 0.0 if task.finished else task.fields.get("time_left", task.time_remaining)
        return Text(f"{_clock(elapsed)} • {_clock(left)}", style=self.style)


class _SpeedColumn(ProgressColumn):
    """Speed in the task's unit: optimizer steps when the bar counts steps, else Lightning's "it"."""

    def __init__(self, style: str | Style) -> None:
        self.style = style
        super().__init__()

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed or 0.0:.2f}{task.fields.get('unit', 'it')}/s", style=self.style)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
