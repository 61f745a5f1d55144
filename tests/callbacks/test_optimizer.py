"""ConfigureOptimizer: the optimizer and schedule a Trainer callback supplies train a module exactly like a plain
PyTorch loop with that optimizer and schedule, whether the module has its own configure_optimizers or none; the
callback parses from LightningCLI arguments; bad input fails before training."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_effi.callbacks import ConfigureOptimizer
from lightning_effi.optim import Lamb
from tests._modules import SequentialRegressor, SequentialRegressorSGD, make_sequential, regression_data

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
# make_sequential()'s parameters by hand: the two Linear weights are decayed; biases and the LayerNorm ("1.") are not
DECAYED = ("0.weight", "3.weight")


def _cosine(warmup: int, total: int, floor: float):
    """Linear warmup to 1, then a half cosine from 1 down to ``floor`` at ``total``: the schedule's definition."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / (total - warmup))
        return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2
    return fn


def _reference(make_opt, make_sched, weight_decay: float):
    """A plain loop: the same net, data, hand-made decay groups, optimizer and per-step scheduler."""
    net = make_sequential()
    named = dict(net.named_parameters())
    groups = [{"params": [named[n] for n in DECAYED], "weight_decay": weight_decay},
              {"params": [p for n, p in named.items() if n not in DECAYED], "weight_decay": 0.0}]
    opt = make_opt(groups)
    sched = make_sched(opt)
    lrs = []
    for _, (x, y) in zip(range(STEPS), torch.utils.data.DataLoader(regression_data(), batch_size=4)):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(net(x), y).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return net, lrs


def _constant(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


# id: (module class, callback arguments, reference optimizer factory, reference scheduler factory, weight decay)
SPECS = {
    "no_configure_optimizers-adamw-warmup_cosine": (
        SequentialRegressor,
        dict(optimizer=torch.optim.AdamW, lr=0.05, optimizer_args={"betas": (0.9, 0.95)}, weight_decay=0.1,
             warmup_steps=1, min_lr_ratio=0.1),
        lambda g: torch.optim.AdamW(g, lr=0.05, betas=(0.9, 0.95)),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, _cosine(1, STEPS, 0.1)),
        0.1),
    "replaces_sgd-lamb_by_import_path": (
        SequentialRegressorSGD,
        dict(optimizer="lightning_effi.optim.Lamb", lr=0.05, weight_decay=0.01),
        lambda g: Lamb(g, lr=0.05),
        _constant,
        0.01),
    "replaces_sgd-sgd_momentum-steplr": (
        SequentialRegressorSGD,
        dict(optimizer=torch.optim.SGD, lr=0.1, optimizer_args={"momentum": 0.9}, weight_decay=0.05,
             lr_scheduler="torch.optim.lr_scheduler.StepLR", lr_scheduler_args={"step_size": 1, "gamma": 0.5}),
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        0.05),
    "no_configure_optimizers-factory": (
        SequentialRegressor,
        dict(optimizer=functools.partial(torch.optim.Adam, betas=(0.8, 0.9)), lr=0.02, weight_decay=0.0),
        lambda g: torch.optim.Adam(g, lr=0.02, betas=(0.8, 0.9)),
        _constant,
        0.0),
}


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
def test_trains_like_a_plain_loop_with_the_same_optimizer_and_schedule(spec):
    module_cls, kwargs, make_opt, make_sched, weight_decay = SPECS[spec]
    module = module_cls()
    trainer = _trainer([ConfigureOptimizer(**kwargs)])
    trainer.fit(module)
    ref, ref_lrs = _reference(make_opt, make_sched, weight_decay)

    assert trainer.global_step == STEPS
    (opt,) = trainer.optimizers
    assert type(opt) is type(make_opt([torch.nn.Parameter(torch.zeros(1))]))
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_lrs[-1], rel=1e-12)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(module.net.state_dict()[name], p, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(module.net[0].weight, make_sequential()[0].weight)  # it did train
    # after fit the module is its own again
    assert "configure_optimizers" not in vars(module)


def test_schedule_really_decays():
    # The cosine case above is not a constant schedule in disguise.
    lrs = _reference(lambda g: torch.optim.AdamW(g, lr=0.05), lambda o: torch.optim.lr_scheduler.LambdaLR(
        o, _cosine(1, STEPS, 0.1)), 0.1)[1]
    assert lrs == pytest.approx([0.05, 0.05 * 0.55, 0.005])


def test_module_without_configure_optimizers_fails_without_the_callback():
    # What the callback supplies: Lightning refuses such a module on its own.
    with pytest.raises(Exception, match="No `configure_optimizers\\(\\)` method defined"):
        _trainer([]).fit(SequentialRegressor())


def test_groups_are_built_from_the_parameters_at_optimizer_time():
    # A strategy may replace parameters (FSDP2 shards them) between setup and the optimizer: the groups must hold
    # the module's parameters when Lightning asks for the optimizer, not those at construction or setup.
    class Replace(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            pl_module.net[0].weight = torch.nn.Parameter(pl_module.net[0].weight.detach().clone())

    module = SequentialRegressor()
    trainer = _trainer([ConfigureOptimizer(torch.optim.AdamW, lr=0.01), Replace()], max_steps=1)
    trainer.fit(module)
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in module.parameters()}


def test_second_fit_and_plain_validate_work():
    module = SequentialRegressorSGD()
    cb = ConfigureOptimizer(Lamb, lr=0.01)
    _trainer([cb], max_steps=1).fit(module)
    trainer = _trainer([cb], max_steps=2)
    trainer.fit(module)
    assert isinstance(trainer.optimizers[0], Lamb) and trainer.global_step == 2
    # Without the callback the module's own optimizer is back.
    trainer = _trainer([], max_steps=1)
    trainer.fit(module)
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        (dict(optimizer="torch.optim.Nope"), ValueError,
         r"Invalid optimizer 'torch.optim.Nope': 'torch.optim' has no importable 'Nope'"),
        (dict(optimizer="no_such_package.Opt"), ValueError, r"Invalid optimizer 'no_such_package.Opt'"),
        (dict(optimizer="AdamW"), ValueError, r"Invalid optimizer 'AdamW': give the full import path"),
        (dict(optimizer="torch.nn.Linear"), TypeError, r"not a subclass of torch.optim.optimizer.Optimizer"),
        (dict(optimizer=torch.nn.Linear), TypeError, r"not a subclass of torch.optim.Optimizer"),
        (dict(optimizer=3), TypeError, r"Invalid optimizer 3"),
        (dict(lr=0.0), ValueError, r"Invalid lr 0.0: must be > 0"),
        (dict(optimizer_args={"betaz": (0.9, 0.9)}), ValueError, r"Invalid optimizer_args \['betaz'\]"),
        (dict(optimizer_args={"weight_decay": 0.1}), ValueError, r"set ConfigureOptimizer\(weight_decay=...\)"),
        (dict(optimizer_args={"lr": 0.1}), ValueError, r"set ConfigureOptimizer\(lr=...\)"),
        (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay -0.1"),
        (dict(no_decay="bias"), TypeError, r"write \['bias'\]"),
        (dict(no_adapt=["(unclosed"]), ValueError, r"not a valid regex"),
        (dict(warmup_steps=-1), ValueError, r"Invalid warmup_steps -1"),
        (dict(min_lr_ratio=1.5), ValueError, r"Invalid min_lr_ratio 1.5"),
        (dict(max_steps=0), ValueError, r"Invalid max_steps 0"),
        (dict(lr_scheduler="torch.optim.lr_scheduler.Nope"), ValueError, r"Invalid lr_scheduler"),
        (dict(lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau), ValueError, r"needs a monitored metric"),
        (dict(lr_scheduler=torch.optim.lr_scheduler.StepLR, warmup_steps=10, lr_scheduler_args={"step_size": 1}),
         ValueError, r"replaces the warmup \+ cosine schedule"),
        (dict(lr_scheduler=torch.optim.lr_scheduler.StepLR, lr_scheduler_args={"step_sise": 1}), ValueError,
         r"Invalid lr_scheduler_args \['step_sise'\]"),
        (dict(lr_scheduler_args={"step_size": 1}), ValueError, r"without an lr_scheduler"),
        (dict(lr_scheduler_interval="batch"), ValueError, r"Invalid lr_scheduler_interval 'batch'"),
    ],
    ids=lambda v: None if isinstance(v, (dict, type)) else str(v)[:40],
)
def test_constructor_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        ConfigureOptimizer(**{"optimizer": torch.optim.AdamW, **kwargs})


def _untrained_after(fn, module):
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fn()
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_unknowable_schedule_length_is_reported_before_training():
    module = SequentialRegressor()
    trainer = _trainer([ConfigureOptimizer(torch.optim.AdamW, min_lr_ratio=0.1)], max_steps=-1, max_epochs=-1)
    with pytest.raises(ValueError, match=r"cannot be estimated for a run without max_steps or max_epochs; set "
                                         r"Trainer\(max_steps=...\) or ConfigureOptimizer\(max_steps=...\)"):
        _untrained_after(lambda: trainer.fit(module), module)
    # a constant schedule needs no length
    _trainer([ConfigureOptimizer(torch.optim.AdamW)], max_steps=-1, max_epochs=1).fit(SequentialRegressor())


def test_rule_matching_no_parameter_is_reported_before_training():
    module = SequentialRegressor()
    trainer = _trainer([ConfigureOptimizer(torch.optim.AdamW, no_decay=["bias", r"^head\."])])
    with pytest.raises(ValueError, match=r"Invalid no_decay entry '\^head\\\\.'"):
        _untrained_after(lambda: trainer.fit(module), module)


def test_both_cli_optimizer_and_callback_is_a_conflict():
    module = SequentialRegressorSGD()
    module.configure_optimizers = lambda: torch.optim.Adam(module.parameters())  # as LightningCLI's --optimizer does
    with pytest.raises(RuntimeError, match=r"already replaced on this instance .* choose the optimizer in one place"):
        _trainer([ConfigureOptimizer(Lamb)]).fit(module)


# ----------------------------------------------------------------------------------------------------- LightningCLI
def test_callback_parses_from_cli_arguments_and_yaml(tmp_path, capsys, monkeypatch):
    from lightning_effi.cli import cli

    args = ["--trainer.callbacks+=lightning_effi.callbacks.ConfigureOptimizer",
            "--trainer.callbacks.optimizer=lightning_effi.optim.Lamb", "--trainer.callbacks.lr=0.01",
            "--trainer.callbacks.optimizer_args={betas: [0.9, 0.98]}", "--trainer.callbacks.warmup_steps=10",
            "--trainer.callbacks.min_lr_ratio=0.1", "--trainer.callbacks.no_adapt=[bias, norm]"]
    with pytest.raises(SystemExit) as e:
        cli(["fit", "--config", str(REPO / "configs/gpt_tiny.yaml"), *args, "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_effi.callbacks.ConfigureOptimizer" in printed
    assert "optimizer: lightning_effi.optim.Lamb" in printed and "lr: 0.01" in printed

    # The printed config is itself a config: it trains, with the callback's Lamb in place of the module's AdamW.
    (tmp_path / "full.yaml").write_text(printed)
    monkeypatch.chdir(tmp_path)
    run = cli(["fit", "--config", str(tmp_path / "full.yaml"), "--trainer.max_steps=1", "--trainer.accelerator=cpu",
               "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
               "--trainer.enable_progress_bar=false", "--data.init_args.max_bytes=50000"])
    (cb,) = [c for c in run.trainer.callbacks if isinstance(c, ConfigureOptimizer)]
    assert cb.optimizer is Lamb and cb.optimizer_kwargs == {"lr": 0.01, "betas": [0.9, 0.98]}
    assert (cb.warmup_steps, cb.min_lr_ratio, cb.no_adapt) == (10, 0.1, ["bias", "norm"])
    (opt,) = run.trainer.optimizers
    assert type(opt) is Lamb and run.trainer.global_step == 1
    # decayed and adapted weights; biases and norms neither (no_decay's default, no_adapt as given)
    assert [(g["weight_decay"], g["adapt"]) for g in opt.param_groups] == [(0.01, True), (0.0, False)]


def test_cli_bad_optimizer_name_is_reported(capsys):
    from lightning_effi.cli import cli

    with pytest.raises(ValueError, match=r"Invalid optimizer 'lightning_effi.optim.Lamm'"):
        cli(["fit", "--config", str(REPO / "configs/gpt_tiny.yaml"),
             "--trainer.callbacks+=lightning_effi.callbacks.ConfigureOptimizer",
             "--trainer.callbacks.optimizer=lightning_effi.optim.Lamm", "--trainer.max_steps=1"])
