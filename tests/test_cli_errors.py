"""How the `effi` command refuses bad input: one line and exit code 2 (the traceback under --debug / EFFI_DEBUG=1),
the innermost reason out of jsonargparse's wrappers, no abbreviated options, misspelt strategy names with the closest
registered ones, max_steps=0 and negative gradient_clip_val, and resumes whose model options contradict the
checkpoint. Bad input ends where the Trainer starts its first loop; failures after that keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_effi import _cli_checks
from lightning_effi._cli_app import _existing
from lightning_effi._cli_errors import DEBUG_ENV, RunState, pop_debug, reason
from lightning_effi.cli import cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs/gpt_tiny.yaml"), "--trainer.max_steps=2", "--data.init_args.max_bytes=30000",
        "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu"]
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def _in_tmp(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def _effi(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in (DEBUG_ENV, "EFFI_VERBOSE")}
    base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # tests.test_cli_errors.*
    return subprocess.run([sys.executable, "-m", "lightning_effi.cli", *args], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("effi: ")]


# ------------------------------------------------------------------------------------------ the innermost reason
# (options, what the one-line message must say): real jsonargparse/Lightning errors, parse time and instantiate time.
REASONS = {
    "precision-plugin-value": (["--trainer.plugins=lightning_effi.plugins.LossScalingPrecision",
                                "--trainer.plugins.init_args.growth_factor=-2"],
                               "Invalid growth_factor -2.0: must be a finite number > 0"),
    "precision-plugin-literal": (["--trainer.plugins=lightning_effi.plugins.LossScalingPrecision",
                                  "--trainer.plugins.init_args.on_min_scale=bogus"],
                                 "--trainer.plugins.init_args.on_min_scale: Expected a typing.Literal['raise', "
                                 "'skip']. Got value: bogus"),
    "precision-plugin-unknown-arg": (["--trainer.plugins=lightning_effi.plugins.MasterWeightsPrecision",
                                      "--trainer.plugins.init_args.precision=16-true"],
                                     "--trainer.plugins (lightning_effi.plugins.MasterWeightsPrecision): Option "
                                     "'precision' is not accepted"),
    "gpt-type": (["--model.init_args.n_layer=zero"],
                 "--model.init_args.n_layer: Expected a <class 'int'>. Got value: zero"),
    "gpt-value": (["--model.init_args.n_layer=0"], "Invalid n_layer 0: must be a positive integer"),
    # the strategy union lists str's refusal first, and jsonargparse chains that one: the reason is the second
    "strategy-class": (["--trainer.strategy=lightning_effi.strategies.EffiFSDPStrategy",
                        "--trainer.strategy.init_args.tensor_parallel_size=0"],
                       "Invalid tensor_parallel_size 0: must be a positive int"),
    "strategy-name": (["--trainer.strategy=effi_deepspeed_stage_2",
                       "--trainer.strategy.init_args.offload_parameters=true"],
                      "offload_parameters=True needs ZeRO stage 3 (got stage=2): use stage=3"),
    "model-import": (["--model=nowhere.Model"], "--model (nowhere.Model): No module named 'nowhere'"),
    "union-of-types": (["--trainer.gradient_clip_val=nan"],
                       "--trainer.gradient_clip_val: Expected a <class 'int'> or a <class 'float'>. Got value: nan"),
}


@pytest.mark.parametrize(("args", "expected"), REASONS.values(), ids=REASONS.keys())
def test_one_line_reason_of_real_errors(args, expected, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")  # parse errors raise too, so every case hands over its exception
    with pytest.raises(Exception) as e:  # noqa: B017  (ArgumentError, ValueError or TypeError by case)
        cli(["fit", *TINY, *QUIET, *args])
    message = reason(e.value)
    assert expected in message, message
    assert "\n" not in message and "Does not validate" not in message and "Given value" not in message


def test_reason_follows_the_cause_when_the_text_does_not_name_it():
    try:
        try:
            raise ValueError("Invalid beta1 1.5: must be in [0, 1)")
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes\nSubtypes: [...]") from inner
    except ValueError as outer:
        assert reason(outer) == "Invalid beta1 1.5: must be in [0, 1)"


def test_parse_error_in_process_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["fit", *TINY, "--model.init_args.n_layer=zero"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert _error_lines(err)[0] == "effi: error: --model.init_args.n_layer: Expected a <class 'int'>. Got value: zero"
    assert "usage:" not in err and "Subtypes" not in err


def test_pop_debug_strips_every_flag(monkeypatch):
    argv = ["--debug", "fit", "--config", "x.yaml", "--debug"]
    assert pop_debug(argv) and argv == ["fit", "--config", "x.yaml"]
    assert not pop_debug(argv)
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert pop_debug(argv)


# ----------------------------------------------------------------------------------------- the command, end to end
BAD_PLUGIN = ["--trainer.plugins=lightning_effi.plugins.LossScalingPrecision",
              "--trainer.plugins.init_args.growth_factor=-2"]


@pytest.mark.parametrize(("how", "args"), [
    ("one-line", ["fit", *TINY, *BAD_PLUGIN]),
    ("one-line-parse", ["fit", *TINY, "--model.init_args.n_layer=zero"]),
    ("--debug", ["fit", *TINY, *BAD_PLUGIN[:1], "--debug", *BAD_PLUGIN[1:]]),
    ("EFFI_DEBUG", ["fit", *TINY, *BAD_PLUGIN]),
])
def test_effi_reports_bad_input_in_one_line_unless_debugging(how, args, tmp_path):
    proc = _effi(*args, cwd=tmp_path, **({DEBUG_ENV: "1"} if how == "EFFI_DEBUG" else {}))
    if how.startswith("one-line"):
        assert proc.returncode == 2, proc.stderr[-3000:]
        (error, hint) = _error_lines(proc.stderr)
        assert error.startswith("effi: error: ") and ("Invalid growth_factor -2.0" in error or "n_layer" in error)
        assert "--debug" in hint
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 3, proc.stderr
    else:
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback (most recent call last)" in proc.stderr
        assert "Invalid growth_factor -2.0: must be a finite number > 0" in proc.stderr
        assert not _error_lines(proc.stderr)


def test_effi_export_of_a_missing_file_is_one_line(tmp_path):
    proc = _effi("export", str(tmp_path / "nope.ckpt"), str(tmp_path / "o.pt"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _error_lines(proc.stderr)[0].startswith("effi: error: checkpoint ") and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


class FailingModule(LightningModule):
    """A module that raises ValueError in one hook, to place the end of the input phase."""

    def __init__(self, fail_in: Literal["setup", "configure_optimizers", "training_step"] = "training_step") -> None:
        super().__init__()
        self.fail_in = fail_in
        self.w = torch.nn.Linear(2, 1)

    def _maybe_fail(self, where: str) -> None:
        if self.fail_in == where:
            raise ValueError(f"boom in {where}")

    def setup(self, stage: str) -> None:
        self._maybe_fail("setup")

    def training_step(self, batch, batch_idx):
        self._maybe_fail("training_step")
        return self.w(batch).sum()

    def configure_optimizers(self):
        self._maybe_fail("configure_optimizers")
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)


FAILING = ["--model=tests.test_cli_errors.FailingModule", "--data=tests.test_cli_errors.TinyData",
           "--trainer.max_steps=2", "--trainer.accelerator=cpu",
           *QUIET, "--trainer.enable_checkpointing=false"]


@pytest.mark.parametrize(("fail_in", "started"), [("setup", False), ("configure_optimizers", False),
                                                  ("training_step", True)])
def test_input_phase_ends_when_the_first_loop_starts(fail_in, started):
    state = RunState()
    with pytest.raises(ValueError, match=f"boom in {fail_in}"):
        cli(["fit", *FAILING, f"--model.fail_in={fail_in}"], run_state=state)
    assert state.started is started


def test_effi_keeps_the_traceback_of_a_failure_during_training(tmp_path):
    proc = _effi("fit", *FAILING, "--model.fail_in=training_step", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "ValueError: boom in training_step" in proc.stderr
    assert not _error_lines(proc.stderr)


# --------------------------------------------------------------------------------------------------- abbreviations
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_abbreviated_option_is_refused_naming_it(subcommand, capsys):
    with pytest.raises(SystemExit) as e:
        cli([subcommand, *TINY, "--trainer.max_step=5", "--print_config"])
    assert e.value.code == 2
    (error, _) = _error_lines(capsys.readouterr().err)
    assert error == ("effi: error: unrecognized arguments: --trainer.max_step=5 (did you mean --trainer.max_steps?)")
    with pytest.raises(SystemExit) as e:  # the full name still works
        cli([subcommand, *TINY, "--trainer.max_steps=5", "--print_config"])
    assert e.value.code in (0, None) and "max_steps: 5" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ strategy names
@pytest.mark.parametrize(("name", "suggested"), [
    ("effi_fdsp", ["'effi_fsdp'"]),
    ("effi_deepspeed_stage_4", ["'effi_deepspeed_stage_1'", "'effi_deepspeed_stage_2'", "'effi_deepspeed_stage_3'"]),
])
@pytest.mark.parametrize("with_init_args", [False, True], ids=["name", "name+init_args"])
def test_misspelt_strategy_names_the_value_and_the_closest_names(name, suggested, with_init_args):
    extra = ["--trainer.strategy.init_args.process_group_backend=gloo"] if with_init_args else []
    with pytest.raises(ValueError, match=f"Invalid strategy '{name}': not a registered strategy name") as e:
        cli(["fit", *TINY, *QUIET, f"--trainer.strategy={name}", *extra])
    assert all(s in str(e.value) for s in suggested), str(e.value)


def test_registered_and_class_path_strategies_pass_the_name_check():
    for name in ("auto", "ddp", "DDP", "effi_fsdp", "effi_deepspeed_stage_3",
                 "lightning_effi.strategies.EffiFSDPStrategy"):
        _cli_checks.check_strategy_name(name)


# --------------------------------------------------------------------------------------- max_steps, gradient clip
@pytest.mark.parametrize(("option", "message"), [
    ("--trainer.max_steps=0", r"Invalid trainer.max_steps 0: .* -1 for no step limit"),
    ("--trainer.gradient_clip_val=-1.0", r"Invalid trainer.gradient_clip_val -1.0: must be >= 0 .*\(null\) for no "
                                         r"clipping"),
], ids=["max_steps", "gradient_clip_val"])
def test_training_limits_lightning_accepts_are_refused_before_training(option, message):
    state = RunState()
    with pytest.raises(ValueError, match=message):
        cli(["fit", *TINY, *QUIET, option], run_state=state)
    assert not state.started


def test_nan_clip_value_from_yaml_is_refused_too():
    with pytest.raises(ValueError, match="Invalid trainer.gradient_clip_val nan"):
        _cli_checks.check_fit_limits(-1, float("nan"))


def test_max_steps_minus_one_and_clip_zero_stay_valid():
    run = cli(["fit", *TINY, *QUIET, "--trainer.max_steps=-1", "--trainer.max_epochs=1",
               "--trainer.limit_train_batches=1", "--trainer.gradient_clip_val=0",
               "--trainer.enable_checkpointing=false"])
    assert run.trainer.global_step == 1


# ---------------------------------------------------------------------------------------------------------- resume
@pytest.fixture
def four_layer_ckpt(tmp_path) -> Path:
    cli(["fit", *TINY, *QUIET])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True, mmap=True)["hyper_parameters"]["n_layer"] == 4
    return ckpt


def test_resume_with_a_contradicting_model_option_is_refused(four_layer_ckpt, tmp_path):
    proc = _effi("fit", *TINY, "--trainer.max_steps=3", "--ckpt_path", str(four_layer_ckpt),
                 "--model.init_args.n_layer=2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = _error_lines(proc.stderr)[0]
    assert f"--ckpt_path '{four_layer_ckpt}' contradicts the model config" in error
    assert "model.init_args.n_layer is 2 here, 4 in the checkpoint" in error
    assert "drop the option" in error and "start a new run (without --ckpt_path)" in error


def test_resume_checks_given_options_only_and_names_linked_ones(four_layer_ckpt):
    state = RunState()
    with pytest.raises(ValueError, match=r"data.init_args.block_size \(which sets model.init_args.block_size\) is 64 "
                                         r"here, 128 in the checkpoint"):
        cli(["fit", *TINY, *QUIET, "--ckpt_path", str(four_layer_ckpt), "--data.init_args.block_size=64"],
            run_state=state)
    assert not state.started
    # the same values as the checkpoint's, given or from the config: resumes and trains on
    run = cli(["fit", *TINY, *QUIET, "--trainer.max_steps=3", "--ckpt_path", str(four_layer_ckpt),
               "--model.init_args.n_layer=4", "--model.init_args.dropout=0.0"])
    assert run.trainer.global_step == 3


def _fake_sharded(tmp_path: Path, layout: str, hparams: dict) -> Path:
    """A checkpoint directory as EffiFSDPStrategy (DCP) or EffiDeepSpeedStrategy writes it, metadata file only."""
    root = tmp_path / layout
    if layout == "dcp":
        root.mkdir()
        (root / ".metadata").write_bytes(b"")
        torch.save({"hyper_parameters": hparams, "global_step": 2}, root / "meta.pt")
    else:
        (root / "checkpoint").mkdir(parents=True)
        (root / "latest").write_text("checkpoint")
        torch.save({"hyper_parameters": hparams, "module": {}}, root / "checkpoint" / "mp_rank_00_model_states.pt")
    return root


@pytest.mark.parametrize("layout", ["dcp", "deepspeed"])
def test_resume_from_a_sharded_directory_compares_every_model_value(layout, tmp_path):
    hparams = {"_class_path": "lightning_effi.models.GPTLightningModule", "n_layer": 6, "d_model": 128,
               "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    ckpt = _fake_sharded(tmp_path, layout, hparams)
    assert _cli_checks.checkpoint_hyper_parameters(ckpt) == (hparams, False)
    # n_layer comes from the config (4), not the command line: nothing restores a directory's hyper-parameters
    with pytest.raises(ValueError, match=r"model.init_args.n_layer is 4 here, 6 in the checkpoint\. A sharded "
                                         r"checkpoint's hyper-parameters are not restored: set the checkpoint's value"):
        cli(["fit", *TINY, *QUIET, "--ckpt_path", str(ckpt)])


def test_checkpoint_reader_edge_cases(tmp_path):
    (tmp_path / "other").mkdir()
    assert _cli_checks.checkpoint_hyper_parameters(tmp_path / "other") == (None, False)  # unknown layout: no check
    (tmp_path / "garbage.ckpt").write_text("garbage\n")
    with pytest.raises(ValueError, match="garbage.ckpt': could not be read as a checkpoint"):
        _cli_checks.checkpoint_hyper_parameters(tmp_path / "garbage.ckpt")
    with pytest.raises(ValueError, match="Invalid ckpt_path 'nope.ckpt': no such file or directory"):
        cli(["fit", *TINY, *QUIET, "--ckpt_path", "nope.ckpt"])
    assert not _cli_checks.check_ckpt_path("last") and not _cli_checks.check_ckpt_path("s3://bucket/a.ckpt")


def test_resume_conflicts_compare_nested_configs_on_common_keys():
    model = {"class_path": "m.A", "init_args": {"optimizer": {"class_path": "torch.optim.AdamW",
                                                              "init_args": {"lr": 0.1, "betas": (0.9, 0.95)}}}}
    saved = {"_class_path": "m.B", "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.2}},
             "betas_unrelated": 1}
    assert _cli_checks.resume_conflicts(model, saved) == [
        "the model class is m.A here, m.B in the checkpoint",
        "model.init_args.optimizer.init_args.lr is 0.1 here, 0.2 in the checkpoint"]


# ---------------------------------------------------------------------------------------------- closing summary
def test_summary_names_only_a_checkpoint_that_exists(tmp_path):
    kept = tmp_path / "epoch=0-step=2.ckpt"
    kept.write_bytes(b"")
    ckpt = ModelCheckpoint(dirpath=tmp_path)
    ckpt.last_model_path, ckpt.best_model_path = str(tmp_path / "removed.ckpt"), str(kept)
    assert _existing(ckpt.last_model_path, ckpt.best_model_path) == str(kept)
    assert _existing("", str(tmp_path / "removed.ckpt")) == "-"
