"""One job of the exact-resume matrix: a strategy x optimizer x precision case, in one of three phases.

Usage: python resume_matrix.py CASE PHASE OUT_DIR

Lightning's launcher starts the second rank as a child of the first (not torchrun, which puts every worker in a
session of its own), so the job is one process group and a single ``os.killpg`` ends all of it at once.

CASE is ``<strategy>-<optimizer>-<precision>``: strategy ``single`` | ``ddp`` | ``fsdp`` (EffiFSDPStrategy) |
``deepspeed`` (EffiDeepSpeedStrategy, ZeRO-2); optimizer ``adamw`` (torch) | ``lamb`` (lightning_effi);
precision ``32-true`` | ``bf16-mixed`` | ``16-mixed`` (the last two as ``LossScalingPrecision``; under DeepSpeed the
strategy maps the plugin onto DeepSpeed's own bf16 / fp16 dynamic loss scaling, its documented equivalent).

Every phase trains the same run: ``AccumulationScheduler(ramp=RAMP, unit="step")`` grows the windows during the run,
a step-interval LR schedule moves, and each rank reads its own slice of the micro-batches through a resumable
``ListLoader`` until ``MAX_STEPS`` optimizer steps.

PHASE:
  full    the uninterrupted run; every rank writes ``full_rank<r>.pt`` (per-micro-batch losses, window sizes,
          gathered fp32 parameters, loss scale).
  kill    every rank first writes ``pid_rank<r>`` (its pid and process group). The run asks for
          ``trainer.save_checkpoint(OUT_DIR/mid.ckpt)`` after micro-batch ``SAVE_AT``, inside a window (written at
          the window's end under DeepSpeed). Once the file is written every rank writes ``kill_rank<r>.pt`` (what it
          had run by then, and whether the checkpoint holds a partial window) and rank 0 then the marker
          ``OUT_DIR/saved``. Training goes on, and a rank that reaches the end waits there, so the job never exits
          by itself: the test SIGKILLs its process group after the marker.
  resume  a fresh job fits from ``mid.ckpt`` to ``MAX_STEPS``; every rank writes ``resume_rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import clean_exit  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402

from lightning_effi.callbacks import AccumulationScheduler  # noqa: E402
from lightning_effi.optim import Lamb  # noqa: E402
from lightning_effi.plugins import LossScalingPrecision  # noqa: E402
from tests.callbacks._toy import ListLoader, TinyLM, make_batches  # noqa: E402

STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")
OPTIMIZERS = ("adamw", "lamb")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
PHASES = ("full", "kill", "resume")

RAMP = (1, 4, 6)  # factors 1, 1, 2, 2, 3, 3, 4 over the 7 steps
MAX_STEPS = 7
MICRO_BATCHES = 16  # per rank: windows 1 | 2 | 3-4 | 5-6 | 7-9 | 10-12 | 13-16
SAVE_AT = 8  # the 2nd micro-batch of the 3-window 7-9, while the ramp still grows
# A scale that grows every 2 clean steps, so the scaler's state moves across the checkpoint.
SCALER = dict(init_scale=2.0**10, growth_interval=2, hysteresis=1)
CKPT, SAVED = "mid.ckpt", "saved"
PARTIAL_WINDOW_KEY = "lightning_effi.accumulation.partial_window"
WAIT_FOR_KILL_S = 300.0


def parse_case(case: str) -> tuple[str, str, str]:
    strategy, optimizer, precision = case.split("-", 2)
    if strategy not in STRATEGIES or optimizer not in OPTIMIZERS or precision not in PRECISIONS:
        raise ValueError(f"Invalid case {case!r}: expected <{'|'.join(STRATEGIES)}>-<{'|'.join(OPTIMIZERS)}>-"
                         f"<{'|'.join(PRECISIONS)}>")
    return strategy, optimizer, precision


def world_size(strategy: str) -> int:
    return 1 if strategy == "single" else 2


def rank_batches(rank: int, world: int) -> list[dict]:
    batches = make_batches(MICRO_BATCHES * world, batch_size=2, max_len=6, seed=5)
    return batches[rank::world]


class MatrixLM(TinyLM):
    """The toy LM (per-token mean loss of each micro-batch), with AdamW or Lamb and a step-interval LR schedule."""

    def __init__(self, optimizer: str) -> None:
        super().__init__(loss_reduction="mean", lr=0.02, seed=0)
        self.optimizer_name = optimizer

    def configure_optimizers(self):
        params = list(self.parameters())
        if self.optimizer_name == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        else:
            opt = Lamb(params, lr=self.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.25 * s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def full_fp32_params(strategy: str, module: MatrixLM) -> dict[str, torch.Tensor]:
    """The whole fp32 parameters (collective for the sharded strategies)."""
    if strategy == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        # the optimizer's fp32 master copy (the module itself holds bf16/fp16 weights under mixed precision)
        return {k: safe_get_full_fp32_param(p).detach().clone() for k, p in module.net.named_parameters()}
    if strategy == "fsdp":
        return {k: p.full_tensor().detach().clone() for k, p in module.net.named_parameters()}
    return {k: p.detach().clone() for k, p in module.net.named_parameters()}


def loss_scale(strategy: str, trainer: Trainer) -> float | None:
    """The dynamic loss scale at the end (None without one): LossScalingPrecision's, or DeepSpeed's fp16 scaler."""
    plugin = trainer.precision_plugin
    if isinstance(plugin, LossScalingPrecision):
        return float(plugin.scaler.state_dict()["scale"])
    engine: Any = trainer.strategy.model
    if strategy == "deepspeed" and engine.fp16_enabled():
        return float(engine.optimizer.loss_scaler.cur_scale)
    return None


class Recorder(Callback):
    """Micro-batches per optimizer step; at the end the per-rank results of a full or resumed run."""

    def __init__(self, strategy: str, phase: str, out: Path) -> None:
        self.strategy, self.phase, self.out = strategy, phase, out
        self.sizes: list[int] = []
        self._n = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._n += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sizes.append(self._n)
        self._n = 0

    def on_train_end(self, trainer, pl_module):
        if self.phase == "kill":
            return
        result = {"losses": list(pl_module.losses), "sizes": self.sizes, "global_step": trainer.global_step,
                  "params": full_fp32_params(self.strategy, pl_module), "scale": loss_scale(self.strategy, trainer)}
        torch.save(result, self.out / f"{self.phase}_rank{trainer.global_rank}.pt")


class SaveThenAwaitKill(Callback):
    """Asks for a checkpoint after micro-batch ``SAVE_AT``; announces it once it is on disk; never ends the run."""

    def __init__(self, out: Path, recorder: Recorder) -> None:
        self.out, self.recorder = out, recorder
        self.seen = 0
        self.snapshot: dict[str, Any] | None = None
        self.announced = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == SAVE_AT:
            trainer.save_checkpoint(self.out / CKPT)  # deferred to the window's end where partial grads cannot be saved
        self._announce(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Runs while the checkpoint is built (after AccumulationScheduler's hook), whenever the write really happens.
        self.snapshot = {"losses": list(pl_module.losses), "sizes": list(self.recorder.sizes),
                         "global_step": trainer.global_step, "partial_window": PARTIAL_WINDOW_KEY in checkpoint}

    def _announce(self, trainer) -> None:
        # trainer.save_checkpoint returns on every rank only after the write and a barrier: the file is complete.
        if self.snapshot is None or self.announced:
            return
        torch.save(self.snapshot, self.out / f"kill_rank{trainer.global_rank}.pt")
        trainer.strategy.barrier("resume_matrix.saved")
        if trainer.global_rank == 0:
            tmp = self.out / f"{SAVED}.tmp"
            tmp.write_text("ok")
            os.replace(tmp, self.out / SAVED)
        self.announced = True

    def on_train_end(self, trainer, pl_module):
        self._announce(trainer)
        # The run must not end cleanly: wait for the SIGKILL; a job nobody kills fails instead of lingering.
        deadline = time.monotonic() + WAIT_FOR_KILL_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(3)


def make_strategy(strategy: str) -> Any:
    if strategy == "single":
        return "auto"
    if strategy == "ddp":
        return "ddp"
    if strategy == "fsdp":
        from lightning_effi.strategies import EffiFSDPStrategy

        return EffiFSDPStrategy(wrap=["Linear", "Embedding"])  # DCP directory checkpoints (the default)
    from lightning_effi.strategies import EffiDeepSpeedStrategy

    return EffiDeepSpeedStrategy(stage=2)


def main(case: str, phase: str, out: Path) -> None:
    if phase not in PHASES:
        raise ValueError(f"Invalid phase {phase!r}: must be one of {PHASES}")
    strategy, optimizer, precision = parse_case(case)
    world = world_size(strategy)
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning's launcher for the ranks it starts
    if phase == "kill":
        (out / f"pid_rank{rank}").write_text(f"{os.getpid()} {os.getpgid(0)}")
    recorder = Recorder(strategy, phase, out)
    callbacks: list[Callback] = [AccumulationScheduler(ramp=RAMP, unit="step"), recorder]
    if phase == "kill":
        callbacks.append(SaveThenAwaitKill(out, recorder))
    plugins = [] if precision == "32-true" else [LossScalingPrecision(precision, **SCALER)]  # type: ignore[arg-type]
    trainer = Trainer(
        accelerator="cpu", devices=world, strategy=make_strategy(strategy), plugins=plugins, max_steps=MAX_STEPS,
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=callbacks, default_root_dir=out,
    )
    ckpt = str(out / CKPT) if phase == "resume" else None
    trainer.fit(MatrixLM(optimizer), train_dataloaders=ListLoader(rank_batches(rank, world)), ckpt_path=ckpt)
    clean_exit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
