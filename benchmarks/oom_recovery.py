"""AutoMicroBatch's run-time out-of-memory recovery on one GPU, next to the runs it must match, in one process.

    python benchmarks/oom_recovery.py --out benchmarks/results/oom_recovery_<hardware>_<yyyymmdd>.jsonl

Workload: the example ``GPTLightningModule`` at GPT-2-small shape (12 layers, d=768, 12 heads, vocab 50304, block
1024), ``precision="bf16-mixed"``, fused AdamW, random tokens, global batch 64 (loader batch 16: 4 micro-batches per
step), eager (no compile: a split changes the batch shape). Cases, each ``--steps`` optimizer steps:

* ``stock``: ``AccumulationScheduler({0: 4})`` at loader batch 16 (no recovery machinery);
* ``armed``: ``AutoMicroBatch(64, max_micro_batch_size=16)`` (on_oom="split", its default on CUDA), no error: the
  cost of the loss hand-off on every micro-batch;
* ``recover``: the same, with the process's memory capped at step ``--cap-at`` (``set_per_process_memory_fraction``)
  to three quarters of the way from the memory held between steps to the peak the loader batch of 16 needs: the
  next forward or backward runs out of memory, and training goes on in smaller parts;
* ``reference``: ``AutoMicroBatch(64, max_micro_batch_size=<the size recover found>)`` from the start, uncapped;
* ``reference_capped``: the reference under ``recover``'s memory cap from the start;
* ``armed_again``, ``stock_again``: the first two once more, in the other order.

Reported per case: tokens/s over the steps after ``--warmup`` (and after the recovery step for ``recover``), the
recovery step's time against the median step, the part size found, peak memory, and the largest loss difference per
step between ``recover`` and ``reference`` after the recovery.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from lightning_effi.callbacks import AccumulationScheduler, AutoMicroBatch
    from lightning_effi.models import GPTLightningModule

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--cap-at", type=int, default=12)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    T, V, GLOBAL, LOADER = 1024, 50304, 64, 16
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory

    class LM(GPTLightningModule):
        def __init__(self) -> None:
            torch.manual_seed(0)
            super().__init__(vocab_size=V, block_size=T, n_layer=12, n_head=12, d_model=768, warmup_steps=5,
                             max_steps=args.steps, optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-4, fused=True))
            self.batch_size = LOADER

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, V, (GLOBAL * (args.steps + 2), T + 1), generator=g)
            rows = [{"input_ids": r[:-1], "labels": r[1:]} for r in ids]
            return DataLoader(rows, batch_size=self.batch_size, shuffle=False)

    class Clock(Callback):
        def __init__(self, cap: bool) -> None:
            self.cap, self.times, self.losses, self.t0, self.base, self.peak = cap, [], [], 0.0, 0, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            w = next(c.window for c in trainer.callbacks if isinstance(c, AccumulationScheduler))
            if w.pos != 0:
                return
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
            if trainer.global_step == args.cap_at - 1:
                self.base = torch.cuda.memory_allocated()
            if self.cap and trainer.global_step == args.cap_at:
                limit = self.base + 0.75 * (self.peak - self.base)
                torch.cuda.set_per_process_memory_fraction(limit / total)
                torch.cuda.empty_cache()  # the limit binds new segments only: give back the cached ones

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            w = next(c.window for c in trainer.callbacks if isinstance(c, AccumulationScheduler))
            if w.is_open:
                return
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            self.losses.append(float(trainer.callback_metrics["train/loss"]))
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    def run(name: str, callback, cap: bool = False, fraction: float = 1.0) -> dict:
        torch.cuda.set_per_process_memory_fraction(fraction)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        clock = Clock(cap)
        module = LM()
        trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=args.steps, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          log_every_n_steps=1, callbacks=[callback, clock])
        trainer.fit(module)
        torch.cuda.set_per_process_memory_fraction(1.0)
        times = clock.times
        skip = {args.cap_at} if cap else set()
        first = args.cap_at + 1 if cap else args.warmup
        timed = [t for i, t in enumerate(times) if i >= first and i not in skip]
        res = {"case": name, "tokens_per_s": GLOBAL * T / statistics.median(timed), "median_step_s":
               statistics.median(timed), "peak_gib": clock.peak / 2**30, "losses": clock.losses}
        if isinstance(callback, AutoMicroBatch):
            res.update(size=callback.micro_batch_size, loader=callback.loader_batch_size,
                       recoveries=callback.recoveries, probed=callback.probed)
        if cap:
            cap_bytes = clock.base + 0.75 * (clock.peak - clock.base)
            res.update(recovery_step_s=times[args.cap_at], cap_gib=cap_bytes / 2**30)
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
        return res

    out = [run("stock", AccumulationScheduler({0: GLOBAL // LOADER})),
           run("armed", AutoMicroBatch(GLOBAL, max_micro_batch_size=LOADER)),
           run("recover", AutoMicroBatch(GLOBAL, max_micro_batch_size=LOADER), cap=True)]
    found = out[-1]["size"]
    out.append(run("reference", AutoMicroBatch(GLOBAL, max_micro_batch_size=found)))
    # the same under the recover run's cap from the start: what the tight allocator limit alone costs
    capped = run("reference_capped", AutoMicroBatch(GLOBAL, max_micro_batch_size=found),
                 fraction=out[2]["cap_gib"] * 2**30 / total)
    # stock and armed again, in the other order: drift within the run shows against the first pair
    out.append(run("armed_again", AutoMicroBatch(GLOBAL, max_micro_batch_size=LOADER)))
    out.append(run("stock_again", AccumulationScheduler({0: GLOBAL // LOADER})))
    rec, ref = out[2], out[3]
    after = range(args.cap_at, len(rec["losses"]))
    diff = max(abs(rec["losses"][i] - ref["losses"][i]) for i in after)
    summary = {"found": found, "recovery_step_s": rec["recovery_step_s"], "median_step_s_after": rec["median_step_s"],
               "armed_vs_stock": out[1]["tokens_per_s"] / out[0]["tokens_per_s"],
               "armed_vs_stock_again": out[4]["tokens_per_s"] / out[5]["tokens_per_s"],
               "recover_after_vs_reference": rec["tokens_per_s"] / ref["tokens_per_s"],
               "recover_after_vs_reference_capped": rec["tokens_per_s"] / capped["tokens_per_s"],
               "max_loss_diff_after_recovery": diff, "device": torch.cuda.get_device_name(),
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    print(json.dumps(summary), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for r in [*out, capped, summary]:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
