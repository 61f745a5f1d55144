"""Exact resume after SIGKILL: strategy x optimizer x precision, with an accumulation ramp growing the windows.

Per case, three jobs of ``scripts/resume_matrix.py`` (each its own process group): an uninterrupted run; the same run
with a checkpoint asked for inside a window, its whole process group SIGKILLed right after the file is written; a
fresh job resuming from that checkpoint to the end. The losses of every micro-batch (the killed run's up to the
checkpoint, then the resumed run's) and the final fp32 parameters must equal the uninterrupted run's on every rank.

CI runs a subset covering every value of every axis; the whole 24-case matrix::

    EFFI_RESUME_MATRIX=full python -m pytest tests/distributed/test_resume_matrix.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import start_script
from tests.distributed.scripts.resume_matrix import (
    MAX_STEPS,
    OPTIMIZERS,
    PRECISIONS,
    SAVE_AT,
    SAVED,
    STRATEGIES,
    parse_case,
    world_size,
)

ALL_CASES = [f"{s}-{o}-{p}" for s in STRATEGIES for o in OPTIMIZERS for p in PRECISIONS]
# Every strategy, optimizer and precision at least once.
CI_CASES = ["single-lamb-bf16-mixed", "ddp-adamw-32-true", "fsdp-lamb-16-mixed", "deepspeed-adamw-16-mixed",
            "deepspeed-lamb-bf16-mixed"]
FULL_WINDOWS = [1, 1, 2, 2, 3, 3, 4]
JOB_TIMEOUT_S = 300.0

# Strategies whose resume is exact up to a tolerance, not bit for bit: {strategy: (rtol, atol)}.
# DDP: the interrupted window's partial gradients are saved summed over ranks and restored on rank 0 (zero on the
# others), so the window's gradient is the same sum taken in another order: fp32 gradients can differ in the last
# bits, which later steps carry on.
TOLERANCES: dict[str, tuple[float, float]] = {"ddp": (1e-6, 1e-7)}


def _params(cases: list[str]) -> list:
    marks = {s: [pytest.mark.distributed] if world_size(s) > 1 else [] for s in STRATEGIES}
    return [pytest.param(case, marks=marks[parse_case(case)[0]], id=case) for case in cases]


CASES = ALL_CASES if os.environ.get("EFFI_RESUME_MATRIX") == "full" else CI_CASES


def _start(case: str, phase: str, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    # Lightning's launcher, not torchrun: its second rank stays in the first one's process group.
    return start_script("resume_matrix.py", case, phase, out, log=out / f"{phase}.log", env={"DS_ACCELERATOR": "cpu"})


def _failure(proc, out: Path, phase: str, what: str) -> AssertionError:
    log = (out / f"{phase}.log").read_text(errors="replace")
    return AssertionError(f"{phase} job {what} (rc {proc.returncode})\n--- output ---\n{log[-10000:]}")


def _alive(pids: set[int], pgid: int) -> list[int]:
    """Of ``pids`` and the members of group ``pgid``, those still running (a killed process stays a zombie until it
    is reaped: not counted)."""
    live = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ... after "(comm)"
        if (int(entry.name) in pids or int(fields[2]) == pgid) and fields[0] != "Z":
            live.append(int(entry.name))
    return live


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _run(case: str, phase: str, out: Path) -> None:
    proc = _start(case, phase, out)
    try:
        proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise _failure(proc, out, phase, f"did not finish in {JOB_TIMEOUT_S:.0f} s") from None
    finally:
        _kill_group(proc)  # whatever outlived the leader (a rank left behind by a failure or a timeout)
    if proc.returncode != 0:
        raise _failure(proc, out, phase, "failed")


def _run_and_kill(case: str, out: Path, world: int) -> None:
    """Start the checkpointing run; SIGKILL its whole process group as soon as the checkpoint is on disk."""
    proc = _start(case, "kill", out)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not (out / SAVED).exists():
            if proc.poll() is not None:
                raise _failure(proc, out, "kill", "exited before its checkpoint was written")
            if time.monotonic() > deadline:
                raise _failure(proc, out, "kill", f"wrote no checkpoint in {JOB_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, f"the job ended by itself (rc {proc.returncode}), not by the kill"
    ranks = [tuple(map(int, (out / f"pid_rank{r}").read_text().split())) for r in range(world)]
    assert all(pgid == proc.pid for _, pgid in ranks), f"a rank outside the killed process group: {ranks}"
    deadline = time.monotonic() + 30
    while live := _alive({pid for pid, _ in ranks}, proc.pid):
        assert time.monotonic() < deadline, f"processes {live} survived the SIGKILL"
        time.sleep(0.1)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _check_equal(what: str, got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float] | None) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, uninterrupted {tuple(want.shape)}"
    if tol is None:
        assert torch.equal(got, want), f"{what} differ: max |diff| {float((got - want).abs().max()):.3e}"
    else:
        torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", _params(CASES))
def test_resume_after_sigkill_reproduces_uninterrupted(case, tmp_path):
    strategy, _, _ = parse_case(case)
    full_dir, run_dir = tmp_path / "full", tmp_path / "run"
    _run(case, "full", full_dir)
    _run_and_kill(case, run_dir, world_size(strategy))
    _run(case, "resume", run_dir)
    tol = TOLERANCES.get(strategy)
    loss_diff = param_diff = 0.0
    for rank in range(world_size(strategy)):
        full = torch.load(full_dir / f"full_rank{rank}.pt", weights_only=False)
        first = torch.load(run_dir / f"kill_rank{rank}.pt", weights_only=False)
        resumed = torch.load(run_dir / f"resume_rank{rank}.pt", weights_only=False)
        assert full["sizes"] == FULL_WINDOWS and full["global_step"] == resumed["global_step"] == MAX_STEPS
        if strategy == "deepspeed":
            # ZeRO keeps partial gradients in private partitions: the save asked for after micro-batch 8 is written
            # at the window's end (micro-batch 9, step 5), a step boundary.
            assert not first["partial_window"] and first["global_step"] == 5
            assert len(first["losses"]) == SAVE_AT + 1 and resumed["sizes"] == [3, 4]
        else:
            # written mid-window: 2 of the 3-window's micro-batches are in the checkpoint's partial gradients
            assert first["partial_window"] and first["global_step"] == 4
            assert len(first["losses"]) == SAVE_AT and resumed["sizes"] == [1, 3, 4]
        losses = torch.tensor(first["losses"] + resumed["losses"], dtype=torch.float64)
        want_losses = torch.tensor(full["losses"], dtype=torch.float64)
        _check_equal(f"rank {rank} losses", losses, want_losses, tol)
        assert resumed["params"].keys() == full["params"].keys()
        for name, want in full["params"].items():
            _check_equal(f"rank {rank} parameter {name}", resumed["params"][name], want, tol)
        assert resumed["scale"] == full["scale"]
        loss_diff = max(loss_diff, float((losses - want_losses).abs().max()))
        param_diff = max(param_diff, _max_diff(resumed["params"], full["params"]))
    # one line per case in the output of `pytest -s`, for the record
    if loss_diff == param_diff == 0.0:
        print(f"[{case}] losses and fp32 parameters bit-identical on every rank")
    else:
        print(f"[{case}] max |diff| losses {loss_diff:.2e}, fp32 parameters {param_diff:.2e} (rtol, atol {tol})")
