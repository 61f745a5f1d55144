"""``FailFast``: when one rank raises, every rank ends within a bounded time (see ``lightning_effi._failfast``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_effi import _failfast


class FailFast(Callback):
    """End every rank of a multi-process run when one rank raises, instead of leaving the others waiting in a
    collective until the backend's timeout.

    The failing rank posts its error to the job's key-value store; the others poll it every ``poll_s`` seconds from
    a daemon thread, print ``[rank r] lightning_effi: ending this rank because rank k raised ...`` and exit with
    status 1. The failing rank's own traceback is unchanged. No cost on the training path (a thread asking the
    store twice a second). ``EffiFSDPStrategy`` and ``EffiDeepSpeedStrategy`` do the same without this callback;
    add it for DDP or any other strategy. A single process does nothing.

    Args:
        poll_s: seconds between two looks at the store. Default ``0.5``.
        ack_timeout_s: how long the failing rank waits for the others to have seen its failure before it
            re-raises (a failure on rank 0, which hosts the store, must reach them before it exits).
            Default ``10``.
    """

    def __init__(self, poll_s: float = _failfast.POLL_S, ack_timeout_s: float = _failfast.ACK_TIMEOUT_S) -> None:
        for name, v in (("poll_s", poll_s), ("ack_timeout_s", ack_timeout_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"Invalid {name} {v!r}: must be a number of seconds > 0")
        self.poll_s, self.ack_timeout_s = float(poll_s), float(ack_timeout_s)
        self._watchdog: Any = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._watchdog = start_watchdog(trainer.strategy, self.poll_s, self.ack_timeout_s)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._watchdog is not None:
            self._watchdog.post(exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None


def start_watchdog(strategy: Any, poll_s: float = _failfast.POLL_S,
                   ack_timeout_s: float = _failfast.ACK_TIMEOUT_S) -> _failfast.Watchdog | None:
    """A running watchdog for ``strategy``'s process group, or None for a single process (or a strategy that runs
    one already)."""
    if strategy.world_size < 2 or getattr(strategy, "_effi_watchdog", None) is not None:
        return None
    store = _failfast.default_store()
    if store is None:
        return None
    return _failfast.Watchdog(store, strategy.global_rank, strategy.world_size, poll_s, ack_timeout_s).start()


class FailFastStrategyMixin:
    """What the package's strategies add: the watchdog from setup_environment (the process group exists then) to
    teardown, and this rank's failure posted from on_exception."""

    _effi_watchdog: _failfast.Watchdog | None = None

    def _effi_start_watchdog(self) -> None:
        self._effi_watchdog = None
        self._effi_watchdog = start_watchdog(self)

    def on_exception(self, exception: BaseException) -> None:
        if self._effi_watchdog is not None:
            self._effi_watchdog.post(exception)
        super().on_exception(exception)  # type: ignore[misc]

    def teardown(self) -> None:
        if self._effi_watchdog is not None:
            self._effi_watchdog.stop()
            self._effi_watchdog = None
        super().teardown()  # type: ignore[misc]
