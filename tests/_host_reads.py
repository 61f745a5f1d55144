"""Counting host reads of tensor values, attributed to the lightning_effi frame that caused them.

A host read is ``Tensor.item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__`` or ``cpu``. On a GPU each one
waits for all queued work; on the CPU they cost nothing, which is why CPU tests count them instead of timing them.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import torch

PACKAGE = str(Path(__file__).resolve().parents[1] / "lightning_effi")
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")


def _culprit() -> str | None:
    """``file:function`` of the innermost lightning_effi frame on the stack, or None if the read is not ours."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        # a comprehension runs in a frame of its own (before Python 3.12): attribute it to its function
        if name.startswith(PACKAGE) and not f.f_code.co_name.startswith("<"):
            return f"{Path(name).relative_to(PACKAGE).as_posix()}:{f.f_code.co_name}"
        f = f.f_back
    return None


class HostReadCounter:
    """Patches the read methods of ``torch.Tensor``; counts only while :attr:`active`."""

    def __init__(self) -> None:
        self.active = False
        self.counts: Counter[str] = Counter()
        self._real = {name: getattr(torch.Tensor, name) for name in READS}

    @contextlib.contextmanager
    def patched(self):
        def wrap(name, real):
            def read(t, *args, **kwargs):
                if self.active:
                    who = _culprit()
                    if who is not None:
                        self.counts[f"{who} ({name})"] += 1
                return real(t, *args, **kwargs)

            return read

        for name, real in self._real.items():
            setattr(torch.Tensor, name, wrap(name, real))
        try:
            yield self
        finally:
            for name, real in self._real.items():
                setattr(torch.Tensor, name, real)


# ------------------------------------------------------------------ the plugin stack both sync-free tests train
def stack_data(n: int, t: int, vocab: int, batch_size: int, seed: int = 0):
    """Token batches with about 20% of the labels ignored (uneven valid tokens: normalize="tokens" has work)."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (t + 1,), generator=g)
        labels = ids[1:].clone()
        labels[torch.rand(t, generator=g) < 0.2] = -100
        items.append({"input_ids": ids[:-1], "labels": labels})
    return DataLoader(items, batch_size=batch_size)


def stack_optimizers() -> dict:
    from functools import partial

    from lightning_effi.optim import Lamb

    return {"adamw-fused": partial(torch.optim.AdamW, lr=1e-3, fused=True),
            "lamb": partial(Lamb, lr=1e-3, max_grad_norm=1.0)}


def stack_accumulation(kind: str, batch_size: int = 2):
    from lightning_effi.callbacks import AccumulationScheduler, AutoMicroBatch

    if kind == "split":
        # run-time out-of-memory recovery armed (the loss hand-off on every micro-batch), the size given: no probe
        class Given(AutoMicroBatch):
            @staticmethod
            def _can_probe(trainer) -> bool:
                return False

        return Given(2 * batch_size, max_micro_batch_size=batch_size, normalize="tokens", on_oom="split")
    if kind == "ramp":
        return AccumulationScheduler(ramp=(1, 3, 8), unit="step")
    return AccumulationScheduler({0: 2}, normalize="tokens")
