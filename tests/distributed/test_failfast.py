"""One rank raising mid-step ends every rank of the job, non-zero, with that rank's error printed: 2 gloo ranks under
torchrun and Lightning's launcher, DDP (with FailFast), EffiFSDPStrategy and EffiDeepSpeedStrategy ZeRO-2, the
failure before the step's collectives, inside its backward and before the optimizer step, on rank 1 and on rank 0
(which hosts the store). The failing rank lingers in most cases (it catches its error and stays alive, its sockets
open), so nothing but the package can end the rank waiting in a collective; the control shows it waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.launch import REPO, SCRIPTS

pytestmark = pytest.mark.distributed
BOUND_S = 180  # generous: the suite shares 2 cores; a hang would last the backend's 30-minute timeout
MESSAGES = {"forward": "bad batch on rank {r} at step 2", "backward": "failure inside backward on rank {r} at step 2",
            "step": "failure before the optimizer step on rank {r} at step 2"}


def _start(args: tuple[str, ...], log: Path, torchrun: bool) -> subprocess.Popen:
    """The job as the leader of a new session: Lightning's launcher (its ranks stay in the group) or torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    with open(log, "wb") as out:
        return subprocess.Popen([*launcher, str(SCRIPTS / "fail_one_rank.py"), *args], env=env, cwd=str(REPO),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _end(proc: subprocess.Popen) -> None:
    """Kill what is left of the job (a lingering failed rank; torchrun puts workers in sessions of their own)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _run(tmp_path: Path, *args: str, torchrun: bool = True) -> tuple[int | None, str]:
    log = tmp_path / "job.log"
    proc = _start(args, log, torchrun)
    try:
        rc = proc.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        _end(proc)
    return rc, log.read_text(errors="replace")


CASES = [
    # (strategy, failing rank, where, extra, launcher)
    ("ddp", 1, "backward", ["linger", "failfast"], "torchrun"),
    ("effi_fsdp", 1, "forward", ["linger"], "torchrun"),
    ("effi_deepspeed_stage_2", 0, "backward", ["linger"], "torchrun"),
    ("effi_fsdp", 0, "step", [], "lightning"),
]


@pytest.mark.parametrize("strategy,rank,where,extra,launcher", CASES,
                         ids=[f"{c[0]}-rank{c[1]}-{c[2]}-{c[4]}" for c in CASES])
def test_every_rank_ends_with_the_failing_rank_s_error(tmp_path, strategy, rank, where, extra, launcher):
    start = time.monotonic()
    rc, log = _run(tmp_path, strategy, str(rank), where, *extra, torchrun=launcher == "torchrun")
    assert rc is not None, f"the job did not end within {BOUND_S} s:\n{log[-4000:]}"
    assert rc != 0, log[-4000:]
    message = MESSAGES[where].format(r=rank)
    assert f"UserError: {message}" in log, log[-4000:]  # the failing rank's own traceback
    other = 1 - rank
    if "linger" in extra:
        # only the watchdog can have ended the other rank: the failed one kept its sockets open
        assert f"[rank {other}] lightning_effi: ending this rank because rank {rank} raised UserError: {message}" \
            in log, log[-4000:]
    assert f"rank {other} finished without error" not in log
    assert time.monotonic() - start < BOUND_S


def test_control_without_the_watchdog_the_other_rank_waits(tmp_path):
    """Stock DDP, the failed rank lingering: the other rank is still waiting in its all-reduce well after."""
    log_path = tmp_path / "job.log"
    proc = _start(("ddp", "1", "backward", "linger"), log_path, torchrun=True)
    try:
        deadline = time.monotonic() + BOUND_S
        while "lingers after its error" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        time.sleep(15)  # far longer than the watchdog needs
        assert proc.poll() is None, "the job ended by itself"
        assert "ending this rank" not in log_path.read_text(errors="replace")
    finally:
        _end(proc)
