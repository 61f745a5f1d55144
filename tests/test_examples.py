"""The Trainer-API example runs as documented in examples/README.md."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_gpt_example_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "examples/train_gpt.py"), "--max-steps", "2",
                           "--out", str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "final val loss" in proc.stdout and "unigram entropy" in proc.stdout
    assert list((tmp_path / "runs" / "gpt_example").glob("version_0/checkpoints/last.ckpt"))
