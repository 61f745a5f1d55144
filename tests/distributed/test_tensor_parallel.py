"""EffiFSDPStrategy with tensor parallelism on CPU processes (gloo) against single-process references.

Three subprocess runs (module fixture), because each costs seconds of start-up on these machines:

1. 2 ranks: every case of ``tp_common.CASES`` (TP=2 with and without sequence and loss parallelism, AdamW and Lamb,
   the package's GPT with its shipped plan and a transformer with a YAML plan), the two checkpoint sources (DP=2 and
   TP=2, two epochs), both resumed onto the other layout, and the package's GPT and BERT LightningModules
   (``module``, ``bert``);
2. 1 rank: ``module`` and ``bert`` again, their single-process references;
3. 4 ranks: DP=2 x TP=2 (``tp_common.CASES_4``), AdamW, Lamb and fp16 with an overflow on one rank, and ``module``.

References are plain single-process PyTorch loops (``tp_common.reference_run``) or, for ``module``, the same
LightningModule on one process.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.distributed.launch import SCRIPTS, run_script

sys.path.insert(0, str(SCRIPTS))
import tp_common as tc  # noqa: E402

pytestmark = pytest.mark.distributed

RESUMES = [("gpt_adamw_dp2", "gpt_adamw_tp2"), ("gpt_adamw_tp2", "gpt_adamw_dp2")]
# ||w - w_ref|| / ||w_ref - w_init||: fp32 with a different summation order stays near 1e-6; a missing reduction
# or a rank stepping on its own is of the order of the movement itself.
FP32_TOL = 1e-4
FP16_TOL = 0.03  # fp16 autocast against the fp32 reference


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    two, one, four = root / "two", root / "one", root / "four"
    run_script("tp_train.py", "--out", two, "--cases", ",".join([*tc.CASES, "module", "bert"]), "--resume", two,
               "--resume-cases", ",".join(f"{a}:{b}" for a, b in RESUMES), torchrun=2, timeout=900)
    run_script("tp_train.py", "--out", one, "--cases", "module,bert", timeout=300)
    run_script("tp_train.py", "--out", four, "--cases", ",".join([*tc.CASES_4, "module"]), torchrun=4, timeout=900)
    return {"two": two, "one": one, "four": four}


def _load(root, case: str, world: int):
    d = tc.case_dir(root, case)
    return torch.load(d / "final.pt"), [json.loads((d / f"rank{r}.json").read_text()) for r in range(world)]


def _where(case: str) -> tuple[str, int]:
    return ("four", 4) if case in tc.CASES_4 else ("two", 2)


@pytest.mark.parametrize("case", list(tc.ALL_CASES))
def test_matches_single_process_reference(runs, case):
    which, world = _where(case)
    got, ranks = _load(runs[which], case, world)
    spec = tc.ALL_CASES[case]
    stats: dict = {}
    ref = tc.reference_run(case, stats)
    assert [r["global_step"] for r in ranks] == [tc.PER_EPOCH * (tc.EPOCHS if spec.get("save") else 1)] * world
    err = tc.rel_to_movement(got, ref, spec["net"])
    assert err < (FP16_TOL if spec.get("fp16") else FP32_TOL), err
    if "trust_ratios" in stats:  # Lamb: per-parameter ratios of the full logical tensors, on every rank
        for r in ranks:
            torch.testing.assert_close(torch.tensor(r["trust_ratios"]), stats["trust_ratios"], rtol=1e-4, atol=1e-6)
    if spec.get("health") and not spec.get("fp16"):  # the logged norm is the full gradients' norm
        for r in ranks:
            assert r["health"]["health/grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("case", [c for c, s in tc.ALL_CASES.items() if s["optimizer"] == "lamb"])
def test_lamb_reduces_once_per_mesh_dimension_per_round(runs, case):
    """Lamb with max_grad_norm needs two rounds (the clip coefficient, then the trust-ratio norms); each is one
    bucketed all_reduce per sharded mesh dimension, whatever the number of parameters. The health monitor's
    gradient norm (logged every step here) adds one more per dimension, and its non-finite check (no loss scaler)
    one over all ranks for the flag of the sharded gradients."""
    which, world = _where(case)
    _, ranks = _load(runs[which], case, world)
    dims = sum(n > 1 for n in tc.layout(case))
    health = dims + 1 if tc.ALL_CASES[case].get("health") else 0
    for r in ranks:
        assert r["allreduce_per_step"] == [2 * dims + health] * tc.PER_EPOCH


def test_layout_tensor_parallel_then_fsdp(runs):
    """The shipped GPT plan on the 2-D mesh: qkv split by output features over tensor parallel and sharded by FSDP2
    over data parallel; norms replicated over tensor parallel under sequence parallelism; the head stays tied to the
    embedding (one parameter), both split over the vocabulary."""
    _, ranks = _load(runs["four"], "2d_adamw", 4)
    placements = ranks[0]["placements"]
    # str() of placements: S(0) = Shard(0), _S(0, 2) = FSDP2's strided shard over a tensor-parallel shard, R = Replicate
    assert placements["net.blocks.0.attn.qkv.weight"] == ["_S(0, 2)", "S(0)"]
    assert placements["net.blocks.0.ln_1.weight"] == ["S(0)", "R"]
    assert placements["net.wpe.weight"] == ["S(0)"]  # not in the plan: FSDP2 over data parallel only
    assert "net.lm_head.weight" not in placements  # tied: named_parameters lists it once, as net.wte.weight
    assert placements["net.wte.weight"] == ["_S(0, 2)", "S(0)"]


def test_fp16_overflow_on_one_rank_skips_on_all_four(runs):
    _, ranks = _load(runs["four"], "2d_fp16", 4)
    expected = [step == tc.SKIP_AT for step in range(tc.PER_EPOCH)]
    assert [r["skipped"] for r in ranks] == [expected] * 4


@pytest.mark.parametrize(("source", "target"), RESUMES)
def test_resume_onto_the_other_layout_equals_the_uninterrupted_run(runs, source, target):
    got, ranks = _load(runs["two"], f"{source}_as_{target}", 2)
    uninterrupted = torch.load(tc.case_dir(runs["two"], source) / "final.pt")
    assert [r["global_step"] for r in ranks] == [tc.PER_EPOCH * tc.EPOCHS] * 2
    assert tc.rel_to_movement(got, uninterrupted, "gpt") < FP32_TOL


@pytest.mark.parametrize(("kind", "which"), [("module", "two"), ("module", "four"), ("bert", "two")])
def test_shipped_modules_match_one_process(runs, kind, which):
    """The example LightningModules with their shipped plans equal the same module trained on one process:
    GPTLightningModule (sequence + loss parallelism, token-sum loss, token-normalised accumulation over micro-batches
    with different token counts) on TP=2 and on DP=2 x TP=2, BertMLMLightningModule (sequence parallelism) on TP=2."""
    from lightning_effi.models import BertMLMLightningModule, GPTLightningModule

    got = torch.load(runs[which] / kind / "final.pt")
    ref = torch.load(runs["one"] / kind / "final.pt")
    assert got.keys() == ref.keys()
    shape = dict(vocab_size=tc.VOCAB, block_size=tc.BLOCK, n_layer=2, n_head=4, d_model=32)
    import lightning.pytorch as pl

    pl.seed_everything(tc.SEED, verbose=False)
    if kind == "bert":
        start = BertMLMLightningModule(**{**shape, "vocab_size": 260}).state_dict()
    else:
        start = GPTLightningModule(**shape).state_dict()
    num = sum(float(((got[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    den = sum(float(((start[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    assert den > 0 and (num / den) ** 0.5 < FP32_TOL
    torch.testing.assert_close(torch.load(runs[which] / kind / "logits.pt"),
                               torch.load(runs["one"] / kind / "logits.pt"), rtol=1e-4, atol=1e-5)


def test_export_loads_into_plain_gpt_with_the_same_logits(runs):
    from lightning_effi.export import export_checkpoint
    from lightning_effi.models import GPT

    out = runs["two"] / "module" / "gpt.pt"
    export_checkpoint(runs["two"] / "module" / "ckpt", out, strip_prefix="model.")
    gpt = GPT.from_export(out)  # the full n_head=4, though each rank held 2 heads
    with torch.no_grad():
        logits = gpt(tc.dataset()[:4, :-1])
    torch.testing.assert_close(logits, torch.load(runs["two"] / "module" / "logits.pt"), rtol=1e-5, atol=1e-5)
