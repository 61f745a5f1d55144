"""AccumulationScheduler with 2 CPU processes (gloo): DDP and FSDP2 against single-process float64 references."""

from __future__ import annotations

import pytest
import torch

from tests.callbacks._toy import TinyLM, reference_sgd
from tests.distributed.launch import run_script
from tests.distributed.scripts.accum_ddp import LR, N_PER_RANK, TOKEN_SCHEDULE, global_batches

WINDOWS = [2, 3, 3, 1]  # {0: 2, 1: 3} over 9 micro-batches per rank: unaligned change at batch 2, partial last


def _global_windows():
    """Per window: the union of both ranks' micro-batches (tokens reference) and the per-rank split (mean reference)."""
    batches = global_batches()
    per_rank = [batches[r::2] for r in range(2)]
    assert len(per_rank[0]) == N_PER_RANK
    union, split, i = [], [], 0
    for size in WINDOWS:
        ranks = [per_rank[r][i:i + size] for r in range(2)]
        union.append(ranks[0] + ranks[1])
        split.append(ranks)
        i += size
    return union, split


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _check_against_references(res: dict, tol: float) -> None:
    union, split = _global_windows()
    init = TinyLM().net  # the scripts build the module with the same seed
    exact = reference_sgd(init, union, lr=LR, normalize="tokens")
    naive = reference_sgd(init, union, lr=LR, normalize="mean", dp_groups=split)
    assert res["tokens"]["sizes"] == WINDOWS
    assert res["mean"]["sizes"] == WINDOWS
    # Token-exact over both ranks and the whole window, including the partial one...
    assert _max_diff(res["tokens"]["weights"], exact) < tol
    # ...and normalize="mean" is the mean over ranks of micro-batch means, which is a different gradient here.
    assert _max_diff(res["mean"]["weights"], naive) < tol
    assert _max_diff(naive, exact) > 100 * tol


@pytest.mark.distributed
def test_ddp_windows_tokens_no_sync_and_resume(tmp_path):
    run_script("accum_ddp.py", tmp_path, timeout=300)
    _check_ddp(torch.load(tmp_path / "ddp.pt", weights_only=False), tol=2e-6)


@pytest.mark.multi_gpu
def test_ddp_nccl_windows_tokens_no_sync_and_resume(tmp_path):
    """The same cases on 2 GPUs (NCCL), against the same float64 CPU reference."""
    run_script("accum_ddp.py", tmp_path, "cuda", timeout=300)
    _check_ddp(torch.load(tmp_path / "ddp.pt", weights_only=False), tol=1e-5)


def _check_ddp(res: dict, tol: float) -> None:
    _check_against_references(res, tol=tol)
    # Gradients are all-reduced only on each window's last micro-batch (DDP no_sync elsewhere): one bucket each.
    boundaries = [sum(WINDOWS[:i + 1]) - 1 for i in range(len(WINDOWS))]
    assert sorted(set(res["tokens"]["allreduce_at"])) == boundaries
    # unit="token" counts valid tokens over both ranks: simulate the windows from the data directly (the position
    # leaves out the window that closed last: its count reaches the host one window later).
    per_rank = [global_batches()[r::2] for r in range(2)]
    tokens = [sum(int((per_rank[r][i]["labels"] != -100).sum()) for r in range(2)) for i in range(N_PER_RANK)]
    (threshold, late), = [kv for kv in TOKEN_SCHEDULE.items() if kv[0] > 0]
    expected, window_tokens, i = [], [], 0
    while i < N_PER_RANK:
        size = min(late if sum(window_tokens[:-1]) >= threshold else 1, N_PER_RANK - i)
        expected.append(size)
        window_tokens.append(sum(tokens[i:i + size]))
        i += size
    assert res["token_unit"]["sizes"] == expected and len(set(expected)) > 1
    # Resume from a checkpoint taken mid-window (after micro-batch 4, inside the 2nd window) == uninterrupted run.
    assert res["adam_first"]["sizes"] == [2] and res["adam_resumed"]["sizes"] == [1, 3, 1]
    losses = res["adam_first"]["losses"] + res["adam_resumed"]["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(res["adam_full"]["losses"]), rtol=1e-5, atol=1e-6)
    assert _max_diff(res["adam_resumed"]["weights"], res["adam_full"]["weights"]) < tol


@pytest.mark.distributed
def test_fsdp2_windows_tokens_and_resume(tmp_path):
    """FSDP2 (ModelParallelStrategy dp=2 with fully_shard, and effi_fsdp): reduce-scatter per micro-batch into DTensor
    shards, the boundary rescale on the shards, and a mid-window DCP checkpoint of sharded partial gradients."""
    run_script("accum_fsdp.py", tmp_path, timeout=400)
    res = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    _check_against_references(res, tol=2e-6)
    assert _max_diff(res["effi_tokens"]["weights"], res["tokens"]["weights"]) < 2e-6
    assert res["adam_first"]["sizes"] == [2] and res["adam_resumed"]["sizes"] == [1, 3, 1]
    losses = res["adam_first"]["losses"] + res["adam_resumed"]["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(res["adam_full"]["losses"]), rtol=1e-5, atol=1e-6)
    assert _max_diff(res["adam_resumed"]["weights"], res["adam_full"]["weights"]) < 1e-6


@pytest.mark.distributed
def test_deepspeed_zero2_follows_schedule(tmp_path):
    """EffiDeepSpeedStrategy (ZeRO-2): the loop-driven engine boundary follows the scheduler's windows, including the
    unaligned change and the partial last window; effi_set_accumulation is called at each size change."""
    run_script("accum_deepspeed.py", tmp_path, torchrun=2, timeout=400)
    res = torch.load(tmp_path / "deepspeed.pt", weights_only=False)
    assert res["sizes"] == WINDOWS
    assert res["factors"] == [2, 3, 1]
    _, split = _global_windows()
    union, _ = _global_windows()
    naive = reference_sgd(TinyLM().net, union, lr=LR, normalize="mean", dp_groups=split)
    assert _max_diff(res["weights"], naive) < 2e-6
