"""Fixtures of tests/strategies: a 1-rank gloo device mesh for FSDP2 code that needs a mesh but no Trainer."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A 1-D CPU device mesh over a 1-rank gloo group (a FileStore in ``tmp_path``, so no port is taken); the group
    is destroyed afterwards so later tests start without one."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.fail("a default process group is already initialised; an earlier test did not destroy it")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
