"""SyncFreeProgressBar on real CPU fits: optimizer steps against max_steps under an accumulation ramp, the factor
shown, the remaining micro-batches behind its time left, no "Epoch 0/-2" and no v_num unless asked."""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_effi.callbacks import AccumulationScheduler, SyncFreeProgressBar
from lightning_effi.callbacks.schedule import factor_at, parse_ramp
from tests.callbacks._toy import ListLoader, TinyLM, make_batches


class _Probe(Callback):
    """Reads the bar's rich task after the bar's own batch-end hook (it comes later in the callback list)."""

    def __init__(self, bar: SyncFreeProgressBar) -> None:
        self.bar = bar
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        task = self.bar.train_progress_bar
        scheduler = next((c for c in trainer.callbacks if isinstance(c, AccumulationScheduler)), None)
        self.rows.append({
            "completed": task.completed, "total": task.total, "description": task.description,
            "metrics": dict(self.bar._metric_component._metrics), "step": trainer.global_step,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "factor": scheduler.factor if scheduler is not None else None,
            "remaining": self.bar.remaining_micro_batches(trainer) if trainer.max_steps > 0 else None,
            "time_left": task.fields.get("time_left"),
        })


def _fit(tmp_path, n_batches=40, bar=None, callbacks=(), logger=True, **trainer_kw):
    bar = bar or SyncFreeProgressBar(refresh_rate=1)
    probe = _Probe(bar)
    trainer = Trainer(accelerator="cpu", devices=1, enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
                      logger=CSVLogger(tmp_path) if logger else False,
                      callbacks=[*callbacks, bar, probe], **trainer_kw)
    trainer.fit(TinyLM(lr=0.1), train_dataloaders=ListLoader(make_batches(n_batches)))
    return trainer, bar, probe.rows


def test_counts_optimizer_steps_under_an_accumulation_ramp(tmp_path):
    ramp = (1, 4, 6)
    trainer, bar, rows = _fit(tmp_path, callbacks=[AccumulationScheduler(ramp=ramp, unit="step")], max_steps=8)
    factors = [factor_at(s, ramp=parse_ramp(ramp)) for s in range(8)]
    assert factors == [1, 1, 2, 2, 3, 3, 4, 4]
    assert len(rows) == sum(factors)  # one row per micro-batch
    for i, row in enumerate(rows):
        assert row["completed"] == row["step"] and row["total"] == 8
        assert "-2" not in row["description"] and "/" not in row["description"]  # max_epochs=-1: no total
        assert "v_num" not in row["metrics"]
        # the factor of the window this micro-batch belongs to, as the loop sees it (aligned windows here)
        assert row["metrics"]["accum"] == str(row["factor"]) == str(row["accumulate_grad_batches"])
        assert row["remaining"] == len(rows) - (i + 1)  # what the time left is computed from
    assert [r["metrics"]["accum"] for r in rows] == [str(f) for f in factors for _ in range(f)]
    task = bar.train_progress_bar
    assert (task.completed, task.total) == (trainer.global_step, trainer.max_steps) == (8, 8)
    assert task.finished and task.finished_time > 0 and task.speed is not None and task.speed > 0
    assert any(r["time_left"] is not None and r["time_left"] >= 0 for r in rows[2:-1])


def test_trainer_accumulation_without_a_scheduler(tmp_path):
    trainer, bar, rows = _fit(tmp_path, accumulate_grad_batches=3, max_steps=4)
    assert len(rows) == 12
    assert [r["completed"] for r in rows] == [s for s in range(1, 5) for s in (s - 1, s - 1, s)]
    assert all(r["metrics"]["accum"] == "3" and r["total"] == 4 for r in rows)
    assert [r["remaining"] for r in rows] == list(range(11, -1, -1))
    assert bar.train_progress_bar.completed == trainer.global_step == 4


def test_micro_batches_per_epoch_without_max_steps_and_version_on_request(tmp_path):
    bar = SyncFreeProgressBar(refresh_rate=1, show_version=True)
    trainer, bar, rows = _fit(tmp_path, n_batches=5, bar=bar, max_epochs=2)
    assert [(r["completed"], r["total"]) for r in rows] == [(i, 5) for i in range(1, 6)] * 2
    assert rows[0]["description"].strip() == "Epoch 0/1" and rows[-1]["description"].strip() == "Epoch 1/1"
    assert rows[0]["metrics"]["v_num"] == "0"  # a string: not rendered as 0.000
    assert "accum" not in rows[0]["metrics"]  # factor 1 and no scheduler


def test_show_version_must_be_a_bool():
    with pytest.raises(TypeError, match="Invalid show_version 'no': must be True or False"):
        SyncFreeProgressBar(show_version="no")


def test_factor_shown_is_the_window_size_not_the_loop_value(tmp_path):
    # Step 1's window of 3 opens at micro-batch 1: Lightning's modulo rule needs other accumulate_grad_batches values
    # there, so the bar reads the scheduler's window size.
    _, _, rows = _fit(tmp_path, callbacks=[AccumulationScheduler({0: 1, 1: 3}, unit="step")], max_steps=3)
    assert [r["metrics"]["accum"] for r in rows] == ["1", "3", "3", "3", "3", "3", "3"]
    assert any(r["accumulate_grad_batches"] != 3 for r in rows[1:4])
    assert [r["completed"] for r in rows] == [1, 1, 1, 2, 2, 2, 3]
    assert [r["remaining"] for r in rows] == list(range(6, -1, -1))
