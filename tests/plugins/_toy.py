"""A tiny LightningModule and helpers shared by the precision / health-monitor tests (CPU, seconds per fit)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def reference_scales(pattern, *, init, growth, backoff, interval, hysteresis, lo, hi, consecutive):
    """Scale after each optimizer step, written from the rule's prose, counting overflows *up* (the code counts a
    tolerance down): every overflow skips; the scale backs off once ``hysteresis`` overflows have been counted since
    the tolerance was last refilled, and on every overflow after that; the tolerance is refilled when the scale grows
    and, in the consecutive variant, by any clean step; the scale grows after ``interval`` clean steps since the last
    overflow or growth; floor and ceiling clamp."""
    scale, counted, clean_run, out = float(init), 0, 0, []
    for overflow in pattern:
        if overflow:
            counted += 1
            clean_run = 0
            if counted >= hysteresis:
                scale = max(scale * backoff, lo)
        else:
            clean_run += 1
            if consecutive:
                counted = 0
            if clean_run == interval:
                scale = min(scale * growth, hi)
                clean_run = 0
                counted = 0
        out.append(scale)
    return out


def make_data(n: int = 64, d_in: int = 8, d_out: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, d_out, generator=g)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(n, d_out, generator=g))


class ToyModule(pl.LightningModule):
    """Two-layer MLP regression. Optional: inf/nan injection into a chosen parameter's gradient at chosen optimizer
    steps (after backward, while gradients are still scaled), a per-step LambdaLR, and recording of autocast dtypes.

    Args:
        inject: {optimizer step index: "inf" | "nan"}.
        inject_param: name of the parameter whose gradient gets the non-finite value.
        inject_rank: only this global rank injects (None = every rank).
        optimizer: "sgd" | "adamw" | "adamw_fused" (torch's fused kernel: it skips overflowing steps itself).
        lr_decay: LambdaLR factor per applied step (lr = lr0 * lr_decay ** k), None = no scheduler.
    """

    def __init__(self, inject=None, inject_param="net.2.weight", inject_rank=None, optimizer="adamw", lr=1e-2,
                 lr_decay=0.9, hidden=16, batch_size=8, n=64):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 4))
        self.inject = dict(inject or {})
        self.inject_param = inject_param
        self.inject_rank = inject_rank
        self.opt_name = optimizer
        self.lr = lr
        self.lr_decay = lr_decay
        self.batch_size = batch_size
        self.n = n
        self.autocast_dtypes = []
        self.injected_at = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.autocast_dtypes.append(out.dtype)
        return torch.nn.functional.mse_loss(out.float(), y)

    def on_after_backward(self):
        step = self.trainer.global_step
        if step in self.inject and (self.inject_rank is None or self.global_rank == self.inject_rank):
            grad = dict(self.named_parameters())[self.inject_param].grad
            grad.view(-1)[0] = float(self.inject[step])
            self.injected_at.append(step)

    def configure_optimizers(self):
        if self.opt_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1,
                                    fused=True if self.opt_name == "adamw_fused" else None)
        if self.lr_decay is None:
            return opt
        decay = self.lr_decay
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: decay**k)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(make_data(self.n), batch_size=self.batch_size, shuffle=False)


class StepRecorder(pl.Callback):
    """Per optimizer step: weights / optimizer state before and after, scale, lr, scheduler position."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._w = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self._o = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        w = pl_module.state_dict()
        o = trainer.optimizers[0].state_dict()["state"]
        weights_same = all(torch.equal(w[k], v) for k, v in self._w.items())
        state_same = o.keys() == self._o.keys() and all(
            torch.equal(torch.as_tensor(o[i][k]), torch.as_tensor(v)) for i in self._o for k, v in self._o[i].items()
        )
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        self.rows.append(
            dict(
                step=self._step,
                weights_same=weights_same,
                state_same=state_same,
                scale=scaler.get_scale() if scaler is not None else None,
                lr=trainer.optimizers[0].param_groups[0]["lr"],
                sched_pos=sched.last_epoch if sched is not None else None,
            )
        )


def fit(module, *, plugins=(), callbacks: Iterable = (), max_steps=12, ckpt_path=None, accelerator="cpu",
        **trainer_kwargs):
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        plugins=list(plugins),
        callbacks=list(callbacks),
        logger=trainer_kwargs.pop("logger", False),
        enable_checkpointing=trainer_kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer
