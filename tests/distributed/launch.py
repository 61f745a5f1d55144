"""Run one multi-process case as its own subprocess.

Lightning's subprocess launcher re-runs the *whole command line* as the other ranks, so a distributed Trainer
must never be started inside the pytest process (rank 1 would re-run pytest). Every multi-process case is a
script under ``tests/distributed/scripts`` that pytest starts with :func:`run_script`; the script writes its
results (tensors, JSON) into a directory the test then compares against a single-process reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).resolve().parents[2]


def _command(name: str, args: tuple, env: dict | None, torchrun: int) -> tuple[list[str], dict]:
    full_env = dict(os.environ)
    # Keep the caller's PYTHONPATH after the repo: on the GPU machine deepspeed lives in a --target prefix there.
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath})
    # Lightning's launcher picks a free port from this range per job; tests run serially so no clash.
    full_env.pop("MASTER_PORT", None)
    full_env.pop("LOCAL_RANK", None)
    full_env.pop("WORLD_SIZE", None)
    if env:
        full_env.update(env)
    script = str(SCRIPTS / name)
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", script]
    else:
        cmd = [sys.executable, script]
    return [*cmd, *map(str, args)], full_env


def run_script(name: str, *args: str, timeout: float = 300.0, env: dict | None = None, torchrun: int = 0):
    """Run ``scripts/<name>`` with ``args``; raise with both output streams if it fails.

    Args:
        name: file name under ``tests/distributed/scripts``.
        args: command-line arguments passed to the script.
        timeout: seconds; generous because the suite shares 2 cores and a short job can take several times longer
            under contention.
        env: extra environment variables.
        torchrun: when > 0, launch with ``torchrun --nproc_per_node=<torchrun>`` instead of plain python
            (for scripts that use torch.distributed directly, without Lightning's launcher).
    """
    cmd, full_env = _command(name, args, env, torchrun)
    proc = subprocess.run(cmd, env=full_env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{name} {' '.join(map(str, args))} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{_head_and_tail(proc.stderr)}"
        )
    return proc


def start_script(name: str, *args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``scripts/<name>`` with plain python without waiting, as the leader of a new process group:
    ``os.killpg(proc.pid, sig)`` then reaches every rank Lightning's launcher starts (they stay in the group; torchrun
    would put each worker in a session of its own).

    Args:
        name, args, env: as for :func:`run_script`.
        log: file receiving stdout and stderr together (a pipe nobody reads while the job runs could fill and block it).
    """
    cmd, full_env = _command(name, args, env, torchrun=0)
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=full_env, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _head_and_tail(text: str, head: int = 4000, tail: int = 8000) -> str:
    """The start and the end of a long stream: under torchrun the first rank to fail writes its traceback first, and
    the other ranks' tracebacks (a collective broken by the dead peer) fill the end."""
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n[... {len(text) - head - tail} characters left out ...]\n{text[-tail:]}"
