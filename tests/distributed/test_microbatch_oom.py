"""AutoMicroBatch with an out-of-memory error on one rank of 2 (gloo): under DDP both ranks split together and end
where the run without the error ends; past the floor, and under FSDP2 / DeepSpeed, every rank ends within a bounded
time with AutoMicroBatch's error."""

from __future__ import annotations

import time

import pytest
import torch

from tests.distributed.launch import run_script

pytestmark = pytest.mark.distributed
BOUND_S = 240  # a hang would last the backend's 30-minute timeout


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_ddp_oom_on_one_rank_in_forward_or_backward_splits_both_and_matches(tmp_path):
    for case in ("stock", "none", "fwd1", "bwd1", "bwd0"):
        run_script("microbatch_oom.py", "ddp", str(tmp_path), case, timeout=BOUND_S)
    res = {c: [torch.load(tmp_path / f"{c}-rank{r}.pt", weights_only=False) for r in (0, 1)]
           for c in ("stock", "none", "fwd1", "bwd1", "bwd0")}
    stock = res["stock"][0]["weights"]
    # Without an error, local accumulation + one coalesced all-reduce at the window's end is DDP's own average.
    assert _max_diff(res["none"][0]["weights"], stock) == 0.0
    expected = {"fwd1": (1, [("forward", 8, 4)], 4), "bwd1": (1, [("backward", 8, 4), ("replay", 4, 2)], 2),
                "bwd0": (0, [("backward", 8, 4)], 4)}
    for case, (rank, recoveries, size) in expected.items():
        r0, r1 = res[case]
        assert [(r["where"], r["from"], r["to"]) for r in res[case][rank]["recoveries"]] == recoveries, case
        assert res[case][1 - rank]["recoveries"] == [] and res[case][1 - rank]["raised"] == []
        assert r0["size"] == r1["size"] == size, case  # the other rank adopted the smaller size
        assert _max_diff(r0["weights"], r1["weights"]) == 0.0
        assert _max_diff(r0["weights"], stock) < 1e-6, case
    assert _max_diff(stock, {k: v for k, v in res["stock"][1]["weights"].items()}) == 0.0


@pytest.mark.parametrize("strategy,case,message", [
    ("ddp", "floor1", "AutoMicroBatch: out of memory in the forward even at 1 samples per forward/backward, the floor "
                      "(min_micro_batch_size=1; loader batch 8, smallest tried 1)"),
    ("ddp", "raise1", "AutoMicroBatch: out of memory in the backward of a micro-batch of 8 samples under DDPStrategy "
                      "at optimizer step 1; on_oom='raise' does not split at run time"),
    ("effi_fsdp", "fwd1", "AutoMicroBatch: out of memory in the forward of a micro-batch of 8 samples under "
                          "EffiFSDPStrategy at optimizer step 1; a run-time split is not possible there"),
    ("effi_deepspeed_stage_2", "bwd1", "AutoMicroBatch: out of memory in the backward of a micro-batch of 8 samples "
                                       "under EffiDeepSpeedStrategy at optimizer step 2"),
    ("effi_fsdp", "probe1", "lightning_effi: ending this rank because rank 1 raised OutOfMemoryError: AutoMicroBatch: "
                            "probing a micro-batch of 16, rank 1 found 'oom' while rank(s) [0] gave no verdict within "
                            "10 s"),
])
def test_unrecoverable_oom_on_one_rank_ends_both_with_the_error(tmp_path, strategy, case, message):
    if strategy.startswith("effi_deepspeed"):
        pytest.importorskip("deepspeed")
    start = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        run_script("microbatch_oom.py", strategy, str(tmp_path), case, timeout=BOUND_S)
    took = time.monotonic() - start
    text = str(failed.value)
    assert "exited with" in text, text[-3000:]  # not a timeout
    assert message in text, text[-4000:]
    assert "max_micro_batch_size=" in text or case == "floor1"
    assert "finished without error" not in text
    assert took < BOUND_S


@pytest.mark.parametrize("strategy", ["effi_fsdp", "effi_deepspeed_stage_2"])
def test_sharded_probe_runs_in_lockstep_and_leaves_no_trace(tmp_path, strategy):
    """Both ranks probe each candidate together (CPU stands in for CUDA; out of memory above 4 on both), agree on 4,
    and train exactly as a run given 4."""
    if strategy.startswith("effi_deepspeed"):
        pytest.importorskip("deepspeed")
    for case in ("probe", "fixed"):
        run_script("microbatch_oom.py", strategy, str(tmp_path), case, timeout=BOUND_S)
    probe = [torch.load(tmp_path / f"probe-rank{r}.pt", weights_only=False) for r in (0, 1)]
    fixed = [torch.load(tmp_path / f"fixed-rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in (0, 1):
        assert probe[r]["probed"] == {16: "oom", 8: "oom", 4: "ok"}
        assert probe[r]["loader"] == fixed[r]["loader"] == 4
        assert _max_diff(probe[r]["weights"], fixed[r]["weights"]) == 0.0
