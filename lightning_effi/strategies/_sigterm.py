"""SIGTERM agreed on by every rank on the host, instead of Lightning's per-batch device broadcast.

Lightning broadcasts a one-element tensor on the root device at the start of every training batch and reads it back
with ``.item()``: on CUDA an NCCL broadcast plus a device sync per batch, so the host waits for the previous step's
kernels and the next step's launch overhead is no longer hidden. Here a CPU tensor is max-reduced over the gloo half
of the process group instead, and a signal on any rank (not only rank 0) stops every rank before the same batch.
The hooks are installed on one trainer's instances through :func:`lightning_effi._compat.install_sigterm_agreement`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_effi import _compat

__all__ = ["install_host_sigterm_check", "report_pending_sigterm"]

# Set by _on_sigterm on the trainer's signal connector: this rank was signalled, not yet agreed on by all ranks.
_SIGTERM_PENDING = "_effi_sigterm_pending"


def _on_sigterm(connector: Any, signum: int, frame: Any) -> None:
    """SIGTERM handler replacing Lightning's ``_SignalConnector._sigterm_notifier_fn`` for multi-process fits.

    Lightning's handler broadcasts on the root device from inside the signal handler, at whatever point the main
    thread was interrupted, and sets ``trainer.received_sigterm``, which makes the signalled rank leave after the
    current batch on its own; the other ranks learn it by pairing that broadcast with their next per-batch one.
    During ``fit`` the signal is only recorded here: every rank learns it at the next training-batch start from
    ``_agree_on_sigterm`` and all leave before that batch together. A signal during fit's validation therefore takes
    effect once validation is done (leaving a rank alone in the middle of it would hang the others' collectives); one
    after the last training batch sets ``received_sigterm`` when fit ends (:func:`report_pending_sigterm`). In
    ``validate``/``test``/``predict`` it sets ``received_sigterm`` at once, as upstream (without the broadcast).
    """
    if not getattr(connector, _SIGTERM_PENDING, False) and not connector.received_sigterm:
        launcher = connector.trainer.strategy.launcher
        if launcher is not None:
            launcher.kill(signum)  # as upstream: forward the signal to the processes Lightning started
    if connector.trainer.state.fn == TrainerFn.FITTING:
        setattr(connector, _SIGTERM_PENDING, True)
    else:
        connector.received_sigterm = True


def _agree_on_sigterm(loop: Any) -> None:
    """Replacement for ``_TrainingEpochLoop._broadcast_sigterm_tensor``: the same decision, made on the host.

    Every rank contributes whether it was signalled; the max over the gloo group is the decision, after which
    ``trainer.received_sigterm`` is set everywhere (callbacks' ``on_exception`` see it as usual).
    """
    trainer = loop.trainer
    connector = trainer._signal_connector
    local = bool(getattr(connector, _SIGTERM_PENDING, False) or trainer.received_sigterm)
    flag = torch.tensor([int(local)], dtype=torch.int32)
    try:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    except Exception:  # a broken group: fall back to this rank's own flag rather than never stopping
        flag.fill_(int(local))
    if int(flag[0]) == 1:
        connector.received_sigterm = True
        with contextlib.suppress(Exception):
            torch.distributed.barrier()  # as upstream: every rank leaves together
        raise SIGTERMException()


def install_host_sigterm_check(trainer: Trainer) -> bool:
    """Use ``_on_sigterm`` and ``_agree_on_sigterm`` in ``trainer`` when the default group can reduce CPU tensors.

    Call it at strategy setup, before Lightning registers its signal handlers. Returns whether it was installed; a
    Lightning without these private methods keeps its own behaviour, and so do a single process (no per-batch
    agreement there) and a group without gloo (e.g. ``process_group_backend="nccl"``).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or trainer.world_size < 2:
        return False  # one process: Lightning's loop never agrees, its handler's own flag is what stops it
    if "gloo" not in str(torch.distributed.get_backend()):
        return False
    if not _compat.install_sigterm_agreement(trainer, _agree_on_sigterm, _on_sigterm):
        return False
    setattr(trainer._signal_connector, _SIGTERM_PENDING, False)
    return True


def report_pending_sigterm(connector: Any) -> None:
    """At the end of fit: a SIGTERM no training batch agreed on (one during the last batch or the final validation)
    is reported like upstream would, so requeue logic that reads ``trainer.received_sigterm`` after fit sees it."""
    if connector is not None and getattr(connector, _SIGTERM_PENDING, False):
        connector.received_sigterm = True
        setattr(connector, _SIGTERM_PENDING, False)
