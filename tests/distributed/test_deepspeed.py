"""EffiDeepSpeedStrategy on 2 CPU processes (gloo) against single-process references.

All training cases run in ONE torchrun job (``scripts/ds_train.py``, one process group, a Trainer per case) to keep
the suite inside its time budget; each test then compares one case with its plain-PyTorch reference
(``scripts/ds_common.reference_run``), written independently of DeepSpeed: same data order, gradients averaged over
all micro-batches of a step, ``torch.nn.utils.clip_grad_norm_`` for clipping, ``Lamb`` in its per-tensor mode.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import REPO, SCRIPTS, run_script

sys.path.insert(0, str(SCRIPTS))
from ds_common import make_dataset, make_gpt, reference_run  # noqa: E402

# The same table runs on 2 CPU processes (gloo, CI) and on 2 GPUs (NCCL, `pytest -m multi_gpu`).
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.distributed, id="cpu"),
    pytest.param("cuda", marks=pytest.mark.multi_gpu, id="cuda"),
]
# fp32 on CPU: differences come from summation order only (reduce-scatter vs one batch). On GPU the reference still
# runs on CPU, so cuBLAS/SDPA kernels differ from it a little per op; a wrong trust ratio moves weights far more.
TOLERANCES = {"cpu": dict(atol=2e-5, rtol=1e-4), "cuda": dict(atol=5e-4, rtol=5e-3)}


class Run(str):
    """A results directory that knows the device it was produced on."""

    device: str


def _env(device: str) -> dict:
    # run_script sets PYTHONPATH to the repository; keep what was there too (on the GPU machine deepspeed is
    # installed with `pip --target` and found through PYTHONPATH).
    return {"EFFI_DS_ACCELERATOR": device,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}


def _run(tmp_path_factory, script: str, device: str) -> Run:
    out = tmp_path_factory.mktemp(f"{Path(script).stem}_{device}")
    run_script(script, str(out), torchrun=2, timeout=600, env=_env(device))
    run = Run(out)
    run.device = device
    return run


@pytest.fixture(scope="module", params=DEVICES)
def ds_results(request, tmp_path_factory) -> Run:
    return _run(tmp_path_factory, "ds_train.py", request.param)


def _load(out: str, name: str) -> dict:
    return torch.load(Path(out) / f"{name}.pt", weights_only=False)


def _assert_params_equal(got: dict, ref_state: dict, device: str = "cpu") -> None:
    names = [n for n, _ in make_gpt().named_parameters()]
    assert sorted(got) == sorted(f"model.{n}" for n in names)
    for n in names:
        torch.testing.assert_close(got[f"model.{n}"], ref_state[n], **TOLERANCES[device],
                                   msg=lambda m, n=n: f"{n}: {m}")


@functools.lru_cache(maxsize=None)
def _plain_reference_run(optimizer: str) -> tuple[dict, torch.optim.Optimizer]:
    # one reference per optimizer for the three stages (the suite shares 2 cores)
    return reference_run(optimizer, 10, return_optimizer=True)


def _plain_reference(optimizer: str) -> dict:
    return _plain_reference_run(optimizer)[0]


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_zero_stage_matches_single_process(ds_results, stage, optimizer):
    res = _load(ds_results, f"s{stage}_{optimizer}")
    ref = _plain_reference(optimizer)
    _assert_params_equal(res["params"], ref, ds_results.device)
    # And training moved the weights (the comparison is not between two untouched models).
    init = make_gpt().state_dict()
    assert any((ref[k] - init[k]).abs().max() > 1e-3 for k in init)
    if optimizer == "lamb" and stage < 3:
        # One trust ratio per logical parameter, not one per rank per flat partition.
        assert res["trust_ratios"].numel() == len(list(make_gpt().parameters()))


@pytest.mark.parametrize("stage", [1, 2])
def test_lamb_subclass_from_outside_the_package(ds_results, stage):
    """``class MyLamb(Lamb): pass`` in a test script is partition-aware through the FlatLayoutOptimizer protocol:
    the same weights and per-parameter trust ratios as the single-process reference (a subclass treated as a plain
    optimizer would get one ratio per flat partition, or be refused)."""
    res = _load(ds_results, f"s{stage}_mylamb")
    assert res["optimizer_class"] == "ds_common.MyLamb"
    ref_state, ref_opt = _plain_reference_run("lamb")
    _assert_params_equal(res["params"], ref_state, ds_results.device)
    assert res["trust_ratios"].numel() == ref_opt.trust_ratios.numel() == len(list(make_gpt().parameters()))
    # ZeRO 1/2 steps the optimizer once per param group with only that group present, so the ratios left after the
    # last step are those of the last group (the first group's entries were not computed in that call).
    last = slice(sum(len(g["params"]) for g in ref_opt.param_groups[:-1]), None)
    assert (ref_opt.trust_ratios[last] != 1).any()
    torch.testing.assert_close(res["trust_ratios"][last], ref_opt.trust_ratios[last], **TOLERANCES[ds_results.device])
    # and what Lamb itself computed in the same 2-process run
    exact = dict(atol=0, rtol=0) if ds_results.device == "cpu" else TOLERANCES[ds_results.device]
    torch.testing.assert_close(res["trust_ratios"], _load(ds_results, f"s{stage}_lamb")["trust_ratios"], **exact)


@pytest.mark.parametrize("case", ["s1_lamb", "s2_lamb", "s3_lamb", "s1_lamb_bf16", "s3_lamb_bf16", "s1_mylamb",
                                  "s2_mylamb"])
def test_flat_layouts_cover_every_parameter_once(ds_results, case):
    res = _load(ds_results, case)
    assert res["num_logical"] == len(list(make_gpt().parameters()))
    assert res["layout_coverage_ok"]
    assert torch.isfinite(res["params"]["model.wte.weight"]).all()


def test_offload_optimizer_with_client_optimizer(ds_results):
    res = _load(ds_results, "s2_adamw_offload")
    assert res["config"]["zero_force_ds_cpu_optimizer"] is False
    assert res["config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    _assert_params_equal(res["params"], _plain_reference("adamw"), ds_results.device)


def test_validate_stage3_inference_engine(ds_results):
    from ds_common import lm_loss, loader, make_dataset

    model = make_gpt()
    with torch.no_grad():
        losses = [lm_loss(model, x, y) for r in range(2) for x, y in loader(make_dataset(), 2, r)]
    expected = torch.stack(losses).mean().item()
    rel = 1e-5 if ds_results.device == "cpu" else 1e-4
    assert _load(ds_results, "s3_validate")["val_loss"] == pytest.approx(expected, rel=rel)


def test_static_accumulation(ds_results):
    res = _load(ds_results, "s2_adamw_acc2")
    assert res["per_step"] == [2] * 5
    _assert_params_equal(res["params"], reference_run("adamw", 5, accumulation=lambda s: 2), ds_results.device)


def test_accumulation_change_mid_run(ds_results):
    res = _load(ds_results, "s1_lamb_schedule")
    # micro-batches counted per optimizer step: 1 until step 4, then 2
    assert res["per_step"] == [1, 1, 1, 1, 2, 2, 2]
    assert res["gas"] == 2 and res["train_batch_size"] == 2 * 2 * 2  # engine bookkeeping followed the change
    ref = reference_run("lamb", 7, accumulation=lambda s: 1 if s < 4 else 2)
    _assert_params_equal(res["params"], ref, ds_results.device)


def test_partial_last_window_steps_like_ddp(ds_results):
    res = _load(ds_results, "s2_adamw_partial")
    # 7 micro-batches per rank and epoch with accumulation 3: 2 full windows, then a partial window of 1 that still
    # steps, its loss divided by 3 (Lightning's DDP behaviour; upstream DeepSpeedStrategy never steps it).
    assert res["per_step"] == [3, 3, 1]
    ref = reference_run("adamw", 3, accumulation=lambda s: 3 if s < 2 else 1, divisor=lambda s: 3,
                        dataset=make_dataset(28))
    _assert_params_equal(res["params"], ref, ds_results.device)


def test_gradient_clipping_stage3(ds_results):
    res = _load(ds_results, "s3_adamw_clip")
    _assert_params_equal(res["params"], reference_run("adamw", 10, clip=0.05), ds_results.device)


def test_lamb_max_grad_norm_covers_all_partitions(ds_results):
    res = _load(ds_results, "s2_lamb_maxgradnorm")
    _assert_params_equal(res["params"], reference_run("lamb", 10, max_grad_norm=0.05), ds_results.device)


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
@pytest.fixture(scope="module", params=DEVICES)
def ds_checkpoints(request, tmp_path_factory) -> Run:
    return _run(tmp_path_factory, "ds_checkpoint.py", request.param)


@pytest.mark.parametrize("case", ["s2_lamb", "s3_adamw"])
def test_resume_equals_uninterrupted(ds_checkpoints, case):
    res = _load(ds_checkpoints, case)
    done, resumed = res["uninterrupted"], res["resumed"]
    assert done["global_step"] == resumed["global_step"] == 10
    # the halving LR schedule advanced 10 times in both (scheduler state came back with the checkpoint)
    assert done["lr"] == resumed["lr"] == pytest.approx(1e-2 * 0.5**10)
    # bitwise on CPU; GPU attention backward kernels may use atomics
    tol = dict(atol=0, rtol=0) if ds_checkpoints.device == "cpu" else dict(atol=1e-5, rtol=1e-4)
    for name, value in done["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, **tol)


@pytest.mark.parametrize("case", ["s2_lamb", "s3_adamw"])
def test_export_single_fp32_state_dict(ds_checkpoints, case, tmp_path):
    from lightning_effi.export import export_checkpoint
    from lightning_effi.models import GPT

    out = export_checkpoint(Path(ds_checkpoints) / case / "step=10.ckpt", tmp_path / "weights.pt",
                            strip_prefix="model.")
    sd = torch.load(out, weights_only=True)["state_dict"]
    final = _load(ds_checkpoints, case)["uninterrupted"]["params"]
    gpt = make_gpt()
    assert set(sd) == set(gpt.state_dict())  # tied lm_head/wte both present
    for name, value in final.items():
        torch.testing.assert_close(sd[name.removeprefix("model.")], value, atol=0, rtol=0)
    gpt.load_state_dict(sd)  # loads into the bare model, independent of the 2 ranks that wrote it
    # the network recorded in the client state DeepSpeed keeps with rank 0's model states
    loaded = GPT.from_export(out).state_dict()
    for name, value in final.items():
        torch.testing.assert_close(loaded[name.removeprefix("model.")], value, atol=0, rtol=0)


def test_resume_on_other_world_size_says_how(ds_checkpoints):
    from lightning_effi.strategies.deepspeed import _check_world_size

    ckpt = Path(ds_checkpoints) / "s2_lamb" / "step=5.ckpt"
    _check_world_size(ckpt, 2)  # same world size: fine
    with pytest.raises(RuntimeError, match=r"(?s)saved by 2 processes but this run has 4.*ds_to_universal.*"
                                           r"load_universal.*effi export"):
        _check_world_size(ckpt, 4)


def test_resume_on_one_process_from_universal_checkpoint(ds_checkpoints, tmp_path):
    """2 ranks wrote step 5; convert with DeepSpeed's ds_to_universal; resume on 1 rank with load_universal."""
    ckpt = tmp_path / "step=5.ckpt"
    shutil.copytree(Path(ds_checkpoints) / "s2_lamb" / "step=5.ckpt", ckpt)
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / "checkpoint"),
         "--output_folder", str(ckpt / "checkpoint_universal"), "--num_extract_workers", "1",
         "--num_merge_workers", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_script("ds_universal.py", str(ckpt), str(tmp_path), torchrun=1, timeout=600, env=_env(ds_checkpoints.device))
    res = torch.load(tmp_path / "universal.pt", weights_only=False)
    restored = res["restored"]
    assert restored["global_step"] == 5 and res["final_step"] == 6
    assert res["lr"] == pytest.approx(1e-2 * 0.5**6)  # scheduler state came along
    from lightning_effi.export import export_state_dict

    saved = export_state_dict(Path(ds_checkpoints) / "s2_lamb" / "step=5.ckpt")
    for name, value in restored["params"].items():
        torch.testing.assert_close(value, saved[name], atol=0, rtol=0)
    # Lamb's moments: the 2 ranks' flat shards, re-partitioned into 1 (sum of squares over all elements)
    shard_sumsq = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
    for f in (Path(ds_checkpoints) / "s2_lamb" / "step=5.ckpt" / "checkpoint").glob("*optim_states.pt"):
        state = torch.load(f, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
        for st in state.values():
            for key in shard_sumsq:
                shard_sumsq[key] += st[key].double().pow(2).sum().item()
    assert shard_sumsq["exp_avg"] > 0
    for key, value in shard_sumsq.items():
        assert restored[f"{key}_sumsq"] == pytest.approx(value, rel=1e-12)


@pytest.mark.distributed
def test_default_trainer_with_mid_window_validation_trains_to_the_end_and_resumes(tmp_path):
    """Validation (and with it ModelCheckpoint) inside accumulation windows under ZeRO-2: each save is written at its
    window's end, so the run finishes, and resuming from one reproduces the uninterrupted run."""
    run_script("ds_midwindow.py", str(tmp_path), torchrun=2, timeout=600, env=_env("cpu"))
    res = torch.load(tmp_path / "midwindow.pt", weights_only=False)
    done, resumed = res["uninterrupted"], res["resumed"]
    assert done["global_step"] == resumed["global_step"] == 4
    # requested after micro-batch 4 (1 step done) and 8 (2 steps done), written at the window ends: steps 2 and 3;
    # the one after micro-batch 12 is at a boundary already
    assert res["steps"] == {"epoch=0-step=1.ckpt": 2, "epoch=0-step=2.ckpt": 3, "epoch=0-step=4.ckpt": 4}
    for name, value in done["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, atol=0, rtol=0)
