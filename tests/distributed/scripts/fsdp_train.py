"""Train the fsdp_common network under EffiFSDPStrategy for each requested case; write what the tests compare.

Usage (2 ranks: under torchrun, so one process pair runs every case's Trainer in turn; 1 rank: plain python):
    torchrun --nproc_per_node=2 fsdp_train.py --out DIR --cases adamw,lamb [--resume-root DIR1]
    python fsdp_train.py --out DIR --cases adamw

Per case, under DIR/<case>/: ``final.pt`` (full model state_dict after the last step, gathered on rank 0),
``step5/`` (a sharded DCP checkpoint at the end of epoch 1 = step 5) and ``info.json`` (observations the test
checks). With --resume-root the case resumes from ``DIR1/<case>/step5`` instead of starting fresh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _common import clean_exit  # noqa: E402
from fsdp_common import GLOBAL_BATCH, OPTIMIZERS, SAVE_AT, STEPS, build_net, dataset, loss_fn, make_optimizer  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402

from lightning_effi.strategies import EffiFSDPStrategy  # noqa: E402


class Rows(Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


class LM(pl.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.net = build_net()
        self.seen_param_dtypes: set[str] = set()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return loss_fn(self.net(batch[:, :-1]), batch)

    def configure_optimizers(self):
        opt, sched = make_optimizer(self.optimizer_name, self.net)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SaveAtEpochEnd(pl.Callback):
    """Save a sharded checkpoint at the end of the epoch that reaches ``step`` (an end-of-epoch checkpoint)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class Observe(pl.Callback):
    """Record dtypes the compute sees and the type/dtype of the gradients the optimizer steps on."""

    def __init__(self) -> None:
        self.info: dict = {"compute_dtypes": set(), "grad_types": set(), "param_types": set()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not hasattr(self, "_hook"):
            block = pl_module.net.gpt.blocks[0]
            self._hook = block.attn.qkv.register_forward_pre_hook(
                lambda mod, args: self.info["compute_dtypes"].add(str(mod.weight.dtype))
            )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for p in pl_module.parameters():
            self.info["param_types"].add(f"{type(p.data).__name__}:{p.dtype}")
            if p.grad is not None:
                self.info["grad_types"].add(f"{type(p.grad).__name__}:{p.grad.dtype}")


def run_case(case: str, out: Path, resume_root: Path | None, world: int) -> None:
    optimizer, _, variant = case.partition("_")
    accumulate = 2 if variant == "accum" else 1
    precision = "bf16-mixed" if variant == "bf16" else "32-true"
    rank = int(os.environ.get("RANK", 0))
    case_dir = out / case
    case_dir.mkdir(parents=True, exist_ok=True)
    sampler = DistributedSampler(Rows(dataset()), num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(Rows(dataset()), batch_size=GLOBAL_BATCH // world // accumulate, sampler=sampler)
    observe = Observe()
    callbacks = [observe] if resume_root else [observe, SaveAtEpochEnd(SAVE_AT, case_dir / "step5")]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=EffiFSDPStrategy(wrap=["Block"]),
        precision=precision,
        # Epoch-based on purpose: with max_steps Lightning treats every resume as mid-epoch ("iteration-based
        # training") and replays one extra batch after an end-of-epoch checkpoint (measured with strategy="auto" too).
        max_epochs=STEPS // SAVE_AT,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=OPTIMIZERS[optimizer]["clip"],
        use_distributed_sampler=False,  # our sampler keeps the order (Lightning would force shuffle=True)
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = LM(optimizer)
    ckpt = str(resume_root / case / "step5") if resume_root else None
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt)

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.global_rank == 0:
        torch.save({k.removeprefix("net."): v for k, v in full.items()}, case_dir / "final.pt")
        info = {k: sorted(v) for k, v in observe.info.items()}
        info.update(global_step=trainer.global_step, world_size=trainer.world_size)
        (case_dir / "info.json").write_text(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--resume-root", type=Path, default=None)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    for case in args.cases.split(","):
        run_case(case, args.out, args.resume_root, world)
    clean_exit()


if __name__ == "__main__":
    main()
