"""One rank raising mid-step ends every rank of the job, non-zero, with that rank's error printed: 2 gloo ranks under
torchrun and Lightning's launcher, DDP (with FailFast), EffiFSDPStrategy and EffiDeepSpeedStrategy ZeRO-2, the
failure before the step's collectives, inside its backward and before the optimizer step, on rank 1 and on rank 0
(which hosts the store). The failing rank lingers in most cases (it catches its error and stays alive, its sockets
open), so nothing but the package can end the rank waiting in a collective; the control shows it waits."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed.launch import start_script

pytestmark = pytest.mark.distributed
BOUND_S = 180  # generous: the suite shares 2 cores; a hang would last the backend's 30-minute timeout
MESSAGES = {"forward": "bad batch on rank {r} at step 2", "backward": "failure inside backward on rank {r} at step 2",
            "step": "failure before the optimizer step on rank {r} at step 2"}


def _run(tmp_path: Path, *args: str, torchrun: int = 2) -> tuple[int | None, str]:
    log = tmp_path / "job.log"
    proc = start_script("fail_one_rank.py", *args, log=log, torchrun=torchrun)
    try:
        rc = proc.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the job (a lingering failed rank)
        except ProcessLookupError:
            pass
        proc.wait()
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
    rc, log = _run(tmp_path, strategy, str(rank), where, *extra, torchrun=2 if launcher == "torchrun" else 0)
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
    proc = start_script("fail_one_rank.py", "ddp", "1", "backward", "linger", log=log_path, torchrun=2)
    try:
        deadline = time.monotonic() + BOUND_S
        while "lingers after its error" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        time.sleep(15)  # far longer than the watchdog needs
        assert proc.poll() is None, "the job ended by itself"
        assert "ending this rank" not in log_path.read_text(errors="replace")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
