"""EffiFSDPStrategy with 2 CPU processes (gloo) against a plain single-process PyTorch reference.

Three subprocess runs (module fixture) cover everything, because each costs seconds of interpreter start-up:

1. 1 rank: ``adamw`` (fresh, writes a step-5 sharded checkpoint);
2. 2 ranks (torchrun, one Trainer per case in turn): every case of ``fsdp_common.CASES`` + the package's
   ``GPTLightningModule`` under ``strategy="effi_fsdp"``, and ``adamw`` resumed from run 1's checkpoint (1 -> 2);
3. 1 rank: ``lamb`` resumed from run 2's checkpoint (2 -> 1).

The reference (``fsdp_common.reference_run``) trains the same network on the whole global batch with no Lightning
and no sharding, so "sharded == unsharded" is checked against an independent implementation.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.distributed.launch import SCRIPTS, run_script

sys.path.insert(0, str(SCRIPTS))
import fsdp_common as fc  # noqa: E402

# The same checks run on CPU with gloo (CI) and on 2 GPUs with NCCL (`pytest -m multi_gpu` on the GPU machine).
ACCELERATORS = [pytest.param("cpu", marks=pytest.mark.distributed),
                pytest.param("cuda", marks=pytest.mark.multi_gpu)]

# Tolerances on ||w - w_ref|| / ||w_ref - w_init|| (the error relative to how far training moved the weights).
# fp32: only the summation order differs. bf16/fp16 compute against the fp32 reference: rounding, still far below
# the error of a wrong reduction or of a rank stepping alone, which is of the order of the movement itself.
TOL = {"adamw_bf16": 0.15, "adamw_fp16": 0.03}
# fp32 against the CPU reference: 1e-4 on CPU; on GPUs other kernels (cuBLAS, SDPA) round differently, and Adam turns
# the rounding noise of the attention key bias (true gradient exactly 0) into updates of up to ~lr * noise / eps.
FP32_TOL = {"cpu": 1e-4, "cuda": 2e-3}


def _tol(runs, case: str) -> float:
    return TOL.get(case, FP32_TOL[runs["acc"]])


def _rel_to_movement(got: dict, ref: dict, case: str = "adamw") -> float:
    init = fc.initial_state(case)
    num = sum(float(((got[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    den = sum(float(((init[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    return (num / den) ** 0.5


@pytest.fixture(scope="module", params=ACCELERATORS)
def runs(request, tmp_path_factory):
    acc = ("--accelerator", request.param)
    root = tmp_path_factory.mktemp(f"fsdp_{request.param}")
    one, two, back = root / "one", root / "two", root / "back"
    run_script("fsdp_train.py", "--out", one, "--cases", "adamw", *acc)
    # EXTRA_CASES (cpu_offload) run on GPUs only
    cases = [*fc.CASES, *(fc.EXTRA_CASES if request.param == "cuda" else ()), "gpt_module", "sigterm"]
    run_script("fsdp_train.py", "--out", two, "--cases", ",".join(cases),
               "--resume", one, "--resume-cases", "adamw", *acc, torchrun=2, timeout=600)
    run_script("fsdp_train.py", "--out", back, "--resume", two, "--resume-cases", "lamb", *acc)
    return {"one": one, "two": two, "back": back, "acc": request.param}


def _load(runs, which: str, case: str):
    d = fc.case_dir(runs[which], case)
    ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in range(2) if (d / f"rank{r}.json").exists()]
    return torch.load(d / "final.pt"), ranks


@pytest.mark.parametrize("case", list(fc.ALL_CASES))
def test_two_ranks_match_single_process_reference(runs, case):
    if not fc.case_dir(runs["two"], case).exists() and case in fc.EXTRA_CASES:
        pytest.skip(f"{case} runs on GPUs only (cpu_offload needs a GPU)")
    got, ranks = _load(runs, "two", case)
    assert [r["world_size"] for r in ranks] == [2, 2]
    ref, _ = fc.reference_run(case)
    assert ranks[0]["global_step"] == len(fc.ALL_CASES[case].get("windows", fc.PLAIN_WINDOWS))
    err = _rel_to_movement(got, ref, case)
    assert err < _tol(runs, case), err
    if case not in TOL:
        worst, where = fc.max_rel_diff(got, ref)  # per tensor too, so a small tensor cannot hide in the global norm
        assert worst < _tol(runs, case), (worst, where)
    # the 1-element gain (empty shard on rank 1) trained like every other parameter
    assert not torch.equal(got["gain"], torch.ones(1))
    torch.testing.assert_close(got["gain"], ref["gain"], rtol=_tol(runs, case), atol=0)


def test_parameters_and_gradients_are_sharded_fp32(runs):
    for case in fc.CASES:
        _, ranks = _load(runs, "two", case)
        # the 1-element gain (and the root_param case's 1-element temperature) has an empty shard on rank 1 only
        empty = ["temperature", "net.gain"] if fc.CASES[case].get("root_param") else ["net.gain"]
        assert ranks[0]["empty_local_shards"] == [] and ranks[1]["empty_local_shards"] == empty, case
        # fp32 sharded master parameters and fp32 gradients after the reduce-scatter, whatever the compute dtype
        assert ranks[0]["param_types"] == ["DTensor:torch.float32"], case
        assert ranks[0]["grad_types"] == ["DTensor:torch.float32"], case


def test_gradients_freed_after_each_optimizer_step_only(runs):
    # free_gradients_after_step: None right after a step, kept while an accumulation window is open
    assert set(_load(runs, "two", "adamw")[1][0]["grads_freed"]) == {True}
    assert _load(runs, "two", "adamw_accum")[1][0]["grads_freed"] == [False, True] * len(fc.PLAIN_WINDOWS)


def test_mixed_precision_policy_follows_precision_plugin(runs):
    compute = {c: _load(runs, "two", c)[1][0]["compute_dtypes"] for c in ("adamw", "adamw_bf16", "adamw_fp16")}
    assert compute == {"adamw": ["torch.float32"], "adamw_bf16": ["torch.bfloat16"], "adamw_fp16": ["torch.float16"]}


def test_fp16_loss_scaling_all_ranks_skip_together(runs):
    got, ranks = _load(runs, "two", "adamw_fp16")
    expected = [step == fc.SKIP_AT for step in range(len(fc.PLAIN_WINDOWS))]
    # The overflow was injected into rank 1's shard only; rank 0's local gradients were finite and it skipped too.
    assert ranks[0]["skipped"] == expected and ranks[1]["skipped"] == expected
    assert ranks[0]["scales"] == ranks[1]["scales"]
    # The skipped step changed nothing: the reference that skips it matches, the one that does not is far away.
    no_skip, _ = fc.reference_run("adamw")
    assert _rel_to_movement(got, no_skip) > 10 * TOL["adamw_fp16"]


def test_training_health_monitor_sees_global_values(runs):
    # Lamb: the logged gradient norm and trust ratios of the last step are those of the full (unsharded) model.
    _, ranks = _load(runs, "two", "lamb")
    stats: dict = {}
    fc.reference_run("lamb", stats=stats)
    tol = 10 * FP32_TOL[runs["acc"]]
    for r in ranks:  # every rank logs the same global values
        h = {k.removeprefix("health/"): v for k, v in r["health"].items()}
        assert h["grad_norm"] == pytest.approx(stats["grad_norm"], rel=tol)
        ratios = stats["trust_ratios"]
        assert h["trust_ratio_min"] == pytest.approx(float(ratios.min()), rel=tol)
        assert h["trust_ratio_median"] == pytest.approx(float(ratios.median()), rel=tol)
        assert h["trust_ratio_max"] == pytest.approx(float(ratios.max()), rel=tol)
    # fp16: the skipped step is reported (on rank 1 with the offending parameter's name), the scale is logged
    _, ranks = _load(runs, "two", "adamw_fp16")
    assert [s[0] for s in ranks[0]["health_skips"]] == [s[0] for s in ranks[1]["health_skips"]] == [fc.SKIP_AT]
    assert ranks[1]["health_skips"][0][1] == ["net.gpt.wte.weight"]
    for r in ranks:
        assert r["health"]["health/loss_scale"] == r["scales"][-1]
        assert r["health"]["health/skipped_steps"] == 1


def test_lamb_norms_one_bucketed_all_reduce(runs):
    # LAMB with max_grad_norm needs two rounds (the clip coefficient feeds the moments that the per-parameter update
    # norms are taken of): one all_reduce for the global gradient norm, one for all 29 parameters' norms together.
    for which, case in (("two", "lamb"), ("two", "lamb_sched")):
        _, ranks = _load(runs, which, case)
        # lamb_sched: the AccumulationScheduler's own per-step all_reduce of its counters happens in the closure;
        # lamb: the health monitor's gradient norm (logged every step there) is one more, and its non-finite check
        # agrees on the flag of the sharded gradients with another (32-true: no loss scaler does it).
        extra = 1 if case == "lamb_sched" else 2 if fc.CASES[case].get("health") else 0
        for r in ranks:
            assert set(r["allreduce_per_step"]) == {2 + extra}, (case, r["allreduce_per_step"])


def test_activation_checkpointing_recomputes_and_matches(runs):
    plain, ranks_plain = _load(runs, "two", "adamw")
    ac, ranks_ac = _load(runs, "two", "adamw_ac")
    assert set(ranks_plain[0]["qkv_calls_per_batch"]) == {1}
    assert set(ranks_ac[0]["qkv_calls_per_batch"]) == {2}  # forward + recomputation in backward
    assert fc.max_rel_diff(ac, plain)[0] < (1e-6 if runs["acc"] == "cpu" else 1e-4)


def test_compile_one_graph_for_every_block(runs):
    # compile=True: each Block's forward is compiled (inductor on GPU, aot_eager on CPU) with FSDP2's hooks outside,
    # so both Blocks share one captured graph (parameters are graph inputs), with no graph break and no recompile.
    # That it trains like the reference is test_two_ranks_match_single_process_reference[adamw_compile].
    for r in _load(runs, "two", "adamw_compile")[1]:
        assert r["dynamo"] == {"unique_graphs": 1, "graph_breaks": 0, "recompiles": 0, "compiled_forwards": 2}


def test_fused_adamw_on_local_shards_is_bitwise_the_dtensor_step(runs):
    # Both match the single-process fused AdamW (test_two_ranks_match_single_process_reference); here: the local-shard
    # kernel call gives exactly DTensor's result, with clipping and rank 1's empty shard included.
    local, local_ranks = _load(runs, "two", "adamw_fused")
    via_dtensor, dtensor_ranks = _load(runs, "two", "adamw_fused_dtensor")
    # the kernel really got plain local shards in one run and DTensors in the other, on every rank
    assert [r["fused_adamw_args"] for r in local_ranks] == [["Tensor"], ["Tensor"]]
    assert [r["fused_adamw_args"] for r in dtensor_ranks] == [["DTensor"], ["DTensor"]]
    assert local.keys() == via_dtensor.keys()
    for k in local:
        assert torch.equal(local[k], via_dtensor[k]), k


def test_wrap_group_size_shards_neighbouring_blocks_as_one_unit(runs):
    # wrap_group_size=2: the two Blocks form one unit (+ the GPT root) instead of two; each Block is still compiled
    # on its own, and training matches the reference (test_two_ranks_match_single_process_reference[lamb_group2]).
    assert _load(runs, "two", "adamw")[1][0]["fsdp_units"] == 3
    for r in _load(runs, "two", "lamb_group2")[1]:
        assert r["fsdp_units"] == 2
        assert r["dynamo"]["graph_breaks"] == 0 and r["dynamo"]["compiled_forwards"] == 2


def test_accumulation_scheduler_windows(runs):
    _, ranks = _load(runs, "two", "lamb_sched")
    assert ranks[0]["global_step"] == len(fc.SCHEDULED_WINDOWS)
    assert len(ranks[0]["qkv_calls_per_batch"]) == sum(map(len, fc.SCHEDULED_WINDOWS))


@pytest.mark.parametrize(("which", "case", "direction"), [("two", "adamw", "1->2"), ("back", "lamb", "2->1")])
def test_resume_on_other_world_size_equals_uninterrupted(runs, which, case, direction):
    got, ranks = _load(runs, which, case + "_resumed")
    assert ranks[0]["world_size"] == (2 if direction == "1->2" else 1)
    assert ranks[0]["global_step"] == len(fc.PLAIN_WINDOWS)
    assert len(ranks[0]["qkv_calls_per_batch"]) == len(fc.PLAIN_WINDOWS) - fc.SAVE_AT  # only the remaining steps ran
    ref, _ = fc.reference_run(case)
    worst, where = fc.max_rel_diff(got, ref)
    assert worst < _tol(runs, case), (worst, where)
    # and it also equals the uninterrupted sharded run of the writer's world size
    uninterrupted, _ = _load(runs, "one" if direction == "1->2" else "two", case)
    assert fc.max_rel_diff(got, uninterrupted)[0] < _tol(runs, case)


def test_export_sharded_checkpoint_loads_into_gpt(runs, tmp_path):
    from lightning_effi.export import export_checkpoint
    from lightning_effi.models import GPT

    # (1) the step-5 checkpoint of the 2-rank run, exported, equals the reference network after 5 steps
    out = export_checkpoint(fc.case_dir(runs["two"], "adamw") / "step5", tmp_path / "net.pt", strip_prefix="net.gpt.")
    # a module of the test's own: its checkpoint does not say which network it holds
    gpt = GPT.from_export(out, config=dict(vocab_size=fc.VOCAB, block_size=fc.BLOCK, n_layer=2, n_head=2, d_model=32))
    _, ref_logits = fc.reference_run("adamw", logits_after=fc.SAVE_AT)
    with torch.no_grad():
        tol = 1e-5 if runs["acc"] == "cpu" else 1e-3
        torch.testing.assert_close(gpt(fc.dataset()[:4, :-1]), ref_logits, rtol=10 * tol, atol=tol)

    # (2) GPTLightningModule under strategy="effi_fsdp" (default wrap: the ModuleList children, i.e. Block): the
    # exported checkpoint reproduces the logits the sharded model itself computed.
    d = fc.case_dir(runs["two"], "gpt_module")
    info = json.loads((d / "info.json").read_text())
    assert info["strategy"] == "EffiFSDPStrategy" and info["fsdp_units"] == ["FSDPBlock", "FSDPBlock", "FSDPGPT"]
    assert (d / "ckpt").is_dir() and (d / "full.ckpt").is_file()  # sharded DCP directory / one gathered file
    for ckpt in ("ckpt", "full.ckpt"):
        out = export_checkpoint(d / ckpt, tmp_path / "gpt.pt")  # the LightningModule's keys, "model." kept
        gpt = GPT.from_export(out)  # class and config recorded by GPTLightningModule's checkpoint
        with torch.no_grad():
            tol = 1e-6 if runs["acc"] == "cpu" else 1e-4  # the sharded logits came from GPU kernels there
            logits = gpt(fc.dataset()[:4, :-1])
            torch.testing.assert_close(logits, torch.load(d / "logits.pt"), rtol=10 * tol, atol=tol, msg=ckpt)


def test_sigterm_on_one_rank_stops_every_rank_without_device_sync(runs):
    # Only rank 0 gets a SIGTERM; both ranks must leave fit with Lightning's SIGTERMException before the same batch,
    # and the per-batch agreement must be a CPU (gloo) all_reduce on GPUs too: Lightning's own check broadcasts on the
    # device and syncs with .item() at every batch start, and its handler broadcasts from inside the signal handler.
    d = fc.case_dir(runs["two"], "sigterm")
    ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in range(2)]
    for info in ranks:
        assert info["sigterm_exit"] is True and info["received_sigterm"] is True
        assert info["global_step"] == fc.SIGTERM_AFTER + 1  # the batch after the signal did not run
        assert info["collectives"] == ["all_reduce:cpu"]
        assert info["n_collectives"] == fc.SIGTERM_AFTER + 2  # one agreement per batch start, the last one says stop
