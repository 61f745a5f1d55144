"""No host read of a tensor value from lightning_effi code on a non-logging optimizer step (CPU fit of the full stack).

Counted: ``item``/``tolist``/``bool``/``float``/``int``/``cpu`` of a tensor with a lightning_effi frame on the stack
(see ``tests/_host_reads.py``), between the first steps (set-up: held schedules, tables) and the logging steps
(which may read once). Lamb's CPU step reads its norms on the host by design (there is no device queue to drain);
those frames are listed and every other read fails the test. The control run shows the counter sees a host-side
skip decision.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_effi.callbacks import AccumulationScheduler, SyncFreeProgressBar, TrainingHealthMonitor
from lightning_effi.models import GPTLightningModule
from lightning_effi.plugins import LossScalingPrecision
from tests._host_reads import HostReadCounter, stack_accumulation, stack_data, stack_optimizers

LOG_EVERY = 10
# Lamb's CPU paths: norms and the skip flag are read on the host (documented; the accelerator paths read nothing).
CPU_OPTIMIZER_FRAMES = ("optim/functional.py:_host_step", "optim/functional.py:_cpu_adam_core",
                        "optim/functional.py:_cpu_per_tensor", "optim/functional.py:lamb")


def _data():
    return stack_data(n=48, t=16, vocab=50, batch_size=2)


class CountBetweenLogs(Callback):
    """Turns the counter on for every micro-batch of a window that ends on a non-logging step, after ``warmup``."""

    def __init__(self, counter: HostReadCounter, warmup: int = 3) -> None:
        self.counter, self.warmup, self.counted_steps = counter, warmup, set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step  # the window in progress ends with optimizer step `step + 1`
        self.counter.active = step >= self.warmup and (step + 1) % LOG_EVERY != 0
        if self.counter.active:
            self.counted_steps.add(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counter.active = False  # the last callback: every other batch-end hook has run (and was counted)

    def on_train_end(self, trainer, pl_module):
        self.counter.active = False


def _fit(precision, optimizer, counter, accumulation, steps=24):
    module = GPTLightningModule(vocab_size=50, block_size=16, n_layer=1, n_head=2, d_model=32, warmup_steps=4,
                                max_steps=steps, loss_reduction="sum", optimizer=optimizer)
    module.batch_size = 2  # the attribute AutoMicroBatch sets (the loader is given; the size equals it)
    counting = CountBetweenLogs(counter)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_model_summary=False, log_every_n_steps=LOG_EVERY, plugins=[precision],
        callbacks=[accumulation, TrainingHealthMonitor(log_every_n_steps=LOG_EVERY), SyncFreeProgressBar(),
                   counting],
    )
    with counter.patched():
        trainer.fit(module, _data())
    return trainer, counting


OPTIMIZERS = stack_optimizers()


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("accumulation", ["ramp", "tokens", "split"])
def test_full_stack_reads_nothing_between_logging_steps(precision, optimizer, accumulation):
    callback = stack_accumulation(accumulation, batch_size=2)
    counter = HostReadCounter()
    trainer, counting = _fit(LossScalingPrecision(precision, init_scale=2.0**8), OPTIMIZERS[optimizer], counter,
                             callback)
    assert trainer.global_step == 24 and len(counting.counted_steps) >= 15
    allowed = CPU_OPTIMIZER_FRAMES if optimizer == "lamb" else ()
    ours = {k: v for k, v in counter.counts.items() if not k.startswith(allowed)}
    assert ours == {}


def test_counter_sees_a_host_side_skip_decision():
    """Control: plain AdamW cannot skip on the device, so the scaler reads the overflow flag every step."""
    counter = HostReadCounter()
    _fit(LossScalingPrecision("16-mixed", init_scale=2.0**8), partial(torch.optim.AdamW, lr=1e-3), counter,
         AccumulationScheduler({0: 1}))
    assert counter.counts["plugins/scaler.py:step (item)"] >= 15


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_nonfinite_policy_without_a_scaler_reads_nothing_between_logging_steps(precision, optimizer):
    """TrainingHealthMonitor's non-finite check (on by default without a loss scaler) masks through found_inf."""
    from lightning.pytorch.plugins import MixedPrecision, Precision

    plugin = MixedPrecision("bf16-mixed", "cpu") if precision == "bf16-mixed" else Precision()
    counter = HostReadCounter()
    trainer, counting = _fit(plugin, OPTIMIZERS[optimizer], counter, stack_accumulation("ramp"))
    assert trainer.global_step == 24 and len(counting.counted_steps) >= 15
    monitor = next(c for c in trainer.callbacks if isinstance(c, TrainingHealthMonitor))
    assert monitor._nf is not None and monitor._nf.masked  # the check ran, and on the device
    allowed = CPU_OPTIMIZER_FRAMES if optimizer == "lamb" else ()
    ours = {k: v for k, v in counter.counts.items() if not k.startswith(allowed)}
    assert ours == {}
