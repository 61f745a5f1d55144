"""The ``effi`` command: a LightningCLI for the example models, plus ``effi export``.

    effi fit --config configs/gpt_tiny.yaml [--trainer.max_steps=N ...]
    effi export CKPT OUT.pt [--strip-prefix model.]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import lightning.pytorch as pl
from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_effi.callbacks import SyncFreeProgressBar


class EffiCLI(LightningCLI):
    """LightningCLI with the package's defaults: CSV logs under ``runs/``, a rich progress bar, the corpus' block
    size linked into the model, and a closing report (where checkpoints and logs went, final val loss against the
    corpus' unigram entropy)."""

    def add_arguments_to_parser(self, parser) -> None:
        # One place for the sequence length: the data module's block_size also sizes the model's position table.
        parser.link_arguments("data.init_args.block_size", "model.init_args.block_size")
        # Always-on, configurable callbacks (``--checkpoint.every_n_train_steps=...``, ``--progress_bar.refresh_rate``).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        # A RichProgressBar (same options) that makes no device sync per batch (lightning_effi.callbacks.progress).
        parser.add_lightning_class_args(SyncFreeProgressBar, "progress_bar")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # The always-on callbacks above would make Lightning reject `--trainer.enable_progress_bar=false` and
        # `--trainer.enable_checkpointing=false` ("found RichProgressBar in callbacks list"): honour the flags instead.
        drop: list[type] = []
        if config.get("enable_progress_bar") is False:
            drop.append(RichProgressBar)
        if config.get("enable_checkpointing") is False:
            drop.append(ModelCheckpoint)
        callbacks = [c for c in callbacks if not isinstance(c, tuple(drop))] if drop else callbacks
        return super()._instantiate_trainer(config, callbacks)

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
            last = ckpt.last_model_path or ckpt.best_model_path or "-"
            lines.append(f"  checkpoints: {ckpt.dirpath}  (last: {last})")
        if log_dir:
            lines.append(f"  logs:        {log_dir}")
        if val is not None:
            lines.append(f"  final val loss: {float(val):.4f} nats/token")
        if hasattr(dm, "unigram_entropy"):
            lines.append(f"  unigram entropy of the training corpus: {dm.unigram_entropy():.4f} nats/token")
        print("\n".join(lines), flush=True)


def _export_main(argv: list[str]) -> None:
    from lightning_effi.export import export_checkpoint

    p = argparse.ArgumentParser(prog="effi export",
                                description="Write a single-file state_dict from a (possibly sharded) checkpoint.")
    p.add_argument("ckpt", help="Lightning .ckpt file, FSDP (DCP) checkpoint directory or DeepSpeed checkpoint dir")
    p.add_argument("out", help="output .pt file (torch.save of a state_dict)")
    p.add_argument("--strip-prefix", default=None,
                   help="drop this key prefix, e.g. 'model.' to load into the bare GPT/BertEncoder")
    a = p.parse_args(argv)
    out = export_checkpoint(a.ckpt, a.out, strip_prefix=a.strip_prefix)
    print(f"effi export: wrote {out}")


def main(args: list[str] | None = None) -> None:
    """Console-script entry point (returns None so ``sys.exit(main())`` exits 0).

    ``args=None`` reads ``sys.argv`` (LightningCLI does so itself, without its "args given both ways" warning).
    """
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "export":
        _export_main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print("effi export CKPT OUT.pt [--strip-prefix model.]   write a single-file state_dict (see effi export -h)")
    cli(args)


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


def cli(argv: list[str] | None) -> EffiCLI:
    """Build and run the LightningCLI on ``argv`` (None: ``sys.argv``); returns it (for tests and notebooks)."""
    import lightning_effi.strategies  # noqa: F401  (registers effi_fsdp / effi_deepspeed_stage_N)

    raw = sys.argv[1:] if argv is None else list(argv)
    expanded = _expand_registered_strategy(raw)
    if argv is not None or expanded != raw:
        argv = expanded
        # LightningCLI warns when args come both from here and from sys.argv; here they are sys.argv, rewritten.
        warnings.filterwarnings("ignore", message=".*not recommended to provide both args and command line")
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
    )


if __name__ == "__main__":
    main()
