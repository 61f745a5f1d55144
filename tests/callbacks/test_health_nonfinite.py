"""TrainingHealthMonitor's non-finite policy without a loss scaler: a skipped step leaves weights and optimizer state
as a plain loop that never applied it; 'raise' names the step and the parameters; steps without a problem read
nothing on the host (tests/test_sync_free.py counts that for the whole stack)."""

from __future__ import annotations

import logging
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_effi.callbacks import TrainingHealthMonitor
from lightning_effi.optim import Lamb

BAD_PARAM = "net.2.bias"


def _data(n: int = 10, seed: int = 0) -> torch.utils.data.DataLoader:
    """``n`` batches of 4 in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(4 * n, 4, generator=g), torch.randn(4 * n, 1, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=4)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _loss(net: nn.Module, x, y, poisoned: bool) -> torch.Tensor:
    loss = F.mse_loss(net(x), y)
    if poisoned:  # a NaN gradient on one parameter only, so the report can name it
        loss = loss + (net[2].bias * float("nan")).sum()
    return loss


class Poisoned(pl.LightningModule):
    def __init__(self, make_opt, bad_steps=(3,)) -> None:
        super().__init__()
        self.net, self.make_opt, self.bad_steps = _net(), make_opt, set(bad_steps)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return _loss(self.net, x, y, self.global_step in self.bad_steps)

    def configure_optimizers(self):
        return self.make_opt(self.parameters())


def _fit(module, monitor, steps=8, precision="32-true", accelerator="cpu"):
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, precision=precision,
                         callbacks=[monitor])
    trainer.fit(module, _data())
    return trainer


def _reference(make_opt, bad_steps, steps=8, device="cpu"):
    """A plain loop that never applies the bad steps (the batch is consumed, the optimizer not stepped)."""
    net = _net().to(device)
    opt = make_opt(net.parameters())
    for step, (x, y) in zip(range(steps), _data()):
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        _loss(net, x, y, False).backward()
        if step not in bad_steps:
            opt.step()
    return net, opt


OPTIMIZERS = {
    "adamw-fused": partial(torch.optim.AdamW, lr=1e-2, fused=True),  # skips on the device (found_inf)
    "lamb": partial(Lamb, lr=1e-2),  # skips on the device (found_inf)
    "sgd": partial(torch.optim.SGD, lr=0.1, momentum=0.9),  # cannot: the host reads the flag, the grads go
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_equals_a_loop_that_never_applied_the_step(name, caplog):
    make_opt = OPTIMIZERS[name]
    module = Poisoned(make_opt, bad_steps=(3, 5))
    monitor = TrainingHealthMonitor(log_every_n_steps=4, on_nonfinite="skip")
    with caplog.at_level(logging.WARNING, logger="lightning_effi.callbacks.health"):
        trainer = _fit(module, monitor)
    assert trainer.global_step == 8
    ref, ref_opt = _reference(make_opt, {3, 5})
    for (n, p), q in zip(module.net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=n)
    opt = trainer.optimizers[0]
    for p, q in zip(module.net.parameters(), ref.parameters(), strict=True):  # moments and step counts too
        for key, value in ref_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, atol=0, rtol=0, msg=key)
    assert monitor.last_metrics["health/nonfinite_steps"] == 2.0  # logged at step 8
    reports = [r.getMessage() for r in caplog.records if "no loss scaler" in r.getMessage()]
    assert len(reports) == 2 and "optimizer step 3 skipped" in reports[0] and "optimizer step 5" in reports[1]
    assert all(BAD_PARAM in r for r in reports)
    assert "found_inf" not in vars(opt)  # nothing left on the optimizer after fit


def test_raise_names_the_step_and_parameters_and_keeps_weights_finite():
    module = Poisoned(OPTIMIZERS["adamw-fused"], bad_steps=(2,))
    monitor = TrainingHealthMonitor(log_every_n_steps=4)  # on_nonfinite="raise" is the default
    with pytest.raises(RuntimeError, match=rf"non-finite gradients at optimizer step 2 without a loss scaler .*"
                                           rf"{BAD_PARAM}.*still finite.*on_nonfinite='skip'"):
        _fit(module, monitor)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_raise_without_device_skip_says_the_weights_may_be_lost():
    module = Poisoned(OPTIMIZERS["sgd"], bad_steps=(1,))
    with pytest.raises(RuntimeError, match=r"optimizer step 1 .*the weights may hold inf/NaN"):
        _fit(module, TrainingHealthMonitor(log_every_n_steps=4))


def test_a_run_shorter_than_the_logging_interval_still_raises_at_its_end():
    module = Poisoned(OPTIMIZERS["lamb"], bad_steps=(1,))
    with pytest.raises(RuntimeError, match=r"optimizer step 1 without a loss scaler"):
        _fit(module, TrainingHealthMonitor(log_every_n_steps=50), steps=3)


def test_bf16_mixed_skip_matches_the_autocast_loop():
    make_opt = OPTIMIZERS["adamw-fused"]
    module = Poisoned(make_opt, bad_steps=(4,))
    _fit(module, TrainingHealthMonitor(log_every_n_steps=4, on_nonfinite="skip"), precision="bf16-mixed")
    net = _net()
    opt = make_opt(net.parameters())
    for step, (x, y) in zip(range(8), _data()):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(net(x), y)
        loss.backward()
        if step != 4:
            opt.step()
    for p, q in zip(module.net.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_policy_off_with_a_loss_scaler_and_when_none():
    from lightning_effi.plugins import LossScalingPrecision

    # the scaler skips the step itself: the monitor adds no check and raises nothing
    module = Poisoned(OPTIMIZERS["adamw-fused"], bad_steps=(2,))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         plugins=[LossScalingPrecision("16-mixed", init_scale=2.0**4)],
                         callbacks=[monitor := TrainingHealthMonitor(log_every_n_steps=3)])
    trainer.fit(module, _data())
    assert monitor._nf is None
    # on_nonfinite=None: no check at all, the NaN goes through as in stock Lightning
    module = Poisoned(OPTIMIZERS["sgd"], bad_steps=(2,))
    _fit(module, TrainingHealthMonitor(log_every_n_steps=3, on_nonfinite=None), steps=4)
    assert not torch.isfinite(module.net[2].bias).all()


def test_invalid_policy():
    with pytest.raises(ValueError, match=r"Invalid on_nonfinite 'ignore': must be 'raise', 'skip' or None"):
        TrainingHealthMonitor(on_nonfinite="ignore")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw-fused", "lamb"])
def test_on_cuda_one_kernel_checks_and_the_optimizer_skips(name):
    """fp32 gradients on a GPU: GradScaler's one-kernel check, the skip inside the optimizer, the step named."""
    make_opt = OPTIMIZERS[name]
    module = Poisoned(make_opt, bad_steps=(3, 5))
    monitor = TrainingHealthMonitor(log_every_n_steps=4, on_nonfinite="skip")
    _fit(module, monitor, accelerator="cuda")
    ref, _ = _reference(make_opt, {3, 5}, device="cuda")
    for p, q in zip(module.net.parameters(), ref.parameters(), strict=True):  # fit moved the module back to the CPU
        torch.testing.assert_close(p, q.cpu(), atol=1e-6, rtol=1e-5)  # another kernel order than the loop's
    assert monitor.last_metrics["health/nonfinite_steps"] == 2.0
    with pytest.raises(RuntimeError, match=r"optimizer step 2 without a loss scaler .*<not recorded: checked on the "
                                           r"GPU.*still finite"):
        _fit(Poisoned(make_opt, bad_steps=(2,)), TrainingHealthMonitor(log_every_n_steps=4), accelerator="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_check_flags_exactly_the_non_finite_parameters(dtype):
    """The CPU check's per-parameter flags against torch.isfinite: +inf, -inf alone, NaN, huge finite values and an
    empty parameter."""
    from types import SimpleNamespace

    from lightning_effi.callbacks.health import _NonFinite

    net = nn.ModuleDict({k: nn.Linear(3, 300) for k in ("posinf", "neginf", "nan", "huge", "fine")}).to(dtype)
    net["empty"] = nn.Linear(0, 4).to(dtype)
    for p in net.parameters():
        p.grad = torch.randn(p.shape).to(dtype)
    net["posinf"].weight.grad[7, 1] = float("inf")
    net["neginf"].bias.grad[100] = float("-inf")
    net["nan"].weight.grad[0, 0] = float("nan")
    net["huge"].weight.grad.fill_(3e38)  # finite: an L2 norm would overflow, the check must not
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    nf = _NonFinite(SimpleNamespace(world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu"))), "raise")
    nf.check(opt, 0, net)
    names = [n for n, _ in net.named_parameters()]
    expected = [not bool(torch.isfinite(p.grad).all()) for p in net.parameters()]
    assert sum(expected) == 3
    assert [bool(f) for f in nf._flags.tolist()] == expected, list(zip(names, nf._flags.tolist()))
    assert float(nf._found) == 1.0
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    nf.check(opt, 1, net)
    assert float(nf._found) == 0.0
