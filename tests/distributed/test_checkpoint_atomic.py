"""Directory checkpoints on 2 CPU processes (gloo) killed in the middle of a save: the previous checkpoint of the same
name stays loadable, and ckpt_path="last" resumes from it (``scripts/ckpt_kill.py``)."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_effi.strategies import EffiDeepSpeedStrategy, EffiFSDPStrategy
from tests._crash import kill_during_save, resume_last


def _saved_step(ckpt, strategy: str) -> int:
    # the trainer state Lightning keeps beside the shards: meta.pt (DCP), rank 0's model states (DeepSpeed)
    meta = ckpt / "meta.pt" if strategy == "fsdp" else ckpt / "checkpoint" / "mp_rank_00_model_states.pt"
    return torch.load(meta, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.distributed
@pytest.mark.parametrize(("strategy", "unfinished"), [
    # rank 0 was killed after DCP's shards and .metadata, before Lightning's meta.pt
    (EffiFSDPStrategy, "without Lightning's meta.pt"),
    # rank 1 was killed before writing its ZeRO shard; rank 0 had written its files and DeepSpeed's 'latest'
    (EffiDeepSpeedStrategy, "without the effi_complete marker"),
], ids=["fsdp", "deepspeed_stage2"])
def test_kill_during_directory_save_keeps_the_previous_checkpoint_and_resumes_from_it(tmp_path, strategy, unfinished):
    name = "fsdp" if strategy is EffiFSDPStrategy else "deepspeed"
    kill_during_save(tmp_path, name, torchrun=2)
    ckpts = tmp_path / "ckpts"
    assert strategy().effi_checkpoint_problem(ckpts / "last.ckpt") is None
    assert _saved_step(ckpts / "last.ckpt", name) == 2
    partial = [p for p in ckpts.iterdir() if p.name.startswith("last.ckpt.tmp-")]
    assert len(partial) == 1
    assert unfinished in (strategy().effi_checkpoint_problem(partial[0]) or "")
    if name == "deepspeed":
        assert (partial[0] / "latest").is_file()  # DeepSpeed's own tag file does not mean every rank is done

    assert resume_last(tmp_path, name, torchrun=2) == {"start": 2, "end": 6}
    assert sorted(os.listdir(ckpts)) == ["last.ckpt"]  # the leftover was removed at the resumed run's first save
    assert _saved_step(ckpts / "last.ckpt", name) == 6
