"""Loss scaling on 2 CPU ranks (gloo): an overflow on one rank only makes every rank skip (DDP and FSDP2)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import run_script
from tests.plugins._toy import reference_scales


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_fused"], ids=["host-decided", "skipped-on-device"])
def test_ddp_overflow_on_one_rank_skips_on_all(tmp_path, optimizer):
    run_script("precision_ddp.py", tmp_path, optimizer, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    inject, n_steps = {1, 4, 5}, 10
    assert r0["injected_at"] == [] and r1["injected_at"] == sorted(inject)
    flags = [s in inject for s in range(n_steps)]
    expected = reference_scales(flags, init=2.0**10, growth=2.0, backoff=0.5, interval=3, hysteresis=2, lo=1.0,
                                hi=2.0**24, consecutive=False)
    for r in (r0, r1):
        assert [row["weights_same"] for row in r["rows"]] == flags
        assert [row["state_same"] for row in r["rows"]] == flags
        assert [row["scale"] for row in r["rows"]] == expected
        applied = [sum(1 for f in flags[: i + 1] if not f) for i in range(n_steps)]
        assert [row["sched_pos"] for row in r["rows"]] == applied
        assert r["skipped_steps"] == len(inject) and r["opt_steps"] == n_steps - len(inject)
        # global tokens/s: both ranks' tokens (4 examples each per step here) over the fake-free wall time > 0
        assert r["health"]["health/skipped_steps"] == len(inject)
        assert r["health"]["health/tokens_per_sec"] > 0
        # the LR schedule (LambdaLR, 0.9 per applied step) held on the skipped steps
        assert r["lrs"] == [pytest.approx(1e-2 * 0.9**a, rel=1e-6) for a in applied]
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    if optimizer == "adamw_fused":
        # skipped inside the kernel: both ranks report the same steps (at the next log), without names
        for r in (r0, r1):
            assert [(s, n) for s, _, n in r["skip_events"]] == [(s, []) for s in sorted(inject)]
        return
    # rank 1 names the parameter it broke; rank 0 had finite gradients and names none
    assert [(s, n) for s, _, n in r1["skip_events"]] == [(s, ["net.2.weight"]) for s in sorted(inject)]
    assert [(s, n) for s, _, n in r0["skip_events"]] == [(s, []) for s in sorted(inject)]

    # MasterWeightsPrecision under DDP: bf16 replicas identical on both ranks, fp32 masters identical, the bf16
    # weights are the masters rounded to nearest, and training moved them.
    m0, m1 = r0["master_weights"], r1["master_weights"]
    for a, b in zip(m0["masters"], m1["masters"]):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    for p, m in zip(m0["params"], m0["masters"]):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.bfloat16())
    for k, v in m0["weights"].items():
        assert torch.equal(v, m1["weights"][k]), k
    assert not torch.equal(m0["weights"]["net.0.weight"].float(), m0["w0"]["net.0.weight"].float())


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer", ["sgd", "adamw_fused"], ids=["host-decided", "skipped-on-device"])
def test_fsdp2_dtensor_overflow_on_one_shard_skips_on_all(tmp_path, optimizer):
    """Plain FSDP2: the scaler unscales DTensor gradients through their local shards (equal to an unsharded float64
    reference), and an inf/nan in rank 1's shard only makes both ranks skip, following the scale rule."""
    import json

    run_script("precision_fsdp2_scaler.py", tmp_path, optimizer, torchrun=2, timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    inject, n_steps = {2, 4, 5}, 8
    flags = [s in inject for s in range(n_steps)]
    expected = reference_scales(flags, init=2.0**10, growth=2.0, backoff=0.5, interval=2, hysteresis=1, lo=1.0,
                                hi=2.0**24, consecutive=False)
    for r in (r0, r1):
        assert r["dtensor_grads"]
        assert r["skipped"] == flags and r["skipped_steps"] == len(inject)
        assert r["scales"] == expected
        assert r["grad_err"] < 1e-5  # fp32 sharded vs float64 unsharded: summation order and fp32 rounding only
        assert r["weight_err"] < 1e-5
        assert r["masked"] == (optimizer == "adamw_fused")
