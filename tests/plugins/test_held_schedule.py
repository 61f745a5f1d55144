"""HeldSchedule alone: the device-held schedule gives exactly what holding the scheduler on the host gives."""

from __future__ import annotations

import random

import pytest
import torch
from torch.optim import lr_scheduler as S

from lightning_effi.plugins.held_schedule import HeldSchedule, can_hold


def _opt():
    p = torch.nn.Parameter(torch.ones(2))
    q = torch.nn.Parameter(torch.ones(3))
    return torch.optim.AdamW([{"params": [p]}, {"params": [q], "lr": 5e-3}], lr=1e-2, fused=True)


SCHEDULERS = {
    "lambda": lambda o: S.LambdaLR(o, lambda k: 0.9**k),
    "lambda-per-group": lambda o: S.LambdaLR(o, [lambda k: 1.0 / (k + 1), lambda k: 0.5 + 0.01 * k]),
    "cosine": lambda o: S.CosineAnnealingLR(o, T_max=7, eta_min=1e-4),
    "linear": lambda o: S.LinearLR(o, start_factor=0.1, total_iters=5),
    "warmup+cosine": lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.2, total_iters=3), S.CosineAnnealingLR(o, 10)],
                                              milestones=[3]),
    "multistep": lambda o: S.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.3),
    "onecycle": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=40, cycle_momentum=False),
    "exponential": lambda o: S.ExponentialLR(o, gamma=0.95),
}


def _host_held(make, flags):
    """The reference: the host knows each skip and simply does not step the scheduler for it."""
    opt = _opt()
    sched = make(opt)
    lrs = []
    for skipped in flags:
        if not skipped:
            sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return lrs, sched.state_dict()


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_device_hold_equals_host_hold(name):
    rng = random.Random(name)
    flags = [rng.random() < 0.3 for _ in range(30)]
    want, want_state = _host_held(SCHEDULERS[name], flags)
    opt = _opt()
    sched = SCHEDULERS[name](opt)
    hold = HeldSchedule(sched, torch.device("cpu"), torch.float64)
    got = []
    for skipped in flags:
        hold.add_pending(torch.tensor(1.0 if skipped else 0.0))
        hold.step()
        got.append([float(g["lr"]) for g in opt.param_groups])
    assert got == want  # float64 learning rates: bitwise the host's values
    state = hold.state_dict()
    assert state["last_epoch"] == want_state["last_epoch"] == flags.count(False)
    assert state["_last_lr"] == want_state["_last_lr"]
    hold.release()
    assert [g["lr"] for g in opt.param_groups] == want[-1]
    assert type(opt.param_groups[0]["lr"]) is float


def test_learning_rates_are_one_device_buffer_and_the_table_is_trimmed():
    opt = _opt()
    hold = HeldSchedule(S.LambdaLR(opt, lambda k: 1.0 / (1 + k)), torch.device("cpu"), torch.float32)
    lr0, lr1 = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
    assert lr0.dtype == torch.float32 and lr0.data_ptr() + 4 == lr1.data_ptr()
    for _ in range(2000):
        hold.add_pending(torch.tensor(0.0))
        hold.step()
    assert hold.position() == 2000 and hold._table.shape[0] < 600  # earlier positions were dropped
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2 / 2001)


def test_optimizer_state_dict_holds_float_learning_rates():
    # A fresh optimizer loading the checkpoint has floats there (torch.distributed.checkpoint refuses a mismatch).
    opt = _opt()
    hold = HeldSchedule(S.LambdaLR(opt, lambda k: 0.5**k), torch.device("cpu"), torch.float64)
    for _ in range(3):
        hold.add_pending(torch.tensor(0.0))
        hold.step()
    saved = opt.state_dict()["param_groups"]
    assert [type(g["lr"]) for g in saved] == [float, float]
    assert [g["lr"] for g in saved] == [1e-2 * 0.5**3, 5e-3 * 0.5**3]
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the live groups keep their device tensors
    hold.release()
    assert not opt._optimizer_state_dict_post_hooks


def test_momentum_cycling_cannot_be_held():
    opt = _opt()
    assert "cycle_momentum" in can_hold(S.OneCycleLR(opt, max_lr=0.1, total_steps=10))
    with pytest.raises(RuntimeError, match="momentum"):
        HeldSchedule(S.OneCycleLR(opt, max_lr=0.1, total_steps=10), torch.device("cpu"))
