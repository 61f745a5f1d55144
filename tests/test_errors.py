"""Bad input is refused before any training work: one row per public constructor argument, function argument or
`effi` option with an invalid value (wrong type, out of range, unknown choice, conflicting pair, bad regex, missing or
foreign file), with the exception type and a regex that the message must match. Each regex names the offending value
and what to pass instead, so a message that loses either fails here.

Most rows call a constructor or function. A few checks need what only the Trainer knows (its other arguments, the
strategy, the data): those rows build a one-step CPU Trainer and call ``fit``, and the test also checks that no
optimizer step ran. The `effi` rows run the command in-process and read the exception text or what it printed."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import Precision

from lightning_effi.callbacks import (
    AccumulationScheduler,
    AutoMicroBatch,
    ConfigureOptimizer,
    EffiModelSummary,
    FailFast,
    SyncFreeProgressBar,
    TrainingHealthMonitor,
)
from lightning_effi.cli import cli
from lightning_effi.export import FORMAT, export_checkpoint, load_export, model_spec
from lightning_effi.models import GPT, BertEncoder, BertMLMLightningModule, CorpusDataModule, GPTLightningModule
from lightning_effi.optim import FlatLayout, Lamb, lamb, param_groups
from lightning_effi.plot import plot_run
from lightning_effi.plugins import DynamicLossScaler, LossScalingPrecision, MasterWeightsPrecision
from lightning_effi.strategies import EffiDeepSpeedStrategy, EffiFSDPStrategy, apply_fsdp
from tests._modules import SequentialRegressor, SequentialRegressorSGD

REPO = Path(__file__).resolve().parents[1]
# Both the exit of a parse error and an exception of instantiation or setup count: the message is what is checked.
CLI_FAILURE = (SystemExit, Exception)


class Row(NamedTuple):
    id: str
    call: Callable[[Path], Any]  # given a fresh temporary directory for the files it needs
    exc: type[BaseException] | tuple[type[BaseException], ...]
    match: str  # re.search'ed in the message: the bad value and the fix
    cli: bool = False  # an `effi` row: the message may also be on stderr


# ------------------------------------------------------------------------------------------------------- helpers
def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


def _tiny_gpt(**kwargs: Any) -> GPT:
    return GPT(**{"block_size": 8, "n_layer": 1, "n_head": 1, "d_model": 8, **kwargs})


_TRAINERS: list[Trainer] = []  # the Trainers of the fit rows, to check that none of them stepped


def _fit(tmp: Path, module: Any, *, datamodule: Any = None, **trainer_kwargs: Any) -> None:
    trainer = Trainer(default_root_dir=tmp, accelerator="cpu", devices=1, max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **trainer_kwargs)
    _TRAINERS.append(trainer)
    trainer.fit(module, datamodule=datamodule)


class _Batched(SequentialRegressorSGD):
    """Has the batch-size attribute AutoMicroBatch sets, so its next check is reached."""

    batch_size = 4


class _LossDoublingPrecision(Precision):
    """A precision plugin whose pre_backward changes the loss in its own way."""

    def pre_backward(self, tensor: Any, module: Any) -> Any:
        return super().pre_backward(tensor * 2, module)


def _corpus(tmp: Path, text: str = "hello world, " * 400, name: str = "corpus.txt") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _tiny_lm(**kwargs: Any) -> GPTLightningModule:
    return GPTLightningModule(**{"block_size": 8, "n_layer": 1, "n_head": 1, "d_model": 8, "warmup_steps": 0,
                                 **kwargs})


def _file(tmp: Path, name: str, content: Any = None, text: str | None = None) -> Path:
    path = tmp / name
    if text is not None:
        path.write_text(text)
    else:
        torch.save(content, path)
    return path


def _gpt_export(tmp: Path) -> Path:
    model = _tiny_gpt()
    spec = model_spec(GPT, {"block_size": 8, "n_layer": 1, "n_head": 1, "d_model": 8})
    return _file(tmp, "gpt.pt", {"format": FORMAT, "format_version": 1, "state_dict": model.state_dict(),
                                 "model": spec})


def _checkpoint_io() -> Any:
    from lightning_effi.plugins import AtomicCheckpointIO

    return AtomicCheckpointIO()


def _scaler_state(**overrides: Any) -> dict[str, Any]:
    return {**DynamicLossScaler().state_dict(), **overrides}


TINY = ["--config", str(REPO / "configs/gpt_tiny.yaml"), "--data.init_args.max_bytes=30000", "--trainer.max_steps=1",
        "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false"]


def _effi(*args: str) -> Callable[[Path], Any]:
    return lambda tmp: cli(["fit", *TINY, *args])


# --------------------------------------------------------------------------------------------------------- rows
ROWS = [
    # AccumulationScheduler
    Row("accumulation-unit", lambda t: AccumulationScheduler(unit="epochs"), ValueError,  # type: ignore[arg-type]
        r"Invalid unit 'epochs': must be one of 'epoch', 'step', 'sample', 'token'"),
    Row("accumulation-normalize", lambda t: AccumulationScheduler(normalize="sum"), ValueError,  # type: ignore
        r"Invalid normalize 'sum': must be one of 'mean', 'tokens'"),
    Row("accumulation-schedule-type", lambda t: AccumulationScheduler([(0, 2)]), TypeError,  # type: ignore[arg-type]
        r"Invalid schedule \[\(0, 2\)\]: must be a mapping \{threshold: factor\}, e.g. \{0: 1, 1000: 4\}"),
    Row("accumulation-schedule-empty", lambda t: AccumulationScheduler({}), ValueError,
        r"Invalid schedule \{\}: give at least one \{threshold: factor\} entry, or leave schedule=None"),
    Row("accumulation-threshold-negative", lambda t: AccumulationScheduler({-1: 2}), ValueError,
        r"Invalid schedule threshold -1: thresholds must be >= 0"),
    Row("accumulation-threshold-text", lambda t: AccumulationScheduler({"ten": 2}), TypeError,
        r"Invalid schedule threshold 'ten': must be an integer \(e.g. 1000 or '1000'\)"),
    Row("accumulation-threshold-order", lambda t: AccumulationScheduler({100: 2, 50: 4}), ValueError,
        r"Invalid schedule threshold 50 after 100: thresholds must be strictly increasing \(write the entries in "
        r"increasing order"),
    Row("accumulation-factor-zero", lambda t: AccumulationScheduler({0: 0}), ValueError,
        r"Invalid accumulation factor 0 at threshold 0: factors must be >= 1"),
    Row("accumulation-factor-bool", lambda t: AccumulationScheduler({0: True}), TypeError,
        r"Invalid accumulation factor for threshold 0 True: must be an integer, not a bool"),
    Row("accumulation-ramp-shape", lambda t: AccumulationScheduler(ramp=(1, 8)), ValueError,  # type: ignore[arg-type]
        r"Invalid ramp \(1, 8\): must be \(start_factor, end_factor, length\), e.g. \(1, 8, 2000\)"),
    Row("accumulation-ramp-factor", lambda t: AccumulationScheduler(ramp=(0, 8, 100)), ValueError,
        r"Invalid ramp \(0, 8, 100\): start_factor and end_factor must be >= 1"),
    Row("accumulation-ramp-length", lambda t: AccumulationScheduler(ramp=(1, 8, 0)), ValueError,
        r"Invalid ramp length 0: must be > 0 units"),
    Row("accumulation-schedule-and-ramp", lambda t: AccumulationScheduler({0: 2}, ramp=(1, 4, 10)), ValueError,
        r"Invalid schedule=\{0: 2\} with ramp=\(1, 4, 10\): give either schedule or ramp, not both"),
    Row("accumulation-global-batch", lambda t: AccumulationScheduler(global_batch_size=0), ValueError,
        r"Invalid global_batch_size 0: must be an integer >= 1"),
    Row("accumulation-global-batch-and-schedule",
        lambda t: AccumulationScheduler({0: 2}, global_batch_size=64), ValueError,
        r"global_batch_size=64 fixes the factor; it cannot be combined with a schedule or ramp \(give those in "
        r"micro-batches per rank instead\)"),
    Row("accumulation-trainer-accumulate",
        lambda t: _fit(t, SequentialRegressorSGD(), callbacks=[AccumulationScheduler({0: 2})],
                       accumulate_grad_batches=2), ValueError,
        r"Trainer\(accumulate_grad_batches=2\) conflicts with AccumulationScheduler, .*remove the Trainer argument "
        r"and give the factor to the callback"),
    # AutoMicroBatch
    Row("microbatch-global-batch", lambda t: AutoMicroBatch(0), ValueError,
        r"Invalid global_batch_size 0: must be an integer >= 1"),
    Row("microbatch-max-micro", lambda t: AutoMicroBatch(8, max_micro_batch_size=0), ValueError,
        r"Invalid max_micro_batch_size 0: must be an integer >= 1"),
    Row("microbatch-memory-fraction", lambda t: AutoMicroBatch(8, memory_fraction=1.5), ValueError,
        r"Invalid memory_fraction 1.5: must be in \(0, 1\]"),
    Row("microbatch-memory-fraction-text",
        lambda t: AutoMicroBatch(8, memory_fraction="0.5"), ValueError,  # type: ignore[arg-type]
        r"Invalid memory_fraction '0.5': must be in \(0, 1\]"),
    Row("microbatch-normalize", lambda t: AutoMicroBatch(8, normalize="sum"), ValueError,  # type: ignore[arg-type]
        r"Invalid normalize 'sum': must be one of 'mean', 'tokens'"),
    Row("microbatch-batch-arg-name",
        lambda t: _fit(t, SequentialRegressorSGD(),
                       callbacks=[AutoMicroBatch(8, max_micro_batch_size=4, batch_arg_name="bsz")]), ValueError,
        r"AutoMicroBatch\(batch_arg_name='bsz'\): neither the LightningModule, its hparams nor the datamodule has that "
        r"attribute; give the name of the attribute that sets the train batch size"),
    Row("microbatch-needs-max-on-cpu", lambda t: _fit(t, _Batched(), callbacks=[AutoMicroBatch(8)]), ValueError,
        r"AutoMicroBatch needs max_micro_batch_size on cpu with SingleDeviceStrategy: .*pass "
        r"AutoMicroBatch\(8, max_micro_batch_size=N\)"),
    Row("microbatch-with-accumulation-scheduler",
        lambda t: _fit(t, _Batched(), callbacks=[AutoMicroBatch(8, max_micro_batch_size=4),
                                                 AccumulationScheduler({0: 2})]), ValueError,
        r"AutoMicroBatch and AccumulationScheduler both drive the accumulation window; use one"),
    Row("microbatch-on-oom", lambda t: AutoMicroBatch(8, on_oom="retry"), ValueError,  # type: ignore[arg-type]
        r"Invalid on_oom 'retry': must be 'split', 'raise' or None \(split where it can\)"),
    Row("microbatch-min-micro", lambda t: AutoMicroBatch(8, min_micro_batch_size=0), ValueError,
        r"Invalid min_micro_batch_size 0: must be an integer >= 1"),
    Row("microbatch-grow-after", lambda t: AutoMicroBatch(8, grow_after=1.5), ValueError,  # type: ignore[arg-type]
        r"Invalid grow_after 1.5: must be an integer >= 1 \(optimizer steps\) or None"),
    Row("microbatch-split-unknown-precision",
        lambda t: _fit(t, _Batched(), callbacks=[AutoMicroBatch(8, max_micro_batch_size=4, on_oom="split")],
                       plugins=[_LossDoublingPrecision()]), ValueError,
        r"AutoMicroBatch\(on_oom='split'\) with the precision plugin _LossDoublingPrecision: its pre_backward changes "
        r"the loss in a way a split cannot repeat for each part; use on_oom='raise'"),
    # ConfigureOptimizer
    Row("configure-optimizer-short-name", lambda t: ConfigureOptimizer("AdamW"), ValueError,
        r"Invalid optimizer 'AdamW': give the full import path of a class, e.g. 'torch.optim.AdamW'"),
    Row("configure-optimizer-missing-class", lambda t: ConfigureOptimizer("torch.optim.Adamw"), ValueError,
        r"Invalid optimizer 'torch.optim.Adamw': 'torch.optim' has no importable 'Adamw' .*give the full import path"),
    Row("configure-optimizer-path-of-module", lambda t: ConfigureOptimizer("torch.nn.Linear"), TypeError,
        r"Invalid optimizer 'torch.nn.Linear': .* is not a subclass of torch.optim.optimizer.Optimizer; give the "
        r"import path of one, e.g. 'torch.optim.AdamW'"),
    Row("configure-optimizer-class-of-module",
        lambda t: ConfigureOptimizer(torch.nn.Linear), TypeError,  # type: ignore[arg-type]
        r"Invalid optimizer <class 'torch.nn.modules.linear.Linear'>: not a subclass of torch.optim.Optimizer; give an "
        r"optimizer class such as torch.optim.AdamW"),
    Row("configure-optimizer-not-callable", lambda t: ConfigureOptimizer(42), TypeError,  # type: ignore[arg-type]
        r"Invalid optimizer 42: give an optimizer class, its import path or a callable that takes parameter groups"),
    Row("configure-optimizer-args-params",
        lambda t: ConfigureOptimizer(torch.optim.SGD, optimizer_args={"params": []}), ValueError,
        r"Invalid optimizer_args key 'params': the callback passes the parameter groups"),
    Row("configure-optimizer-args-lr",
        lambda t: ConfigureOptimizer(torch.optim.SGD, optimizer_args={"lr": 0.1}), ValueError,
        r"Invalid optimizer_args key 'lr': set ConfigureOptimizer\(lr=...\)"),
    Row("configure-optimizer-args-unknown",
        lambda t: ConfigureOptimizer(torch.optim.AdamW, optimizer_args={"beta": 0.9}), ValueError,
        r"Invalid optimizer_args \['beta'\]: 'AdamW' takes \[.*'betas'"),
    Row("configure-optimizer-lr", lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.0), ValueError,
        r"Invalid lr 0.0: must be > 0"),
    Row("configure-optimizer-lr-text",
        lambda t: ConfigureOptimizer(torch.optim.SGD, lr="1e-3"), ValueError,  # type: ignore[arg-type]
        r"Invalid lr '1e-3': must be > 0"),
    Row("configure-optimizer-weight-decay",
        lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1, weight_decay=-0.1), ValueError,
        r"Invalid weight_decay -0.1: must be >= 0"),
    Row("configure-optimizer-warmup", lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1, warmup_steps=-1),
        ValueError, r"Invalid warmup_steps -1: must be an integer >= 0"),
    Row("configure-optimizer-min-lr-ratio",
        lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1, min_lr_ratio=1.5), ValueError,
        r"Invalid min_lr_ratio 1.5: must be in \[0, 1\]"),
    Row("configure-optimizer-max-steps", lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1, max_steps=0),
        ValueError, r"Invalid max_steps 0: must be a positive integer or None"),
    Row("configure-optimizer-interval",
        lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1, lr_scheduler_interval="batch"),  # type: ignore[arg-type]
        ValueError, r"Invalid lr_scheduler_interval 'batch': must be 'step' or 'epoch'"),
    Row("configure-optimizer-plateau",
        lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1,
                                     lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau), ValueError,
        r"Invalid lr_scheduler ReduceLROnPlateau: .*return it from the module's configure_optimizers with a 'monitor' "
        r"key"),
    Row("configure-optimizer-scheduler-and-warmup",
        lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1, lr_scheduler=torch.optim.lr_scheduler.StepLR,
                                     lr_scheduler_args={"step_size": 1}, warmup_steps=10), ValueError,
        r"lr_scheduler=<class 'torch.optim.lr_scheduler.StepLR'> replaces the warmup \+ cosine schedule; leave "
        r"warmup_steps \(10\) at 0"),
    Row("configure-optimizer-scheduler-args-alone",
        lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1, lr_scheduler_args={"gamma": 0.5}), ValueError,
        r"lr_scheduler_args \{'gamma': 0.5\} given without an lr_scheduler; set lr_scheduler or drop them"),
    Row("configure-optimizer-scheduler-args-unknown",
        lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1, lr_scheduler=torch.optim.lr_scheduler.StepLR,
                                     lr_scheduler_args={"step": 1}), ValueError,
        r"Invalid lr_scheduler_args \['step'\]: 'StepLR' takes \[.*'step_size'"),
    Row("configure-optimizer-scheduler-path-of-module",
        lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1, lr_scheduler="torch.optim.SGD"), TypeError,
        r"Invalid lr_scheduler 'torch.optim.SGD': .* is not a subclass of torch.optim.lr_scheduler.LRScheduler; give "
        r"the import path of one, e.g. 'torch.optim.lr_scheduler.OneCycleLR'"),
    Row("configure-optimizer-no-decay-string",
        lambda t: ConfigureOptimizer(torch.optim.SGD, lr=0.1, no_decay="bias"), TypeError,
        r"no_decay must be a list of categories or patterns, got the string 'bias'; write \['bias'\]"),
    Row("configure-optimizer-no-adapt-regex", lambda t: ConfigureOptimizer(Lamb, no_adapt=["("]), ValueError,
        r"Invalid no_adapt entry '\(': not one of .* and not a valid regex"),
    Row("configure-optimizer-no-decay-unmatched",
        lambda t: _fit(t, SequentialRegressor(), callbacks=[ConfigureOptimizer(torch.optim.SGD, lr=0.1,
                                                                               no_decay=["encoder"])]), ValueError,
        r"Invalid no_decay entry 'encoder': not a category and no parameter name matches it; use a category of .* "
        r"or a regex searched in names such as \[net.0.weight"),
    # EffiModelSummary, FailFast, SyncFreeProgressBar, TrainingHealthMonitor
    Row("summary-max-depth", lambda t: EffiModelSummary(max_depth=-2), ValueError,
        r"Invalid max_depth -2: must be -1 \(every layer\), 0 \(no summary\) or a positive int"),
    Row("failfast-poll", lambda t: FailFast(poll_s=0), ValueError,
        r"Invalid poll_s 0: must be a number of seconds > 0"),
    Row("failfast-ack-timeout", lambda t: FailFast(ack_timeout_s="10"), ValueError,  # type: ignore[arg-type]
        r"Invalid ack_timeout_s '10': must be a number of seconds > 0"),
    Row("progress-show-version", lambda t: SyncFreeProgressBar(show_version="yes"), TypeError,  # type: ignore
        r"Invalid show_version 'yes': must be True or False"),
    Row("progress-refresh-rate", lambda t: SyncFreeProgressBar(refresh_rate=-1), ValueError,
        r"Invalid refresh_rate -1: must be an int >= 0"),
    Row("health-log-every", lambda t: TrainingHealthMonitor(log_every_n_steps=0), ValueError,
        r"Invalid log_every_n_steps 0: must be an int >= 1"),
    Row("health-max-names", lambda t: TrainingHealthMonitor(max_names=True), ValueError,
        r"Invalid max_names True: must be an int >= 1"),
    Row("health-tokens-key", lambda t: TrainingHealthMonitor(tokens_key=""), ValueError,
        r"Invalid tokens_key '': must be a non-empty string"),
    Row("health-prefix", lambda t: TrainingHealthMonitor(prefix=None), TypeError,  # type: ignore[arg-type]
        r"Invalid prefix None: must be a string"),
    Row("health-on-nonfinite", lambda t: TrainingHealthMonitor(on_nonfinite="warn"), ValueError,  # type: ignore
        r"Invalid on_nonfinite 'warn': must be 'raise', 'skip' or None"),
    # DynamicLossScaler
    Row("scaler-init-scale", lambda t: DynamicLossScaler(init_scale=0), ValueError,
        r"Invalid init_scale 0: must be a finite number > 0"),
    Row("scaler-init-scale-nan", lambda t: DynamicLossScaler(init_scale=float("nan")), ValueError,
        r"Invalid init_scale nan: must be a finite number > 0"),
    Row("scaler-growth-factor", lambda t: DynamicLossScaler(growth_factor=1.0), ValueError,
        r"Invalid growth_factor 1.0: must be > 1 \(use a huge growth_interval to never grow\)"),
    Row("scaler-backoff-factor", lambda t: DynamicLossScaler(backoff_factor=1.5), ValueError,
        r"Invalid backoff_factor 1.5: must be in \(0, 1\)"),
    Row("scaler-growth-interval", lambda t: DynamicLossScaler(growth_interval=0), ValueError,
        r"Invalid growth_interval 0: must be an int >= 1"),
    Row("scaler-hysteresis", lambda t: DynamicLossScaler(hysteresis=1.5), ValueError,  # type: ignore[arg-type]
        r"Invalid hysteresis 1.5: must be an int >= 1"),
    Row("scaler-max-below-min", lambda t: DynamicLossScaler(init_scale=4, min_scale=4, max_scale=2), ValueError,
        r"Invalid max_scale 2: must be >= min_scale \(4\)"),
    Row("scaler-init-outside-range", lambda t: DynamicLossScaler(init_scale=2.0**30), ValueError,
        r"Invalid init_scale 1073741824.0: must lie in \[min_scale, max_scale\] = \[1.0, 16777216.0\]"),
    Row("scaler-consecutive-hysteresis",
        lambda t: DynamicLossScaler(consecutive_hysteresis="yes"), TypeError,  # type: ignore[arg-type]
        r"Invalid consecutive_hysteresis 'yes': must be a bool"),
    Row("scaler-state-keys", lambda t: DynamicLossScaler().load_state_dict({"scale": 1.0}), KeyError,
        r"DynamicLossScaler state_dict is missing \[.*'growth_tracker'.*\]; it must come from "
        r"DynamicLossScaler.state_dict\(\)"),
    Row("scaler-state-scale", lambda t: DynamicLossScaler().load_state_dict(_scaler_state(scale=-1.0)), ValueError,
        r"Invalid scale -1.0 in state_dict: must be a finite float > 0"),
    # LossScalingPrecision, MasterWeightsPrecision
    Row("loss-scaling-precision", lambda t: LossScalingPrecision("16-true"), ValueError,  # type: ignore[arg-type]
        r"Invalid precision '16-true': LossScalingPrecision supports .*'16-mixed'.*; for bf16 weights use "
        r"MasterWeightsPrecision, for fp32 pass no plugin"),
    Row("loss-scaling-on-min-scale",
        lambda t: LossScalingPrecision(on_min_scale="ignore"), ValueError,  # type: ignore[arg-type]
        r"Invalid on_min_scale 'ignore': must be one of \('raise', 'skip'\)"),
    Row("loss-scaling-warn-every", lambda t: LossScalingPrecision(warn_every_n_steps=0), ValueError,
        r"Invalid warn_every_n_steps 0: must be an int >= 1"),
    Row("loss-scaling-device", lambda t: LossScalingPrecision(device="mps"), ValueError,
        r"Invalid device 'mps': must be 'cpu', 'cuda' or None \(the Trainer's device\)"),
    Row("loss-scaling-scaler-type",
        lambda t: LossScalingPrecision(scaler="dynamic"), TypeError,  # type: ignore[arg-type]
        r"Invalid scaler 'dynamic': must be a lightning_effi.plugins.DynamicLossScaler"),
    Row("loss-scaling-scaler-and-knob",
        lambda t: LossScalingPrecision(scaler=DynamicLossScaler(), init_scale=2.0), ValueError,
        r"Give the scaler settings \['init_scale'\] to the DynamicLossScaler passed as scaler=, not to "
        r"LossScalingPrecision as well"),
    Row("loss-scaling-knob", lambda t: LossScalingPrecision(growth_factor=-2.0), ValueError,
        r"Invalid growth_factor -2.0: must be a finite number > 0"),
    Row("master-weights-mode", lambda t: MasterWeightsPrecision(mode="kahn"), ValueError,  # type: ignore[arg-type]
        r"Invalid mode 'kahn': must be one of \('fp32', 'kahan'\)"),
    # AtomicCheckpointIO
    Row("checkpoint-io-missing", lambda t: _checkpoint_io().load_checkpoint(t / "nope.ckpt"), FileNotFoundError,
        r"Checkpoint '.*nope\.ckpt' does not exist; pass the path of a saved checkpoint .* or ckpt_path='last'"),
    Row("checkpoint-io-empty", lambda t: _checkpoint_io().load_checkpoint(_file(t, "e.ckpt", text="")),
        ValueError, r"Checkpoint '.*e\.ckpt' is empty .*; resume from an earlier checkpoint \(ckpt_path='last' skips "
                    r"incomplete ones\) or delete this one"),
    Row("checkpoint-io-not-a-dict",
        lambda t: _checkpoint_io().load_checkpoint(_file(t, "l.ckpt", [1, 2])), ValueError,
        r"Checkpoint '.*l\.ckpt' holds a list, not a Lightning training checkpoint \(a dict\); pass a file written "
        r"by Trainer.save_checkpoint or ModelCheckpoint"),
    Row("checkpoint-io-export-file", lambda t: _checkpoint_io().load_checkpoint(_gpt_export(t)), ValueError,
        r"Checkpoint '.*gpt\.pt' is an `effi export` file \(weights only\), not a training checkpoint: load it with"),
    Row("checkpoint-io-storage-options",
        lambda t: _checkpoint_io().save_checkpoint({}, t / "c.ckpt", storage_options={"x": 1}), TypeError,
        r"AtomicCheckpointIO.save_checkpoint\(storage_options=\{'x': 1\}\) is not supported: .*leave storage_options "
        r"unset"),
    # Lamb, lamb, FlatLayout, param_groups
    Row("lamb-lr", lambda t: Lamb(_params(), lr=-1.0), ValueError, r"Invalid learning rate -1.0: must be a float >= 0"),
    Row("lamb-beta1", lambda t: Lamb(_params(), betas=(1.0, 0.999)), ValueError,
        r"Invalid beta1 1.0: must be in \[0, 1\)"),
    Row("lamb-beta2", lambda t: Lamb(_params(), betas=(0.9, 1.5)), ValueError,
        r"Invalid beta2 1.5: must be in \[0, 1\)"),
    Row("lamb-betas-shape", lambda t: Lamb(_params(), betas=(0.9,)), ValueError,  # type: ignore[arg-type]
        r"Invalid betas \(0.9,\): must be a pair \(beta1, beta2\)"),
    Row("lamb-eps", lambda t: Lamb(_params(), eps=-1e-8), ValueError, r"Invalid eps -1e-08: must be >= 0"),
    Row("lamb-weight-decay", lambda t: Lamb(_params(), weight_decay=-0.1), ValueError,
        r"Invalid weight_decay -0.1: must be >= 0"),
    Row("lamb-trust-clip", lambda t: Lamb(_params(), trust_clip=(2.0, 1.0)), ValueError,
        r"Invalid trust_clip \(2.0, 1.0\): must satisfy 0 <= lo <= hi"),
    Row("lamb-trust-clip-type", lambda t: Lamb(_params(), trust_clip=("a", 1.0)), TypeError,  # type: ignore
        r"Invalid trust_clip \('a', 1.0\): lo and hi must be numbers"),
    Row("lamb-weight-norm-clip", lambda t: Lamb(_params(), weight_norm_clip=(1.0,)), ValueError,  # type: ignore
        r"Invalid weight_norm_clip \(1.0,\): must be None or a pair \(lo, hi\)"),
    Row("lamb-max-grad-norm", lambda t: Lamb(_params(), max_grad_norm=0.0), ValueError,
        r"Invalid max_grad_norm 0.0: must be None \(no clipping\) or a float > 0"),
    Row("lamb-bias-correction", lambda t: Lamb(_params(), bias_correction="yes"), TypeError,  # type: ignore
        r"Invalid bias_correction 'yes': must be True or False"),
    Row("lamb-foreach-and-fused", lambda t: Lamb(_params(), foreach=True, fused=True), ValueError,
        r"foreach=True and fused=True are exclusive: pick one implementation path"),
    Row("lamb-group-max-grad-norm",
        lambda t: Lamb(_params(), max_grad_norm=1.0).add_param_group({"params": _params(), "max_grad_norm": 2.0}),
        ValueError, r"Invalid max_grad_norm 2.0 in a param group: .*can only be set on the optimizer"),
    Row("lamb-functional-lengths",
        lambda t: lamb([torch.zeros(3)], [torch.zeros(3)], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6,
                       weight_decay=0.0),
        ValueError, r"Invalid list lengths \[1, 1, 0, 0, 0\] of params, grads, .*: give one entry per parameter"),
    Row("flat-layout-num-logical", lambda t: FlatLayout(segments=(), num_logical=-1), ValueError,
        r"Invalid FlatLayout.num_logical -1: must be an int >= 0"),
    Row("flat-layout-logical-id", lambda t: FlatLayout(segments=((2, 0, 3),), num_logical=2), ValueError,
        r"Invalid FlatLayout logical_id 2: must be in \[0, num_logical=2\)"),
    Row("flat-layout-overlap", lambda t: FlatLayout(segments=((0, 0, 3), (1, 2, 3)), num_logical=2), ValueError,
        r"Invalid FlatLayout: segments \(0, 0, 3\) and \(1, 2, 3\) overlap; each element of the flat tensor belongs "
        r"to one segment at most"),
    Row("param-groups-weight-decay", lambda t: param_groups(_tiny_gpt(), weight_decay=-1.0), ValueError,
        r"Invalid weight_decay -1.0: must be >= 0"),
    Row("param-groups-no-decay-string", lambda t: param_groups(_tiny_gpt(), no_decay="norm"), TypeError,
        r"no_decay must be a list of categories or patterns, got the string 'norm'; write \['norm'\]"),
    Row("param-groups-no-decay-unmatched", lambda t: param_groups(_tiny_gpt(), no_decay=["embeddings"]), ValueError,
        r"Invalid no_decay entry 'embeddings': not a category and no parameter name matches it; use a category of "
        r".* or a regex searched in names such as \[wte.weight"),
    Row("param-groups-no-adapt-regex", lambda t: param_groups(_tiny_gpt(), no_adapt=["[a"]), ValueError,
        r"Invalid no_adapt entry '\[a': not one of .* and not a valid regex"),
    # EffiFSDPStrategy, apply_fsdp (constructor-level: setup needs a process group)
    Row("fsdp-wrap-string", lambda t: EffiFSDPStrategy(wrap="Block"), TypeError,
        r"wrap must be a list of class names, got the string 'Block'; write \['Block'\]"),
    Row("fsdp-wrap-empty-name", lambda t: EffiFSDPStrategy(wrap=[""]), TypeError,
        r"wrap entries must be non-empty class-name strings, got ''"),
    Row("fsdp-activation-checkpointing-string", lambda t: EffiFSDPStrategy(activation_checkpointing="Block"),
        TypeError,
        r"activation_checkpointing must be a list of class names, got the string 'Block'; write \['Block'\]"),
    Row("fsdp-reshard-after-forward", lambda t: EffiFSDPStrategy(reshard_after_forward=0), ValueError,
        r"Invalid reshard_after_forward 0: must be True, False or a positive group size"),
    Row("fsdp-wrap-group-size", lambda t: EffiFSDPStrategy(wrap_group_size=0), ValueError,
        r"Invalid wrap_group_size 0: must be a positive int"),
    Row("fsdp-compile-flag", lambda t: EffiFSDPStrategy(compile="yes"), TypeError,  # type: ignore[arg-type]
        r"Invalid compile 'yes': must be True or False"),
    Row("fsdp-compile-and-checkpointing",
        lambda t: EffiFSDPStrategy(compile=True, activation_checkpointing=["Block"]), ValueError,
        r"compile=True with activation_checkpointing=\['Block'\] is not supported: .*Use one of the two"),
    Row("fsdp-cpu-offload-flag", lambda t: EffiFSDPStrategy(cpu_offload=1), TypeError,  # type: ignore[arg-type]
        r"Invalid cpu_offload 1: must be True or False"),
    Row("fsdp-param-dtype", lambda t: EffiFSDPStrategy(param_dtype="fp16"), ValueError,  # type: ignore[arg-type]
        r"Invalid param_dtype 'fp16': must be 'auto' or one of \['bfloat16', 'float16', 'float32'\]"),
    Row("fsdp-reduce-dtype", lambda t: EffiFSDPStrategy(reduce_dtype="half"), ValueError,  # type: ignore[arg-type]
        r"Invalid reduce_dtype 'half': must be 'auto' or one of \['bfloat16', 'float16', 'float32'\]"),
    Row("fsdp-tensor-parallel-size", lambda t: EffiFSDPStrategy(tensor_parallel_size=0), ValueError,
        r"Invalid tensor_parallel_size 0: must be a positive int \(1: no tensor parallelism\)"),
    Row("fsdp-tp-plan-type", lambda t: EffiFSDPStrategy(tp_plan=["model.wte"]), TypeError,  # type: ignore[arg-type]
        r"Invalid tp_plan \['model.wte'\]: must be a mapping of module-path pattern -> style, e.g."),
    Row("fsdp-tp-plan-style", lambda t: EffiFSDPStrategy(tp_plan={"model.wte": "diagonal"}), ValueError,
        r"tp_plan\['model.wte'\] = 'diagonal' is not a tensor-parallel style. Styles: 'colwise'"),
    Row("fsdp-sequence-parallel-flag",
        lambda t: EffiFSDPStrategy(sequence_parallel="yes"), TypeError,  # type: ignore[arg-type]
        r"Invalid sequence_parallel 'yes': must be True or False"),
    Row("apply-fsdp-wrap-unknown", lambda t: apply_fsdp(_tiny_gpt(), None, wrap=["Blok"]), ValueError,
        r"wrap class name\(s\) \['Blok'\] match no module of GPT. Module classes present: \[.*'Block'.*\]. Use one of "
        r"these names"),
    Row("apply-fsdp-checkpointing-unknown",
        lambda t: apply_fsdp(_tiny_gpt(), None, activation_checkpointing=["MLPs"]), ValueError,
        r"activation_checkpointing class name\(s\) \['MLPs'\] match no module of GPT.*Use one of these names"),
    Row("apply-fsdp-mp-policy", lambda t: apply_fsdp(_tiny_gpt(), None, mp_policy="bf16"), TypeError,  # type: ignore
        r"Invalid mp_policy 'bf16': must be a torch.distributed.fsdp.MixedPrecisionPolicy"),
    # EffiDeepSpeedStrategy (constructor-level, and the config check its launcher runs before any process starts)
    Row("deepspeed-stage", lambda t: EffiDeepSpeedStrategy(stage=0), ValueError,  # type: ignore[arg-type]
        r"Invalid ZeRO stage 0: must be 1, 2 or 3 \(stage 0 is plain DDP: use 'ddp'\)"),
    Row("deepspeed-offload-parameters", lambda t: EffiDeepSpeedStrategy(stage=2, offload_parameters=True), ValueError,
        r"offload_parameters=True needs ZeRO stage 3 \(got stage=2\): use stage=3"),
    Row("deepspeed-config-missing", lambda t: EffiDeepSpeedStrategy(config=t / "ds.json"), FileNotFoundError,
        r"DeepSpeed config file '.*ds\.json' does not exist; pass a dict or a JSON path"),
    Row("deepspeed-config-not-json",
        lambda t: EffiDeepSpeedStrategy(config=_file(t, "ds.json", text="{stage: 2}")), ValueError,
        r"DeepSpeed config file '.*ds\.json' is not valid JSON: .*; fix the JSON there, or pass the config as a dict"),
    Row("deepspeed-config-not-object",
        lambda t: EffiDeepSpeedStrategy(config=_file(t, "ds.json", text=json.dumps([1, 2]))), ValueError,
        r"DeepSpeed config file '.*ds\.json' must hold a JSON object, got list; write the config as one object"),
    Row("deepspeed-config-type", lambda t: EffiDeepSpeedStrategy(config=42), TypeError,  # type: ignore[arg-type]
        r"Invalid DeepSpeed config 42: pass a dict, a path to a JSON file, or None"),
    Row("deepspeed-config-stage-conflict",
        lambda t: _fit(t, SequentialRegressorSGD(),
                       strategy=EffiDeepSpeedStrategy(stage=2, config={"zero_optimization": {"stage": 3}})),
        ValueError,
        r"zero_optimization.stage is 3 in the DeepSpeed config but the strategy is stage 2 "
        r"\(effi_deepspeed_stage_2\): use effi_deepspeed_stage_3 .*or remove 'stage' from the config"),
    Row("deepspeed-config-accumulation-conflict",
        lambda t: _fit(t, SequentialRegressorSGD(), accumulate_grad_batches=2,
                       strategy=EffiDeepSpeedStrategy(config={"gradient_accumulation_steps": 4})),
        ValueError, r"gradient_accumulation_steps is 4 in the DeepSpeed config but "
                    r"Trainer\(accumulate_grad_batches=2\): set "),
    # GPT, BertEncoder
    Row("gpt-n-layer", lambda t: GPT(n_layer=0), ValueError, r"Invalid n_layer 0: must be a positive integer"),
    Row("gpt-vocab-size-text", lambda t: GPT(vocab_size="260"), ValueError,  # type: ignore[arg-type]
        r"Invalid vocab_size '260': must be a positive integer"),
    Row("gpt-block-size-bool", lambda t: GPT(block_size=True), ValueError,
        r"Invalid block_size True: must be a positive integer"),
    Row("gpt-d-model-heads", lambda t: GPT(d_model=65, n_head=2), ValueError,
        r"Invalid d_model 65: must be divisible by n_head=2"),
    Row("gpt-dropout", lambda t: GPT(dropout=1.0), ValueError, r"Invalid dropout 1.0: must be in \[0, 1\)"),
    Row("bert-n-head", lambda t: BertEncoder(n_head=0), ValueError, r"Invalid n_head 0: must be a positive integer"),
    Row("bert-dropout", lambda t: BertEncoder(dropout=-0.1), ValueError, r"Invalid dropout -0.1: must be in \[0, 1\)"),
    # GPTLightningModule, BertMLMLightningModule
    Row("gpt-module-fused-loss", lambda t: GPTLightningModule(fused_loss="yes"), ValueError,  # type: ignore
        r"Invalid fused_loss 'yes': must be true, false or null"),
    Row("gpt-module-loss-reduction", lambda t: GPTLightningModule(loss_reduction="none"), ValueError,  # type: ignore
        r"Invalid loss_reduction 'none': must be 'mean' or 'sum'"),
    Row("gpt-module-warmup", lambda t: GPTLightningModule(warmup_steps=-1), ValueError,
        r"Invalid warmup_steps -1: must be an int >= 0"),
    Row("gpt-module-warmup-float", lambda t: GPTLightningModule(warmup_steps=2.5), ValueError,  # type: ignore
        r"Invalid warmup_steps 2.5: must be an int >= 0"),
    Row("gpt-module-min-lr-ratio", lambda t: GPTLightningModule(min_lr_ratio=1.5), ValueError,
        r"Invalid min_lr_ratio 1.5: must be in \[0, 1\]"),
    Row("gpt-module-max-steps", lambda t: GPTLightningModule(max_steps=0), ValueError,
        r"Invalid max_steps 0: must be a positive integer"),
    Row("gpt-module-weight-decay", lambda t: GPTLightningModule(weight_decay=-0.1), ValueError,
        r"Invalid weight_decay -0.1: must be a number >= 0"),
    Row("gpt-module-no-decay-string", lambda t: GPTLightningModule(no_decay="bias"), TypeError,  # type: ignore
        r"no_decay must be a list of categories or patterns, got the string 'bias'; write \['bias'\]"),
    Row("gpt-module-no-adapt-regex", lambda t: GPTLightningModule(no_adapt=["("]), ValueError,
        r"Invalid no_adapt entry '\(': not one of .* and not a valid regex"),
    Row("gpt-module-compile", lambda t: GPTLightningModule(compile="yes"), TypeError,  # type: ignore[arg-type]
        r"Invalid compile 'yes': must be True or False"),
    Row("gpt-module-shape", lambda t: GPTLightningModule(d_model=30, n_head=4), ValueError,
        r"Invalid d_model 30: must be divisible by n_head=4"),
    Row("bert-module-mask-prob", lambda t: BertMLMLightningModule(mask_prob=0.0), ValueError,
        r"Invalid mask_prob 0.0: must be in \(0, 1\)"),
    Row("bert-module-min-lr-ratio", lambda t: BertMLMLightningModule(min_lr_ratio=-0.5), ValueError,
        r"Invalid min_lr_ratio -0.5: must be in \[0, 1\]"),
    Row("gpt-module-data-task",
        lambda t: _fit(t, _tiny_lm(), datamodule=CorpusDataModule(path=_corpus(t), block_size=8, task="mlm")),
        ValueError, r"GPTLightningModule needs data with task='causal', but CorpusDataModule.task is 'mlm'; set the "
                    r"data module's task to 'causal'"),
    Row("gpt-module-vocab-size",
        lambda t: _fit(t, _tiny_lm(vocab_size=100), datamodule=CorpusDataModule(path=_corpus(t), block_size=8)),
        ValueError, r"GPTLightningModule.vocab_size 100 is smaller than the data's vocabulary "
                    r"\(CorpusDataModule.vocab_size=260\); set vocab_size >= 260"),
    # CorpusDataModule
    Row("data-block-size", lambda t: CorpusDataModule(block_size=0), ValueError,
        r"Invalid CorpusDataModule.block_size 0: must be a positive integer"),
    Row("data-batch-size", lambda t: CorpusDataModule(batch_size=-1), ValueError,
        r"Invalid CorpusDataModule.batch_size -1: must be a positive integer"),
    Row("data-max-bytes-bool", lambda t: CorpusDataModule(max_bytes=True), ValueError,
        r"Invalid CorpusDataModule.max_bytes True: must be a positive integer"),
    Row("data-val-fraction", lambda t: CorpusDataModule(val_fraction=1.0), ValueError,
        r"Invalid CorpusDataModule.val_fraction 1.0: must be in \(0, 1\)"),
    Row("data-task", lambda t: CorpusDataModule(task="seq2seq"), ValueError,  # type: ignore[arg-type]
        r"Invalid CorpusDataModule.task 'seq2seq': must be 'causal' or 'mlm'"),
    Row("data-num-workers", lambda t: CorpusDataModule(num_workers=-1), ValueError,
        r"Invalid CorpusDataModule.num_workers -1: must be >= 0"),
    Row("data-path-missing", lambda t: CorpusDataModule(path=str(t / "corpus")), FileNotFoundError,
        r"CorpusDataModule.path '.*corpus' does not exist; give an existing text file or folder, or leave path unset"),
    Row("data-path-empty-file", lambda t: CorpusDataModule(path=_corpus(t, "")).setup("fit"), ValueError,
        r"CorpusDataModule.path '.*corpus\.txt' is an empty file; give a text file with content or a folder"),
    Row("data-pattern", lambda t: CorpusDataModule(path=str(Path(_corpus(t)).parent), pattern="*.md").setup("fit"),
        ValueError, r"CorpusDataModule.path '.*' holds no file matching pattern '\*\.md'; point path at a folder with "
                    r"text files or change pattern"),
    Row("data-block-size-over-split",
        lambda t: CorpusDataModule(path=_corpus(t, "x" * 200), block_size=512).setup("fit"), ValueError,
        r"CorpusDataModule.block_size 512 is larger than the train split, .*use a smaller block_size, a larger "
        r"max_bytes"),
    # export_checkpoint, load_export, model_spec
    Row("export-missing", lambda t: export_checkpoint(t / "nope.ckpt", t / "out.pt"), FileNotFoundError,
        r"checkpoint '.*nope\.ckpt' does not exist; pass a Lightning \.ckpt file, an FSDP \(DCP\) checkpoint directory "
        r"or a DeepSpeed checkpoint directory"),
    Row("export-not-torch", lambda t: export_checkpoint(_file(t, "a.ckpt", text="hello"), t / "out.pt"), ValueError,
        r"'.*a\.ckpt' could not be read as a checkpoint \(.*\); pass a Lightning \.ckpt file"),
    Row("export-no-state-dict", lambda t: export_checkpoint(_file(t, "a.ckpt", {"epoch": 1}), t / "out.pt"),
        ValueError, r"'.*a\.ckpt' is not a Lightning checkpoint \(no 'state_dict' key\); pass a \.ckpt file"),
    Row("export-unknown-directory", lambda t: export_checkpoint(t, t / "out" / "out.pt"), ValueError,
        r"'.*' is a directory but not a checkpoint format this version can export .*; pass a Lightning \.ckpt file"),
    Row("export-strip-prefix",
        lambda t: export_checkpoint(_file(t, "a.ckpt", {"state_dict": {"model.w": torch.zeros(1)}}), t / "out.pt",
                                    strip_prefix="net"), ValueError,
        r"no key of '.*a\.ckpt' starts with strip_prefix 'net\.'; pass one its keys start with \('model\.'\) or no "
        r"strip_prefix"),
    Row("load-export-missing", lambda t: load_export(t / "nope.pt"), FileNotFoundError,
        r"export '.*nope\.pt' does not exist; pass the OUT\.pt file `effi export CKPT OUT\.pt` wrote"),
    Row("load-export-not-torch", lambda t: load_export(_file(t, "a.pt", text="hello")), ValueError,
        r"'.*a\.pt' could not be read as an `effi export` file \(.*\); write one with `effi export CKPT OUT\.pt`"),
    Row("load-export-foreign", lambda t: load_export(_file(t, "a.pt", {"epoch": 1})), ValueError,
        r"'.*a\.pt' is not an `effi export` file \(no 'format': 'lightning_effi.export' entry\); write one with"),
    Row("load-export-newer-version",
        lambda t: load_export(_file(t, "a.pt", {"format": FORMAT, "format_version": 99})), ValueError,
        r"'.*a\.pt' has export format_version 99; this version of lightning_effi reads up to 1: upgrade "
        r"lightning_effi"),
    Row("load-export-bare-state-dict", lambda t: load_export(_file(t, "a.pt", {"w": torch.zeros(1)})), ValueError,
        r"'.*a\.pt' holds a bare state_dict .*; re-export the checkpoint .*or pass the config explicitly"),
    Row("load-export-other-class", lambda t: BertEncoder.from_export(_gpt_export(t)), ValueError,
        r"'.*gpt\.pt' holds a lightning_effi.models.gpt.GPT export, not a lightning_effi.models.bert.BertEncoder; load "
        r"it with GPT.from_export"),
    Row("model-spec-prefix", lambda t: model_spec(GPT, {}, prefix="model"), ValueError,
        r"Invalid prefix 'model': must be empty or end with '\.' \(e.g. 'model\.'\)"),
    Row("model-spec-init-args", lambda t: model_spec(GPT, {"n_layer": object()}), TypeError,
        r"Invalid init_args\['n_layer'\] <object object at .*> of lightning_effi.models.gpt.GPT: must be a bool, int, "
        r"float, str, None, or a list or dict of them"),
    # plot_run
    Row("plot-missing", lambda t: plot_run(t / "runs"), FileNotFoundError,
        r"Run directory '.*runs' does not exist \(or is not a directory\); pass the logger's save_dir or a run's "
        r"version directory"),
    Row("plot-no-logs", lambda t: plot_run(t), FileNotFoundError,
        r"No logged metrics under '.*': looked for TensorBoard event files .* Pass the logger's save_dir or the run's "
        r"version directory"),
    Row("plot-csv-without-step", lambda t: plot_run(_file(t, "metrics.csv", text="a,b\n1,2\n").parent), ValueError,
        r"'.*metrics\.csv' has no 'step' column: not a Lightning CSVLogger metrics file; pass a directory whose "
        r"metrics\.csv files CSVLogger wrote"),
    Row("plot-nothing-plotted", lambda t: plot_run(_file(t, "metrics.csv", text="step,my_loss\n0,1.0\n").parent),
        ValueError, r"None of the metrics logged under '.*' is plotted \(logged: \['my_loss'\]; plotted: .*\); log one "
                    r"of those names"),
    # the `effi` command (in-process)
    Row("cli-model-value", _effi("--model.init_args.n_layer=0"), CLI_FAILURE,
        r"Invalid n_layer 0: must be a positive integer", cli=True),
    Row("cli-model-type", _effi("--model.init_args.dropout=lots"), CLI_FAILURE,
        r"dropout.*lots", cli=True),
    Row("cli-data-value", _effi("--data.init_args.batch_size=0"), CLI_FAILURE,
        r"Invalid CorpusDataModule.batch_size 0: must be a positive integer", cli=True),
    Row("cli-data-path", _effi("--data.init_args.path=/nonexistent/corpus"), CLI_FAILURE,
        r"CorpusDataModule.path '/nonexistent/corpus' does not exist; give an existing text file or folder", cli=True),
    Row("cli-plugin-literal", _effi("--trainer.plugins=lightning_effi.plugins.LossScalingPrecision",
                                    "--trainer.plugins.init_args.on_min_scale=bogus"), CLI_FAILURE,
        r"on_min_scale.*'raise', 'skip'.*bogus", cli=True),
    Row("cli-callback-schedule", _effi("--trainer.callbacks+=lightning_effi.callbacks.AccumulationScheduler",
                                       "--trainer.callbacks.init_args.schedule={0: 1, ten: 4}"), CLI_FAILURE,
        r"Invalid schedule threshold 'ten': must be an integer \(e.g. 1000 or '1000'\)", cli=True),
    Row("cli-model-summary-depth", _effi("--model_summary.max_depth=-2"), CLI_FAILURE,
        r"Invalid max_depth -2: must be -1 \(every layer\), 0 \(no summary\) or a positive int", cli=True),
    Row("cli-strategy-name", _effi("--trainer.strategy=effi_fsdpp"), CLI_FAILURE,
        r"Invalid strategy 'effi_fsdpp': not a registered strategy name; did you mean .*'effi_fsdp'", cli=True),
    Row("cli-optimizer-betas", _effi("--model.init_args.optimizer=lightning_effi.optim.Lamb",
                                     "--model.init_args.optimizer.init_args.betas=[0.9, 1.5]"), CLI_FAILURE,
        r"Invalid beta2 1.5: must be in \[0, 1\)", cli=True),
]


def _message(error: BaseException) -> str:
    """The text of ``error`` and of the errors it was raised from (jsonargparse wraps the constructor's)."""
    parts, seen = [], set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def test_table_is_complete():
    assert len(ROWS) >= 80
    assert len({r.id for r in ROWS}) == len(ROWS), "row ids must be unique"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_refused_naming_the_value_and_the_fix(row: Row, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the `effi` rows and Trainers write their logs here
    monkeypatch.delenv("EFFI_DEBUG", raising=False)
    _TRAINERS.clear()
    with pytest.raises(row.exc) as info:
        row.call(tmp_path)
    message = _message(info.value)
    if row.cli:
        message += "\n" + capsys.readouterr().err
    assert re.search(row.match, message, flags=re.DOTALL), f"{row.match!r} not found in:\n{message}"
    assert all(t.global_step == 0 for t in _TRAINERS), "the error came after an optimizer step"
