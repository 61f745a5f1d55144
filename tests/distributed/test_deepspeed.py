"""EffiDeepSpeedStrategy on 2 CPU processes (gloo) against single-process references.

All training cases run in ONE torchrun job (``scripts/ds_train.py``, one process group, a Trainer per case) to keep
the suite inside its time budget; each test then compares one case with its plain-PyTorch reference
(``scripts/ds_common.reference_run``), written independently of DeepSpeed: same data order, gradients averaged over
all micro-batches of a step, ``torch.nn.utils.clip_grad_norm_`` for clipping, ``Lamb`` in its per-tensor mode.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import SCRIPTS, run_script

sys.path.insert(0, str(SCRIPTS))
from ds_common import make_gpt, reference_run  # noqa: E402

pytestmark = pytest.mark.distributed

# fp32 on CPU: differences come from summation order only (reduce-scatter vs one batch).
ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds_train")
    run_script("ds_train.py", str(out), torchrun=2, timeout=600)
    return out


def _load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


def _assert_params_equal(got: dict, ref_state: dict) -> None:
    names = [n for n, _ in make_gpt().named_parameters()]
    assert sorted(got) == sorted(f"model.{n}" for n in names)
    for n in names:
        torch.testing.assert_close(got[f"model.{n}"], ref_state[n], atol=ATOL, rtol=RTOL, msg=lambda m: f"{n}: {m}")


@functools.lru_cache(maxsize=None)
def _plain_reference(optimizer: str) -> dict:
    # one reference per optimizer for the three stages (the suite shares 2 cores)
    return reference_run(optimizer, 10)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_zero_stage_matches_single_process(ds_results, stage, optimizer):
    res = _load(ds_results, f"s{stage}_{optimizer}")
    ref = _plain_reference(optimizer)
    _assert_params_equal(res["params"], ref)
    # And training moved the weights (the comparison is not between two untouched models).
    init = make_gpt().state_dict()
    assert any((ref[k] - init[k]).abs().max() > 1e-3 for k in init)
    if optimizer == "lamb" and stage < 3:
        # One trust ratio per logical parameter, not one per rank per flat partition.
        assert res["trust_ratios"].numel() == len(list(make_gpt().parameters()))


def test_static_accumulation(ds_results):
    res = _load(ds_results, "s2_adamw_acc2")
    assert res["per_step"] == [2] * 5
    _assert_params_equal(res["params"], reference_run("adamw", 5, accumulation=lambda s: 2))


def test_accumulation_change_mid_run(ds_results):
    res = _load(ds_results, "s1_lamb_schedule")
    # micro-batches counted per optimizer step: 1 until step 4, then 2
    assert res["per_step"] == [1, 1, 1, 1, 2, 2, 2]
    assert res["gas"] == 2 and res["train_batch_size"] == 2 * 2 * 2  # engine bookkeeping followed the change
    ref = reference_run("lamb", 7, accumulation=lambda s: 1 if s < 4 else 2)
    _assert_params_equal(res["params"], ref)


def test_partial_last_window_steps_like_ddp(ds_results):
    res = _load(ds_results, "s2_adamw_partial")
    # 24 micro-batches per rank and epoch with accumulation 5: 4 full windows, then a partial window of 4 that still
    # steps (Lightning's DDP behaviour; upstream DeepSpeedStrategy carries it into the next epoch instead).
    assert res["per_step"] == [5, 5, 5, 5, 4]
    ref = reference_run("adamw", 5, accumulation=lambda s: 5 if s < 4 else 4, divisor=lambda s: 5)
    _assert_params_equal(res["params"], ref)


def test_gradient_clipping_stage3(ds_results):
    res = _load(ds_results, "s3_adamw_clip")
    _assert_params_equal(res["params"], reference_run("adamw", 10, clip=0.05))


def test_lamb_max_grad_norm_covers_all_partitions(ds_results):
    res = _load(ds_results, "s2_lamb_maxgradnorm")
    _assert_params_equal(res["params"], reference_run("lamb", 10, max_grad_norm=0.05))


def test_fp16_overflow_skips_step_and_scheduler(ds_results):
    res = _load(ds_results, "s2_fp16_skip")
    assert res["config"]["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 8,
                                     "loss_scale_window": 2, "hysteresis": 1, "consecutive_hysteresis": False,
                                     "min_loss_scale": 1}
    assert res["skipped_steps"] == 1
    # Lightning counts 6 optimizer steps; one was skipped, so the halving schedule advanced 5 times, not 6.
    assert res["global_step"] == 6
    assert res["lrs"][-1] == pytest.approx(1e-2 * 0.5 ** 5)
    # DeepSpeed's scaler would grow 256 -> 512 after the third clean step; max_scale=256 caps it; the overflow at
    # step index 4 halves it (hysteresis 1). Uncapped it would read [256, 256, 512, 512, 256, 256].
    assert res["scales"] == [256.0, 256.0, 256.0, 256.0, 128.0, 128.0]


# ------------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def ds_checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds_ckpt")
    run_script("ds_checkpoint.py", str(out), torchrun=2, timeout=600)
    return out


@pytest.mark.parametrize("case", ["s2_lamb", "s3_adamw"])
def test_resume_equals_uninterrupted(ds_checkpoints, case):
    res = _load(ds_checkpoints, case)
    done, resumed = res["uninterrupted"], res["resumed"]
    assert done["global_step"] == resumed["global_step"] == 10
    # the halving LR schedule advanced 10 times in both (scheduler state came back with the checkpoint)
    assert done["lr"] == resumed["lr"] == pytest.approx(1e-2 * 0.5**10)
    for name, value in done["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["s2_lamb", "s3_adamw"])
def test_export_single_fp32_state_dict(ds_checkpoints, case, tmp_path):
    from lightning_effi.export import export_checkpoint

    out = export_checkpoint(ds_checkpoints / case / "step=10.ckpt", tmp_path / "weights.pt", strip_prefix="model.")
    sd = torch.load(out, weights_only=True)
    final = _load(ds_checkpoints, case)["uninterrupted"]["params"]
    gpt = make_gpt()
    assert set(sd) == set(gpt.state_dict())  # tied lm_head/wte both present
    for name, value in final.items():
        torch.testing.assert_close(sd[name.removeprefix("model.")], value, atol=0, rtol=0)
    gpt.load_state_dict(sd)  # loads into the bare model, independent of the 2 ranks that wrote it


def test_resume_on_other_world_size_says_how(ds_checkpoints):
    from lightning_effi.strategies.deepspeed import _check_world_size

    ckpt = ds_checkpoints / "s2_lamb" / "step=5.ckpt"
    _check_world_size(ckpt, 2)  # same world size: fine
    with pytest.raises(RuntimeError, match=r"(?s)saved by 2 processes but this run has 4.*effi export"):
        _check_world_size(ckpt, 4)
