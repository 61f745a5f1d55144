"""Model, data and the single-process reference shared by the Lamb sharding scripts (imported by path).

The model has odd-sized tensors and a 1-element ``gain`` so that, sharded over 2 ranks, shards are uneven and one is
empty, and flat partitions split parameters across ranks. Groups come from ``param_groups`` with decay and
adaptation exclusions, so per-group hyperparameters must follow each piece of a parameter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from lightning_effi.optim import Lamb, param_groups  # noqa: E402

SEED, GLOBAL_BATCH, STEPS = 0, 8, 10
LAMB_KW = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-6)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 9)
        self.norm = nn.LayerNorm(9)
        self.fc2 = nn.Linear(9, 3)
        self.gain = nn.Parameter(torch.full((1,), 1.5))

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x)))) * self.gain


def make_model() -> Tiny:
    torch.manual_seed(SEED)
    return Tiny()


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def groups(model):
    # Biases and norms not decayed; norms also not adapted; gain decayed but not adapted: every combination.
    return param_groups(model, weight_decay=0.1, no_decay=["bias", "norm"], no_adapt=["norm", r"gain"])


def make_lamb(params_or_groups, max_grad_norm):
    return Lamb(params_or_groups, max_grad_norm=max_grad_norm, **LAMB_KW)


def reference_run(max_grad_norm, steps=STEPS):
    """Single process, plain tensors, whole global batch: (params, trust ratios, global grad norm) per step."""
    model = make_model()
    opt = make_lamb(groups(model), max_grad_norm)
    out = []
    for step in range(steps):
        model.zero_grad()
        loss_fn(model, *batch(step)).backward()
        gnorm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))
        opt.step()
        out.append(({n: p.detach().clone() for n, p in model.named_parameters()}, opt.trust_ratios.clone(), gnorm))
    return out


class CountAllReduce:
    """Counts torch.distributed.all_reduce calls made inside the block."""

    def __enter__(self):
        import torch.distributed as dist

        self.n = 0
        self._orig = dist.all_reduce

        def counted(*a, **k):
            self.n += 1
            return self._orig(*a, **k)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_reduce = self._orig


def write(out_dir: str, rank: int, payload: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(payload))
