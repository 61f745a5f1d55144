"""`effi plot`: the panels drawn from a real run's TensorBoard and CSV logs match what the loggers recorded (read
back independently), the two readers agree, and a directory without logs is refused with a message naming it."""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from lightning_effi.callbacks import AccumulationScheduler, TrainingHealthMonitor
from lightning_effi.cli import cli
from lightning_effi.models import CorpusDataModule, GPTLightningModule
from lightning_effi.plot import Panel, main, panels, plot_run, read_runs
from lightning_effi.plugins import LossScalingPrecision

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# What the run below logs, panel by panel, in drawing order: the GPT's losses, LearningRateMonitor's two parameter
# groups (decay / no decay), TrainingHealthMonitor under fp16 loss scaling, AccumulationScheduler's factor.
EXPECTED = {
    "loss": ("train/loss", "val/loss"),
    "learning rate": ("lr-AdamW/pg1", "lr-AdamW/pg2"),
    "gradient norm": ("health/grad_norm",),
    "loss scale": ("health/loss_scale",),
    "skipped steps (cumulative)": ("health/skipped_steps",),
    "accumulation factor": ("accumulation/factor",),
    "tokens/s": ("health/tokens_per_sec",),
}
# Logged as well, and not drawn.
NOT_PLOTTED = {"train/tokens", "accumulation/global_batch_samples", "accumulation/global_batch_tokens", "epoch"}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    """A 10-step fp16 GPT run logged by a TensorBoardLogger (under tb/) and a CSVLogger (under csv/) at once."""
    root = tmp_path_factory.mktemp("run")
    module = GPTLightningModule(block_size=16, n_layer=1, n_head=2, d_model=16, warmup_steps=2, max_steps=10)
    data = CorpusDataModule(block_size=16, batch_size=4, max_bytes=40_000, val_fraction=0.2)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=10, log_every_n_steps=2, val_check_interval=5, limit_val_batches=2,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        logger=[TensorBoardLogger(root, name="tb", default_hp_metric=False), CSVLogger(root, name="csv")],
        plugins=[LossScalingPrecision("16-mixed")],
        callbacks=[AccumulationScheduler({0: 1, 4: 2}, unit="step"), TrainingHealthMonitor(log_every_n_steps=2),
                   LearningRateMonitor(logging_interval="step")],
    )
    trainer.fit(module, datamodule=data)
    return root


def _event_tags(directory: Path) -> set[str]:
    acc = EventAccumulator(str(directory), size_guidance={SCALARS: 0})
    acc.Reload()
    return set(acc.Tags()["scalars"])


def _check_png(path: Path, titles: list[str]) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    with Image.open(path) as img:
        assert img.text["Description"] == "; ".join(titles)


def test_tensorboard_run_plots_one_panel_per_logged_kind(logged_run):
    version = logged_run / "tb" / "version_0"
    assert list(version.glob("events.out.tfevents.*"))
    tags = _event_tags(version)
    assert tags == set().union(*EXPECTED.values()) | NOT_PLOTTED
    assert panels(tags) == [Panel(title, names) for title, names in EXPECTED.items()]

    out = plot_run(logged_run / "tb")
    assert out == logged_run / "tb" / "metrics.png"
    _check_png(out, list(EXPECTED))


def test_csv_run_plots_the_same_panels(logged_run, tmp_path):
    (metrics_csv,) = (logged_run / "csv").rglob("metrics.csv")
    with metrics_csv.open(newline="") as f:
        columns = set(next(csv.reader(f))) - {"step"}
    assert columns == set().union(*EXPECTED.values()) | NOT_PLOTTED

    out = plot_run(str(logged_run / "csv"), tmp_path / "sub" / "csv.png")
    assert out == tmp_path / "sub" / "csv.png"
    _check_png(out, list(EXPECTED))


def test_tensorboard_and_csv_readers_agree(logged_run):
    (tb,) = read_runs(logged_run / "tb").values()
    (from_csv,) = read_runs(logged_run / "csv").values()
    assert set(tb) == set(from_csv)
    for name, series in from_csv.items():
        assert [s for s, _ in tb[name]] == [s for s, _ in series], name
        # TensorBoard keeps float32
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(tb[name], series)), name


def test_event_files_win_over_csv_and_several_runs_are_labelled(logged_run, tmp_path):
    shutil.copytree(logged_run / "tb" / "version_0", tmp_path / "version_0")
    shutil.copytree(logged_run / "tb" / "version_0", tmp_path / "version_1")
    shutil.copy(next((logged_run / "csv").rglob("metrics.csv")), tmp_path / "version_1")
    runs = read_runs(tmp_path)
    assert sorted(runs) == ["version_0", "version_1"]
    assert runs["version_0"] == runs["version_1"]  # the same events, not the CSV's rows
    _check_png(plot_run(tmp_path), list(EXPECTED))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# (files to create under the run directory, exception, message regex)
ERRORS = [
    pytest.param({}, FileNotFoundError, r"No logged metrics under '.*empty'.*events\.out\.tfevents\.\*.*metrics\.csv",
                 id="empty"),
    pytest.param(None, FileNotFoundError, r"Run directory '.*empty' does not exist", id="missing"),
    pytest.param({"v0/metrics.csv": "epoch,step,my_loss\n0,1,2.5\n"}, ValueError,
                 r"None of the metrics logged under '.*empty' is plotted \(logged: \['epoch', 'my_loss'\]",
                 id="nothing-plottable"),
    pytest.param({"v0/metrics.csv": "a,b\n1,2\n"}, ValueError, r"metrics\.csv' has no 'step' column",
                 id="not-csvlogger"),
]


@pytest.mark.parametrize(("files", "exc", "match"), ERRORS)
def test_bad_run_directories_are_refused_naming_them(tmp_path, capsys, files, exc, match):
    run_dir = tmp_path / "empty"
    if files is not None:
        run_dir.mkdir()
        for rel, text in files.items():
            _write(run_dir / rel, text)
    with pytest.raises(exc, match=match):
        plot_run(run_dir)
    assert not (run_dir / "metrics.png").exists()
    with pytest.raises(SystemExit) as e:
        main([str(run_dir)])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err.replace("\n", " "))


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "usage: effi plot" in capsys.readouterr().out


def test_module_command_writes_the_png_without_importing_torch(logged_run, tmp_path):
    out = tmp_path / "m.png"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "lightning_effi.plot", str(logged_run / "csv"),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"effi plot: wrote {out}"
    imported = re.findall(r"^import time:.*\|\s*(\S+)$", proc.stderr, re.M)
    assert "matplotlib" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "lightning", "pytorch_lightning")]
    _check_png(out, list(EXPECTED))


def test_tensorboard_config_logs_event_files_that_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(["fit", "--config", str(REPO / "configs/gpt_tiny_tensorboard.yaml"), "--trainer.max_steps=10",
         "--trainer.log_every_n_steps=5", "--trainer.val_check_interval=5", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
         "--data.init_args.max_bytes=60000", "--data.init_args.block_size=32", "--data.init_args.batch_size=4",
         "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.d_model=32"])
    version = tmp_path / "runs" / "tensorboard" / "version_0"
    assert list(version.glob("events.out.tfevents.*"))
    tags = _event_tags(version)
    assert "hp_metric" not in tags
    titles = [p.title for p in panels(tags)]
    assert titles == ["loss", "learning rate", "gradient norm", "tokens/s"]
    _check_png(plot_run(version, tmp_path / "cfg.png"), titles)
