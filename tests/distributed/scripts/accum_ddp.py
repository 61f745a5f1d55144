"""AccumulationScheduler under 2-process CPU DDP (gloo): several fits in one process pair (one launch for all).

Usage: accum_ddp.py OUT_DIR [cpu|cuda]. Writes ``<out>/ddp.pt`` on rank 0 with, per case: final weights,
micro-batches per optimizer step, and (tokens case) the global micro-batch index of every DDP all-reduce bucket
hook call. The test compares with float64 references.

Cases:
  tokens: normalize="tokens", schedule {0: 2, 1: 3} over 9 micro-batches per rank -> windows 2, 3, 3, 1 (unaligned
          change at batch 2, partial last window), SGD.
  mean:   the same windows with normalize="mean" and per-token-mean losses.
  token_unit: a token-keyed schedule (global valid tokens), checked against a simulation of the global counts.
  resume: the tokens case with Adam, stopped after micro-batch 4 (mid-window) with a checkpoint, then resumed;
          plus the uninterrupted Adam run to compare with.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import clean_exit  # noqa: E402

from lightning_effi.callbacks import AccumulationScheduler  # noqa: E402
from tests.callbacks._toy import ListLoader, TinyLM, make_batches  # noqa: E402

ACCELERATOR = sys.argv[2] if len(sys.argv) > 2 else "cpu"  # "cuda": the same cases under NCCL (multi_gpu tests)
N_PER_RANK = 9
SCHEDULE = {0: 2, 1: 3}
TOKEN_SCHEDULE = {0: 1, 60: 3}
LR = 0.5


def global_batches() -> list[dict]:
    return make_batches(2 * N_PER_RANK, batch_size=3, max_len=8, seed=21)


class Recorder(Callback):
    """Micro-batches per step, and which micro-batches' backward passes triggered a DDP all-reduce."""

    def __init__(self, hook_comm: bool) -> None:
        self.hook_comm = hook_comm
        self.sizes: list[int] = []
        self.allreduce_at: list[int] = []
        self.micro = -1
        self._n = 0

    def on_train_start(self, trainer, pl_module):
        if self.hook_comm:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting_hook(state, bucket):
                self.allreduce_at.append(self.micro)
                return allreduce_hook(state, bucket)

            trainer.strategy.model.register_comm_hook(None, counting_hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.micro += 1
        self._n += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sizes.append(self._n)
        self._n = 0


class SaveAndStop(Callback):
    def __init__(self, at: int, path: str) -> None:
        self.at, self.path, self.seen = at, path, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.at:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True  # Lightning ends the epoch loop after this batch: mid-window


def fit(normalize: str, *, optimizer: str = "sgd", callbacks=(), ckpt=None, hook_comm=False, scheduler=None):
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    mine = global_batches()[rank::2]
    reduction = "sum" if normalize == "tokens" else "mean"
    module = TinyLM(loss_reduction=reduction, lr=LR if optimizer == "sgd" else 0.02, optimizer=optimizer)
    rec = Recorder(hook_comm)
    trainer = Trainer(
        accelerator=ACCELERATOR, devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[scheduler or AccumulationScheduler(SCHEDULE, normalize=normalize), rec, *callbacks],
    )
    trainer.fit(module, ListLoader(mine), ckpt_path=ckpt)
    weights = {k: v.detach().cpu().clone() for k, v in module.net.state_dict().items()}
    return {"weights": weights, "sizes": rec.sizes, "allreduce_at": rec.allreduce_at, "losses": module.losses}


def main() -> None:
    out = Path(sys.argv[1])
    results = {
        "tokens": fit("tokens", hook_comm=True),
        "mean": fit("mean"),
        "adam_full": fit("tokens", optimizer="adam"),
        # thresholds in valid tokens summed over both ranks
        "token_unit": fit("tokens", scheduler=AccumulationScheduler(TOKEN_SCHEDULE, unit="token", normalize="tokens")),
    }
    ckpt = str(out / "mid.ckpt")
    results["adam_first"] = fit("tokens", optimizer="adam", callbacks=[SaveAndStop(4, ckpt)])
    results["adam_resumed"] = fit("tokens", optimizer="adam", ckpt=ckpt)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(results, out / "ddp.pt")
    clean_exit()


if __name__ == "__main__":
    main()
