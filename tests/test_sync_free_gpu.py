"""On a CUDA GPU: the full stack's steady-state non-logging steps run under ``torch.cuda.set_sync_debug_mode("error")``
(any synchronising CUDA call raises), and the control, an optimizer the scaler must drive with a host read, raises."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_effi.callbacks import AccumulationScheduler, SyncFreeProgressBar, TrainingHealthMonitor
from lightning_effi.models import GPTLightningModule
from lightning_effi.plugins import LossScalingPrecision
from tests._host_reads import stack_accumulation, stack_data, stack_optimizers

pytestmark = pytest.mark.gpu
LOG_EVERY = 10


def _data():
    return stack_data(n=96, t=64, vocab=256, batch_size=4)


class SyncDebugBetweenLogs(Callback):
    """``set_sync_debug_mode("error")`` from each non-logging window's start to the next window's start."""

    def __init__(self, warmup: int = 4) -> None:
        self.warmup, self.checked = warmup, set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        on = step >= self.warmup and (step + 1) % LOG_EVERY != 0
        torch.cuda.set_sync_debug_mode("error" if on else 0)
        if on:
            self.checked.add(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the last callback: the last batch's hooks were checked; the end of fit may read once (documented)
        if trainer.global_step >= trainer.max_steps:
            torch.cuda.set_sync_debug_mode(0)

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode(0)


def _fit(precision, optimizer, accumulation, steps=24):
    module = GPTLightningModule(vocab_size=256, block_size=64, n_layer=2, n_head=4, d_model=128, warmup_steps=4,
                                max_steps=steps, loss_reduction="sum", optimizer=optimizer)
    module.batch_size = 4  # the attribute AutoMicroBatch sets (the loader is given; the size equals it)
    debug = SyncDebugBetweenLogs()
    trainer = Trainer(
        accelerator="gpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_model_summary=False, log_every_n_steps=LOG_EVERY, plugins=[precision],
        callbacks=[accumulation, TrainingHealthMonitor(log_every_n_steps=LOG_EVERY), SyncFreeProgressBar(), debug],
    )
    try:
        trainer.fit(module, _data())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return trainer, debug


OPTIMIZERS = stack_optimizers()


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("accumulation", ["ramp", "tokens", "split"])
def test_full_stack_makes_no_sync_between_logging_steps(precision, optimizer, accumulation):
    callback = stack_accumulation(accumulation, batch_size=4)
    # A scale that fits from the start: steps before the first applied one are decided on the host by design
    trainer, debug = _fit(LossScalingPrecision(precision, init_scale=2.0**8), OPTIMIZERS[optimizer], callback)
    assert trainer.global_step == 24 and len(debug.checked) >= 15
    assert trainer.precision_plugin.skipped_steps >= 0  # a host read after fit is allowed


def test_control_host_decided_skip_raises_under_sync_debug():
    with pytest.raises(RuntimeError, match="synchroniz"):
        _fit(LossScalingPrecision("16-mixed", init_scale=2.0**8), partial(torch.optim.AdamW, lr=1e-3, foreach=True),
             AccumulationScheduler({0: 1}))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_nonfinite_policy_without_a_scaler_makes_no_sync_between_logging_steps(precision, optimizer):
    """TrainingHealthMonitor's non-finite check (on by default without a loss scaler) masks through found_inf, on the
    device."""
    from lightning.pytorch.plugins import MixedPrecision, Precision

    plugin = MixedPrecision("bf16-mixed", "cuda") if precision == "bf16-mixed" else Precision()
    trainer, debug = _fit(plugin, OPTIMIZERS[optimizer], stack_accumulation("ramp"))
    assert trainer.global_step == 24 and len(debug.checked) >= 15
    monitor = next(c for c in trainer.callbacks if isinstance(c, TrainingHealthMonitor))
    assert monitor._nf is not None and monitor._nf.masked
