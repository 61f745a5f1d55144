"""Run ``tests/distributed/scripts/ckpt_kill.py`` until its checkpoint save blocks part-way, then SIGKILL every process
of the job (a crash in the middle of writing a checkpoint), and resume it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.distributed.launch import REPO, SCRIPTS, run_script

# the script trains on the CPU; DeepSpeed would pick its CUDA accelerator on a GPU machine
_ENV = {"DS_ACCELERATOR": "cpu"}


def _command(out: Path, strategy: str, mode: str, torchrun: int) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "RANK")}
    env.update({**_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))})
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return [*launcher, str(SCRIPTS / "ckpt_kill.py"), str(out), strategy, mode], env


def kill_during_save(out: Path, strategy: str, torchrun: int = 0, timeout: float = 300.0) -> None:
    """Start the ``kill`` mode, wait for the blocked save, SIGKILL every rank (torchrun starts each worker in a
    session of its own, so by the pids they wrote) and the launcher's process group."""
    cmd, env = _command(out, strategy, "kill", torchrun)
    log = out / "kill.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not (out / "blocked").exists():
            if proc.poll() is not None:
                raise AssertionError(f"ckpt_kill.py {strategy} exited with {proc.returncode} before its save blocked:"
                                     f"\n{log.read_text()[-8000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"ckpt_kill.py {strategy}: no blocked save after {timeout} s:\n"
                                     f"{log.read_text()[-8000:]}")
            time.sleep(0.2)
    finally:
        for pid_file in out.glob("pid.*"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def resume_last(out: Path, strategy: str, torchrun: int = 0) -> dict:
    """Run the ``resume`` mode (``ckpt_path="last"``); the steps it started from and ended at."""
    run_script("ckpt_kill.py", str(out), strategy, "resume", torchrun=torchrun, timeout=600, env=_ENV)
    return json.loads((out / "resumed.json").read_text())
