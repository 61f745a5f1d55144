"""The examples run as documented in examples/README.md (subprocesses, tiny settings), and the HuggingFace one gets
the same weight-decay split as HuggingFace's own Trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    for key in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_train_gpt_example_smoke(tmp_path):
    proc = _run([str(REPO / "examples/train_gpt.py"), "--max-steps", "2", "--out", str(tmp_path / "runs")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "final val loss" in proc.stdout and "unigram entropy" in proc.stdout
    assert list((tmp_path / "runs" / "gpt_example").glob("version_0/checkpoints/last.ckpt"))


@pytest.mark.parametrize("extra", [[], pytest.param(["--devices", "2", "--fsdp"], marks=pytest.mark.distributed)],
                         ids=["one-process", "fsdp-2-processes"])
def test_hf_gpt2_example_trains(extra, tmp_path):
    proc = _run([str(REPO / "examples/hf_gpt2.py"), "--max-steps", "3", "--max-bytes", "200000", *extra], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "hf_gpt2: 3 optimizer steps" in proc.stdout
    assert (tmp_path / "runs/hf_gpt2").is_dir()


def test_param_groups_on_hf_gpt2_match_hf_trainers_decay_rule():
    """GPT-2 builds its projections from Conv1D, not nn.Linear: the categories still find its biases and norms."""
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.trainer_pt_utils import get_parameter_names

    from lightning_effi.optim import param_groups

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    # by tensor: HF lists the tied head weight under both names, param_groups holds the tensor once
    hf_decay = {id(model.get_parameter(n)) for n in get_parameter_names(model, [nn.LayerNorm]) if "bias" not in n}
    ours = param_groups(model, weight_decay=0.1, no_decay=["bias", "norm"])
    decayed = {id(p) for g in ours if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == hf_decay and len(decayed) == 2 * 4 + 2  # per block attn/proj/fc/proj weights; wte, wpe
