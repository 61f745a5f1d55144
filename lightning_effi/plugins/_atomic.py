"""Crash-safe checkpoint files and directories on a local filesystem, and what is wrong with a checkpoint path.

No Lightning here: :class:`~lightning_effi.plugins.AtomicCheckpointIO` and the strategies' directory saves call these
functions. The guarantee and the names on disk are described in ``docs/checkpoints.md``:

- a checkpoint is written under ``<name>.tmp-<token>`` in its own directory, flushed to disk, then moved onto
  ``<name>`` (:func:`commit`), so ``<name>`` always holds a complete checkpoint, the old one or the new one;
- replacing a directory swaps the two in one step where the filesystem can (Linux ``renameat2(RENAME_EXCHANGE)``),
  else moves the old one aside to ``<stem>.old-<token><suffix>`` first (still a ``.ckpt`` name, so Lightning's
  ``ckpt_path="last"`` finds it if the process dies between the two moves);
- a removed directory is first renamed to ``<name>.del-<token>``, so no half-deleted checkpoint keeps its name;
- :func:`clean_leftovers` finishes or undoes what a killed save left behind, before the next save.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import zipfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import IO, Any, Literal

import torch

#: written by EffiDeepSpeedStrategy into a checkpoint directory once every rank has finished its part
MARKER = "effi_complete"
# Lightning's sharded (DCP) save: DCP writes ".metadata" after every shard, then Lightning writes "meta.pt".
DCP_METADATA = ".metadata"
LIGHTNING_META = "meta.pt"
_ZIP_MAGIC = b"PK\x03\x04"

_TOKEN = r"[0-9a-f]{12}"
_PENDING = re.compile(rf"^.+\.(tmp|del)-{_TOKEN}$")
_ASIDE = re.compile(rf"^(?P<stem>.+)\.old-(?P<token>{_TOKEN})(?P<suffix>\.[^.]*)?$")

Kind = Literal["file", "dcp", "deepspeed"]
KINDS: dict[str, str] = {
    "file": "a single checkpoint file",
    "dcp": "a torch.distributed.checkpoint directory (a sharded EffiFSDPStrategy save)",
    "deepspeed": "a DeepSpeed checkpoint directory",
}
_READERS: dict[str, str] = {
    "file": "a single-device or DDP Trainer (or EffiFSDPStrategy)",
    "dcp": "EffiFSDPStrategy",
    "deepspeed": "EffiDeepSpeedStrategy",
}


# ------------------------------------------------------------------------------------------------- names on disk
def new_token() -> str:
    return secrets.token_hex(6)


def temp_path(path: Path, token: str) -> Path:
    """Where the checkpoint ``path`` is written before :func:`commit`: a name Lightning never takes for a checkpoint
    (its suffix is not ``.ckpt``)."""
    return path.with_name(f"{path.name}.tmp-{token}")


def _aside_path(path: Path, token: str) -> Path:
    return path.with_name(f"{path.stem}.old-{token}{path.suffix}")


def _trash_path(path: Path, token: str) -> Path:
    return path.with_name(f"{path.name}.del-{token}")


# ------------------------------------------------------------------------------------------------------ durability
def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (created or renamed files) durable; a no-op where directories cannot be opened."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (for writers that do not sync their own files)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath, name))
        fsync_dir(Path(dirpath))


# ---------------------------------------------------------------------------------------------------------- writes
def write_file(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write the file ``path`` with ``write(f)`` so that a crash leaves either the previous ``path`` or the new one."""
    token = new_token()
    tmp = temp_path(path, token)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path, token)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where it is not supported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def commit(tmp: Path, path: Path, token: str) -> None:
    """Move the complete checkpoint ``tmp`` (a file or a directory, written with ``token``) onto ``path``, replacing
    what is there: at every moment ``path``, or while the fallback swaps directories its aside name, holds a
    complete checkpoint."""
    parent = path.parent
    if not os.path.lexists(path) or (not tmp.is_dir() and not path.is_dir()):
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        _delete(tmp)  # now the previous checkpoint
    else:
        aside = _aside_path(path, token)
        os.replace(path, aside)
        os.replace(tmp, path)
        fsync_dir(parent)
        _delete(aside)
    fsync_dir(parent)


def remove(path: Path) -> None:
    """Delete a checkpoint; a directory is renamed away first, so a kill mid-deletion leaves no partial checkpoint
    under its name."""
    if path.is_dir() and not path.is_symlink():
        trash = _trash_path(path, new_token())
        os.replace(path, trash)
        fsync_dir(path.parent)
        shutil.rmtree(trash)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_leftovers(directory: Path) -> None:
    """Finish or undo what a killed save or removal left in ``directory``.

    A directory of checkpoints belongs to one run (as for Lightning's ``ModelCheckpoint``), whose saves run one at a
    time: any temporary entry seen here is from a save that died.
    """
    try:
        names = set(os.listdir(directory))
    except FileNotFoundError:
        return
    for name in sorted(names):
        m = _ASIDE.match(name)
        if m is None:
            continue
        final = m["stem"] + (m["suffix"] or "")
        pending = temp_path(directory / final, m["token"])
        if final in names:
            _delete(directory / name)  # the new checkpoint is in place
        elif pending.name in names:
            os.replace(pending, directory / final)  # complete: only a complete one is ever moved in
            _delete(directory / name)
        else:
            os.replace(directory / name, directory / final)
    for name in os.listdir(directory):
        if _PENDING.match(name):
            _delete(directory / name)
    fsync_dir(directory)


# -------------------------------------------------------------------------------------------------------- problems
def kind_of(path: Path) -> Kind | None:
    """Which checkpoint layout ``path`` has, from what is on disk; None for a directory of neither layout."""
    if not path.is_dir():
        return "file"
    names = set(os.listdir(path))
    if names & {DCP_METADATA, LIGHTNING_META} or any(n.endswith(".distcp") for n in names):
        return "dcp"
    if "latest" in names or MARKER in names or any(path.glob("*/*model_states.pt")):
        return "deepspeed"
    return None


# What to do about a checkpoint that is incomplete or not one: part of every such message.
EARLIER = "; resume from an earlier checkpoint (ckpt_path='last' skips incomplete ones) or delete this one"
NOT_TRAINING = "; pass a file written by Trainer.save_checkpoint or ModelCheckpoint"


def _file_problem(path: Path) -> str | None:
    if path.stat().st_size == 0:
        return "is empty (a save that died before writing?)" + EARLIER
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        if zipfile.is_zipfile(path):
            return None
        return "is truncated or not a torch checkpoint: a zip archive without its end record (an incomplete save?)" \
            + EARLIER
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy format
        return None
    return "is truncated or not a torch checkpoint (neither torch.save's zip archive nor a pickle)" + EARLIER


def _directory_problem(path: Path, kind: Kind | None, deepspeed_marker: bool) -> str | None:
    names = set(os.listdir(path))
    if not names:
        return "is an empty directory (an incomplete save?)" + EARLIER
    if kind == "dcp":
        if DCP_METADATA not in names:
            return f"is a torch.distributed.checkpoint directory without its {DCP_METADATA}, which DCP writes last " \
                   "(an incomplete save?)" + EARLIER
        if LIGHTNING_META not in names:
            return f"is a torch.distributed.checkpoint directory without Lightning's {LIGHTNING_META}, written after " \
                   "the shards (an incomplete save, or not a Lightning checkpoint)" + EARLIER
        return None
    if kind == "deepspeed":
        if deepspeed_marker and MARKER not in names:
            return f"is a DeepSpeed checkpoint directory without the {MARKER} marker EffiDeepSpeedStrategy writes " \
                   "once every rank has finished (an incomplete save?); if it is complete (saved without " \
                   f"EffiDeepSpeedStrategy), mark it with `touch {path / MARKER}`"
        if "latest" not in names:
            return "is a DeepSpeed checkpoint directory without its 'latest' tag file (an incomplete save?)" + EARLIER
        return None
    hint = EARLIER
    if path.parent != path and kind_of(path.parent) in ("dcp", "deepspeed"):
        hint = f"; it is inside the checkpoint {str(path.parent)!r}: pass that"
    return f"is a directory without DeepSpeed or DCP metadata (an incomplete save?){hint}"


def checkpoint_problem(path: Path, accepts: Collection[str], reader: str, *,
                       deepspeed_marker: bool = True) -> str | None:
    """What is wrong with ``path`` as a checkpoint ``reader`` resumes from (which reads the layouts ``accepts``), as
    words that follow the path; None when it looks complete. Reads only names and a file's first and last bytes.

    Args:
        deepspeed_marker: require :data:`MARKER` in a DeepSpeed directory (default True; False for directories that
            other DeepSpeed strategies wrote).
    """
    if not path.exists():
        return "does not exist"
    kind = kind_of(path)
    problem = _file_problem(path) if kind == "file" else _directory_problem(path, kind, deepspeed_marker)
    if problem is None and kind is not None and kind not in accepts:
        return f"is {KINDS[kind]}, which {reader} does not resume: resume it with {_READERS[kind]}, or take its " \
               "weights with `effi export CKPT OUT.pt`"
    return problem


def content_problem(checkpoint: Any) -> str | None:
    """What makes a loaded object not a Lightning training checkpoint (an ``effi export`` file, a bare
    ``state_dict``, a foreign dict), as words that follow the path; None for a training checkpoint."""
    from lightning_effi import export

    if not isinstance(checkpoint, dict):
        return f"holds a {type(checkpoint).__name__}, not a Lightning training checkpoint (a dict)" + NOT_TRAINING
    if checkpoint.get("format") == export.FORMAT:
        model = checkpoint.get("model")
        cls = model["class_path"].rpartition(".")[2] if isinstance(model, dict) and "class_path" in model else None
        how = f"{cls}.from_export(path) or " if cls else ""
        return "is an `effi export` file (weights only), not a training checkpoint: load it with " \
               f"{how}lightning_effi.export.load_export(path); to resume training pass the checkpoint it was " \
               "exported from"
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return "is a bare state_dict (weights only: an earlier `effi export`, or torch.save(model.state_dict())), " \
               "not a training checkpoint: load it with model.load_state_dict(torch.load(path)); to resume " \
               "training pass the checkpoint it came from"
    if "pytorch-lightning_version" not in checkpoint:
        keys = sorted(map(str, checkpoint))
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"is not a Lightning training checkpoint (no 'pytorch-lightning_version' entry; its keys: {shown})" \
            + NOT_TRAINING
    return None


def file_content_problem(path: Path) -> str | None:
    """:func:`content_problem` of a checkpoint file, read without its tensors' data (mmap) and with
    ``weights_only=True``; None also when that reader cannot load it (the original error then stands)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # the caller re-raises the error of the load that failed
        return None
    return content_problem(checkpoint)
