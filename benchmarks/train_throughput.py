"""Training throughput, MFU and peak GPU memory of the example GPT under different strategies, side by side.

    # every case on all visible GPUs (each case in its own torchrun job, one JSON line per case)
    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput_<hardware>_<yyyymmdd>.jsonl
    python benchmarks/train_throughput.py --cases effi_fsdp_adamw,effi_fsdp_lamb --steps 30   # a subset

Default workload: GPT d_model=2048, 24 layers, 16 heads, block 1024, vocab 50304, micro-batch
8 per GPU, bf16-mixed, no accumulation, no clipping. Same model, data, optimizer hyper-parameters and allocator
settings for every case; only the strategy (and AdamW vs LAMB) changes. Cases:

- ``ddp``: Lightning's DDPStrategy.
- ``model_parallel``: Lightning's ModelParallelStrategy with a hand-written ``configure_model`` applying
  ``fully_shard`` to each Block and the root with a bf16 MixedPrecisionPolicy (the "FSDP2 by hand" baseline).
- ``effi_fsdp_adamw`` / ``effi_fsdp_lamb``: EffiFSDPStrategy(wrap=["Block"]), no per-module code.
- ``effi_fsdp_adamw_compile`` / ``effi_fsdp_lamb_compile``: the same with ``compile=True`` (each Block's forward
  compiled; compile time is in the untimed warmup steps).
- ``model_parallel_nosync`` / ``effi_fsdp_adamw_compile_nosync``: an experiment, not a configuration: the same
  without Lightning's per-batch SIGTERM broadcast (a host sync at every batch start), to see how host-bound a case is.
- ``model_parallel_eagerloss`` / ``effi_fsdp_adamw_compile_eagerloss``: the GPT's loss in eager fp32
  (``fused_loss=False``) instead of its CUDA default, the compiled loss: the configuration measured before it existed.
- ``effi_fsdp_{adamw,lamb}_compile_group{2,4}``: ``wrap_group_size=2`` / ``4`` (neighbouring Blocks as one unit).
- ``effi_fsdp_adamw_compile_group2_dtensor_adam``: group2 with ``fused_adam_on_local_shards=False`` (A/B).
- ``effi_fsdp_adamw_compile_bf16_reduce``: and gradients reduce-scattered in bf16 (``reduce_dtype="bfloat16"``: half
  the reduce-scatter bytes; the sums of 2 ranks lose little, but it is a numerics choice, not the default).

Adding a strategy is one entry in ``CASES``, e.g. ``"x": Case(_effi("EffiDeepSpeedStrategy", stage=2), "adamw")``.
Metrics, measured over ``--steps`` optimizer steps after ``--warmup``:
``tokens_per_s`` (all GPUs), ``mfu = 6 * n_params * tokens_per_s / (n_gpus * peak_flops)`` with ``n_params`` the
model's unique parameters (the tied embedding counted once: it is the output projection's matmul) and
``peak_flops = 989e12`` (H100/H200 dense bf16), and ``mfu_untied_count`` with the output head counted a second
time (the convention of a 1.42B "untied" count, for comparison with numbers quoted that way); peak memory is the
max over ranks of ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` during the timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 tensor-core peak


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: how to build the strategy, which optimizer, and how the module is built."""

    strategy: Callable[[int], object]  # world_size -> Trainer(strategy=...)
    optimizer: str = "adamw"  # "adamw" or "lamb" (see _make_optimizer)
    hand_sharded: bool = False  # the module applies fully_shard itself in configure_model
    empty_init: bool = False  # build the module on the meta device; the strategy materialises the shards
    # Experiment only: skip Lightning's per-batch SIGTERM broadcast, whose .item() makes the host wait for the GPU at
    # the start of every batch (the GPU queue drains each step). Measures how host-bound a case is; SIGTERM is then
    # not handled in that benchmark process.
    no_sigterm_sync: bool = False
    module: tuple = ()  # extra GPTLightningModule keyword arguments, as (name, value) pairs


def _ddp(world: int):
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(gradient_as_bucket_view=True)


def _model_parallel(world: int):
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)


def _effi(class_name: str, **kwargs) -> Callable[[int], object]:
    """A lightning_effi strategy by class name and keyword arguments (imported in the benchmark process only)."""

    def build(world: int):
        from lightning_effi import strategies

        return getattr(strategies, class_name)(**kwargs)

    return build


def _fsdp(**kwargs) -> Callable[[int], object]:
    """EffiFSDPStrategy(wrap=["Block"], **kwargs)."""
    return _effi("EffiFSDPStrategy", wrap=["Block"], **kwargs)


def _effi_deepspeed(stage: int) -> Callable[[int], object]:
    return _effi("EffiDeepSpeedStrategy", stage=stage)


def _stock_deepspeed(stage: int) -> Callable[[int], object]:
    def build(world: int):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=stage)

    return build


# One line per case.
CASES: dict[str, Case] = {
    "ddp": Case(_ddp),
    "model_parallel": Case(_model_parallel, hand_sharded=True, empty_init=True),
    "effi_fsdp_adamw": Case(_fsdp(), "adamw", empty_init=True),
    "effi_fsdp_lamb": Case(_fsdp(), "lamb", empty_init=True),
    "effi_fsdp_adamw_compile": Case(_fsdp(compile=True), "adamw", empty_init=True),
    "model_parallel_nosync": Case(_model_parallel, hand_sharded=True, empty_init=True, no_sigterm_sync=True),
    "effi_fsdp_adamw_compile_nosync": Case(_fsdp(compile=True), "adamw",
                                           empty_init=True, no_sigterm_sync=True),
    "effi_fsdp_lamb_compile": Case(_fsdp(compile=True), "lamb", empty_init=True),
    # The GPT's loss is compiled on CUDA by default (fused_loss=None); these keep the eager fp32 loss, as measured
    # before fused_loss existed (model_parallel_eagerloss is the original hand-written FSDP2 baseline).
    "model_parallel_eagerloss": Case(_model_parallel, hand_sharded=True, empty_init=True,
                                     module=(("fused_loss", False),)),
    "effi_fsdp_adamw_compile_eagerloss": Case(_fsdp(compile=True), "adamw",
                                              empty_init=True, module=(("fused_loss", False),)),
    # wrap_group_size: neighbouring Blocks sharded as one FSDP unit (fewer hooks on the host, fewer collectives)
    "effi_fsdp_adamw_compile_group2": Case(_fsdp(compile=True, wrap_group_size=2),
                                           "adamw", empty_init=True),
    "effi_fsdp_adamw_compile_group4": Case(_fsdp(compile=True, wrap_group_size=4),
                                           "adamw", empty_init=True),
    "effi_fsdp_lamb_compile_group2": Case(_fsdp(compile=True, wrap_group_size=2),
                                          "lamb", empty_init=True),
    # A/B of fused_adam_on_local_shards (default True): torch's fused AdamW through DTensor's dispatcher instead
    "effi_fsdp_adamw_compile_group2_dtensor_adam": Case(
        _fsdp(compile=True, wrap_group_size=2, fused_adam_on_local_shards=False),
        "adamw", empty_init=True),
    "effi_fsdp_adamw_compile_bf16_reduce": Case(
        _fsdp(compile=True, reduce_dtype="bfloat16"), "adamw", empty_init=True),
    # DeepSpeed ZeRO (deepspeed is not in the GPU image: see DEVELOPERS.md for the wheel). Stage 3 refuses
    # init_module(empty_init=False) and builds the module on the CPU either way (DeepSpeed partitions it at setup).
    "deepspeed_stage_2": Case(_stock_deepspeed(2)),
    "deepspeed_stage_3": Case(_stock_deepspeed(3), empty_init=True),
    "effi_ds1_adamw": Case(_effi_deepspeed(1), "adamw"),
    "effi_ds2_adamw": Case(_effi_deepspeed(2), "adamw"),
    "effi_ds2_lamb": Case(_effi_deepspeed(2), "lamb"),
    "effi_ds3_adamw": Case(_effi_deepspeed(3), "adamw", empty_init=True),
    "effi_ds3_lamb": Case(_effi_deepspeed(3), "lamb", empty_init=True),
}


def _make_optimizer(name: str, args):
    import torch

    def factory(groups):
        if name == "adamw":
            # fused: one kernel for all parameters (DTensor shards included); same choice for every case
            return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
        if name == "lamb":
            from lightning_effi.optim import Lamb

            return Lamb(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-6)
        raise ValueError(f"Invalid optimizer {name!r}: must be 'adamw' or 'lamb'")

    return factory


# ------------------------------------------------------------------------------------------------ one case (child)
def run_case(args) -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, Dataset

    from lightning_effi.models import GPTLightningModule

    case = CASES[args.case]
    if case.no_sigterm_sync:
        from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

        _TrainingEpochLoop._broadcast_sigterm_tensor = lambda self: None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    class HandShardedGPT(GPTLightningModule):
        """The hand-written FSDP2 baseline: per-Block fully_shard + root, bf16 params, fp32 gradient reduction."""

        def configure_model(self) -> None:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = self.device_mesh["data_parallel"]
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh, mp_policy=mp)
            fully_shard(self.model, mesh=mesh, mp_policy=mp)

    class RandomTokens(Dataset):
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int):
            g = torch.Generator().manual_seed(i)
            t = torch.randint(0, args.vocab, (args.block_size + 1,), generator=g)
            return {"input_ids": t[:-1], "labels": t[1:]}

    cuda = args.accelerator == "cuda"

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.t0 = self.t1 = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == args.warmup and self.t0 is None:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == args.warmup + args.steps and self.t1 is None:
                if cuda:
                    torch.cuda.synchronize()
                self.t1 = time.perf_counter()

    class Profile(pl.Callback):
        """--profile: a torch.profiler trace (CPU + CUDA) of 3 steps right after the warmup, rank 0's written to
        --profile-dir; the throughput of a profiled run is not a measurement (marked "profiled")."""

        def __init__(self) -> None:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
            self.running = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == args.warmup and not self.running:
                self.prof.start()
                self.running = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.running and trainer.global_step == args.warmup + 3:
                if cuda:
                    torch.cuda.synchronize()
                self.prof.stop()
                self.running = False
                if rank == 0:
                    args.profile_dir.mkdir(parents=True, exist_ok=True)
                    self.prof.export_chrome_trace(str(args.profile_dir / f"trace_{args.case}.json"))

    timer = Timer()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=world,
        strategy=case.strategy(world),
        precision="bf16-mixed",
        max_steps=args.warmup + args.steps,
        callbacks=[timer, *([Profile()] if args.profile else [])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    cls = HandShardedGPT if case.hand_sharded else GPTLightningModule
    with trainer.init_module(empty_init=case.empty_init):
        model = cls(vocab_size=args.vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                    d_model=args.d_model, dropout=0.0, optimizer=_make_optimizer(case.optimizer, args),
                    warmup_steps=10, max_steps=args.warmup + args.steps, **dict(case.module))
    n_params = sum(p.numel() for p in model.model.parameters())  # unique parameters (tied embedding once)
    n_samples = (args.warmup + args.steps + 1) * args.micro_batch * world
    loader = DataLoader(RandomTokens(n_samples), batch_size=args.micro_batch, num_workers=2, pin_memory=True,
                        shuffle=False)
    trainer.fit(model, train_dataloaders=loader)

    device = trainer.strategy.root_device
    stats = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()] if cuda else [0, 0],
                         dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
    if rank != 0:
        return
    seconds = timer.t1 - timer.t0
    tokens_per_s = args.steps * args.micro_batch * args.block_size * world / seconds
    untied = n_params + args.vocab * args.d_model
    row = {
        "bench": "train_throughput",
        "strategy": args.case,
        "optimizer": case.optimizer,
        "n_gpus": world,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke test: MFU meaningless)",
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "d_model": args.d_model,
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "block_size": args.block_size,
        "micro_batch": args.micro_batch,
        "vocab": args.vocab,
        "n_params": n_params,
        "steps": args.steps,
        "warmup": args.warmup,
        "step_time_s": round(seconds / args.steps, 5),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(6 * n_params * tokens_per_s / (world * PEAK_FLOPS), 4),
        "mfu_untied_count": round(6 * untied * tokens_per_s / (world * PEAK_FLOPS), 4),
        "peak_alloc_gib": round(float(stats[0]) / 2**30, 2),
        "peak_reserved_gib": round(float(stats[1]) / 2**30, 2),
        "module": dict(case.module),
        "profiled": bool(args.profile),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print("BENCH_JSON " + json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------------ driver (parent)
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per case (default: all visible)")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=8, help="untimed optimizer steps first")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--timeout", type=float, default=900, help="seconds per case")
    p.add_argument("--accelerator", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke test of the code paths (use a tiny model and --gpus as the process count)")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    p.add_argument("--profile", action="store_true",
                   help="trace 3 steps after the warmup (torch.profiler; timings of such a run are not measurements)")
    p.add_argument("--profile-dir", type=Path, default=Path("profiles"), help="where --profile writes its traces")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case under torchrun
    args = p.parse_args()
    if args.case is not None:
        run_case(args)
        return

    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    import torch

    gpus = args.gpus or (torch.cuda.device_count() if args.accelerator == "cuda" else 1)
    if gpus < 1:
        sys.exit("train_throughput.py needs CUDA GPUs (none visible); --accelerator cpu for a smoke test")
    env = dict(os.environ)
    # Same allocator for every case; expandable segments keep fragmentation out of the reserved-memory number.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "4" if args.accelerator == "cuda" else "1")
    passthrough = []
    for name in ("d_model", "n_layer", "n_head", "block_size", "vocab", "micro_batch", "steps", "warmup", "lr",
                 "accelerator", "profile_dir"):
        passthrough += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    passthrough += ["--profile"] if args.profile else []
    rows = []
    for case in cases:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               str(Path(__file__).resolve()), "--case", case, *passthrough]
        start = time.time()
        try:
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1][len("BENCH_JSON "):])
            else:
                tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-3000:]).strip()
                row = {"bench": "train_throughput", "strategy": case, "n_gpus": gpus, "error": f"rc={proc.returncode}",
                       "tail": tail}
        except subprocess.TimeoutExpired:
            row = {"bench": "train_throughput", "strategy": case, "n_gpus": gpus, "error": f"timeout {args.timeout}s"}
        row["wall_s"] = round(time.time() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
