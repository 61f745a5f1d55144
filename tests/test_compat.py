"""Each private dependency in lightning_effi._compat still looks the way the package relies on (an upgrade of torch,
Lightning or DeepSpeed that changes one fails here, not silently in a run)."""

from __future__ import annotations

import pytest

from lightning_effi import _compat


@pytest.mark.parametrize("entry", _compat.CHECKS, ids=[c.name for c in _compat.CHECKS])
def test_private_dependency_is_unchanged(entry):
    try:
        entry.check()
    except ImportError as e:  # an optional package (DeepSpeed) that is not installed here
        pytest.skip(f"{entry.name}: {e}")


def test_deepspeed_patches_are_restored():
    pytest.importorskip("deepspeed")
    import importlib

    from deepspeed.accelerator import get_accelerator

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build, answer = ds_torch.build_shm_op, get_accelerator().is_fp16_supported()
    with _compat.deepspeed_without_shm_build(), _compat.deepspeed_fp16_on_cpu():
        assert ds_torch.build_shm_op() is None and get_accelerator().is_fp16_supported() is True
    assert ds_torch.build_shm_op is build and get_accelerator().is_fp16_supported() == answer
