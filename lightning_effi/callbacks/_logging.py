"""When a callback's per-step metrics are worth handing to Lightning.

``LightningModule.log`` costs a fraction of a millisecond of host time per call, and Lightning only writes on_step
metrics every ``log_every_n_steps`` optimizer steps; logging in between is host time spent for nothing (on a
host-bound run, time the GPU waits).
"""

from __future__ import annotations

from typing import Any


def metrics_due(trainer: Any) -> bool:
    """At the end of an optimizer step: True every ``log_every_n_steps`` steps and at the last step of fit, so the
    loggers and ``trainer.callback_metrics`` get the values they would otherwise see."""
    step = trainer.global_step
    if step % max(1, trainer.log_every_n_steps) == 0 or trainer.should_stop:
        return True
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= step:
        return True
    progress = trainer.fit_loop.epoch_loop.batch_progress
    last_epoch = trainer.max_epochs is not None and trainer.max_epochs >= 0 and \
        trainer.current_epoch >= trainer.max_epochs - 1
    return bool(progress.is_last_batch and last_epoch)
