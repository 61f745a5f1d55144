"""The `effi` command beyond configs: --optimizer/--lr_scheduler through LightningCLI for a module without
configure_optimizers, the subcommand list, subcommands that start without torch, and quiet defaults that --verbose
turns off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_effi.callbacks import ConfigureOptimizer
from lightning_effi.cli import cli
from lightning_effi.optim import Lamb

REPO = Path(__file__).resolve().parents[1]
# TinyCorpusLM has no configure_optimizers: the optimizer can only come from the command line.
MODULE = ["--model=tests._modules.TinyCorpusLM", "--data=lightning_effi.models.CorpusDataModule",
          "--data.init_args.block_size=16", "--data.init_args.batch_size=4", "--data.init_args.max_bytes=30000"]
RUN = ["--trainer.max_steps=3", "--trainer.accelerator=cpu", "--trainer.logger=false",
       "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
       "--seed_everything=0"]


def _fit(*args: str):
    return cli(["fit", *MODULE, *RUN, *args])


def test_cli_optimizer_and_scheduler_train_a_module_without_configure_optimizers(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    run = _fit("--optimizer=lightning_effi.optim.Lamb", "--optimizer.lr=0.01", "--optimizer.weight_decay=0.1",
               "--lr_scheduler=torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size=1",
               "--lr_scheduler.gamma=0.5")
    (opt,) = run.trainer.optimizers
    assert type(opt) is Lamb and run.trainer.global_step == 3
    names = {id(p): n for n, p in run.model.named_parameters()}
    groups = [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in opt.param_groups]
    # by hand: the embedding and head weights decay; the head bias and the LayerNorm do not
    assert groups == [(0.1, ["emb.weight", "head.weight"]), (0.0, ["head.bias", "norm.bias", "norm.weight"])]
    # LightningCLI's own method returns the scheduler without an interval: stepped per epoch, so not yet here
    (cfg,) = run.trainer.lr_scheduler_configs
    assert type(cfg.scheduler) is torch.optim.lr_scheduler.StepLR and cfg.interval == "epoch"
    assert opt.param_groups[0]["lr"] == 0.01

    # the same as giving the callback directly, parameter for parameter
    ref = cli(["fit", *MODULE, *RUN, "--trainer.callbacks+=lightning_effi.callbacks.ConfigureOptimizer",
               "--trainer.callbacks.optimizer=lightning_effi.optim.Lamb", "--trainer.callbacks.lr=0.01",
               "--trainer.callbacks.weight_decay=0.1"])
    for (n, p), (n_ref, p_ref) in zip(run.model.named_parameters(), ref.model.named_parameters(), strict=True):
        assert n == n_ref and torch.equal(p, p_ref), n
    # and it trained: the parameters moved from the seed's initialisation
    from tests._modules import TinyCorpusLM

    init = TinyCorpusLM(block_size=16)
    assert not torch.equal(init.head.weight, run.model.head.weight)


def test_cli_optimizer_and_callback_together_is_a_conflict(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"Both --optimizer and a ConfigureOptimizer callback .* one place"):
        _fit("--optimizer=torch.optim.AdamW", "--trainer.callbacks+=lightning_effi.callbacks.ConfigureOptimizer",
             "--trainer.callbacks.optimizer=torch.optim.SGD")


def test_cli_without_optimizer_leaves_the_module_s_own(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    run = cli(["fit", "--config", str(REPO / "configs/gpt_tiny.yaml"), *RUN[:-1], "--data.init_args.max_bytes=30000"])
    assert type(run.trainer.optimizers[0]) is torch.optim.AdamW
    assert not any(isinstance(c, ConfigureOptimizer) for c in run.trainer.callbacks)


def _effi(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EFFI_VERBOSE"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "lightning_effi.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_help_lists_every_subcommand(tmp_path):
    proc = _effi("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for sub in ("effi fit", "effi export", "effi plot", "effi --verbose", "{fit,validate,test,predict}"):
        assert sub in proc.stdout, sub


@pytest.mark.parametrize("sub", ["export", "plot"])
def test_subcommands_that_need_no_torch_do_not_import_it(sub):
    # Import time is what makes help slow; torch and Lightning are most of it. Counted as modules, not seconds.
    code = "\n".join(["import sys", "from lightning_effi.cli import main", "try:", f"    main([{sub!r}, '--help'])",
                      "except SystemExit as e:", "    assert e.code in (0, None), e.code",
                      "print('HEAVY', sorted(m for m in ('torch', 'lightning') if m in sys.modules))"])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: effi " + sub in proc.stdout
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


NOISE = ("💡 Tip", "LeafSpec", "FLOPs", "Trainer already configured with model summary")


def test_quiet_by_default_and_verbose_brings_upstream_messages_back(tmp_path):
    args = ["fit", "--config", str(REPO / "configs/gpt_tiny.yaml"), "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0", "--data.init_args.max_bytes=30000", "--trainer.accelerator=cpu"]
    quiet = _effi(*args, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    text = quiet.stdout + quiet.stderr
    assert [n for n in NOISE if n in text] == [], text[-3000:]
    assert "Params" in text  # the model summary itself is still printed

    loud = _effi("--verbose", *args, cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr[-3000:]
    text = loud.stdout + loud.stderr
    assert "💡 Tip" in text and "LeafSpec" in text, text[-3000:]
