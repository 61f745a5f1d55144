"""LossScalingPrecision in a real Trainer on CPU (real fp16 autocast): skipping, scale rule, LR accounting, no
warning, clipping on unscaled gradients, resume, floor policy, manual optimization, accumulation, errors."""

from __future__ import annotations

import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_effi.plugins import LossScalingPrecision
from lightning_effi.plugins.precision import _check_strategy_for_loss_scaling
from tests.plugins._toy import StepRecorder, ToyModule, fit, reference_scales

LR_WARNING = "lr_scheduler.step()"


def _lr_warnings(records):
    return [str(w.message) for w in records if LR_WARNING in str(w.message)]


@pytest.mark.parametrize("precision,dtype", [("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)])
def test_autocast_dtype_is_real_on_cpu(precision, dtype):
    module = ToyModule()
    fit(module, plugins=[LossScalingPrecision(precision)], max_steps=2)
    assert module.autocast_dtypes == [dtype, dtype]


@pytest.mark.parametrize("consecutive", [False, True], ids=["nonconsecutive", "consecutive"])
def test_injected_overflow_skips_exactly(consecutive):
    """inf/nan in one parameter's gradient at chosen steps (including the first): those steps are skipped with
    weights and optimizer state bit-identical, the scale follows the rule, the LR schedule lags by exactly the
    number of skips, and torch's "lr_scheduler.step() before optimizer.step()" warning is not emitted."""
    inject = {0: "inf", 3: "nan", 5: "inf", 6: "inf", 10: "inf", 11: "inf", 12: "inf"}
    n_steps = 16
    knobs = dict(init_scale=2.0**10, growth_interval=3, hysteresis=2, min_scale=4.0, max_scale=2.0**12)
    module = ToyModule(inject=inject, lr=1e-2, lr_decay=0.8)
    rec = StepRecorder()
    plugin = LossScalingPrecision("16-mixed", consecutive_hysteresis=consecutive, **knobs)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer = fit(module, plugins=[plugin], callbacks=[rec], max_steps=n_steps)
    assert _lr_warnings(records) == []
    assert module.injected_at == sorted(inject)
    assert [r["step"] for r in rec.rows] == list(range(n_steps))
    flags = [s in inject for s in range(n_steps)]
    for r, overflow in zip(rec.rows, flags):
        assert r["weights_same"] is overflow, r
        assert r["state_same"] is overflow, r
    expected = reference_scales(
        flags, init=2.0**10, growth=2.0, backoff=0.5, interval=3, hysteresis=2, lo=4.0, hi=2.0**12,
        consecutive=consecutive,
    )
    assert [r["scale"] for r in rec.rows] == expected
    applied = 0
    for r, overflow in zip(rec.rows, flags):
        applied += not overflow
        assert r["sched_pos"] == applied
        assert r["lr"] == pytest.approx(1e-2 * 0.8**applied, rel=1e-12)
    assert plugin.skipped_steps == len(inject)
    assert trainer.global_step == n_steps
    # the optimizer really stepped exactly the applied number of times
    assert trainer.optimizers[0].state_dict()["state"][0]["step"].item() == n_steps - len(inject)
    # the scheduler got its own class back at teardown
    assert type(trainer.lr_scheduler_configs[0].scheduler) is torch.optim.lr_scheduler.LambdaLR


def test_lightning_mixed_precision_control_shows_the_problems():
    """Control for the test above: Lightning's MixedPrecision + torch GradScaler on the same injected first-step
    overflow warns and advances the schedule on the skipped step (what LossScalingPrecision fixes)."""
    module = ToyModule(inject={0: "inf"})
    rec = StepRecorder()
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(module, plugins=[plugin], callbacks=[rec], max_steps=3)
    assert len(_lr_warnings(records)) == 1
    assert rec.rows[0]["weights_same"] and rec.rows[-1]["sched_pos"] == 3  # skipped, yet the schedule moved 3


def _norm_recorder():
    class NormRecorder(pl.Callback):
        def __init__(self):
            self.pre, self.post = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.pre.append(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item())

    return NormRecorder()


class ClipProbe(ToyModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.post_clip = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)
        grads = [p.grad.float() for p in self.parameters()]
        self.post_clip.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


def test_clipping_sees_unscaled_gradients():
    """Hooks and clipping see true gradients: the pre-clip norm matches an fp32 run, the clipped norm is the clip
    value (not clip/scale), and the first update matches fp32's clipped SGD update."""
    runs = {}
    for name, plugins in (("fp32", []), ("fp16", [LossScalingPrecision("16-mixed", init_scale=2.0**12)])):
        module = ClipProbe(optimizer="sgd", lr=0.5, lr_decay=None)
        rec = _norm_recorder()
        w0 = module.net[0].weight.detach().clone()
        fit(module, plugins=plugins, callbacks=[rec], max_steps=1, gradient_clip_val=0.05)
        runs[name] = (rec.pre[0], module.post_clip[0], module.net[0].weight.detach() - w0)
    pre32, post32, d32 = runs["fp32"]
    pre16, post16, d16 = runs["fp16"]
    assert pre32 > 0.05 * 4  # clipping is active
    assert pre16 == pytest.approx(pre32, rel=2e-2)
    assert post16 == pytest.approx(0.05, rel=1e-4) and post32 == pytest.approx(0.05, rel=1e-4)
    torch.testing.assert_close(d16, d32, rtol=3e-2, atol=1e-4)


def test_resume_restores_scale_and_trackers_exactly(tmp_path):
    """An uninterrupted 12-step run writes a checkpoint at step 6; resuming from it reproduces the rest bit for bit
    (scale, trackers, skip count, weights, LR position). Overflows on both sides of the checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    inject = {1: "inf", 4: "inf", 5: "nan", 9: "inf"}
    knobs = dict(init_scale=2.0**10, growth_interval=2, hysteresis=2)
    # 6 batches per epoch: the checkpoint falls on an epoch boundary, so the (non-resumable) loader replays exactly
    full = ToyModule(inject=inject, n=48)
    p_full = LossScalingPrecision("16-mixed", **knobs)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="m-{step}", every_n_train_steps=6, save_top_k=-1)
    fit(full, plugins=[p_full], callbacks=[ckpt_cb], max_steps=12, enable_checkpointing=True)
    ckpt = tmp_path / "m-step=6.ckpt"
    saved = torch.load(ckpt, weights_only=False)["LossScalingPrecision"]
    assert saved["skipped_steps"] == 3 and saved["num_updates"] == 6

    second = ToyModule(inject=inject, n=48)
    p2 = LossScalingPrecision("16-mixed", **knobs)
    assert p2.scaler.state_dict() != p_full.scaler.state_dict()
    t2 = fit(second, plugins=[p2], max_steps=12, ckpt_path=ckpt)
    assert p2.scaler.state_dict() == p_full.scaler.state_dict()
    assert p2.skipped_steps == len(inject)
    for (k, a), b in zip(full.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    assert t2.lr_scheduler_configs[0].scheduler.last_epoch == 12 - len(inject)


def test_on_min_scale_raise_names_step_scale_and_parameter():
    inject = {s: "inf" for s in range(10)}
    module = ToyModule(inject=inject, inject_param="net.0.bias")
    plugin = LossScalingPrecision("16-mixed", init_scale=4.0, min_scale=2.0, hysteresis=1)
    with pytest.raises(RuntimeError, match=r"min_scale=2.0 and step 1 .*scale 2.0.*\['net.0.bias'\]"):
        fit(module, plugins=[plugin], max_steps=10)


def test_on_min_scale_skip_keeps_skipping_and_warns_every_n():
    inject = {s: "inf" for s in range(2, 14)}
    module = ToyModule(inject=inject)
    plugin = LossScalingPrecision("16-mixed", init_scale=4.0, min_scale=4.0, hysteresis=1, on_min_scale="skip",
                                  warn_every_n_steps=5)
    rec = StepRecorder()
    with pytest.warns(RuntimeWarning, match="at its floor") as records:
        fit(module, plugins=[plugin], callbacks=[rec], max_steps=16)
    floor = [w for w in records if "at its floor" in str(w.message)]
    assert len(floor) == 3  # steps 2, 7, 12
    assert "step 2 " in str(floor[0].message) and "step 7 " in str(floor[1].message)
    assert plugin.skipped_steps == 12
    assert [r["weights_same"] for r in rec.rows] == [s in inject for s in range(16)]


class ManualModule(ToyModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False
        self.skips = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        sched = self.lr_schedulers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x).float(), y)
        opt.zero_grad()
        self.manual_backward(loss)
        if self.trainer.global_step in self.inject:
            self.net[2].weight.grad[0, 0] = float("inf")
        self.clip_gradients(opt, gradient_clip_val=1.0)  # unscales first; step must not unscale again
        opt.step()
        skipped = self.trainer.precision_plugin.last_step_skipped
        self.skips.append(skipped)
        if not skipped:
            sched.step()


def test_manual_optimization_unscales_once_and_reports_skips(monkeypatch):
    module = ManualModule(inject={2: "inf"})
    plugin = LossScalingPrecision("16-mixed", init_scale=2.0**8)
    calls = []
    real = plugin.scaler.unscale_
    monkeypatch.setattr(plugin.scaler, "unscale_", lambda opt: calls.append(1) or real(opt))
    trainer = fit(module, plugins=[plugin], max_steps=5)
    assert len(calls) == 5
    assert module.skips == [False, False, True, False, False]
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_accumulation_scales_every_microbatch_and_unscales_once(monkeypatch):
    """accumulate_grad_batches=4: one unscale per optimizer step, and the unscaled accumulated gradient equals the
    fp32 one (fp16 autocast tolerance)."""

    class GradSnap(pl.Callback):
        def __init__(self):
            self.grads = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads.append(pl_module.net[0].weight.grad.detach().clone())

    out = {}
    for name, plugins in (("fp32", []), ("fp16", [LossScalingPrecision("16-mixed", init_scale=2.0**14)])):
        calls = []
        if plugins:
            real = plugins[0].scaler.unscale_
            monkeypatch.setattr(plugins[0].scaler, "unscale_",
                                lambda opt, real=real, calls=calls: calls.append(1) or real(opt))
        snap = GradSnap()
        fit(ToyModule(optimizer="sgd", lr_decay=None), plugins=plugins, callbacks=[snap], max_steps=2,
            accumulate_grad_batches=4)
        out[name] = (snap.grads, calls)
    assert len(out["fp16"][1]) == 2
    for g16, g32 in zip(out["fp16"][0], out["fp32"][0]):
        torch.testing.assert_close(g16, g32, rtol=2e-2, atol=2e-3)


def test_state_dict_is_in_checkpoint_under_plugin_name(tmp_path):
    plugin = LossScalingPrecision("16-mixed", init_scale=2.0**5, growth_interval=1)
    t = fit(ToyModule(), plugins=[plugin], max_steps=3)
    t.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=False)["LossScalingPrecision"]
    assert state["scale"] == 2.0**8 and state["num_updates"] == 3 and state["skipped_steps"] == 0


def test_knobs_are_plain_attributes():
    p = LossScalingPrecision("bf16-mixed", init_scale=2.0**4, growth_interval=7, hysteresis=3, min_scale=0.5,
                             backoff_factor=0.25, growth_factor=4.0, max_scale=2.0**6, consecutive_hysteresis=True)
    assert (p.precision, p.init_scale, p.growth_interval, p.hysteresis, p.min_scale, p.backoff_factor,
            p.growth_factor, p.max_scale, p.consecutive_hysteresis) == (
        "bf16-mixed", 16.0, 7, 3, 0.5, 0.25, 4.0, 64.0, True)
    assert p.scaler.get_scale() == 16.0 and p.scaler.hysteresis == 3


ERRORS = [
    (dict(precision="16-true"), ValueError, "Invalid precision '16-true'"),
    (dict(on_min_scale="stop"), ValueError, "Invalid on_min_scale 'stop'"),
    (dict(warn_every_n_steps=0), ValueError, "Invalid warn_every_n_steps 0"),
    (dict(device="mps"), ValueError, "Invalid device 'mps'"),
    (dict(hysteresis=0), ValueError, "Invalid hysteresis 0"),
    (dict(min_scale=8.0, init_scale=4.0), ValueError, "Invalid init_scale 4.0"),
]


@pytest.mark.parametrize("kwargs,exc,msg", ERRORS, ids=[next(iter(k)) for k, _, _ in ERRORS])
def test_validation_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        LossScalingPrecision(**kwargs)


def test_lightning_deepspeed_strategy_is_refused_with_a_pointer():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    fake = types.SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    with pytest.raises(RuntimeError, match="effi_deepspeed_stage"):
        _check_strategy_for_loss_scaling(fake)


def test_lbfgs_is_refused():
    class LB(ToyModule):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(RuntimeError, match="LBFGS"):
        fit(LB(), plugins=[LossScalingPrecision("16-mixed")], max_steps=1)


def test_unsupported_device_is_refused_at_setup():
    plugin = LossScalingPrecision("16-mixed")
    module = ToyModule()
    module._trainer = types.SimpleNamespace(
        strategy=types.SimpleNamespace(root_device=torch.device("meta"))
    )
    with pytest.raises(RuntimeError, match="not 'meta'"):
        plugin.convert_module(module)


# --------------------------------------------------------------------------- skipped on the device (sync-free)
class FloatLRRecorder(StepRecorder):
    """StepRecorder that reads the learning rate as a float (a device-held schedule keeps a tensor there)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.rows[-1]["lr"] = float(self.rows[-1]["lr"])


@pytest.mark.parametrize("consecutive", [False, True], ids=["nonconsecutive", "consecutive"])
def test_fused_optimizer_skips_on_the_device_exactly(consecutive):
    """The same injected overflows with torch's fused AdamW, which skips inside its kernel: the same guarantees as
    the host-decided path (skips bit-identical, scale rule, LR held on skipped steps, no torch LR warning), with the
    schedule held on the device; at teardown the scheduler is plain again with float learning rates."""
    inject = {0: "inf", 3: "nan", 5: "inf", 6: "inf", 10: "inf", 11: "inf", 12: "inf"}
    n_steps = 16
    knobs = dict(init_scale=2.0**10, growth_interval=3, hysteresis=2, min_scale=4.0, max_scale=2.0**12)
    module = ToyModule(inject=inject, lr=1e-2, lr_decay=0.8, optimizer="adamw_fused")
    rec = FloatLRRecorder()
    plugin = LossScalingPrecision("16-mixed", consecutive_hysteresis=consecutive, **knobs)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer = fit(module, plugins=[plugin], callbacks=[rec], max_steps=n_steps)
    assert _lr_warnings(records) == []
    flags = [s in inject for s in range(n_steps)]
    assert [r["weights_same"] for r in rec.rows] == flags
    assert [r["state_same"] for r in rec.rows] == flags
    expected = reference_scales(flags, init=2.0**10, growth=2.0, backoff=0.5, interval=3, hysteresis=2, lo=4.0,
                                hi=2.0**12, consecutive=consecutive)
    assert [r["scale"] for r in rec.rows] == expected
    applied = 0
    for r, overflow in zip(rec.rows, flags):
        applied += not overflow
        assert r["sched_pos"] == applied
        assert r["lr"] == 1e-2 * 0.8**applied  # float64 learning rates on the CPU: the host schedule's values
    assert plugin.skipped_steps == len(inject)
    assert trainer.optimizers[0].state_dict()["state"][0]["step"].item() == n_steps - len(inject)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert type(sched) is torch.optim.lr_scheduler.LambdaLR and sched.last_epoch == n_steps - len(inject)
    assert isinstance(trainer.optimizers[0].param_groups[0]["lr"], float)


def test_fused_resume_restores_held_schedule_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    inject = {1: "inf", 4: "inf", 5: "nan", 9: "inf"}
    knobs = dict(init_scale=2.0**10, growth_interval=2, hysteresis=2)
    full = ToyModule(inject=inject, n=48, optimizer="adamw_fused")
    p_full = LossScalingPrecision("16-mixed", **knobs)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="m-{step}", every_n_train_steps=6, save_top_k=-1)
    t_full = fit(full, plugins=[p_full], callbacks=[ckpt_cb], max_steps=12, enable_checkpointing=True)
    ckpt = tmp_path / "m-step=6.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["lr_schedulers"][0]["last_epoch"] == 6 - 3  # the held position, not the number of calls
    second = ToyModule(inject=inject, n=48, optimizer="adamw_fused")
    p2 = LossScalingPrecision("16-mixed", **knobs)
    t2 = fit(second, plugins=[p2], max_steps=12, ckpt_path=ckpt)
    assert p2.scaler.state_dict() == p_full.scaler.state_dict()
    for (k, a), b in zip(full.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    assert t2.lr_scheduler_configs[0].scheduler.last_epoch == t_full.lr_scheduler_configs[0].scheduler.last_epoch
    assert t2.optimizers[0].param_groups[0]["lr"] == t_full.optimizers[0].param_groups[0]["lr"]


def test_fused_on_min_scale_raise_names_the_step():
    inject = {s: "inf" for s in range(2, 12)}  # after a clean first step: the optimizer skips on the device
    plugin = LossScalingPrecision("16-mixed", init_scale=4.0, min_scale=2.0, hysteresis=1)
    with pytest.raises(RuntimeError, match=r"min_scale=2.0 and step 3 .*scale 2.0.*not recorded"):
        fit(ToyModule(inject=inject, optimizer="adamw_fused"), plugins=[plugin], max_steps=10)


def test_fused_on_min_scale_skip_warns_every_n():
    inject = {s: "inf" for s in range(2, 14)}
    plugin = LossScalingPrecision("16-mixed", init_scale=4.0, min_scale=4.0, hysteresis=1, on_min_scale="skip",
                                  warn_every_n_steps=5)
    with pytest.warns(RuntimeWarning, match="at its floor") as records:
        fit(ToyModule(inject=inject, optimizer="adamw_fused"), plugins=[plugin], max_steps=16)
    floor = [str(w.message) for w in records if "at its floor" in str(w.message)]
    assert len(floor) == 3 and "step 2 " in floor[0] and "step 7 " in floor[1] and "step 12 " in floor[2]
    assert plugin.skipped_steps == 12


def test_optimizer_without_device_lr_is_held_on_the_host_with_a_warning():
    class FusedSGD(ToyModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, fused=True)
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k),
                                     "interval": "step"}}

    plugin = LossScalingPrecision("16-mixed", init_scale=2.0**8)
    with pytest.warns(UserWarning, match="SGD does not take a device learning rate"):
        t = fit(FusedSGD(inject={1: "inf"}), plugins=[plugin], max_steps=4)
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 3


def test_scaler_argument_and_knob_shorthand():
    from lightning_effi.plugins import DynamicLossScaler

    s = DynamicLossScaler(init_scale=8.0, hysteresis=3)
    p = LossScalingPrecision("16-mixed", scaler=s)
    assert p.scaler is s and p.init_scale == 8.0 and p.hysteresis == 3
    with pytest.raises(ValueError, match=r"Give the scaler settings \['hysteresis'\] to the DynamicLossScaler"):
        LossScalingPrecision("16-mixed", scaler=s, hysteresis=2)
    with pytest.raises(TypeError, match="Invalid scaler"):
        LossScalingPrecision("16-mixed", scaler=torch.amp.GradScaler("cpu"))
