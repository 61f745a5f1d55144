"""The ``effi`` command: a LightningCLI for the example models, plus ``effi export``.

    effi fit --config configs/gpt_tiny.yaml [--trainer.max_steps=N ...]
    effi export CKPT OUT.pt [--strip-prefix model.]
"""

from __future__ import annotations

import argparse
import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from jsonargparse import lazy_instance


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
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")

    def after_fit(self) -> None:
        trainer, model, dm = self.trainer, self.model, self.datamodule
        if trainer.interrupted:
            return
        if trainer.num_val_batches and any(n > 0 for n in trainer.num_val_batches) or trainer.limit_val_batches:
            trainer.validate(model, datamodule=dm, verbose=False)
        # trainer.log_dir broadcasts from rank 0 (a collective): every rank must ask before the others return.
        log_dir = trainer.log_dir if trainer.logger is not None else None
        if not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val/loss")
        ckpt = trainer.checkpoint_callback
        lines = ["", "effi: training finished"]
        if isinstance(ckpt, ModelCheckpoint):
            lines.append(f"  checkpoints: {ckpt.dirpath}  (last: {ckpt.last_model_path or ckpt.best_model_path or '-'})")
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
    """Console-script entry point (returns None so ``sys.exit(main())`` exits 0)."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "export":
        _export_main(argv[1:])
        return
    cli(argv)


def cli(argv: list[str]) -> EffiCLI:
    """Build and run the LightningCLI on ``argv``; returns it (for tests and notebooks)."""
    import lightning_effi.strategies  # noqa: F401  (registers effi_fsdp / effi_deepspeed_stage_N)

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
