"""TrainingHealthMonitor: scale/skip/grad-norm/tokens-per-second/trust-ratio metrics against independent values."""

from __future__ import annotations

import itertools
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from lightning_effi.callbacks import TrainingHealthMonitor
from lightning_effi.optim import Lamb
from lightning_effi.plugins import LossScalingPrecision
from tests.plugins._toy import ToyModule, fit, reference_scales

TOKENS_PER_BATCH = 8 * 7  # batch 8, a pretend 7 tokens per example


class MemLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "mem"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


class TokenToy(ToyModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return {"loss": loss, "num_tokens": torch.tensor(batch[0].shape[0] * 7)}


class NormReference(pl.Callback):
    """float64 global norm of the (unscaled) gradients, computed independently, at every step."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        sq = sum(float(p.grad.double().square().sum()) for p in pl_module.parameters() if p.grad is not None)
        self.norms[trainer.global_step + 1] = sq**0.5


@pytest.fixture
def fake_clock(monkeypatch):
    """perf_counter advancing by exactly 1 s per call, so tokens/s equals tokens per logging interval."""
    ticks = itertools.count()
    monkeypatch.setattr("lightning_effi.callbacks.health.time.perf_counter", lambda: float(next(ticks)))


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_metrics_with_loss_scaling(fake_clock, monkeypatch, caplog, accelerator):
    """On CUDA the logging step's copy lands later and is logged then, at its own step: the same rows."""
    inject = {2: "inf", 3: "inf", 6: "nan"}
    n_steps, every = 10, 2
    module = TokenToy(inject=inject, inject_param="net.0.bias")
    plugin = LossScalingPrecision("16-mixed", init_scale=2.0**8, growth_interval=3, hysteresis=2)
    monitor = TrainingHealthMonitor(log_every_n_steps=every)
    ref = NormReference()
    logger = MemLogger()
    norm_calls = []
    real_norm = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: norm_calls.append(1) or real_norm(*a, **k))
    with caplog.at_level(logging.WARNING, logger="lightning_effi.callbacks.health"):
        fit(module, plugins=[plugin], callbacks=[monitor, ref], logger=logger, max_steps=n_steps,
            accelerator=accelerator)

    rows = [(s, m) for s, m in logger.rows if any(k.startswith("health/") for k in m)]
    assert [s for s, _ in rows] == list(range(every, n_steps + 1, every))
    # the norm is computed on logged steps, and once at the first step (the logging work's warm-up, not logged)
    assert len(norm_calls) == n_steps // every + 1
    flags = [s in inject for s in range(n_steps)]
    scales = reference_scales(flags, init=2.0**8, growth=2.0, backoff=0.5, interval=3, hysteresis=2, lo=1.0,
                              hi=2.0**24, consecutive=False)
    for step, m in rows:
        assert m["health/loss_scale"] == scales[step - 1]
        assert m["health/skipped_steps"] == sum(flags[:step])
        assert m["health/tokens_per_sec"] == every * TOKENS_PER_BATCH  # 1 fake second per interval
        expected = ref.norms[step]
        if flags[step - 1]:
            assert not torch.isfinite(torch.tensor(m["health/grad_norm"]))
        else:
            assert m["health/grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert [(s, names) for s, _, names in monitor.skip_events] == [(s, ["net.0.bias"]) for s in sorted(inject)]
    assert [sc for _, sc, _ in monitor.skip_events] == [scales[s] for s in sorted(inject)]
    skipped_logs = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped_logs) == 3 and "optimizer step 2 skipped" in skipped_logs[0] and "net.0.bias" in skipped_logs[0]


class FakeLambSGD(torch.optim.SGD):
    """SGD that exposes a fixed ``trust_ratios`` (interface 1), to check the statistics by hand."""

    def step(self, closure=None):
        out = super().step(closure)
        self.trust_ratios = torch.tensor([3.0, 1.0, float("nan"), 2.0, 0.5, 4.0])
        return out


def test_trust_ratio_statistics_by_hand(fake_clock):
    class M(TokenToy):
        def configure_optimizers(self):
            return FakeLambSGD(self.parameters(), lr=0.01)

    monitor = TrainingHealthMonitor(log_every_n_steps=1)
    fit(M(), callbacks=[monitor], max_steps=2)
    m = monitor.last_metrics
    # finite entries 0.5, 1, 2, 3, 4: min 0.5, (lower) median 2, max 4; no scaler metrics without a loss scaler
    assert (m["health/trust_ratio_min"], m["health/trust_ratio_median"], m["health/trust_ratio_max"]) == (0.5, 2.0, 4.0)
    assert "health/loss_scale" not in m and "health/grad_norm" in m


def test_with_real_lamb(fake_clock):
    seen = []

    class M(TokenToy):
        def configure_optimizers(self):
            return Lamb(self.parameters(), lr=1e-2)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen.append(self.trainer.optimizers[0].trust_ratios.clone())

    monitor = TrainingHealthMonitor(log_every_n_steps=3)
    fit(M(), plugins=[LossScalingPrecision("bf16-mixed")], callbacks=[monitor], max_steps=3)
    ratios = seen[-1]
    assert ratios.shape == (4,) and torch.all(ratios > 0)
    m = monitor.last_metrics
    assert m["health/trust_ratio_min"] == pytest.approx(ratios.min().item())
    assert m["health/trust_ratio_max"] == pytest.approx(ratios.max().item())
    assert m["health/trust_ratio_median"] == pytest.approx(ratios.median().item())
    assert m["health/loss_scale"] == 2.0**16


def test_missing_token_key_warns_once_and_omits_tokens_per_sec():
    monitor = TrainingHealthMonitor(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="no 'num_tokens' entry") as rec:
        fit(ToyModule(), callbacks=[monitor], max_steps=3)
    assert len([w for w in rec if "num_tokens" in str(w.message)]) == 1
    assert "health/tokens_per_sec" not in monitor.last_metrics


def test_accumulation_logs_per_optimizer_step(fake_clock):
    monitor = TrainingHealthMonitor(log_every_n_steps=1)
    logger = MemLogger()
    fit(TokenToy(), plugins=[LossScalingPrecision("16-mixed")], callbacks=[monitor], logger=logger, max_steps=3,
        accumulate_grad_batches=2)
    rows = [(s, m) for s, m in logger.rows if "health/tokens_per_sec" in m]
    assert [s for s, _ in rows] == [1, 2, 3]
    assert all(m["health/tokens_per_sec"] == 2 * TOKENS_PER_BATCH for _, m in rows)


@pytest.mark.parametrize(
    "kwargs,msg",
    [(dict(log_every_n_steps=0), "Invalid log_every_n_steps 0"), (dict(max_names=True), "Invalid max_names True"),
     (dict(tokens_key=""), "Invalid tokens_key ''")],
)
def test_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TrainingHealthMonitor(**kwargs)


def test_loss_scale_state_from_deepspeed_engine_and_gradscaler():
    """DeepSpeed fp16 (EffiDeepSpeedStrategy replaces our plugin by the engine's scaler): scale, skip count and the
    last step's fate come from the engine's attributes (names as in deepspeed 0.19 engine.py / zero optimizers)."""
    import types

    from lightning_effi.callbacks.health import _loss_scale_state

    engine = types.SimpleNamespace(
        fp16_enabled=lambda: True, skipped_steps=3, was_step_applied=lambda: False,
        optimizer=types.SimpleNamespace(loss_scaler=types.SimpleNamespace(cur_scale=512.0)),
    )
    trainer = types.SimpleNamespace(precision_plugin=object(), strategy=types.SimpleNamespace(deepspeed_engine=engine))
    assert _loss_scale_state(trainer) == (512.0, 3, True)
    engine.fp16_enabled = lambda: False
    assert _loss_scale_state(trainer) is None
    gs = types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=8.0))
    assert _loss_scale_state(types.SimpleNamespace(precision_plugin=gs, strategy=None)) == (8.0, None, False)


def test_lightning_mixed_precision_logs_scale_without_skip_count():
    from lightning.pytorch.plugins.precision import MixedPrecision

    monitor = TrainingHealthMonitor(log_every_n_steps=2)
    fit(TokenToy(), plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=4.0))],
        callbacks=[monitor], max_steps=2)
    assert monitor.last_metrics["health/loss_scale"] == 4.0 and "health/skipped_steps" not in monitor.last_metrics


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_logging_steps_allocate_no_host_buffers(fake_clock, monkeypatch, accelerator):
    """The host ring the logging steps copy into is allocated at train start, not at the first logging step (pinned
    memory made mid-run stalls that step); a ring outgrown later is re-made and logs the same rows."""
    from lightning_effi._host import HostMirror

    where: list = []
    phase = {"now": "setup"}
    real = HostMirror._allocate
    monkeypatch.setattr(HostMirror, "_allocate", lambda self, like: where.append(phase["now"]) or real(self, like))

    class Phase(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            phase["now"] = trainer.global_step

    class Shrink(pl.Callback):  # after the monitor's on_train_start: a ring too small for the first interval
        def on_train_start(self, trainer, pl_module):
            trainer.callbacks[0]._room = 1

    rows = {}
    for shrink in (False, True):
        logger = MemLogger()
        monitor = TrainingHealthMonitor(log_every_n_steps=2)
        where.clear()
        phase["now"] = "setup"
        fit(TokenToy(), plugins=[LossScalingPrecision("16-mixed", init_scale=2.0**8)],
            callbacks=[monitor, Phase()] + ([Shrink()] if shrink else []), logger=logger, max_steps=6,
            accelerator=accelerator)
        rows[shrink] = [(s, m) for s, m in logger.rows if any(k.startswith("health/") for k in m)]
        if shrink:
            assert "setup" in where and any(isinstance(w, int) and w > 0 for w in where), where
        else:
            # the monitor's ring at setup; one at the first step is the precision plugin's first push
            assert monitor._mirror._bufs is not None and len(monitor._mirror._bufs[0]) == monitor._room
            assert where.count("setup") == 1 and all(w in ("setup", 0) for w in where), where
    assert [s for s, _ in rows[False]] == [2, 4, 6]
    assert rows[False] == rows[True]


def test_first_step_runs_the_logging_work_once_and_logs_nothing(fake_clock, monkeypatch):
    """The logging step's device work (gradient norm, trust-ratio statistics, the non-finite state, packing) runs
    once at the first optimizer step, so its kernels are loaded there and not mid-run; only logging steps log, and
    the first interval's metrics are those of a run without that extra pass (the same rows)."""
    calls = []
    real = TrainingHealthMonitor._parts

    def spy(self, trainer, device):
        parts = real(self, trainer, device)
        calls.append((trainer.global_step, sorted(parts)))
        return parts

    class M(TokenToy):
        def configure_optimizers(self):
            return Lamb(self.parameters(), lr=1e-2)

    rows = {}
    for warm in (True, False):
        calls.clear()
        monkeypatch.setattr(TrainingHealthMonitor, "_parts", spy)
        if not warm:  # the reference: as if the first step had already warmed up
            monkeypatch.setattr(TrainingHealthMonitor, "_warm_up", lambda self, trainer: None)
        logger = MemLogger()
        torch.manual_seed(0)
        fit(M(), callbacks=[TrainingHealthMonitor(log_every_n_steps=4)], logger=logger, max_steps=8)
        rows[warm] = [(s, m) for s, m in logger.rows if any(k.startswith("health/") for k in m)]
        if warm:
            assert calls == [(1, ["grad_norm", "nonfinite", "ratios", "tokens"])] + [
                (s, ["grad_norm", "nonfinite", "ratios", "tokens"]) for s in (4, 8)]
    assert [s for s, _ in rows[True]] == [4, 8]
    assert rows[True] == rows[False]


def test_device_decided_skips_are_reported_from_one_persistent_buffer(fake_clock):
    """Fused AdamW skips inside its kernel (found_inf), so only the device knows which steps were skipped: the
    monitor reports them at the logs after, with the scale the independent rule gives, and keeps the flags in one
    buffer written in place (a flag tensor kept per step would grow the allocator's live set every step)."""
    inject = {2: "inf", 3: "inf", 6: "nan"}
    n_steps, every = 10, 4
    module = TokenToy(inject=inject, inject_param="net.0.bias", optimizer="adamw_fused")
    plugin = LossScalingPrecision("16-mixed", init_scale=2.0**8, growth_interval=3, hysteresis=2)
    monitor = TrainingHealthMonitor(log_every_n_steps=every)
    ptrs = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if monitor._skip_flags is not None:
                ptrs.append(monitor._skip_flags.data_ptr())

    fit(module, plugins=[plugin], callbacks=[monitor, Watch()], logger=MemLogger(), max_steps=n_steps)
    assert trainer_skips_on_device(plugin)
    flags = [s in inject for s in range(n_steps)]
    scales = reference_scales(flags, init=2.0**8, growth=2.0, backoff=0.5, interval=3, hysteresis=2, lo=1.0,
                              hi=2.0**24, consecutive=False)
    assert [s for s, _, _ in monitor.skip_events] == sorted(inject)
    # reported at the next log, with that log's scale (the scale after the interval, not the step's own)
    assert [sc for _, sc, _ in monitor.skip_events] == [scales[4 - 1], scales[4 - 1], scales[8 - 1]]
    assert len(ptrs) >= n_steps - 1 and len(set(ptrs)) == 1


def trainer_skips_on_device(plugin) -> bool:
    return plugin.scaler.host_known_skip is None
