"""A table of EffiDeepSpeedStrategy runs in ONE 2-process group (torchrun), each compared by the test with a
single-process reference.

Usage: torchrun --nproc_per_node=2 ds_train.py OUT_DIR [CASE ...]

Every case trains the tiny GPT on CPU/gloo and writes, from rank 0, ``OUT_DIR/<case>.pt`` with the gathered fp32
master weights and what the case observed (micro-batches per optimizer step, skipped steps, learning rates...).
One process group for all cases: a Trainer per case, same ranks (torchrun sets LOCAL_RANK, so Lightning does not
spawn processes and DeepSpeed's distributed init is reused).
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
# "cpu" (gloo, the CI case) or "cuda" (NCCL, `pytest -m multi_gpu` on the GPU machine)
ACCELERATOR = os.environ.get("EFFI_DS_ACCELERATOR", "cpu")


class Recorder(pl.Callback):
    """Counts micro-batches per optimizer step, optionally changes accumulation and injects an overflow."""

    def __init__(self, change_at: int | None = None, new_factor: int = 2) -> None:
        self.change_at, self.new_factor = change_at, new_factor
        self.per_step: list[int] = []
        self.lrs: list[float] = []
        self.scales: list[float] = []
        self._count = 0
        self._last_step = 0
        self.result: dict = {}

    def on_train_start(self, trainer, pl_module):
        # Every element of every logical parameter is covered by exactly one FlatLayout segment on exactly one rank.
        layouts = trainer.strategy._flat_layouts
        if layouts is None:
            return
        numels = torch.tensor(trainer.strategy._logical_numels, dtype=torch.long)
        covered = torch.zeros_like(numels)
        for layout in layouts:
            spans = sorted((off, off + n) for _, off, n in layout.segments)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "overlapping segments"
            for lid, _, n in layout.segments:
                covered[lid] += n
        covered = covered.to(pl_module.device)  # NCCL reduces device tensors only
        torch.distributed.all_reduce(covered)
        self.result["layout_coverage_ok"] = bool(torch.equal(covered.cpu(), numels))
        self.result["num_logical"] = int(numels.numel())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Accumulation changes apply from a window start, as AccumulationScheduler does.
        if self.change_at is not None and trainer.global_step == self.change_at and self._count == 0:
            trainer.strategy.effi_set_accumulation(self.new_factor)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._count += 1
        if trainer.global_step != self._last_step:
            self.per_step.append(self._count)
            self._count = 0
            self._last_step = trainer.global_step
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
            scaler = getattr(trainer.model.optimizer, "loss_scaler", None)
            self.scales.append(float(getattr(scaler, "cur_scale", 1.0)))

    def on_train_end(self, trainer, pl_module):
        engine = trainer.strategy.deepspeed_engine
        self.result = {**self.result,
            "params": full_fp32_params(pl_module),
            "per_step": self.per_step,
            "lrs": self.lrs,
            "scales": self.scales,
            "skipped_steps": int(engine.skipped_steps),
            "global_step": trainer.global_step,
            "gas": int(engine.gradient_accumulation_steps()),
            "train_batch_size": int(engine.train_batch_size()),
            "config": trainer.strategy.config,
        }
        opt = trainer.strategy.deepspeed_engine.optimizer
        client = getattr(opt, "optimizer", opt)
        tr = getattr(client, "trust_ratios", None)
        self.result["trust_ratios"] = None if tr is None else tr.detach().cpu().clone()
        self.result["optimizer_class"] = f"{type(client).__module__}.{type(client).__qualname__}"


# name -> (stage, optimizer, trainer kwargs, recorder kwargs, module kwargs, strategy kwargs, plugins)
def _cases() -> dict:
    from lightning_effi.plugins import LossScalingPrecision

    cases = {}
    for stage in (1, 2, 3):
        for opt in ("adamw", "lamb"):
            cases[f"s{stage}_{opt}"] = dict(stage=stage, module=dict(optimizer=opt), trainer=dict(max_steps=10))
    # a Lamb subclass from outside the package (ds_common.MyLamb) must get the same per-parameter trust ratios
    for stage in (1, 2):
        cases[f"s{stage}_mylamb"] = dict(stage=stage, module=dict(optimizer="mylamb"), trainer=dict(max_steps=10))
    cases["s2_adamw_acc2"] = dict(stage=2, module=dict(optimizer="adamw"),
                                  trainer=dict(max_steps=5, accumulate_grad_batches=2))
    # accumulation 1 for 4 steps, then 2 (set through the strategy, as AccumulationScheduler does)
    cases["s1_lamb_schedule"] = dict(stage=1, module=dict(optimizer="lamb"), trainer=dict(max_steps=7),
                                     recorder=dict(change_at=4, new_factor=2))
    # 7 micro-batches per epoch per rank (28 samples), accumulation 3: 2 full windows and a partial one of 1 (like DDP)
    cases["s2_adamw_partial"] = dict(stage=2, module=dict(optimizer="adamw"), samples=28,
                                     trainer=dict(max_epochs=1, accumulate_grad_batches=3))
    cases["s3_adamw_clip"] = dict(stage=3, module=dict(optimizer="adamw"),
                                  trainer=dict(max_steps=10, gradient_clip_val=0.05))
    cases["s2_lamb_maxgradnorm"] = dict(stage=2, module=dict(optimizer="lamb", max_grad_norm=0.05),
                                        trainer=dict(max_steps=10))
    # optimizer state and step on the CPU (ZeRO-Offload) with the optimizer from configure_optimizers
    cases["s2_adamw_offload"] = dict(stage=2, module=dict(optimizer="adamw"), trainer=dict(max_steps=10),
                                     strategy=dict(offload_optimizer=True))
    cases["s3_validate"] = dict(stage=3, trainer=dict(), validate_only=True)
    # bf16 (ZeRO-1 then runs DeepSpeed's BF16_Optimizer, another partition layout): layouts checked structurally
    for stage in (1, 3):
        cases[f"s{stage}_lamb_bf16"] = dict(stage=stage, module=dict(optimizer="lamb"), trainer=dict(
            max_steps=3, precision="bf16-mixed"))
    cases["s2_fp16_skip"] = dict(
        stage=2, module=dict(optimizer="adamw", scheduler="halving", overflow_at=4), trainer=dict(max_steps=6),
        plugins=[LossScalingPrecision("16-mixed", init_scale=2.0**8, growth_interval=2, hysteresis=1,
                                      max_scale=2.0**8)],
    )
    return cases


def run_case(name: str, spec: dict, out: Path) -> None:
    torch.manual_seed(0)
    module = TinyLM(**spec.get("module", {}))
    recorder = Recorder(**spec.get("recorder", {}))
    trainer = pl.Trainer(
        accelerator=ACCELERATOR, devices=WORLD,
        strategy=EffiDeepSpeedStrategy(stage=spec["stage"], **spec.get("strategy", {})),
        plugins=spec.get("plugins"), use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder], **spec["trainer"],
    )
    if spec.get("validate_only"):
        # DeepSpeed's inference engine (no optimizer) on an untrained model: the mean loss over all ranks' batches
        metrics = trainer.validate(module, dataloaders=loader(make_dataset(), WORLD, RANK), verbose=False)
        recorder.result = {"val_loss": metrics[0]["val_loss"]}
    else:
        trainer.fit(module, train_dataloaders=loader(make_dataset(spec.get("samples", 96)), WORLD, RANK))
    if RANK == 0:
        torch.save(recorder.result, out / f"{name}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    cases = _cases()
    selected = sys.argv[2:] or list(cases)
    for name in selected:
        run_case(name, cases[name], out)
    clean_exit()


if __name__ == "__main__":
    main()
