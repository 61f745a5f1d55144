"""A byte-level corpus that exists on every machine with no network: the Python standard library's sources.

Tokens are bytes (ids 0-255) plus four special ids; documents (files) are joined with ``EOS_ID``. The default corpus
is the ``.py`` files of the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``, without
``site-packages``, ``test``/``tests`` folders and ``__pycache__``). Files are ordered and split by a stable hash of
their path relative to the root, so the selection and the train/val split are fixed for a given Python version
and disjoint by file. A user text file or folder can be given instead (``path``).
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

NUM_BYTES = 256
PAD_ID, BOS_ID, EOS_ID, MASK_ID = 256, 257, 258, 259
VOCAB_SIZE = 260
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}


def _hash01(rel: str) -> float:
    """A stable number in [0, 1) for a relative path (independent of PYTHONHASHSEED and of the file system order)."""
    return int(hashlib.md5(rel.encode()).hexdigest()[:12], 16) / 16**12


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files of the standard library in the fixed order used for the corpus (by path hash)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: (_hash01(p.relative_to(root).as_posix()), p.relative_to(root).as_posix()))


class BlockDataset(Dataset):
    """Fixed-length blocks cut from one token stream.

    ``task="causal"``: item ``i`` is ``stream[i*T : i*T + T + 1]`` split into ``input_ids`` (first T) and ``labels``
    (last T, i.e. shifted by one). ``task="mlm"``: ``input_ids`` and ``labels`` are the same T tokens (the module
    applies the masking).
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, task: str):
        self.tokens, self.block_size, self.task = tokens, block_size, task
        extra = 1 if task == "causal" else 0
        self.n = max(0, (len(tokens) - extra) // block_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        T = self.block_size
        if self.task == "causal":
            chunk = self.tokens[i * T: i * T + T + 1].long()
            return {"input_ids": chunk[:-1], "labels": chunk[1:]}
        chunk = self.tokens[i * T: (i + 1) * T].long()
        return {"input_ids": chunk, "labels": chunk.clone()}


def _encode(docs: list[bytes]) -> torch.Tensor:
    out = bytearray()
    ids: list[int] = []
    for d in docs:
        out += d
        ids.append(len(out))
        out += b"\0"  # placeholder for EOS, replaced below (bytes cannot hold id 258)
    t = torch.frombuffer(out, dtype=torch.uint8).to(torch.int16) if out else torch.zeros(0, dtype=torch.int16)
    if ids:
        t[torch.tensor(ids)] = EOS_ID
    return t


class CorpusDataModule(pl.LightningDataModule):
    """Byte-level language-modelling data from the standard library's sources or from your own text.

    Args:
        path: ``None`` (default) for the Python standard library's ``.py`` files; else a text file (split by
            position: the last ``val_fraction`` of its bytes is validation) or a folder (every file matching
            ``pattern``, split by file).
        pattern: glob for files inside a ``path`` folder. Default ``"**/*"`` (every file).
        block_size: tokens per training example. Default 128.
        batch_size: examples per micro-batch, per device. Default 16.
        val_fraction: share of files (or bytes) held out for validation. Default 0.05.
        max_bytes: cap on the corpus size read from disk (files are taken in their fixed order). Default 4 MB.
        seed: seed of the training-order shuffle. Default 1234.
        task: ``"causal"`` (GPT: labels shifted by one) or ``"mlm"`` (BERT: labels = inputs, masked by the model).
        num_workers: DataLoader workers. Default 0.
    """

    def __init__(self, path: str | None = None, pattern: str = "**/*", block_size: int = 128, batch_size: int = 16,
                 val_fraction: float = 0.05, max_bytes: int = 4_000_000, seed: int = 1234,
                 task: Literal["causal", "mlm"] = "causal", num_workers: int = 0):
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Invalid CorpusDataModule.{name} {value!r}: must be a positive integer")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"Invalid CorpusDataModule.val_fraction {val_fraction!r}: must be in (0, 1)")
        if task not in ("causal", "mlm"):
            raise ValueError(f"Invalid CorpusDataModule.task {task!r}: must be 'causal' or 'mlm'")
        if num_workers < 0:
            raise ValueError(f"Invalid CorpusDataModule.num_workers {num_workers!r}: must be >= 0")
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"CorpusDataModule.path {path!r} does not exist; give an existing text file or "
                                    "folder, or leave path unset to use the Python standard library's sources")
        self.save_hyperparameters()
        self.vocab_size = VOCAB_SIZE  # 256 bytes + PAD/BOS/EOS/MASK: a model's vocab_size must be at least this
        self.path, self.pattern, self.block_size, self.batch_size = path, pattern, block_size, batch_size
        self.val_fraction, self.max_bytes, self.seed, self.task = val_fraction, max_bytes, seed, task
        self.num_workers = num_workers
        self.train_tokens: torch.Tensor | None = None
        self.val_tokens: torch.Tensor | None = None
        self.files: dict[str, list[str]] = {}

    # -- corpus ---------------------------------------------------------------------------------------------
    def _read_docs(self) -> tuple[list[bytes], list[bytes]]:
        """Return (train docs, val docs) as raw bytes."""
        if self.path is None:
            root = Path(sysconfig.get_paths()["stdlib"])
            candidates = [(p, p.relative_to(root).as_posix()) for p in stdlib_files(root)]
        else:
            p = Path(self.path)
            if p.is_file():
                data = p.read_bytes()[: self.max_bytes]
                if not data:
                    raise ValueError(f"CorpusDataModule.path {self.path!r} is an empty file; give a text file with "
                                     "content or a folder of them")
                cut = int(len(data) * (1 - self.val_fraction))
                self.files = {"train": [str(p)], "val": [str(p)]}
                return [data[:cut]], [data[cut:]]
            found = sorted(f for f in p.glob(self.pattern) if f.is_file())
            if not found:
                raise ValueError(f"CorpusDataModule.path {self.path!r} holds no file matching pattern "
                                 f"{self.pattern!r}; point path at a folder with text files or change pattern")
            candidates = sorted(((f, f.relative_to(p).as_posix()) for f in found), key=lambda x: (_hash01(x[1]), x[1]))
        # Each split fills its own byte budget, so validation keeps its share whatever max_bytes is.
        budget = {"val": int(self.max_bytes * self.val_fraction)}
        budget["train"] = self.max_bytes - budget["val"]
        docs: dict[str, list[bytes]] = {"train": [], "val": []}
        self.files = {"train": [], "val": []}
        for f, rel in candidates:
            if budget["train"] <= 0 and budget["val"] <= 0:
                break
            split = "val" if _hash01("split:" + rel) < self.val_fraction else "train"
            if budget[split] <= 0:
                continue
            data = f.read_bytes()[: budget[split]]
            if not data:
                continue
            budget[split] -= len(data)
            docs[split].append(data)
            self.files[split].append(rel)
        train, val = docs["train"], docs["val"]
        return train, val

    def prepare_corpus(self) -> None:
        if self.train_tokens is not None:
            return
        train, val = self._read_docs()
        self.train_tokens, self.val_tokens = _encode(train), _encode(val)
        need = self.block_size + (1 if self.task == "causal" else 0)
        for split, toks in (("train", self.train_tokens), ("val", self.val_tokens)):
            if len(toks) < need:
                raise ValueError(
                    f"CorpusDataModule.block_size {self.block_size} is larger than the {split} split, which has "
                    f"{len(toks)} tokens ({len(self.files.get(split, []))} files); use a smaller block_size, a larger "
                    "max_bytes or val_fraction, or a bigger corpus")

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the training split's token frequencies: the loss of the best context-free model."""
        self.prepare_corpus()
        assert self.train_tokens is not None  # prepare_corpus() filled it
        counts = torch.bincount(self.train_tokens.long(), minlength=VOCAB_SIZE).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())

    def setup(self, stage: str | None = None) -> None:
        self.prepare_corpus()
        assert self.train_tokens is not None and self.val_tokens is not None  # prepare_corpus() filled them
        self.train_set = BlockDataset(self.train_tokens, self.block_size, self.task)
        self.val_set = BlockDataset(self.val_tokens, self.block_size, self.task)
        source = "python stdlib " + sysconfig.get_paths()["stdlib"] if self.path is None else self.path
        rank_zero_info(
            f"CorpusDataModule: {source}: train {len(self.train_tokens):,} tokens "
            f"({len(self.files['train'])} files, {len(self.train_set)} blocks of {self.block_size}), "
            f"val {len(self.val_tokens):,} tokens ({len(self.files['val'])} files, {len(self.val_set)} blocks); "
            f"unigram entropy {self.unigram_entropy():.3f} nats/token")

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


def bits(nats: float) -> float:
    return nats / math.log(2)


__all__ = ["CorpusDataModule", "BlockDataset", "stdlib_files", "VOCAB_SIZE", "PAD_ID", "BOS_ID", "EOS_ID", "MASK_ID"]
