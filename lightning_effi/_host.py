"""Moving small values between the device and the host without making the host wait for the device.

Two helpers used on the hot path of every plugin:

* :func:`device_scalar`: a 0-dim device tensor holding a Python number, made by a fill kernel (``torch.full``)
  instead of ``torch.tensor(value, device=...)``, whose pageable host-to-device copy synchronises the stream.
* :class:`HostMirror`: a ring of host buffers that small device tensors are copied into without blocking (pinned
  memory and an event on CUDA). The host reads a slot only once its copy has landed, through a NumPy view of the
  host buffer; the device tensor itself is never read. On the CPU the copy is immediate and the ring is plain
  memory, so the same code runs in CPU tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["HostMirror", "device_scalar"]

_CONSTANTS: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def device_scalar(value: float, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A 0-dim ``dtype`` tensor on ``device`` equal to ``value``; cached per value (treat it as read-only)."""
    key = (float(value), dtype, torch.device(device))
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 4096:  # a counter logged as a constant would grow this without bound
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.full((), float(value), dtype=dtype, device=device)
    return t


class HostMirror:
    """Non-blocking copies of a small device tensor into a ring of host buffers.

    Args:
        slots: ring length; a slot is reused ``slots`` pushes later, so reads may lag that far at most.
    """

    def __init__(self, slots: int = 4) -> None:
        if slots < 1:
            raise ValueError(f"Invalid slots {slots!r}: must be >= 1")
        self.slots = slots
        self._bufs: list[Tensor] | None = None
        self._views: list[np.ndarray] = []
        self._events: list[Any] = []
        self._seq: list[int] = []
        self.pushed = 0  # copies issued so far; the newest went to slot (pushed - 1) % slots

    def _allocate(self, like: Tensor) -> None:
        cuda = like.is_cuda
        self._bufs = [torch.empty(like.shape, dtype=like.dtype, pin_memory=cuda) for _ in range(self.slots)]
        self._views = [b.numpy() for b in self._bufs]
        self._events = [torch.cuda.Event() if cuda else None for _ in range(self.slots)]
        self._seq = [-1] * self.slots

    def reserve(self, like: Tensor) -> None:
        """Allocate the ring for values shaped like ``like`` now. Pinned host memory and events made at the first
        push can stall that step's host for far longer than the copy itself, so a caller whose first push comes
        in the middle of training allocates at its start instead."""
        if self._bufs is None or self._bufs[0].shape != like.shape or self._bufs[0].dtype != like.dtype:
            self._allocate(like)
            self.pushed = 0

    def push(self, value: Tensor) -> int:
        """Copy ``value`` (detached) into the next slot without waiting; returns its sequence number."""
        value = value.detach()
        if self._bufs is None or self._bufs[0].shape != value.shape or self._bufs[0].dtype != value.dtype:
            self._allocate(value)
        assert self._bufs is not None
        k = self.pushed % self.slots
        self._bufs[k].copy_(value, non_blocking=value.is_cuda)
        if self._events[k] is not None:
            self._events[k].record()
        self._seq[k] = self.pushed
        self.pushed += 1
        return self.pushed - 1

    def _ready(self, k: int) -> bool:
        event = self._events[k]
        return event is None or event.query()

    def latest(self) -> np.ndarray | None:
        """The newest slot whose copy has landed (never waits), or None before the first landed copy."""
        for age in range(min(self.pushed, self.slots)):
            k = (self.pushed - 1 - age) % self.slots
            if self._ready(k):
                return self._views[k]
        return None

    def peek(self, seq: int) -> np.ndarray | None:
        """The copy with sequence number ``seq`` if it has landed, else None (never waits)."""
        k = seq % self.slots
        if self._bufs is None or self._seq[k] != seq or not self._ready(k):
            return None
        return self._views[k]

    def get(self, seq: int) -> np.ndarray:
        """The copy with sequence number ``seq``, waiting for it to land if it has not yet.

        The wait is for work issued at that push, not for everything queued since: callers read copies made a full
        step earlier, so the device keeps at least that step's work queued while the host waits.
        """
        k = seq % self.slots
        if self._bufs is None or self._seq[k] != seq:
            raise RuntimeError(f"HostMirror: copy {seq} is not in the ring (pushed {self.pushed}, {self.slots} slots)")
        event = self._events[k]
        if event is not None and not event.query():
            event.synchronize()
        return self._views[k]

    def clear(self) -> None:
        """Drop the buffers and events (they cannot be pickled or deep-copied)."""
        self._bufs, self._views, self._events, self._seq = None, [], [], []
        self.pushed = 0

    def __getstate__(self) -> dict:
        return {"slots": self.slots, "_bufs": None, "_views": [], "_events": [], "_seq": [], "pushed": 0}

    def __deepcopy__(self, memo: dict) -> HostMirror:
        return HostMirror(self.slots)
