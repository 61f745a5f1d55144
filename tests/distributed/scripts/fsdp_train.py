"""Train the fsdp_common network under EffiFSDPStrategy for each requested case; write what the tests compare.

Usage (2 ranks under torchrun, so one process pair runs every case's Trainer in turn; 1 rank: plain python):
    torchrun --nproc_per_node=2 fsdp_train.py --out DIR --cases adamw,lamb [--resume ROOT --resume-cases adamw]
    python fsdp_train.py --out DIR --cases adamw
    (--accelerator cuda: the same on GPUs with NCCL)

Per case, under DIR/<case>/: ``final.pt`` (full model state_dict after the last step, gathered to rank 0),
``step5/`` (a sharded DCP checkpoint written at the end of epoch 1 = step 5), ``info.json`` (rank 0's observations)
and ``rank<r>.json`` (per-rank observations). Cases in --resume-cases instead resume from ``ROOT/<case>/step5`` and
write to DIR/<case>_resumed/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import fsdp_common as fc  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import clean_exit, count_all_reduces_per_step, rows, save_at_epoch_end  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402

from lightning_effi.strategies import EffiFSDPStrategy  # noqa: E402


class LM(pl.LightningModule):
    def __init__(self, optimizer: str, root_param: bool = False) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.net = fc.build_net()
        if root_param:
            self.temperature = nn.Parameter(torch.full((1,), fc.TEMPERATURE))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.net(batch[:, :-1])
        return fc.loss_fn(logits * self.temperature if hasattr(self, "temperature") else logits, batch)

    def configure_optimizers(self):
        opt, sched = fc.make_optimizer(self.optimizer_name, self if hasattr(self, "temperature") else self.net)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Observe(pl.Callback):
    """What the tests check besides the weights: compute dtype, parameter/gradient types, all_reduce calls inside
    each optimizer step, forward calls per micro-batch (activation checkpointing recomputes), skipped steps."""

    def __init__(self, inject_overflow_at: int | None = None, hook_qkv: bool = True) -> None:
        self.inject_overflow_at = inject_overflow_at
        self.hook_qkv = hook_qkv  # False under compile: a hook inside one Block would give it a graph of its own
        self.info: dict = {"compute_dtypes": set(), "grad_types": set(), "param_types": set(),
                           "allreduce_per_step": [], "qkv_calls_per_batch": [], "skipped": [], "scales": [],
                           "grads_freed": []}
        self._calls = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.info["empty_local_shards"] = [
            n for n, p in pl_module.named_parameters() if hasattr(p, "to_local") and p.to_local().numel() == 0
        ]
        qkv = pl_module.net.gpt.blocks[0].attn.qkv

        def pre_hook(mod, args):
            self.info["compute_dtypes"].add(str(mod.weight.dtype))
            self._calls += 1

        if self.hook_qkv:
            qkv.register_forward_pre_hook(pre_hook)
        count_all_reduces_per_step(trainer.optimizers[0], self.info["allreduce_per_step"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._calls = 0

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.inject_overflow_at and trainer.global_rank == 1:
            # Only rank 1's shard of the embedding gradient overflows: rank 0 sees finite local gradients and must
            # still skip (the scaler agrees on the flag across ranks).
            pl_module.net.gpt.wte.weight.grad.to_local()[0, 0] = float("inf")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for p in pl_module.parameters():
            self.info["param_types"].add(f"{type(p.data).__name__}:{p.dtype}")
            if p.grad is not None:
                self.info["grad_types"].add(f"{type(p.grad).__name__}:{p.grad.dtype}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.info["qkv_calls_per_batch"].append(self._calls)
        self.info["grads_freed"].append(all(p.grad is None for p in pl_module.parameters()))
        plugin = trainer.precision_plugin
        if hasattr(plugin, "last_step_skipped"):
            self.info["skipped"].append(bool(plugin.last_step_skipped))
            self.info["scales"].append(float(plugin.scaler.get_scale()))


def run_case(case: str, out: Path, resume_root: Path | None, world: int, accelerator: str) -> None:
    from lightning_effi.callbacks import AccumulationScheduler, TrainingHealthMonitor
    from lightning_effi.plugins import LossScalingPrecision

    spec = fc.ALL_CASES[case]
    rank = int(os.environ.get("RANK", 0))
    compiled = spec.get("strategy", {}).get("compile", False)
    real_compile = torch.compile
    if compiled:
        import functools

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        if accelerator == "cpu":  # the strategy calls torch.compile(unit.forward); aot_eager needs no C++ compiler
            torch.compile = functools.partial(real_compile, backend="aot_eager")
    accumulate = spec.get("accumulate", 1)
    target = fc.case_dir(out, case + ("_resumed" if resume_root else ""))
    target.mkdir(parents=True, exist_ok=True)
    data = rows(fc.dataset())
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=fc.GLOBAL_BATCH // world // accumulate, sampler=sampler)
    observe = Observe(inject_overflow_at=fc.SKIP_AT if spec.get("fp16") else None, hook_qkv=not compiled)
    callbacks: list = [observe]
    if not resume_root:
        callbacks.append(save_at_epoch_end(fc.SAVE_AT, target / "step5"))
    if "schedule" in spec:
        callbacks.append(AccumulationScheduler(spec["schedule"], unit="step"))
    health = TrainingHealthMonitor(log_every_n_steps=1) if spec.get("health") else None
    if health is not None:
        callbacks.append(health)
    plugins = [LossScalingPrecision("16-mixed", init_scale=2.0**10, growth_interval=1000)] if spec.get("fp16") else []
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=world,
        strategy=EffiFSDPStrategy(wrap=["Block"], **spec.get("strategy", {})),
        precision=spec.get("precision", None if plugins else "32-true"),
        plugins=plugins,
        # Epoch-based on purpose: with max_steps Lightning treats every resume as mid-epoch ("iteration-based
        # training") and replays one extra batch after an end-of-epoch checkpoint (strategy="auto" does the same).
        max_epochs=fc.EPOCHS,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=fc.OPTIMIZERS[spec["optimizer"]]["clip"],
        use_distributed_sampler=False,  # our sampler keeps the order (Lightning would force shuffle=True)
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = LM(spec["optimizer"], root_param=spec.get("root_param", False))
    ckpt = str(fc.case_dir(resume_root, case) / "step5") if resume_root else None
    # what torch's fused AdamW kernel is handed (torch's functional adam looks torch._fused_adamw_ up at every call)
    kernel, kernel_args = torch._fused_adamw_, set()

    def recording_kernel(*args, **kwargs):
        kernel_args.update(type(t).__name__ for lst in args[:4] for t in lst)
        return kernel(*args, **kwargs)

    torch._fused_adamw_ = recording_kernel
    try:
        trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt)
    finally:
        torch.compile = real_compile
        torch._fused_adamw_ = kernel

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    info = {k: sorted(v) if isinstance(v, set) else v for k, v in observe.info.items()}
    from torch.distributed.fsdp import FSDPModule

    # FSDP units = distinct FSDP states (a group of modules sharded together shares one)
    states = {id(m._get_fsdp_state()) for m in model.modules() if isinstance(m, FSDPModule)}
    info.update(global_step=trainer.global_step, world_size=trainer.world_size, fsdp_units=len(states),
                fused_adamw_args=sorted(kernel_args))
    if compiled:
        from torch._dynamo.utils import counters

        # one graph for every Block (parameters are graph inputs), captured once per call, no fallback to eager
        info["dynamo"] = {"unique_graphs": counters["stats"]["unique_graphs"],
                          "graph_breaks": sum(counters["graph_break"].values()),
                          "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
                          "compiled_forwards": sum(1 for m in model.modules() if "forward" in vars(m))}
    if health is not None:
        info["health"] = dict(health.last_metrics)
        info["health_skips"] = [[step, names] for step, _, names in health.skip_events]
    (target / f"rank{rank}.json").write_text(json.dumps(info))
    if trainer.global_rank == 0:
        torch.save({k.removeprefix("net."): v for k, v in full.items()}, target / "final.pt")
        (target / "info.json").write_text(json.dumps(info))


def run_gpt_module(out: Path, world: int, accelerator: str) -> None:
    """The package's GPTLightningModule under ``strategy="effi_fsdp"`` (registry name, default wrap = the classes in
    every ModuleList, i.e. ``Block``): 3 steps, a sharded checkpoint, and the sharded model's own logits on fixed
    tokens, which the exported single-file state_dict must reproduce in a plain ``GPT``."""
    from lightning_effi.models import GPTLightningModule

    target = fc.case_dir(out, "gpt_module")
    target.mkdir(parents=True, exist_ok=True)
    tokens = fc.dataset()
    rows = [{"input_ids": t[:-1], "labels": t[1:]} for t in tokens]
    rank = int(os.environ.get("RANK", 0))
    loader = DataLoader(rows, batch_size=fc.GLOBAL_BATCH // world,
                        sampler=DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=False))
    torch.manual_seed(fc.SEED)
    model = GPTLightningModule(vocab_size=fc.VOCAB, block_size=fc.BLOCK, n_layer=2, n_head=2, d_model=32,
                               warmup_steps=1, max_steps=3)
    trainer = pl.Trainer(accelerator=accelerator, devices=world, strategy="effi_fsdp", max_steps=3,
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=loader)
    trainer.save_checkpoint(target / "ckpt")
    # save_distributed_checkpoint=False: the full state gathered into one .ckpt file on rank 0
    trainer.strategy._save_distributed_checkpoint = False
    trainer.save_checkpoint(target / "full.ckpt")
    from torch.distributed.fsdp import FSDPModule

    units = sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule))
    model.eval()
    with torch.no_grad():
        logits = model(tokens[:4, :-1].to(trainer.strategy.root_device)).cpu()
    if rank == 0:
        torch.save(logits, target / "logits.pt")
        info = {"fsdp_units": units, "strategy": type(trainer.strategy).__name__}
        (target / "info.json").write_text(json.dumps(info))


def run_sigterm(out: Path, world: int, accelerator: str) -> None:
    """Only rank 0 receives a real SIGTERM (after batch ``SIGTERM_AFTER``); every rank must stop at the start of the
    next batch together, agreeing over a CPU tensor (no device collective, no GPU sync). Records per rank the step it
    stopped at, whether fit ended with Lightning's SIGTERMException, and the (collective, device) of every
    broadcast/all_reduce issued in the training loop (FSDP itself uses all-gather and reduce-scatter)."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    target = fc.case_dir(out, "sigterm")
    target.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    data = rows(fc.dataset())
    loader = DataLoader(data, batch_size=fc.GLOBAL_BATCH // world,
                        sampler=DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False))

    calls: list[str] = []
    armed = [False]  # record from the first training batch on (setup checks dataloader lengths on the device)

    class SigtermOnRank0(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            armed[0] = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == fc.SIGTERM_AFTER and trainer.global_rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the handler Lightning registers at fit start

    real = {name: getattr(dist, name) for name in ("broadcast", "all_reduce")}

    def recording(name):
        def call(tensor, *a, **k):
            if armed[0]:
                calls.append(f"{name}:{tensor.device.type}")
            return real[name](tensor, *a, **k)
        return call

    trainer = pl.Trainer(accelerator=accelerator, devices=world, strategy=EffiFSDPStrategy(wrap=["Block"]),
                         max_epochs=fc.EPOCHS, use_distributed_sampler=False, callbacks=[SigtermOnRank0()],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    exited = False
    for name in real:
        setattr(dist, name, recording(name))
    try:
        trainer.fit(LM("adamw"), train_dataloaders=loader)
    except SIGTERMException:
        exited = True
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    info = {"global_step": trainer.global_step, "sigterm_exit": exited, "received_sigterm": trainer.received_sigterm,
            "collectives": sorted(set(calls)), "n_collectives": len(calls)}
    (target / f"rank{rank}.json").write_text(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="")
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--resume-cases", default="")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    for case in filter(None, args.cases.split(",")):
        if case == "gpt_module":
            run_gpt_module(args.out, world, args.accelerator)
        elif case == "sigterm":
            run_sigterm(args.out, world, args.accelerator)
        else:
            run_case(case, args.out, None, world, args.accelerator)
    for case in filter(None, args.resume_cases.split(",")):
        run_case(case, args.out, args.resume, world, args.accelerator)
    clean_exit()


if __name__ == "__main__":
    main()
