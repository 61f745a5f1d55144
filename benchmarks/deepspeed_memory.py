"""Peak GPU memory and throughput of DeepSpeed ZeRO 1/2/3 under EffiDeepSpeedStrategy, beside Lightning's stock
DeepSpeedStrategy, on a ~1.4B-parameter GPT (d_model 2048, 26 layers), one case per process group.

    torchrun --nproc_per_node=2 benchmarks/deepspeed_memory.py --case effi:2:adamw

Rank 0 appends one JSON line per case to ``--out``, by default
``benchmarks/results/deepspeed_memory_<hardware>_<yyyymmdd>.jsonl`` (e.g. hardware ``h200x2``: GPU model x ranks).

A case is ``<strategy>:<stage>:<optimizer>`` with strategy ``effi`` (EffiDeepSpeedStrategy) or ``stock`` (Lightning's
DeepSpeedStrategy), stage 1-3, optimizer ``adamw`` (torch.optim.AdamW) or ``lamb`` (lightning_effi.optim.Lamb).
Run one case per torchrun so that memory a previous engine left behind cannot inflate the next case's peak.

What is measured, on every rank (rank 0 appends one JSON line; the ranks' maxima are reported):

- ``model_state_gib``: ``torch.cuda.memory_allocated()`` at the start of a step after warmup: parameters, gradient
  buffers and optimizer state that live across steps (ZeRO's "model states"), no activations;
- ``peak_gib``: ``torch.cuda.max_memory_allocated()`` over the measured steps (model states + activations);
- ``paper_gib``: the ZeRO paper's mixed-precision Adam model-state bytes per parameter, Psi x (4 + 12/N),
  (2 + 14/N), (16/N) for stages 1, 2, 3 (Rajbhandari et al. 2020, Sec. 5), N = data-parallel size;
- ``tokens_per_s`` over all ranks, and MFU against the H200's dense bf16 peak (989.5 TFLOP/s per GPU) with
  6 Psi + 12 L d T FLOPs per token.

bf16-mixed, micro-batch 8 x 1024 tokens per GPU, no accumulation, random tokens (no data-loading cost).
A case that fails records its error instead of numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_effi.models import GPT
from lightning_effi.optim import Lamb, param_groups

H200_BF16_FLOPS = 989.5e12
CUDA = torch.cuda.is_available()
PAPER_BYTES = {1: lambda n: 4 + 12 / n, 2: lambda n: 2 + 14 / n, 3: lambda n: 16 / n}


class RandomTokens(Dataset):
    def __init__(self, n: int, t: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, t + 1), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i, :-1], self.x[i, 1:]


class BenchLM(pl.LightningModule):
    def __init__(self, optimizer: str, shape: dict) -> None:
        super().__init__()
        self.optimizer_name, self.shape = optimizer, shape
        self.model: GPT | None = None

    def configure_model(self) -> None:
        # Built inside the strategy's init context: on the GPU directly, and partitioned at construction under
        # ZeRO-3 (deepspeed.zero.Init), so no rank ever holds the full fp32 model.
        if self.model is None:
            self.model = GPT(**self.shape)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        groups = param_groups(self.model, weight_decay=0.1)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
        return Lamb(groups, lr=1e-3, betas=(0.9, 0.999))


class Meter(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.t0 = 0.0
        self.model_state = 0
        self.result: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.t0 == 0.0:
            if CUDA:
                torch.cuda.synchronize()
                self.model_state = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if CUDA:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.t0
        peak = torch.cuda.max_memory_allocated() if CUDA else 0
        stats = torch.tensor([self.model_state, peak], dtype=torch.float64, device=pl_module.device)
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        self.result = {"elapsed_s": elapsed, "model_state_bytes": stats[0].item(), "peak_bytes": stats[1].item()}


def run(case: str, steps: int, warmup: int, micro: int, tiny: bool) -> dict:
    kind, stage, optimizer = case.split(":")
    stage = int(stage)
    shape = {"vocab_size": 50304, "block_size": 1024, "n_layer": 26, "n_head": 16, "d_model": 2048, "dropout": 0.0}
    if tiny:  # a smoke test of this script on CPU
        shape = {"vocab_size": 256, "block_size": 32, "n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.0}
    world = int(os.environ["WORLD_SIZE"])
    if kind == "effi":
        from lightning_effi.strategies import EffiDeepSpeedStrategy

        strategy = EffiDeepSpeedStrategy(stage=stage)
    elif kind == "stock":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(stage=stage)
    else:
        raise ValueError(f"Invalid strategy {kind!r} in case {case!r}: use 'effi' or 'stock'")
    meter = Meter(warmup)
    trainer = pl.Trainer(accelerator="cuda" if CUDA else "cpu", devices=world, strategy=strategy,
                         precision="bf16-mixed",
                         max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[meter])
    module = BenchLM(optimizer, shape)
    data = DataLoader(RandomTokens(micro * world * (warmup + steps + 2), shape["block_size"], shape["vocab_size"]),
                      batch_size=micro, num_workers=2 if CUDA else 0, pin_memory=CUDA)
    trainer.fit(module, train_dataloaders=data)
    psi = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.model.parameters())
    tokens = steps * micro * shape["block_size"] * world
    tps = tokens / meter.result["elapsed_s"]
    flops_per_token = 6 * psi + 12 * shape["n_layer"] * shape["d_model"] * shape["block_size"]
    gib = 2.0**30
    return {
        "_rank": trainer.global_rank,
        "case": case, "params": psi, "world_size": world, "micro_batch": micro, "seq_len": shape["block_size"],
        "steps": steps, "warmup": warmup,
        "tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token / (world * H200_BF16_FLOPS), 4),
        "model_state_gib": round(meter.result["model_state_bytes"] / gib, 2),
        "peak_gib": round(meter.result["peak_bytes"] / gib, 2),
        "paper_gib": round(psi * PAPER_BYTES[stage](world) / gib, 2),
        "paper_bytes_per_param": round(PAPER_BYTES[stage](world), 2),
        "model_state_bytes_per_param": round(meter.result["model_state_bytes"] / psi, 2),
    }


def default_out(world: int) -> Path:
    """benchmarks/results/deepspeed_memory_<hardware>_<yyyymmdd>.jsonl, hardware as GPU model x ranks (or cpu)."""
    hardware = "cpu"
    if CUDA:
        model = re.search(r"[a-z]+\d+", torch.cuda.get_device_name(0).lower().replace("nvidia", ""))
        hardware = f"{model.group(0) if model else 'gpu'}x{world}"
    day = time.strftime("%Y%m%d", time.gmtime())
    return Path(__file__).resolve().parent / "results" / f"deepspeed_memory_{hardware}_{day}.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", required=True, help="<effi|stock>:<1|2|3>:<adamw|lamb>")
    parser.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default 3)")
    parser.add_argument("--micro", type=int, default=8, help="micro-batch per GPU (default 8)")
    parser.add_argument("--out", default=None, help="JSON-lines file to append to (default: "
                        "benchmarks/results/deepspeed_memory_<hardware>_<yyyymmdd>.jsonl)")
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test of the script)")
    args = parser.parse_args()
    try:
        result = run(args.case, args.steps, args.warmup, args.micro, args.tiny)
    except Exception as err:  # noqa: BLE001 - recorded, so the remaining cases of a sweep still run
        result = {"case": args.case, "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()[-3000:]}
    # Lightning's rank (set on every process it drives); the environment's RANK only when the run failed early.
    rank = result.pop("_rank", int(os.environ.get("RANK", "0")))
    if rank == 0:
        result.update({"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                       else "cpu", "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())})
        out = Path(args.out) if args.out else default_out(int(os.environ.get("WORLD_SIZE", "1")))
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "traceback"}), flush=True)
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
