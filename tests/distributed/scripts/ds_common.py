"""Shared pieces of the DeepSpeed scripts and their single-process references (imported by path).

The model is the example GPT, tiny; the data are fixed random token sequences. Every rank reads its own slice with
``DistributedSampler(shuffle=False)`` (Lightning's own distributed sampler always shuffles training data), so
optimizer step k of the 2-rank run sees exactly the samples of step k of the single-process reference with twice
the batch.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_effi.export import SPEC_KEY, model_spec
from lightning_effi.models import GPT
from lightning_effi.optim import Lamb, param_groups

VOCAB, T, MICRO = 64, 16, 2
LR = 1e-2
GPT_ARGS = {"vocab_size": VOCAB, "block_size": T, "n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.0}


def make_dataset(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, T + 1), generator=g)
    return TensorDataset(x[:, :-1].contiguous(), x[:, 1:].contiguous())


def make_gpt(seed: int = 1) -> GPT:
    torch.manual_seed(seed)
    return GPT(**GPT_ARGS)


class MyLamb(Lamb):
    """A Lamb subclass defined outside the package: the strategy must find it partition-aware by its attributes
    (``lightning_effi._protocols.FlatLayoutOptimizer``), whatever module it lives in."""


def make_optimizer(name: str, model: torch.nn.Module, max_grad_norm: float | None = None) -> torch.optim.Optimizer:
    # Two groups (decay / no decay) so the flat layouts span several param groups.
    groups = param_groups(model, weight_decay=0.1)
    if name == "adamw":
        # eps 1e-3, not 1e-8: the attention key bias has a mathematically zero gradient (softmax is shift-invariant),
        # so its rounding noise (which depends on summation order) divided by sqrt(v) + 1e-8 would move it by about
        # lr per step in either run: an ill-conditioned comparison, not a sharding error.
        return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99), eps=1e-3)
    if name in ("lamb", "mylamb"):
        cls = Lamb if name == "lamb" else MyLamb
        return cls(groups, lr=LR, betas=(0.9, 0.99), eps=1e-6, max_grad_norm=max_grad_norm)
    raise ValueError(name)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


class TinyLM(pl.LightningModule):
    def __init__(self, optimizer: str = "adamw", max_grad_norm: float | None = None, scheduler: str | None = None,
                 seed: int = 1, overflow_at: int | None = None) -> None:
        super().__init__()
        self.model = make_gpt(seed)
        self.optimizer_name = optimizer
        self.max_grad_norm = max_grad_norm
        self.scheduler = scheduler
        self.overflow_at = overflow_at

    def on_save_checkpoint(self, checkpoint):
        # A module of one's own opting in: `effi export` files of its checkpoints then rebuild the GPT.
        checkpoint[SPEC_KEY] = model_spec(GPT, GPT_ARGS, prefix="model.")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = lm_loss(self.model, x, y)
        if self.overflow_at is not None and self.trainer.global_step == self.overflow_at and self.global_rank == 0:
            # inf gradients on one rank only: the overflow must be agreed on by all ranks and the step skipped
            loss = loss * float("inf")
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", lm_loss(self.model, x, y), sync_dist=True, batch_size=x.shape[0])

    def configure_optimizers(self):
        opt = make_optimizer(self.optimizer_name, self.model, self.max_grad_norm)
        if self.scheduler is None:
            return opt
        # lr halves every optimizer step: easy to check how many steps it advanced.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(dataset: TensorDataset, world: int, rank: int, micro: int = MICRO) -> DataLoader:
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=micro, sampler=sampler)


def reference_run(optimizer: str, steps: int, *, world: int = 2, accumulation=lambda step: 1, divisor=None,
                  clip: float = 0.0, max_grad_norm: float | None = None, dataset: TensorDataset | None = None,
                  return_optimizer: bool = False):
    """Single process, plain PyTorch: step k averages the gradients of all micro-batches all ranks see in step k.

    ``accumulation(k)`` is the number of micro-batches per rank in step k; ``divisor(k)`` what each micro-batch loss
    is divided by (default the same number; Lightning divides a partial last window by the full factor). Returns
    the final state dict, with ``return_optimizer`` as ``(state dict, optimizer)`` (e.g. for Lamb's trust ratios).
    """
    divisor = divisor or accumulation
    dataset = dataset or make_dataset()
    model = make_gpt()
    opt = make_optimizer(optimizer, model, max_grad_norm)
    per_rank = [list(loader(dataset, world, r)) for r in range(world)]
    i = 0
    for step in range(steps):
        factor = accumulation(step)
        opt.zero_grad()
        for _ in range(factor):
            for r in range(world):
                x, y = per_rank[r][i]
                (lm_loss(model, x, y) / (divisor(step) * world)).backward()
            i += 1
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return (state, opt) if return_optimizer else state


def full_fp32_params(module: torch.nn.Module) -> dict:
    """The fp32 master weights of a DeepSpeed-managed module, gathered on every rank (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = full.detach().clone().cpu()
    return out
