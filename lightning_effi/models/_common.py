"""Pieces shared by the example LightningModules: argument checks, optimizer + LR schedule construction."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from lightning_effi.optim.param_groups import param_groups

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Invalid {name} {value!r}: must be a positive integer")


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def build_optimizers(model: nn.Module, factory: OptimizerCallable | None, *, weight_decay: float,
                     no_decay: Sequence[str], no_adapt: Sequence[str], warmup_steps: int, total_steps: int,
                     min_lr_ratio: float) -> dict:
    """Build ``configure_optimizers``'s return value: optimizer over ``param_groups`` and a per-step LR schedule."""
    if factory is None:
        factory = lambda params: torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95))  # noqa: E731
    groups = param_groups(model, weight_decay=weight_decay, no_decay=no_decay, no_adapt=no_adapt, with_names=True)
    optimizer = factory(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
