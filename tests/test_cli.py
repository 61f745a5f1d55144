"""The `effi` LightningCLI: every shipped YAML parses, the README's main job runs, and export round-trips."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_effi.cli import cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["fit", "--config", str(config), "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: lightning_effi.models." in out
    assert "block_size" in out


def test_bad_config_value_is_reported_before_training(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["fit", "--config", str(REPO / "configs/gpt_tiny.yaml"), "--model.init_args.n_layer=zero"])
    assert e.value.code != 0
    assert "n_layer" in capsys.readouterr().err


def _effi(args, cwd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_effi.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_effi_fit_gpt_tiny_three_steps_then_export(tmp_path):
    proc = _effi(["fit", "--config", str(REPO / "configs/gpt_tiny.yaml"), "--trainer.max_steps=3"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    assert "effi: training finished" in out and "final val loss" in out and "unigram entropy" in out
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (run / "metrics.csv").is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3

    from lightning_effi.models import GPT

    ref = GPT(block_size=128, n_layer=4, n_head=4, d_model=128)
    ref.load_state_dict({k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")})
    x = torch.randint(0, 256, (2, 32))
    for strip in ([], ["--strip-prefix", "model."]):
        proc = _effi(["export", str(ckpt), str(tmp_path / "gpt.pt"), *strip], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        model = GPT.from_export(tmp_path / "gpt.pt")  # the config of configs/gpt_tiny.yaml comes with the file
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert not torch.equal(model.wte.weight, GPT(block_size=128, n_layer=4, n_head=4, d_model=128).wte.weight)


def test_export_rejects_missing_and_foreign_files(tmp_path):
    from lightning_effi.export import export_checkpoint

    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "o.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        export_checkpoint(tmp_path / "foreign.pt", tmp_path / "o.pt")


def test_trainer_flags_that_disable_default_callbacks_are_honoured(tmp_path):
    proc = _effi(["fit", "--config", str(REPO / "configs/gpt_tiny.yaml"), "--trainer.max_steps=1",
                  "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
                  "--trainer.limit_val_batches=1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "effi: training finished" in proc.stdout
    assert not list(tmp_path.glob("runs/lightning_logs/version_0/checkpoints/*.ckpt"))


def test_module_without_validation_finishes_cleanly(tmp_path):
    (tmp_path / "mymod.py").write_text(
        "import torch, lightning.pytorch as pl\n"
        "class M(pl.LightningModule):\n"
        "    def __init__(self):\n        super().__init__(); self.w = torch.nn.Linear(2, 1)\n"
        "    def training_step(self, b, i):\n        return self.w(b).sum()\n"
        "    def configure_optimizers(self):\n        return torch.optim.SGD(self.parameters(), lr=0.1)\n"
        "class D(pl.LightningDataModule):\n"
        "    def train_dataloader(self):\n        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)\n"
    )
    env_path = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_path}
    proc = subprocess.run([sys.executable, "-m", "lightning_effi.cli", "fit", "--model", "mymod.M", "--data", "mymod.D",
                           "--trainer.max_steps=2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "effi: training finished" in proc.stdout and "final val loss" not in proc.stdout


def test_export_errors_name_the_file_and_prefix_gets_its_dot(tmp_path):
    from lightning_effi.export import export_checkpoint

    bad = tmp_path / "garbage.ckpt"
    bad.write_text("garbage\n")
    with pytest.raises(ValueError, match="garbage.ckpt' could not be read as a checkpoint"):
        export_checkpoint(bad, tmp_path / "o.pt")
    torch.save({"state_dict": {"model.w": torch.ones(1), "model_x.w": torch.zeros(1)}}, tmp_path / "a.ckpt")
    export_checkpoint(tmp_path / "a.ckpt", tmp_path / "o.pt", strip_prefix="model")
    assert list(torch.load(tmp_path / "o.pt")["state_dict"]) == ["w"]
    # a directory as the destination: named with the fix, before anything is read or written
    (tmp_path / "outdir").mkdir()
    with pytest.raises(ValueError, match=r"Export destination '.*outdir' is a directory; give the file to write, "
                                         r"e\.g\. '.*outdir/a\.pt'"):
        export_checkpoint(tmp_path / "a.ckpt", tmp_path / "outdir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "garbage.ckpt", "o.pt", "outdir"]  # no .tmp


@pytest.mark.parametrize(("name", "cls", "extra"), [
    ("effi_fsdp", "lightning_effi.strategies.fsdp.EffiFSDPStrategy", "tensor_parallel_size: 2"),
    ("effi_deepspeed_stage_2", "lightning_effi.strategies.deepspeed.EffiDeepSpeedStrategy", "stage: 2"),
])
def test_registered_strategy_name_takes_init_args(name, cls, extra, capsys):
    """``--trainer.strategy=<registry name>`` with ``--trainer.strategy.init_args.*``: the name's class with the
    registry's own arguments (a DeepSpeed stage) and the given ones."""
    option = ("--trainer.strategy.init_args.tensor_parallel_size=2" if name == "effi_fsdp"
              else "--trainer.strategy.init_args.offload_optimizer=false")
    with pytest.raises(SystemExit):
        cli(["fit", "--config", str(REPO / "configs/gpt_tiny.yaml"), f"--trainer.strategy={name}", option,
             "--print_config"])
    out = capsys.readouterr().out
    assert f"class_path: {cls}" in out and extra in out


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["gpt_tp.yaml", "gpt_2d.yaml"])
def test_tensor_parallel_configs_train_on_cpu_then_export(config, tmp_path):
    proc = _effi(["fit", "--config", str(REPO / "configs" / config), "--trainer.max_steps=2",
                  "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
                  "--data.init_args.max_bytes=200000"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "effi: training finished" in proc.stdout
    ckpt = tmp_path / "runs/lightning_logs/version_0/checkpoints/last.ckpt"
    out = _effi(["export", str(ckpt), str(tmp_path / "gpt.pt"), "--strip-prefix", "model."], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    from lightning_effi.models import GPT

    assert isinstance(GPT.from_export(tmp_path / "gpt.pt"), GPT)  # strict: every key
