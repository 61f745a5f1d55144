"""Crash-safe checkpoints: a checkpoint is complete or absent, a bad ckpt_path is named with what is wrong, and
ckpt_path="last" takes the newest complete checkpoint. The 2-process directory saves are in
tests/distributed/test_checkpoint_atomic.py."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from lightning_effi.plugins import AtomicCheckpointIO, _atomic
from lightning_effi.strategies import EffiDeepSpeedStrategy, EffiFSDPStrategy
from tests._crash import kill_during_save, resume_last
from tests.distributed.launch import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
from ds_common import TinyLM, loader, make_dataset  # noqa: E402

TOKEN = "0123456789ab"


class StartStep(Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step


def _fit(root: Path, max_steps: int, ckpt_path: str | None = None, callbacks: list | None = None) -> Trainer:
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, plugins=[AtomicCheckpointIO()],
                      callbacks=callbacks or [], enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                                          for c in callbacks or []))
    trainer.fit(TinyLM(), train_dataloaders=loader(make_dataset(16), 1, 0), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[int, Path]:
    """Training checkpoints of one run after 2 and 4 steps."""
    root = tmp_path_factory.mktemp("saved")

    class Save(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in (2, 4):
                trainer.save_checkpoint(root / f"step{trainer.global_step}.ckpt")

    _fit(root, 4, callbacks=[Save()])
    return {2: root / "step2.ckpt", 4: root / "step4.ckpt"}


def _names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# ------------------------------------------------------------------------------------------------- single files
def test_file_keeps_the_previous_checkpoint_until_the_new_one_is_complete(tmp_path):
    path = tmp_path / "a.ckpt"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"new, half")
        assert path.read_bytes() == b"old"
        assert [n for n in _names(tmp_path) if n.startswith("a.ckpt.tmp-")]
        f.write(b" written")

    _atomic.write_file(path, write)
    assert path.read_bytes() == b"new, half written" and _names(tmp_path) == ["a.ckpt"]

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _atomic.write_file(path, fail)
    assert path.read_bytes() == b"new, half written" and _names(tmp_path) == ["a.ckpt"]


def test_stock_trainer_saves_and_resumes_through_the_plugin(tmp_path, saved):
    # ModelCheckpoint and trainer.save_checkpoint write through the CheckpointIO: the file of a run is a normal
    # Lightning checkpoint and resumes.
    start = StartStep()
    _fit(tmp_path, 4, ckpt_path=str(saved[2]), callbacks=[start])
    assert start.step == 2
    assert torch.load(saved[4], weights_only=True)["global_step"] == 4


@pytest.mark.parametrize("swap", ["exchange", "move_aside"])
def test_directory_replaced_in_one_step_or_moved_aside(tmp_path, monkeypatch, swap):
    if swap == "move_aside":
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    final, tmp = tmp_path / "last.ckpt", _atomic.temp_path(tmp_path / "last.ckpt", TOKEN)
    for d, content in ((final, "old"), (tmp, "new")):
        d.mkdir()
        (d / "shard").write_text(content)
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        seen.append(_names(tmp_path))

    monkeypatch.setattr(_atomic.os, "replace", replace)
    _atomic.commit(tmp, final, TOKEN)
    assert _names(tmp_path) == ["last.ckpt"] and (final / "shard").read_text() == "new"
    # between the two moves of the fallback the previous checkpoint keeps a name ckpt_path="last" finds
    assert seen == ([] if swap == "exchange" else [[f"last.ckpt.tmp-{TOKEN}", f"last.old-{TOKEN}.ckpt"],
                                                   ["last.ckpt", f"last.old-{TOKEN}.ckpt"]])


def _layout(root: Path, entries: dict[str, str]) -> None:
    for name, content in entries.items():
        (root / name).mkdir()
        (root / name / "shard").write_text(content)


@pytest.mark.parametrize(("left", "expected"), [
    # killed between moving the previous checkpoint aside and moving the new one in: the new one is complete
    ({f"last.ckpt.tmp-{TOKEN}": "new", f"last.old-{TOKEN}.ckpt": "old"}, "new"),
    # killed after the move, before deleting the previous one
    ({"last.ckpt": "new", f"last.old-{TOKEN}.ckpt": "old"}, "new"),
    # killed while writing
    ({"last.ckpt": "old", f"last.ckpt.tmp-{TOKEN}": "partial"}, "old"),
    # killed while deleting a removed checkpoint
    ({"last.ckpt": "old", f"epoch=0.ckpt.del-{TOKEN}": "removed"}, "old"),
], ids=["between_moves", "before_delete", "mid_write", "mid_remove"])
def test_next_save_finishes_or_undoes_what_a_killed_save_left(tmp_path, left, expected):
    _layout(tmp_path, left)
    (tmp_path / "notes.txt").write_text("not ours")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "epoch=1.ckpt")
    assert _names(tmp_path) == ["epoch=1.ckpt", "last.ckpt", "notes.txt"]
    assert (tmp_path / "last.ckpt" / "shard").read_text() == expected


def test_removed_directory_loses_its_name_before_its_files(tmp_path, monkeypatch):
    ckpt = tmp_path / "epoch=0.ckpt"
    _layout(tmp_path, {"epoch=0.ckpt": "x"})

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(_atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().remove_checkpoint(ckpt)
    assert not ckpt.exists() and [n for n in _names(tmp_path) if n.startswith("epoch=0.ckpt.del-")]


def test_strategies_default_to_atomic_checkpoint_io():
    for strategy in (EffiFSDPStrategy(), EffiDeepSpeedStrategy()):
        assert isinstance(strategy.checkpoint_io, AtomicCheckpointIO)
        strategy.checkpoint_io = AsyncCheckpointIO()  # a wrapper given without a CheckpointIO of its own
        assert isinstance(strategy.checkpoint_io.checkpoint_io, AtomicCheckpointIO)


def test_kill_during_save_keeps_the_previous_checkpoint_and_resumes_from_it(tmp_path):
    kill_during_save(tmp_path, "single")
    ckpts = tmp_path / "ckpts"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2
    partial = [p for p in ckpts.iterdir() if p.name.startswith("last.ckpt.tmp-")]
    assert len(partial) == 1 and _atomic.checkpoint_problem(partial[0], ("file",), "test") is not None
    assert resume_last(tmp_path, "single") == {"start": 2, "end": 6}
    assert _names(ckpts) == ["last.ckpt"]  # the leftover was removed at the resumed run's first save
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 6


# ---------------------------------------------------------------------------------------------- ckpt_path="last"
def _aged(path: Path, age: float) -> None:
    t = path.stat().st_mtime - age
    os.utime(path, (t, t))


def test_last_skips_incomplete_checkpoints_and_leftovers(tmp_path, saved):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    good = ckpts / "last-v1.ckpt"
    good.write_bytes(saved[2].read_bytes())
    _aged(good, 100)
    # newer: a truncated last.ckpt (written without the plugin), an empty DCP-named directory, a complete temp file
    (ckpts / "last.ckpt").write_bytes(saved[4].read_bytes()[:1000])
    (ckpts / "last-v2.ckpt").mkdir()
    (ckpts / f"last.ckpt.tmp-{TOKEN}").write_bytes(saved[4].read_bytes())
    start = StartStep()
    with pytest.warns(UserWarning, match=r"(?s)skips .*last\.ckpt.*truncated") as record:
        _fit(tmp_path, 3, ckpt_path="last", callbacks=[start, ModelCheckpoint(dirpath=ckpts, save_top_k=0)])
    assert start.step == 2
    assert any(re.search(r"last-v2\.ckpt.*empty directory", str(w.message)) for w in record)


def test_last_finds_the_previous_checkpoint_moved_aside(tmp_path, saved):
    # killed between the two moves of a directory swap without renameat2: last.ckpt is absent for that moment
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / f"last.old-{TOKEN}.ckpt").write_bytes(saved[2].read_bytes())
    start = StartStep()
    _fit(tmp_path, 3, ckpt_path="last", callbacks=[start, ModelCheckpoint(dirpath=ckpts, save_top_k=0)])
    assert start.step == 2


# ---------------------------------------------------------------------------------------------- bad ckpt_path
def _export(tmp: Path, good: Path) -> Path:
    from lightning_effi.export import export_checkpoint

    return export_checkpoint(good, tmp / "weights.pt")


def _files(tmp: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    out = {"truncated": data[: len(data) // 2], "random": os.urandom(4096), "empty": b""}
    paths = {}
    for name, content in out.items():
        paths[name] = tmp / f"{name}.ckpt"
        paths[name].write_bytes(content)
    paths["export"] = _export(tmp, good)
    paths["state_dict"] = tmp / "state_dict.pt"
    torch.save(TinyLM().state_dict(), paths["state_dict"])
    paths["foreign"] = tmp / "foreign.pt"
    torch.save({"weights": torch.ones(2), "step": 3}, paths["foreign"])
    return paths


def _dirs(tmp: Path) -> dict[str, Path]:
    layouts = {
        "empty_dir": {},
        "dcp_no_metadata": {"__0_0.distcp": b"x", "meta.pt": b"x"},
        "dcp_no_meta_pt": {"__0_0.distcp": b"x", ".metadata": b"x"},
        "ds_no_marker": {"latest": b"checkpoint", "checkpoint/mp_rank_00_model_states.pt": b"x"},
        "ds_complete": {"latest": b"checkpoint", "checkpoint/mp_rank_00_model_states.pt": b"x", _atomic.MARKER: b""},
        "unknown_dir": {"zero_to_fp32.py": b"x"},
    }
    paths = {}
    for name, files in layouts.items():
        paths[name] = tmp / f"{name}.ckpt"
        paths[name].mkdir()
        for rel, content in files.items():
            (paths[name] / rel).parent.mkdir(parents=True, exist_ok=True)
            (paths[name] / rel).write_bytes(content)
    return paths


TRUNCATED = r"is truncated or not a torch checkpoint"
EXPORT = r"is an `effi export` file \(weights only\), not a training checkpoint: load it with GPT\.from_export"
BAD_PATHS = [
    # (path, who loads it, message)
    ("truncated", "trainer", TRUNCATED + r": a zip archive without its end record"),
    ("random", "trainer", TRUNCATED),
    ("empty", "trainer", r"is empty"),
    ("export", "trainer", EXPORT),
    ("export", "fsdp", EXPORT),
    ("state_dict", "trainer", r"is a bare state_dict \(weights only"),
    ("foreign", "trainer", r"is not a Lightning training checkpoint \(no 'pytorch-lightning_version' entry; its "
                           r"keys: 'step', 'weights'\)"),
    ("empty_dir", "trainer", r"is an empty directory \(an incomplete save\?\)"),
    ("empty_dir", "fsdp", r"is an empty directory"),
    ("empty_dir", "deepspeed", r"is an empty directory"),
    ("dcp_no_metadata", "fsdp", r"is a torch\.distributed\.checkpoint directory without its \.metadata"),
    ("dcp_no_meta_pt", "fsdp", r"is a torch\.distributed\.checkpoint directory without Lightning's meta\.pt"),
    ("ds_no_marker", "deepspeed", r"is a DeepSpeed checkpoint directory without the effi_complete marker "
                                  r".*touch .*effi_complete"),
    ("unknown_dir", "fsdp", r"is a directory without DeepSpeed or DCP metadata \(an incomplete save\?\)"),
    ("ds_complete", "fsdp", r"is a DeepSpeed checkpoint directory, which EffiFSDPStrategy does not resume: resume it "
                            r"with EffiDeepSpeedStrategy, or take its weights with `effi export"),
    ("ds_complete", "trainer", r"is a DeepSpeed checkpoint directory, which a single-file strategy"),
    ("good", "deepspeed", r"is a single checkpoint file, which EffiDeepSpeedStrategy does not resume"),
    ("missing", "trainer", r"does not exist"),
]


@pytest.fixture(scope="module")
def bad_paths(tmp_path_factory, saved) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad")
    return {**_files(tmp, saved[2]), **_dirs(tmp), "good": saved[2], "missing": tmp / "missing.ckpt"}


@pytest.mark.parametrize(("name", "loader_name", "message"), BAD_PATHS,
                         ids=[f"{n}-{w}" for n, w, _ in BAD_PATHS])
def test_bad_ckpt_path_is_named_with_what_is_wrong(tmp_path, bad_paths, name, loader_name, message):
    path = bad_paths[name]
    error = FileNotFoundError if name == "missing" else ValueError
    pattern = rf"(?s)Checkpoint {re.escape(repr(str(path)))} {message}"
    with pytest.raises(error, match=pattern):
        if loader_name == "trainer":
            _fit(tmp_path, 1, ckpt_path=str(path))
        elif loader_name == "fsdp":
            EffiFSDPStrategy().load_checkpoint(path)
        else:
            EffiDeepSpeedStrategy().load_checkpoint(path)


def test_complete_layouts_have_no_problem(bad_paths):
    assert EffiDeepSpeedStrategy().effi_checkpoint_problem(bad_paths["ds_complete"]) is None
    assert EffiFSDPStrategy().effi_checkpoint_problem(bad_paths["good"]) is None
    assert AtomicCheckpointIO().effi_checkpoint_problem(bad_paths["good"]) is None
    # a single file under ZeRO-3 with load_full_weights (weights only) is the CheckpointIO's to check
    assert EffiDeepSpeedStrategy(stage=3, load_full_weights=True).effi_checkpoint_problem(bad_paths["good"]) is None
