"""Model, data, optimizers and cases shared by the EffiFSDPStrategy scripts and their tests.

The network is the package's GPT plus a 1-element ``gain`` (its shard is empty on rank 1 of 2) and an odd vocabulary
(67 rows: shards of 34 and 33 rows), so uneven and empty shards are exercised. ``reference_run`` is the independent
reference: a plain single-process PyTorch loop on the whole global batch, no Lightning, no sharding.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, BLOCK, N_SAMPLES, GLOBAL_BATCH, SEED = 67, 16, 40, 8, 1234
STEPS, SAVE_AT = 10, 5  # 5 global batches per epoch: the step-5 checkpoint is an end-of-epoch checkpoint


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from lightning_effi.models import GPT

        self.gpt = GPT(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, d_model=32, dropout=0.0)
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx) * self.gain


def build_net() -> Net:
    torch.manual_seed(SEED)
    return Net()


def dataset() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, VOCAB, (N_SAMPLES, BLOCK + 1), generator=g)


def loss_fn(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


# Optimizer specs: everything the Lightning module and the reference need to build the same optimizer.
# "clip" is Trainer(gradient_clip_val=...) (Lightning calls torch.nn.utils.clip_grad_norm_ on DTensor grads);
# Lamb clips inside with max_grad_norm. no_decay/no_adapt exercise the group exclusions.
OPTIMIZERS = {
    "adamw": {"clip": 0.05, "no_decay": ["bias", "norm"], "no_adapt": []},
    "lamb": {"clip": None, "no_decay": ["bias", "norm"], "no_adapt": ["1d"]},
}


def make_optimizer(name: str, module: nn.Module):
    from lightning_effi.optim import param_groups

    spec = OPTIMIZERS[name]
    groups = param_groups(module, weight_decay=0.1, no_decay=spec["no_decay"], no_adapt=spec["no_adapt"])
    if name == "adamw":
        opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, foreach=False)
    else:
        from lightning_effi.optim import Lamb

        # max_grad_norm small enough that clipping is active in every step
        opt = Lamb(groups, lr=2e-2, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))  # warmup: its state must resume
    return opt, sched


def reference_run(optimizer: str, steps: int = STEPS, *, upto_logits_at: int | None = None):
    """Plain single-process training on the full global batch; returns the final ``state_dict`` (and logits)."""
    net = build_net()
    data = dataset()
    opt, sched = make_optimizer(optimizer, net)
    clip = OPTIMIZERS[optimizer]["clip"]
    per_epoch = N_SAMPLES // GLOBAL_BATCH
    logits = None
    for step in range(steps):
        i = step % per_epoch
        batch = data[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]
        loss = loss_fn(net(batch[:, :-1]), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        sched.step()
        if upto_logits_at is not None and step + 1 == upto_logits_at:
            with torch.no_grad():
                logits = net.gpt(data[:4, :-1]).clone()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, logits


def max_rel_diff(a: dict, b: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for k in a:
        x, y = a[k].double(), b[k].double()
        d = ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()
        if d > worst or math.isnan(d):
            worst, where = d, k
    return worst, where


def output_dir(root: str | Path, case: str) -> Path:
    return Path(root) / case
