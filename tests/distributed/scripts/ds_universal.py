"""Resume a 2-process DeepSpeed checkpoint (converted to a universal checkpoint) on a different world size.

Usage: torchrun --nproc_per_node=N ds_universal.py CKPT_DIR OUT_DIR

Resumes the stage-2 Lamb run of ds_checkpoint.py from step 5 with ``load_universal``, records the fp32 weights and
the optimizer's exp_avg / exp_avg_sq norms right after the restore (before any new step), trains one more step, and
writes ``OUT_DIR/universal.pt`` from rank 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _common import clean_exit  # noqa: E402
from ds_common import TinyLM, full_fp32_params, loader, make_dataset  # noqa: E402

from lightning_effi.strategies import EffiDeepSpeedStrategy  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
ACCELERATOR = os.environ.get("EFFI_DS_ACCELERATOR", "cpu")


class Probe(pl.Callback):
    def __init__(self) -> None:
        self.result: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "restored" in self.result:
            return
        opt = trainer.strategy.deepspeed_engine.optimizer
        client = getattr(opt, "optimizer", opt)
        sq = {"exp_avg": torch.zeros((), dtype=torch.float64), "exp_avg_sq": torch.zeros((), dtype=torch.float64)}
        for state in client.state.values():
            for key in sq:
                sq[key] += state[key].double().pow(2).sum().cpu()
        for key in sq:  # flat partitions: each rank holds a piece; padding is zero
            sq[key] = sq[key].to(pl_module.device)  # NCCL reduces device tensors only
            torch.distributed.all_reduce(sq[key])
        self.result["restored"] = {"params": full_fp32_params(pl_module), "global_step": trainer.global_step,
                                   **{f"{k}_sumsq": v.item() for k, v in sq.items()}}

    def on_train_end(self, trainer, pl_module):
        self.result["final_step"] = trainer.global_step
        self.result["lr"] = trainer.optimizers[0].param_groups[0]["lr"]


def main() -> None:
    ckpt, out = sys.argv[1], Path(sys.argv[2])
    probe = Probe()
    trainer = pl.Trainer(
        accelerator=ACCELERATOR, devices=WORLD, max_steps=6, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
        strategy=EffiDeepSpeedStrategy(stage=2, config={"checkpoint": {"load_universal": True}}),
    )
    trainer.fit(TinyLM(optimizer="lamb", scheduler="halving"), train_dataloaders=loader(make_dataset(20), WORLD, RANK),
                ckpt_path=ckpt)
    if RANK == 0:
        torch.save(probe.result, out / "universal.pt")
    clean_exit()


if __name__ == "__main__":
    main()
