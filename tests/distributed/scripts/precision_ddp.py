"""LossScalingPrecision + TrainingHealthMonitor under 2-process CPU DDP (gloo), real fp16 autocast.

An inf/nan is written into one parameter's gradient on rank 1 only, after DDP's all-reduce (``on_after_backward``),
so rank 0's gradients are finite: only the scaler's cross-rank agreement can make rank 0 skip too. Each rank writes
``<out>/rank<r>.pt`` with its per-step records, scale sequence, skip events, health metrics and final weights, and
(plain AdamW) the result of a second fit in the same process pair with MasterWeightsPrecision (one launch saves
~4 s). With ``adamw_fused`` the optimizer skips inside its kernel: no host read of the overflow flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import clean_exit  # noqa: E402

from lightning_effi.callbacks import TrainingHealthMonitor  # noqa: E402
from lightning_effi.plugins import LossScalingPrecision, MasterWeightsPrecision  # noqa: E402
from tests.plugins._toy import StepRecorder, ToyModule  # noqa: E402

INJECT = {1: "inf", 4: "nan", 5: "inf"}
N_STEPS = 10
KNOBS = dict(init_scale=2.0**10, growth_interval=3, hysteresis=2)


class LRRecorder(StepRecorder):
    """Also the learning rate as a float (with a device-held schedule the group's lr is a tensor updated in place)."""

    def __init__(self):
        super().__init__()
        self.lrs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))


class TokenToy(ToyModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return {"loss": loss, "num_tokens": torch.tensor(batch[0].shape[0])}


def master_weights_case() -> dict:
    """MasterWeightsPrecision under DDP: bf16 replicas (DDP reduces bf16 gradients), fp32 masters per rank."""
    module = ToyModule(optimizer="adamw", lr=1e-3)
    w0 = {k: v.detach().clone() for k, v in module.state_dict().items()}
    plugin = MasterWeightsPrecision("fp32")
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6, plugins=[plugin], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module)
    masters = [p.detach().clone() for g in trainer.optimizers[0].param_groups for p in g["params"]]
    return {
        "w0": w0,
        "weights": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "masters": masters,
        "params": [p.detach().clone() for p in module.parameters()],
    }


def main(out: Path, optimizer: str) -> None:
    module = TokenToy(inject=INJECT, inject_rank=1, inject_param="net.2.weight", optimizer=optimizer)
    plugin = LossScalingPrecision("16-mixed", **KNOBS)
    rec = LRRecorder()
    monitor = TrainingHealthMonitor(log_every_n_steps=5)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=N_STEPS, plugins=[plugin], callbacks=[rec, monitor],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module)
    torch.save(
        {
            "rows": rec.rows,
            "injected_at": module.injected_at,
            "skipped_steps": plugin.skipped_steps,
            "skip_events": monitor.skip_events,
            "health": monitor.last_metrics,
            "weights": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "opt_steps": int(trainer.optimizers[0].state_dict()["state"][0]["step"]),
            "lrs": rec.lrs,
            "master_weights": master_weights_case() if optimizer == "adamw" else None,
        },
        out / f"rank{trainer.global_rank}.pt",
    )
    clean_exit()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "adamw")
