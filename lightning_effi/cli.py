"""The ``effi`` command: a LightningCLI for any LightningModule (the example models by default), plus ``effi export``
and ``effi plot``.

    effi fit --config configs/gpt_tiny.yaml [--trainer.max_steps=N ...]
    effi export CKPT OUT.pt [--strip-prefix model.]
    effi plot RUN_DIR [--out FILE]

Bad input (a parse error, an invalid value, a misspelt option or strategy, options that contradict the resumed
checkpoint) is reported as ``effi: error: <reason>`` on one line, exit code 2; ``--debug`` anywhere on the command
line (or ``EFFI_DEBUG=1``) shows the traceback instead. Input ends where the Trainer starts its first loop (sanity
check, training or evaluation): what fails after that is the run's and keeps its traceback
(``lightning_effi._cli_errors``).

This module imports neither torch nor Lightning: the subcommands that need neither start at once, and the
LightningCLI (``lightning_effi._cli_app``) loads only for fit/validate/test/predict.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from lightning_effi import _cli_errors, _quiet

if TYPE_CHECKING:
    from lightning_effi._cli_app import EffiCLI

USAGE = """\
effi: train any LightningModule with lightning_effi from a config, export and plot runs.

  effi fit|validate|test|predict --config FILE [--trainer.X=...]   LightningCLI subcommands (options below)
  effi export CKPT OUT.pt [--strip-prefix model.]   single-file weights plus what rebuilds the model (effi export -h)
  effi plot RUN_DIR [--out FILE]                    a run's metrics as a PNG next to its logs (effi plot -h)
  effi --verbose ...                                keep upstream tips, deprecation warnings and DeepSpeed's logs
  effi --debug ...                                  a traceback instead of the one-line error (or EFFI_DEBUG=1)
"""


def _export_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="effi export",
                                description="Write one file with the weights of a (possibly sharded) checkpoint and "
                                            "what rebuilds the network (GPT.from_export / load_export).")
    p.add_argument("ckpt", help="Lightning .ckpt file, FSDP (DCP) checkpoint directory or DeepSpeed checkpoint dir")
    p.add_argument("out", help="output .pt file (a plain dict: state_dict, model class and arguments)")
    p.add_argument("--strip-prefix", default=None,
                   help="drop this key prefix, e.g. 'model.' to load into the bare GPT/BertEncoder")
    a = p.parse_args(argv)
    from lightning_effi.export import export_checkpoint  # after parsing: -h needs no torch

    out = export_checkpoint(a.ckpt, a.out, strip_prefix=a.strip_prefix)
    print(f"effi export: wrote {out}")


def _plot_main(argv: list[str]) -> None:
    from lightning_effi.plot import main as plot_main

    plot_main(argv)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point (returns None so ``sys.exit(main())`` exits 0).

    ``args=None`` reads ``sys.argv`` (LightningCLI does so itself, without its "args given both ways" warning).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if "--verbose" in argv:
        argv.remove("--verbose")
        args = argv
        # in the environment, so the ranks a launcher starts (which re-run this command line) are verbose too
        os.environ[_quiet.VERBOSE_ENV] = "1"
        _quiet.uninstall()
    given = len(argv)
    debug = _cli_errors.pop_debug(argv)
    if len(argv) != given:
        args = argv
    if debug:
        os.environ[_cli_errors.DEBUG_ENV] = "1"  # read by cli() for parse errors
    state = _cli_errors.RunState()
    try:
        if argv[:1] == ["export"]:
            _export_main(argv[1:])
            return
        if argv[:1] == ["plot"]:
            _plot_main(argv[1:])
            return
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
        cli(args, run_state=state)
        _end_process_group()
    except Exception as e:
        if debug or state.started or not _cli_errors.is_input_error(e):
            raise
        _cli_errors.report(e)


def _end_process_group() -> None:
    """After a run in several processes: gloo's worker threads must not outlive the interpreter's teardown (an
    exit-time abort otherwise); the barrier keeps a rank from leaving while another still talks to it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cli(argv: list[str] | None, *, run_state: _cli_errors.RunState | None = None) -> EffiCLI:
    """Build and run the LightningCLI on ``argv`` (None: ``sys.argv``); returns it (for tests and notebooks).

    A parse error exits with code 2 after one line on stderr; other errors raise, bad input or not (``main`` tells
    them apart with ``run_state``).
    """
    from lightning_effi._cli_app import cli as run

    return run(argv, run_state=run_state)


def __getattr__(name: str) -> Any:
    if name == "EffiCLI":  # the class, without importing Lightning for the subcommands that do not need it
        from lightning_effi._cli_app import EffiCLI

        return EffiCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
