"""One rank raises in the middle of a training step; every rank of the job must end, non-zero, within a bounded time.

Usage: python fail_one_rank.py STRATEGY FAILING_RANK WHERE [linger] [failfast]   (Lightning's launcher, 2 processes)
       torchrun --nproc_per_node=2 fail_one_rank.py STRATEGY FAILING_RANK WHERE [linger] [failfast]

STRATEGY: ddp | effi_fsdp | effi_deepspeed_stage_2. WHERE: ``forward`` (before any collective of the step: the
other rank waits in the gradient reduction, or in FSDP2's all-gather), ``backward`` (from a gradient hook, inside the
backward whose collectives the other rank is running), ``step`` (in on_before_optimizer_step, where the other rank
goes on to the next step's collectives). ``linger``: the failing rank catches its error after fit and stays alive
(a notebook, a script that goes on), so its sockets stay open and only the package can tell the others. ``failfast``:
add the FailFast callback (the strategy that is not one of the package's needs it).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
from ds_common import TinyLM, loader, make_dataset  # noqa: E402

import lightning_effi.strategies  # noqa: E402,F401  (registers effi_fsdp, effi_deepspeed_stage_N)

STRATEGY, FAILING, WHERE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
LINGER, FAILFAST = "linger" in sys.argv[4:], "failfast" in sys.argv[4:]
FAIL_AT = 2  # optimizer step at which the failing rank raises


class UserError(RuntimeError):
    pass


class Failing(TinyLM):
    def training_step(self, batch, batch_idx):
        mine = self.global_rank == FAILING and self.trainer.global_step == FAIL_AT
        if mine and WHERE == "forward":
            raise UserError(f"bad batch on rank {self.global_rank} at step {FAIL_AT}")
        loss = super().training_step(batch, batch_idx)
        if mine and WHERE == "backward":
            def hook(grad):
                raise UserError(f"failure inside backward on rank {self.global_rank} at step {FAIL_AT}")
            loss.register_hook(hook)
        return loss

    def on_before_optimizer_step(self, optimizer):
        if WHERE == "step" and self.global_rank == FAILING and self.trainer.global_step == FAIL_AT:
            raise UserError(f"failure before the optimizer step on rank {self.global_rank} at step {FAIL_AT}")


def main() -> None:
    from lightning_effi.callbacks import FailFast

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=STRATEGY, max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, callbacks=[FailFast()] if FAILFAST else [])
    module = Failing(optimizer="adamw")
    try:
        trainer.fit(module, train_dataloaders=loader(make_dataset(48), 2, trainer.global_rank))
    except UserError:
        if not LINGER:
            raise
        traceback.print_exc()
        print(f"rank {trainer.global_rank} lingers after its error", flush=True)
        time.sleep(600)
        raise
    print(f"rank {trainer.global_rank} finished without error", flush=True)


if __name__ == "__main__":
    main()
