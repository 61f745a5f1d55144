"""Save at step 5, resume, continue == uninterrupted, with EffiDeepSpeedStrategy on 2 CPU processes.

Usage: torchrun --nproc_per_node=2 ds_checkpoint.py OUT_DIR

Per case: an uninterrupted 10-step run that checkpoints every 5 steps (DeepSpeed checkpoint directories), then a
fresh Trainer and module that resume from the step-5 checkpoint and train to step 10. Rank 0 writes
``OUT_DIR/<case>.pt`` with both runs' gathered fp32 weights and learning rates, and leaves the checkpoint
directories under ``OUT_DIR/<case>/`` for the export test. One epoch is exactly 5 optimizer steps, so the resumed run
starts at an epoch boundary and sees the same batches as the uninterrupted one (a plain DataLoader has no position
to restore mid-epoch).
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
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_effi.strategies import EffiDeepSpeedStrategy  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
ACCELERATOR = os.environ.get("EFFI_DS_ACCELERATOR", "cpu")
CASES = {
    "s2_lamb": dict(stage=2, optimizer="lamb"),
    "s3_adamw": dict(stage=3, optimizer="adamw"),
}


class Final(pl.Callback):
    def __init__(self) -> None:
        self.result: dict = {}

    def on_train_end(self, trainer, pl_module):
        self.result = {"params": full_fp32_params(pl_module), "global_step": trainer.global_step,
                       "lr": trainer.optimizers[0].param_groups[0]["lr"]}


def fit(case: dict, root: Path, max_steps: int, ckpt_path: str | None = None, save: bool = False) -> dict:
    final = Final()
    callbacks: list = [final]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=5, save_top_k=-1,
                                         filename="{step}", save_last=False))
    trainer = pl.Trainer(
        accelerator=ACCELERATOR, devices=WORLD, strategy=EffiDeepSpeedStrategy(stage=case["stage"]),
        max_steps=max_steps,
        use_distributed_sampler=False, logger=False, enable_checkpointing=save, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=root,
    )
    module = TinyLM(optimizer=case["optimizer"], scheduler="halving")
    # 20 samples / 2 ranks / micro-batch 2 = 5 steps per epoch
    trainer.fit(module, train_dataloaders=loader(make_dataset(20), WORLD, RANK), ckpt_path=ckpt_path)
    return final.result


def main() -> None:
    out = Path(sys.argv[1])
    for name, case in CASES.items():
        root = out / name
        uninterrupted = fit(case, root, 10, save=True)
        resumed = fit(case, root, 10, ckpt_path=str(root / "step=5.ckpt"))
        if RANK == 0:
            torch.save({"uninterrupted": uninterrupted, "resumed": resumed}, out / f"{name}.pt")
    clean_exit()


if __name__ == "__main__":
    main()
