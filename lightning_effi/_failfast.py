"""One rank's exception ends every rank of the job within a bounded time.

When a rank raises mid-step, the others wait inside a collective for a partner that will not come: gloo notices
only once the failed process has exited and closed its sockets, NCCL only at the process-group timeout (thirty
minutes in Lightning), and no launcher helps when the failed rank lingers (a notebook, a script that catches the
error, an exit that hangs in cleanup). Here the failing rank writes its error into the job's key-value store (the
default process group's ``TCPStore``) from Lightning's ``on_exception``; every other rank polls that key from a
daemon thread, prints which rank failed and why, and ends with ``os._exit(1)`` (a rank blocked in a collective
cannot unwind). The failing rank waits briefly for the others to acknowledge, so a failure on rank 0, which hosts
the store, still reaches them before it exits. A rank killed outright (SIGKILL, a segfault) posts nothing; that case
is left to the launcher (torchrun and Lightning's launcher end the job when a process dies) and to the backend.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

KEY = "lightning_effi/failfast/failed"
POLL_S = 0.5  # how often a waiting rank looks for a failure
ACK_TIMEOUT_S = 10.0  # how long the failing rank waits for the others to have seen it


class Watchdog:
    """Polls ``store`` for a failure posted by another rank; :meth:`post` publishes this rank's."""

    def __init__(self, store: Any, rank: int, world_size: int, poll_s: float = POLL_S,
                 ack_timeout_s: float = ACK_TIMEOUT_S) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.poll_s, self.ack_timeout_s = poll_s, ack_timeout_s
        self._stop = threading.Event()
        self._posted = False
        self._thread = threading.Thread(target=self._run, name="lightning_effi-failfast", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self._posted:
                return
            try:
                failed = self.store.check([KEY])
                if failed:
                    message = self.store.get(KEY).decode(errors="replace")
                    self.store.set(f"{KEY}/ack/{self.rank}", b"1")
            except Exception:  # noqa: BLE001  (the store is gone: the job is ending; the backend reports it)
                return
            if failed and not self._posted and not self._stop.is_set():
                sys.stderr.write(f"[rank {self.rank}] lightning_effi: ending this rank because {message}\n")
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(1)

    def post(self, exception: BaseException) -> None:
        """Tell the other ranks that this one failed with ``exception`` (once), and give them time to see it."""
        if self._posted or self._stop.is_set():
            return
        self._posted = True
        text = f"rank {self.rank} raised {type(exception).__name__}: {exception}"
        try:
            self.store.set(KEY, text[:4000].encode())
            acks = [f"{KEY}/ack/{r}" for r in range(self.world_size) if r != self.rank]
            deadline = time.monotonic() + self.ack_timeout_s
            while acks and time.monotonic() < deadline:
                acks = [k for k in acks if not self.store.check([k])]
                if acks:
                    time.sleep(self.poll_s / 5)
        except Exception:  # noqa: BLE001  (no store to tell: the exception itself still propagates)
            pass


def default_store() -> Any:
    """The default process group's key-value store, or None without one."""
    from lightning_effi import _compat

    return _compat.default_store()
