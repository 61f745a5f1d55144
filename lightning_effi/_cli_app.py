"""The LightningCLI behind ``effi fit|validate|test|predict`` (imported only for those: ``lightning_effi.cli`` stays
free of torch so ``effi export -h`` and ``effi plot`` start at once)."""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from argparse import ArgumentError
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim.lr_scheduler import ReduceLROnPlateau
from typing_extensions import override

from lightning_effi import _cli_checks, _cli_errors
from lightning_effi.callbacks import ConfigureOptimizer, EffiModelSummary, FailFast, SyncFreeProgressBar

# (source, target): the data module's block_size also sizes the model's position table
_LINKS = (("data.init_args.block_size", "model.init_args.block_size"),)


def _init(value: Any) -> tuple[type, dict[str, Any]] | None:
    """The class and init arguments of a ``class_path``/``init_args`` config value (None when unset)."""
    from jsonargparse._util import import_object

    if not value:
        return None
    if isinstance(value, Namespace):
        value = value.as_dict()
    args = dict(value.get("init_args") or {})
    return import_object(value["class_path"]), args


class _LoopStarted(Callback):
    """Marks the end of the input phase (``lightning_effi._cli_errors``): the first hook of any loop."""

    def __init__(self, state: _cli_errors.RunState) -> None:
        self.state = state

    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state.started = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state.started = True

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state.started = True

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state.started = True

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state.started = True


class EffiCLI(LightningCLI):
    """LightningCLI with the package's defaults: CSV logs under ``runs/``, a rich progress bar, the corpus' block
    size linked into the model, ``--optimizer``/``--lr_scheduler`` through :class:`ConfigureOptimizer`, and a closing
    report (where checkpoints, logs and the metrics plot went, final val loss against the corpus' unigram entropy).

    Before any training work it refuses what Lightning would take silently (``lightning_effi._cli_checks``): a
    misspelt strategy name, ``max_steps=0``, a negative ``gradient_clip_val``, model options that contradict the
    ``--ckpt_path`` checkpoint's hyper-parameters; abbreviated options are unknown options. ``run_state`` records
    when the Trainer starts its first loop (what fails before is bad input).
    """

    def __init__(self, *args: Any, run_state: _cli_errors.RunState | None = None, **kwargs: Any) -> None:
        self.run_state = run_state if run_state is not None else _cli_errors.RunState()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in _LINKS:
            parser.link_arguments(source, target)
        # Always-on, configurable callbacks (``--checkpoint.every_n_train_steps=...``, ``--progress_bar.refresh_rate``).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        # A RichProgressBar (same options) that makes no device sync per batch (lightning_effi.callbacks.progress).
        parser.add_lightning_class_args(SyncFreeProgressBar, "progress_bar")
        parser.add_lightning_class_args(EffiModelSummary, "model_summary")
        # One rank's exception ends every rank under any strategy (a no-op on one process; the package's strategies
        # run the same watchdog themselves).
        parser.add_lightning_class_args(FailFast, "fail_fast")

    def parse_arguments(self, parser, args) -> None:
        self._args = sys.argv[1:] if args is None else args  # re-parsed by _check_resume
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            message = str(e)
            if message.startswith("unrecognized arguments: "):
                raise ArgumentError(None, message + self._did_you_mean(message)) from e
            raise

    def _did_you_mean(self, message: str) -> str:
        """`` (did you mean --trainer.max_steps?)`` for unknown options close to the subcommand's own."""
        sub = next((a for a in self._args if isinstance(a, str) and a in self._subcommand_parsers), None)
        parser = self._subcommand_parsers[sub] if sub else self.parser
        known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
        unknown = [a.split("=", 1)[0] for a in message.split(": ", 1)[1].split() if a.startswith("--")]
        close = [c for u in unknown for c in difflib.get_close_matches(u, known, n=1, cutoff=0.75)]
        return f" (did you mean {' or '.join(dict.fromkeys(close))}?)" if close else ""

    def _parse_ckpt_path(self) -> None:
        # before LightningCLI replaces the config's model values with the checkpoint's
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and _cli_checks.check_ckpt_path(ckpt_path):
            self._check_resume(subcommand, ckpt_path)
        super()._parse_ckpt_path()

    def _check_resume(self, subcommand: str, ckpt_path: Any) -> None:
        """Refuse model options that contradict the checkpoint's hyper-parameters, naming both values."""
        hparams, restored = _cli_checks.checkpoint_hyper_parameters(ckpt_path)
        if not hparams:
            return
        config = self.config[subcommand]
        if restored:
            # LightningCLI restores every value but the given ones, which it overrides silently: check those.
            args = self._args
            given = (self.parser.parse_object(args, defaults=False) if isinstance(args, (dict, Namespace))
                     else self.parser.parse_args(args, defaults=False))[subcommand]
            model = _cli_checks.plain(given.get("model") or {})
            init_args = model.setdefault("init_args", {})
            for source, target in _LINKS:
                if given.get(source) is not None:
                    init_args[target.rsplit(".", 1)[1]] = config[target]
        else:
            model = _cli_checks.plain(config.get("model") or {})  # nothing restores them: every value counts
        labels = {target: f"{source} (which sets {target})" for source, target in _LINKS}
        conflicts = _cli_checks.resume_conflicts(model, hparams, labels)
        _cli_checks.raise_resume_conflicts(ckpt_path, conflicts, restored)

    def before_instantiate_classes(self) -> None:
        trainer = self._get(self.config, "trainer")
        strategy = trainer.get("strategy")
        if isinstance(strategy, str):
            _cli_checks.check_strategy_name(strategy)
        if self.subcommand in (None, "fit"):
            _cli_checks.check_fit_limits(trainer.get("max_steps"), trainer.get("gradient_clip_val"))

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # The always-on callbacks above would make Lightning reject `--trainer.enable_progress_bar=false` and
        # `--trainer.enable_checkpointing=false` ("found RichProgressBar in callbacks list"): honour the flags instead.
        drop: list[type] = []
        if config.get("enable_progress_bar") is False:
            drop.append(RichProgressBar)
        if config.get("enable_checkpointing") is False:
            drop.append(ModelCheckpoint)
        if config.get("enable_model_summary") is False:
            drop.append(ModelSummary)
        callbacks = [c for c in callbacks if not isinstance(c, tuple(drop))] if drop else callbacks
        # first, so that it marks the start before another callback's hook can fail
        callbacks = [_LoopStarted(self.run_state), *callbacks]
        chosen = getattr(self, "_cli_optimizer", None)
        if chosen is not None:
            given = [c for c in [*callbacks, *(config.get("callbacks") or [])] if isinstance(c, ConfigureOptimizer)]
            if given:
                raise ValueError("Both --optimizer and a ConfigureOptimizer callback choose the optimizer; choose it "
                                 "in one place: drop --optimizer/--lr_scheduler or the callback")
            callbacks = [*callbacks, chosen]
        return super()._instantiate_trainer(config, callbacks)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # LightningCLI builds the --optimizer from model.parameters() when the CLI starts: one group (biases and
        # norms decayed, LAMB-adapted) holding the unsharded parameters, which a sharding strategy then replaces.
        # ConfigureOptimizer builds it when the strategy asks, from the sharded parameters, with param_groups.
        optimizer = _init(self._get(self.config_init, "optimizer", default=None))
        scheduler = _init(self._get(self.config_init, "lr_scheduler", default=None))
        if optimizer is None or (scheduler is not None and issubclass(scheduler[0], ReduceLROnPlateau)):
            # nothing chosen, or a plateau scheduler, whose monitor only LightningCLI's own method configures
            return super()._add_configure_optimizers_method_to_model(subcommand)
        cls, args = optimizer
        args.pop("params", None)
        lr, weight_decay = args.pop("lr", None), args.pop("weight_decay", 0.0)
        # handed to the Trainer in _instantiate_trainer, which LightningCLI calls right after this
        self._cli_optimizer = ConfigureOptimizer(
            cls, lr=lr, optimizer_args=args, weight_decay=weight_decay or 0.0,
            lr_scheduler=scheduler[0] if scheduler else None,
            lr_scheduler_args={k: v for k, v in scheduler[1].items() if k != "optimizer"} if scheduler else None,
            # LightningCLI's own method returns the scheduler without an interval: Lightning steps it per epoch.
            lr_scheduler_interval="epoch")

    def after_fit(self) -> None:
        trainer, model, dm = self.trainer, self.model, self.datamodule
        if trainer.interrupted:
            return
        has_val_data = ((dm is not None and is_overridden("val_dataloader", dm))
                        or is_overridden("val_dataloader", model))
        if is_overridden("validation_step", model) and has_val_data and trainer.limit_val_batches != 0:
            trainer.validate(model, datamodule=dm, verbose=False)
        # trainer.log_dir broadcasts from rank 0 (a collective): every rank must ask before the others return.
        log_dir = trainer.log_dir if trainer.logger is not None else None
        if not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val/loss")
        ckpt = trainer.checkpoint_callback
        lines = ["", "effi: training finished"]
        if isinstance(ckpt, ModelCheckpoint):
            last = _existing(ckpt.last_model_path, ckpt.best_model_path)
            lines.append(f"  checkpoints: {ckpt.dirpath}  (last: {last})")
        if log_dir:
            lines.append(f"  logs:        {log_dir}")
            lines.append(f"  plot:        {_plot(log_dir)}")
        if val is not None:
            lines.append(f"  final val loss: {float(val):.4f} nats/token")
        if hasattr(dm, "unigram_entropy"):
            lines.append(f"  unigram entropy of the training corpus: {dm.unigram_entropy():.4f} nats/token")
        print("\n".join(lines), flush=True)


def _existing(*paths: str) -> str:
    """The first of ``paths`` that exists ("-" if none does): the callback keeps paths of checkpoints it has since
    removed, and after a resume into a new directory, one from the old run."""
    return next((p for p in paths if p and os.path.exists(p)), "-")


def _plot(log_dir: str) -> str:
    """Render the run's metrics next to its logs; a run whose logs cannot be plotted still finishes."""
    from lightning_effi.plot import plot_run

    try:
        return str(plot_run(log_dir))
    except Exception as e:  # noqa: BLE001  (the plot is a convenience, never a reason to fail a finished run)
        return f"- ({type(e).__name__}: {e}; try `effi plot {log_dir}`)"


_STRATEGY = "--trainer.strategy"


def _expand_registered_strategy(argv: list[str]) -> list[str]:
    """``--trainer.strategy=effi_fsdp --trainer.strategy.init_args.tensor_parallel_size=2`` as the class path plus
    the registry entry's own init arguments: jsonargparse accepts ``init_args`` only after a class path, and a
    registry name is just a string to it. Without ``init_args`` options the name is left to Lightning."""
    from lightning.pytorch.strategies import StrategyRegistry

    if not any(a.startswith(_STRATEGY + ".init_args.") for a in argv):
        return argv
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = None
        if arg.startswith(_STRATEGY + "="):
            name, step = arg.split("=", 1)[1], 1
        elif arg == _STRATEGY and i + 1 < len(argv):
            name, step = argv[i + 1], 2
        if name is not None:
            _cli_checks.check_strategy_name(name)  # else jsonargparse's "Expected a dot import path string"
        if name is not None and name in StrategyRegistry:
            entry = StrategyRegistry[name]
            cls = entry["strategy"]
            out.append(f"{_STRATEGY}={cls.__module__}.{cls.__qualname__}")
            out.extend(f"{_STRATEGY}.init_args.{k}={v}" for k, v in entry["init_params"].items())
            i += step
            continue
        out.append(arg)
        i += 1
    return out


def _parser_kwargs() -> dict[str, Any]:
    """For the main parser and each subcommand's: parse errors raise (``cli`` reports them on one line), and an
    abbreviated option is an unknown one (``--trainer.max_step=5`` would set max_steps)."""
    kwargs = {"exit_on_error": False, "allow_abbrev": False}
    return {**kwargs, **{name: dict(kwargs) for name in LightningCLI.subcommands()}}


def cli(argv: list[str] | None, *, run_state: _cli_errors.RunState | None = None) -> EffiCLI:
    """Build and run the LightningCLI on ``argv`` (None: ``sys.argv``); returns it (for tests and notebooks).

    A parse error prints ``effi: error: <reason>`` and exits with code 2 (argparse's convention), or raises with
    its traceback under ``EFFI_DEBUG=1``; any other error raises. ``run_state.started`` tells whether the Trainer had
    started its first loop.
    """
    import lightning_effi.strategies  # noqa: F401  (registers effi_fsdp / effi_deepspeed_stage_N)

    raw = sys.argv[1:] if argv is None else list(argv)
    expanded = _expand_registered_strategy(raw)
    if argv is not None or expanded != raw:
        argv = expanded
        # LightningCLI warns when args come both from here and from sys.argv; here they are sys.argv, rewritten.
        warnings.filterwarnings("ignore", message=".*not recommended to provide both args and command line")
    try:
        return EffiCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": lazy_instance(CSVLogger, save_dir="runs"),
            },
            parser_kwargs=_parser_kwargs(),
            run_state=run_state,
        )
    except ArgumentError as e:
        if _cli_errors.debug():
            raise
        _cli_errors.report(e)


