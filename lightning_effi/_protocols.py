"""The contracts between the package's modules, as ``typing.Protocol`` types.

Each names what one side offers and the other relies on, so a third-party class can take part by having the
attributes (a ``Lamb`` subclass defined elsewhere, a user's strategy or progress bar) and a check is an
``isinstance`` against the protocol instead of a module-name or ``hasattr`` test.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class FlatLayoutOptimizer(Protocol):
    """An optimizer whose per-parameter norms stay right on ZeRO's flat partitions.

    A ZeRO strategy sets ``group["flat_layouts"]`` (one ``FlatLayout`` per flat tensor of the group) and
    :attr:`norm_process_group` (the group the partitions are sharded over) before each step; the optimizer computes
    every norm of a logical parameter over all of its segments on all ranks. ``lightning_effi.optim.Lamb`` is one,
    and so is any subclass of it.
    """

    accepts_flat_layouts: ClassVar[bool]
    norm_process_group: Any


@runtime_checkable
class TrustRatioOptimizer(Protocol):
    """An optimizer that exposes the per-parameter trust ratios of its last step (a device tensor, None before the
    first step), for ``TrainingHealthMonitor``."""

    trust_ratios: Tensor | None


@runtime_checkable
class DeviceLROptimizer(Protocol):
    """An optimizer whose ``step`` reads a 0-dim device tensor ``group["lr"]`` without a host sync, so a learning-rate
    schedule can be held on the device (``LossScalingPrecision``)."""

    accepts_tensor_lr: ClassVar[bool]


@runtime_checkable
class AccumulationEngine(Protocol):
    """A strategy whose engine keeps its own accumulation bookkeeping: ``AccumulationScheduler`` calls
    ``effi_set_accumulation(factor)`` at the start of every window whose size differs from the previous one."""

    def effi_set_accumulation(self, factor: int) -> None: ...


@runtime_checkable
class CheckpointValidator(Protocol):
    """A strategy or CheckpointIO that can tell a complete checkpoint from an incomplete or foreign one:
    ``effi_checkpoint_problem(path)`` returns what is wrong with it (words that follow the path) or None.
    ``ckpt_path="last"`` skips the candidates it finds wrong."""

    def effi_checkpoint_problem(self, path: Path) -> str | None: ...


@runtime_checkable
class HostMetricsModule(Protocol):
    """A LightningModule that offers progress-bar values it can produce without a device sync (Python floats, e.g.
    read from a landed non-blocking copy), for ``SyncFreeProgressBar``."""

    def progress_bar_host_metrics(self) -> dict[str, float]: ...


@runtime_checkable
class HostMetricsProgressBar(Protocol):
    """A progress bar that shows :class:`HostMetricsModule` values: with it the example models log no progress-bar
    metric of their own (Lightning reads every progress-bar metric with ``.item()`` at each batch end)."""

    reads_host_metrics: ClassVar[bool]


@runtime_checkable
class ExportSpecModule(Protocol):
    """A LightningModule class that says which network its checkpoints hold, for ``effi export``: ``export_spec``
    maps its hyper-parameters to ``lightning_effi.export.model_spec(...)`` (class path, constructor arguments, key
    prefix). Checked on the class LightningCLI recorded in a checkpoint that has no ``"export_spec"`` entry."""

    @classmethod
    def export_spec(cls, hparams: Mapping[str, Any]) -> dict[str, Any]: ...
