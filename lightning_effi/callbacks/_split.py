"""Run-time micro-batch splitting: the size rule, batch slicing and the loss hand-off, free of Lightning.

:class:`SplitSize` is the rule: a loader batch of ``limit`` samples runs in parts of ``size`` samples; an
out-of-memory error halves ``size`` (never below ``floor``), ``grow_after`` clean optimizer steps double it again
(never above ``limit``), and an out-of-memory error soon after a growth doubles the wait before the next one, so a
size that does not fit is not retried every ``grow_after`` steps.

:func:`handoff` gives the training loop a loss whose backward runs a callable with the gradient the loop applied to
it (its accumulation division and loss scale). The real loss, and with it the autograd graph of the forward, is
reachable only from that callable, so after an out-of-memory error in backward it can drop the graph (every saved
activation) before it runs the micro-batch again in parts; a graph held by the loop's own frames could not be freed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor


class SplitSize:
    """Samples per forward/backward inside a loader batch of ``limit`` samples.

    Args:
        limit: the loader batch size (the largest part).
        floor: the smallest part; halving stops there.
        grow_after: clean optimizer steps before the part size doubles again; None never grows.
    """

    def __init__(self, limit: int, *, floor: int = 1, grow_after: int | None = 100) -> None:
        self.limit, self.floor, self.grow_after = limit, min(floor, limit), grow_after
        self.size = limit
        self.clean = 0  # optimizer steps since the last out-of-memory error or growth
        self.wait = grow_after  # steps before the next growth: doubled by an OOM soon after a growth
        self.grown = False  # the last change was a growth
        self.smallest = limit  # the smallest size tried
        self.ooms = 0

    def shrink(self) -> bool:
        """After an out-of-memory error at ``size``: halve it. False when it is at the floor already."""
        self.ooms += 1
        if self.size <= self.floor:
            return False
        if self.grown and self.wait is not None:
            self.wait *= 2  # the grown size did not fit: wait longer before trying it again
        self.size = max(self.floor, (self.size + 1) // 2)
        self.smallest = min(self.smallest, self.size)
        self.clean, self.grown = 0, False
        return True

    def adopt(self, size: int) -> None:
        """Take the size other ranks agreed on (the smallest): every rank splits the same way."""
        if size < self.size:
            self.size, self.clean, self.grown = size, 0, False
            self.smallest = min(self.smallest, size)

    def step_done(self) -> bool:
        """After a clean optimizer step: True when the size grew."""
        if self.size >= self.limit or self.wait is None:
            return False
        self.clean += 1
        if self.clean < self.wait:
            return False
        self.size = min(self.limit, self.size * 2)
        self.clean, self.grown = 0, True
        return True

    def bounds(self, rows: int) -> list[tuple[int, int]]:
        """``[start, stop)`` row ranges of a batch of ``rows`` samples in parts of at most ``size``."""
        return [(a, min(a + self.size, rows)) for a in range(0, rows, self.size)] or [(0, rows)]

    def state_dict(self) -> dict[str, Any]:
        return {"limit": self.limit, "size": self.size, "clean": self.clean, "wait": self.wait,
                "grown": self.grown, "smallest": self.smallest, "ooms": self.ooms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = max(self.floor, min(self.limit, int(state["size"])))
        self.clean, self.wait = int(state["clean"]), state["wait"]
        self.grown, self.smallest, self.ooms = bool(state["grown"]), int(state["smallest"]), int(state["ooms"])


def slice_batch(batch: Any, start: int, stop: int, rows: int) -> Any:
    """Rows ``start:stop`` of every tensor in ``batch`` whose first dimension is the batch (``rows``); other tensors
    and values are shared by all parts."""
    if start == 0 and stop == rows:
        return batch

    def cut(t: Tensor) -> Tensor:
        return t[start:stop] if t.dim() > 0 and t.shape[0] == rows else t

    return apply_to_collection(batch, Tensor, cut)


class _Handoff(torch.autograd.Function):
    """Identity on a detached value whose backward calls ``job(grad)``; the anchor makes it require grad."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, value: Tensor, job: Callable[[Tensor], None]) -> Tensor:  # type: ignore[override]
        ctx.job = job
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        job, ctx.job = ctx.job, None
        job(grad)
        return None, None, None


_ANCHORS: dict[torch.device, Tensor] = {}
_REPLAY_FLAG = "_lightning_effi_replaying"


def replaying(module: Any) -> bool:
    """Whether ``module``'s ``training_step`` is being run again by an out-of-memory replay (the batch was seen and
    counted before): a counter of samples or tokens kept by ``training_step`` should skip it then."""
    return bool(getattr(module, _REPLAY_FLAG, False))


def set_replaying(module: Any, on: bool) -> None:
    object.__setattr__(module, _REPLAY_FLAG, on)


def handoff(value: Tensor, job: Callable[[Tensor], None]) -> Tensor:
    """A tensor equal to ``value`` (detached) whose backward calls ``job`` with the gradient reaching it."""
    anchor = _ANCHORS.get(value.device)
    if anchor is None:
        anchor = _ANCHORS[value.device] = torch.zeros((), device=value.device, requires_grad=True)
    return _Handoff.apply(anchor, value.detach(), job)
