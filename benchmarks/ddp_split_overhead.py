"""What ``AutoMicroBatch(on_oom="split")`` costs under DDP without an error: local accumulation and one coalesced
all-reduce after the window's last backward, against DDP's reducer overlapping its all-reduces with that backward.

    python benchmarks/ddp_split_overhead.py --out benchmarks/results/ddp_split_overhead_<hardware>_<yyyymmdd>.jsonl

Runs each case as its own 2-process job (Lightning's launcher; CPU/gloo unless ``--accelerator gpu``), alternating
``stock`` (``AccumulationScheduler({0: 2})``: DDP's reducer) and ``split`` (``AutoMicroBatch(..., on_oom="split")``)
``--repeats`` times. Workload: the example GPT (4 layers, d=256, vocab 8192, block 128), loader batch 8, 2
micro-batches per step, SGD, ``--steps`` steps, the median step after ``--warmup`` on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def job(case: str, accelerator: str, steps: int, warmup: int, out: Path) -> None:
    import torch
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from lightning_effi.callbacks import AccumulationScheduler, AutoMicroBatch
    from lightning_effi.models import GPTLightningModule

    class LM(GPTLightningModule):
        def __init__(self) -> None:
            torch.manual_seed(0)
            super().__init__(vocab_size=8192, block_size=128, n_layer=4, n_head=4, d_model=256, max_steps=steps,
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-2))
            self.batch_size = 8

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, 8192, (16 * 2 * (steps + 1), 129), generator=g)
            return DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=self.batch_size)

    class Clock(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = time.perf_counter()

        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            if accelerator == "gpu":
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.times.append(now - self.t0)
            self.t0 = now

    callback = AccumulationScheduler({0: 2}) if case == "stock" else \
        AutoMicroBatch(32, max_micro_batch_size=8, on_oom="split")
    clock = Clock()
    trainer = Trainer(accelerator=accelerator, devices=2, strategy="ddp", max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[callback, clock])
    trainer.fit(LM())
    if trainer.global_rank == 0:
        step = statistics.median(clock.times[warmup:])
        with open(out, "a") as f:
            f.write(json.dumps({"case": case, "median_step_s": step, "accelerator": accelerator,
                                "steps": steps}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--job", default=None)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.job is not None:
        job(a.job, a.accelerator, a.steps, a.warmup, a.out)
        return
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(a.repeats):
        for case in ("stock", "split"):
            subprocess.run([sys.executable, __file__, "--job", case, "--accelerator", a.accelerator,
                            "--steps", str(a.steps), "--warmup", str(a.warmup), "--out", str(a.out)],
                           check=True, env=env, cwd=REPO, capture_output=True)
    rows = [json.loads(line) for line in a.out.read_text().splitlines()]
    for r in rows:
        print(json.dumps(r))
    stock = [r["median_step_s"] for r in rows if r["case"] == "stock"]
    split = [r["median_step_s"] for r in rows if r["case"] == "split"]
    summary = {"split_over_stock_step_time": [s / t for s, t in zip(split, stock)], "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(summary))
    with open(a.out, "a") as f:
        f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
