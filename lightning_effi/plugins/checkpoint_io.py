"""AtomicCheckpointIO: Lightning's TorchCheckpointIO with crash-safe saves and loads that say what is wrong.

The package's strategies use it by default; any other strategy that saves through a CheckpointIO (single device, DDP)
gets it with ``Trainer(plugins=[AtomicCheckpointIO()])``. The filesystem work is in :mod:`._atomic`; the guarantee
is in ``docs/checkpoints.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import fsspec.utils
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_effi import _compat
from lightning_effi._protocols import CheckpointValidator
from lightning_effi.plugins import _atomic

# What a Trainer whose CheckpointIO is this one resumes from: files; directories are the strategy's, and a stock
# DeepSpeed strategy writes no completion marker.
_READER = "a single-file strategy (single device, DDP)"


def _local(path: _PATH) -> bool:
    return fsspec.utils.get_protocol(str(path)) == "file"


def raise_if_problem(path: Path, problem: str | None) -> None:
    """Raise for a checkpoint path that :func:`._atomic.checkpoint_problem` found wrong, naming it."""
    if problem is None:
        return
    if problem == "does not exist":
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist; pass the path of a saved checkpoint "
                                "(ModelCheckpoint's dirpath/<name>.ckpt) or ckpt_path='last'")
    raise ValueError(f"Checkpoint {str(path)!r} {problem}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save``/``torch.load`` checkpoints that are complete or absent.

    A save writes ``<name>.tmp-<token>`` in the checkpoint's directory, flushes and fsyncs it, renames it onto
    ``<name>`` and fsyncs the directory, so a kill at any moment leaves the previous checkpoint of that name loadable
    (Lightning's own save writes through an fsspec transaction whose temporary file sits in the system temp directory
    and is moved without a sync). Leftovers of a killed save are removed at the next save into the directory. A
    removal renames a directory away before deleting it.

    A load names the path and what is wrong with it (truncated, not a torch file, an ``effi export`` file, a directory
    of another strategy) instead of torch's unpickling error or Lightning's ``KeyError``. Remote (fsspec) paths are
    left to ``TorchCheckpointIO``.
    """

    def __init__(self) -> None:
        super().__init__()
        _compat.filter_last_checkpoints(_complete_last_checkpoints)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if not _local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint(storage_options={storage_options!r}) is not "
                            "supported: it writes local files with torch.save; leave storage_options unset")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic.clean_leftovers(target.parent)
        _atomic.write_file(target, lambda f: torch.save(checkpoint, f))

    @override
    def load_checkpoint(self, path: _PATH, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if not _local(path):
            return super().load_checkpoint(path, map_location, weights_only)
        source = Path(path)
        raise_if_problem(source, self.effi_checkpoint_problem(source))
        checkpoint = super().load_checkpoint(path, map_location, weights_only)
        raise_if_problem(source, _atomic.content_problem(checkpoint))
        return checkpoint

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        if not _local(path):
            return super().remove_checkpoint(path)
        _atomic.remove(Path(path))

    def effi_checkpoint_problem(self, path: Path) -> str | None:
        """What is wrong with ``path`` as a checkpoint file this plugin loads (None: it looks complete)."""
        return _atomic.checkpoint_problem(path, ("file",), _READER)


def _validator(trainer: Any) -> CheckpointValidator | None:
    """Whose rules decide that a checkpoint is complete: the strategy's, else its CheckpointIO's, else nobody's."""
    strategy = trainer.strategy
    if isinstance(strategy, CheckpointValidator):
        return strategy
    io = strategy.checkpoint_io
    while isinstance(io, _WrappingCheckpointIO):
        io = io.checkpoint_io
    return io if isinstance(io, CheckpointValidator) else None


def _complete_last_checkpoints(trainer: Any, found: set[str]) -> set[str]:
    """Lightning's candidates for ``ckpt_path="last"`` (it takes the newest of them) without incomplete ones."""
    validator = _validator(trainer)
    if validator is None:
        return found
    complete = set()
    for path in found:
        problem = validator.effi_checkpoint_problem(Path(path))
        if problem is None:
            complete.add(path)
        else:
            rank_zero_warn(f'ckpt_path="last" skips {path!r}: it {problem}')
    return complete


class AtomicCheckpointIODefault:
    """Mixin for a strategy: :class:`AtomicCheckpointIO` when the user gave no CheckpointIO (upstream's default is
    TorchCheckpointIO), also inside a wrapper such as ``AsyncCheckpointIO()`` given without one; and
    ``ckpt_path="last"`` checked by the strategy's ``effi_checkpoint_problem`` from its construction on (the Trainer
    resolves "last" before it first reads ``checkpoint_io``)."""

    _checkpoint_io: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _compat.filter_last_checkpoints(_complete_last_checkpoints)

    @property
    def checkpoint_io(self) -> Any:
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        elif isinstance(self._checkpoint_io, _WrappingCheckpointIO) and self._checkpoint_io.checkpoint_io is None:
            self._checkpoint_io.checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Any) -> None:
        self._checkpoint_io = io
