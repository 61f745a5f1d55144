"""The collective side of a crash-safe checkpoint directory: every rank writes into one temporary sibling directory,
rank 0 seals it and moves it into place once all have finished (filesystem steps in ``plugins/_atomic.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ParallelStrategy

from lightning_effi.plugins import _atomic


def save_directory(strategy: ParallelStrategy, filepath: _PATH, write: Callable[[Path], None], *,
                   seal: Callable[[Path], None], sync_every_file: bool) -> None:
    """Save a checkpoint directory so that ``filepath`` holds the previous checkpoint until the new one is complete.

    Args:
        write: called on every rank with the temporary directory; writes this rank's part.
        seal: called on rank 0 once every rank has written (and synced) its part, before the move: makes the
            writer's own last files durable, or writes a completion marker.
        sync_every_file: fsync every file before sealing, on one rank per node (whose page cache holds that node's
            writes), for writers that do not sync their files themselves.
    """
    final = Path(strategy.broadcast(str(filepath)))
    token = strategy.broadcast(_atomic.new_token())
    tmp = _atomic.temp_path(final, token)
    if strategy.is_global_zero:
        final.parent.mkdir(parents=True, exist_ok=True)
        _atomic.clean_leftovers(final.parent)
    strategy.barrier("effi_checkpoint_start")
    write(tmp)
    strategy.barrier("effi_checkpoint_written")
    if sync_every_file:
        if strategy.local_rank == 0:
            _atomic.fsync_tree(tmp)
        strategy.barrier("effi_checkpoint_synced")
    if strategy.is_global_zero:
        seal(tmp)
        _atomic.commit(tmp, final, token)
    # no rank goes on (to load it, or to remove an older checkpoint) before the new one is in place
    strategy.barrier("effi_checkpoint_committed")
