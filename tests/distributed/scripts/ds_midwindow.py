"""A default Trainer (ModelCheckpoint keeping every file, validation every 4 micro-batches) with
AccumulationScheduler({0: 3}) under EffiDeepSpeedStrategy(stage=2) on 2 CPU processes: validations fall inside
windows, where ZeRO's partial gradients cannot be saved; the saves are written at the windows' ends and the run
trains to its end. Then a fresh run resumes from the last checkpoint written mid-epoch and trains to the same end.

Usage: torchrun --nproc_per_node=2 ds_midwindow.py OUT_DIR

Rank 0 writes ``OUT_DIR/midwindow.pt``: both runs' gathered fp32 weights and steps, the checkpoint files and the
global step stored in each.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _common import clean_exit  # noqa: E402
from ds_common import TinyLM, full_fp32_params, make_dataset  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_effi.callbacks import AccumulationScheduler  # noqa: E402
from lightning_effi.strategies import EffiDeepSpeedStrategy  # noqa: E402
from tests.callbacks._toy import ListLoader  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])


class Final(pl.Callback):
    def __init__(self) -> None:
        self.result: dict = {}

    def on_train_end(self, trainer, pl_module):
        self.result = {"params": full_fp32_params(pl_module), "global_step": trainer.global_step}


def batches(rank: int) -> list:
    data = make_dataset(48)  # 12 micro-batches of 2 per rank: windows of 3 end at micro-batches 3, 6, 9, 12
    rows = [data[i] for i in range(rank, len(data), WORLD)]
    return [tuple(torch.stack(t) for t in zip(*rows[i:i + 2])) for i in range(0, len(rows), 2)]


def fit(root: Path, ckpt_path: str | None = None) -> dict:
    final = Final()
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, strategy=EffiDeepSpeedStrategy(stage=2), max_epochs=1,
        val_check_interval=4, limit_val_batches=1, use_distributed_sampler=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        # Lightning's default ModelCheckpoint, keeping every file instead of the last only
        callbacks=[AccumulationScheduler({0: 3}), final, ModelCheckpoint(save_top_k=-1)],
    )
    module = TinyLM(optimizer="adamw")
    val = ListLoader(batches(RANK)[:1])
    trainer.fit(module, train_dataloaders=ListLoader(batches(RANK)), val_dataloaders=val, ckpt_path=ckpt_path)
    return final.result


def main() -> None:
    out = Path(sys.argv[1])
    uninterrupted = fit(out / "run")
    ckpts = sorted((out / "run" / "checkpoints").glob("*.ckpt"))
    # a DeepSpeed checkpoint is a directory; Lightning's client state (loop position, global step) is in one file
    steps = {c.name: torch.load(c / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False,
                                map_location="cpu")["global_step"] for c in ckpts}
    # resume from the checkpoint requested at micro-batch 8 (inside the window 7..9)
    (mid,) = [c for c in ckpts if c.name == "epoch=0-step=2.ckpt"]
    resumed = fit(out / "resumed", ckpt_path=str(mid))
    if RANK == 0:
        torch.save({"uninterrupted": uninterrupted, "resumed": resumed, "steps": steps}, out / "midwindow.pt")
    clean_exit()


if __name__ == "__main__":
    main()
