import os

# Multi-process CPU tests and the suite itself share 2 cores: one intra-op thread per process keeps them from
# oversubscribing (short multi-process jobs took several times longer under contention). Set before torch is imported,
# which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on the GPU machine")
    skip_multi = pytest.mark.skip(reason=f"needs >= 2 CUDA GPUs, found {n_gpu}; run `pytest -m multi_gpu` there")
    for item in items:
        if "gpu" in item.keywords and n_gpu < 1:
            item.add_marker(skip_gpu)
        if "multi_gpu" in item.keywords and n_gpu < 2:
            item.add_marker(skip_multi)
