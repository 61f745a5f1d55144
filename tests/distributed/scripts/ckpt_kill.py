"""A training killed in the middle of writing a checkpoint, and its resumption with ckpt_path="last".

Usage: [torchrun --nproc_per_node=2] ckpt_kill.py OUT_DIR STRATEGY MODE

STRATEGY: ``single`` (one process, ``plugins=[AtomicCheckpointIO()]``), ``fsdp`` (EffiFSDPStrategy) or ``deepspeed``
(EffiDeepSpeedStrategy, ZeRO-2). Every 2 steps ModelCheckpoint saves ``OUT_DIR/ckpts/last.ckpt`` (the same name).

MODE ``kill``: 6 steps; the save at step 4 blocks part-way, and the test SIGKILLs every process. Each rank writes
``OUT_DIR/pid.<rank>`` at start, the blocked one ``OUT_DIR/blocked``. Where the save blocks:

- single: inside ``torch.save``, after half of the serialized bytes reached the file;
- fsdp: rank 0, after DCP wrote every shard and ``.metadata``, before Lightning's ``meta.pt`` (rank 1 waits in the
  strategy's barrier);
- deepspeed: rank 1, before it writes its ZeRO optimizer shard (rank 0 has written its files).

MODE ``resume``: ``fit(ckpt_path="last")`` to step 6; rank 0 writes ``OUT_DIR/resumed.json`` with the step training
started from and the step it ended at.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl
import torch
from _common import clean_exit
from ds_common import TinyLM, loader, make_dataset
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_effi.plugins import AtomicCheckpointIO
from lightning_effi.strategies import EffiDeepSpeedStrategy, EffiFSDPStrategy

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
BLOCK_AT = 4  # the global step whose save is killed


class Steps(pl.Callback):
    def __init__(self) -> None:
        self.trainer: pl.Trainer | None = None
        self.start = self.end = -1

    def on_train_start(self, trainer, pl_module):
        self.trainer, self.start = trainer, trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.end = trainer.global_step


def block(out: Path) -> None:
    (out / "blocked").write_text(str(os.getpid()))
    time.sleep(3600)


def block_mid_save(strategy: str, out: Path, steps: Steps) -> None:
    def at_block_step() -> bool:
        return steps.trainer is not None and steps.trainer.global_step == BLOCK_AT

    if strategy == "single":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if at_block_step() and hasattr(f, "write"):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                block(out)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif strategy == "fsdp":
        import torch.distributed.checkpoint as dcp

        real_dcp_save = dcp.save

        def dcp_save(*args, **kwargs):
            result = real_dcp_save(*args, **kwargs)
            if at_block_step() and RANK == 0:
                block(out)
            return result

        dcp.save = dcp_save
    else:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        real_engine_save = TorchCheckpointEngine.save

        def engine_save(self, state_dict, path):
            if at_block_step() and RANK == 1 and "optim_states" in str(path):
                block(out)
            return real_engine_save(self, state_dict, path)

        TorchCheckpointEngine.save = engine_save


def main() -> None:
    out, strategy, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    (out / f"pid.{RANK}").write_text(str(os.getpid()))
    steps = Steps()
    if mode == "kill":
        block_mid_save(strategy, out, steps)
    kwargs: dict = {"devices": 1, "plugins": [AtomicCheckpointIO()]} if strategy == "single" else \
        {"devices": WORLD, "strategy": EffiFSDPStrategy() if strategy == "fsdp" else EffiDeepSpeedStrategy(stage=2)}
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=6, use_distributed_sampler=False, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out,
        callbacks=[ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=2, save_top_k=0, save_last=True), steps],
        **kwargs,
    )
    trainer.fit(TinyLM(optimizer="adamw"), train_dataloaders=loader(make_dataset(24), WORLD, RANK),
                ckpt_path="last" if mode == "resume" else None)
    if RANK == 0 and mode == "resume":
        (out / "resumed.json").write_text(json.dumps({"start": steps.start, "end": steps.end}))
    clean_exit()


if __name__ == "__main__":
    main()
