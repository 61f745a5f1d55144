"""``Trainer(num_nodes=2, devices=1)``: two torchrun launches on localhost stand in for two nodes (each its own
``--node_rank``, one rendezvous), under DDP and EffiFSDPStrategy; the weights equal the single-process reference."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.distributed.launch import REPO, SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import fsdp_common as fc  # noqa: E402

pytestmark = pytest.mark.distributed
STRATEGIES = ["ddp", "effi_fsdp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                          f"--node_rank={r}", "--master_addr=127.0.0.1", f"--master_port={port}",
                          str(SCRIPTS / "multinode_train.py"), "--out", str(out), "--strategies", ",".join(STRATEGIES)],
                         env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    logs = []
    try:
        for p in nodes:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in nodes:  # one node failing must not leave the other waiting in the rendezvous
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(nodes, logs)):
        assert p.returncode == 0, f"node {r} exited with {p.returncode}\n{log[-6000:]}"
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_nodes_equal_one_process(out, strategy):
    import torch

    ranks = [json.loads((out / strategy / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["world_size"], r["num_nodes"], r["node_rank"]) for r in ranks] == [(2, 2, 0), (2, 2, 1)]
    assert {r["global_step"] for r in ranks} == {fc.PER_EPOCH}
    got = torch.load(out / strategy / "final.pt")
    ref, _ = fc.reference_run("adamw", steps=fc.PER_EPOCH)
    init = fc.build_net().state_dict()
    num = sum(float(((got[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    den = sum(float(((init[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    assert (num / den) ** 0.5 < 1e-4
