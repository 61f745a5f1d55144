"""Train tp_common's networks under EffiFSDPStrategy(tensor_parallel_size=...) for each requested case.

Usage (under torchrun; one process group runs every case's Trainer in turn):
    torchrun --nproc_per_node=2 tp_train.py --out DIR --cases gpt_adamw,llama_lamb_lp
    torchrun --nproc_per_node=2 tp_train.py --out DIR --resume ROOT --resume-cases gpt_adamw_dp2:gpt_adamw_tp2
    torchrun --nproc_per_node=2 tp_train.py --out DIR --cases module   (GPTLightningModule, tokens, export)
    python tp_train.py --out DIR --cases module                        (its single-process reference)

Per case, under DIR/<case>/: ``final.pt`` (the full model state_dict, gathered), ``rank<r>.json`` (per-rank
observations) and for checkpoint sources ``step5/`` (a DCP checkpoint at the end of epoch 1). ``--resume-cases
a:b`` resumes ``ROOT/a/step5`` with case ``b``'s layout and writes DIR/<a>_as_<b>/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import tp_common as tc  # noqa: E402
from _common import clean_exit, count_all_reduces_per_step, rows, save_at_epoch_end  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402

from lightning_effi.strategies import EffiFSDPStrategy  # noqa: E402


class LM(pl.LightningModule):
    def __init__(self, net: str, optimizer: str) -> None:
        super().__init__()
        self.net_name, self.optimizer_name = net, optimizer
        self.net = tc.build_net(net)

    def tp_plan(self) -> dict[str, str]:
        if self.net_name == "llama":
            return tc.LLAMA_PLAN
        from lightning_effi.models import GPTLightningModule

        # the shipped GPT plan, its paths moved from the module's "model" to this module's "net"
        return {"net" + k.removeprefix("model"): v for k, v in GPTLightningModule.tp_plan(self).items()}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return tc.loss_fn(self.net(batch[:, :-1]), batch)

    def configure_optimizers(self):
        opt, sched = tc.make_optimizer(self.optimizer_name, self.net)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Observe(pl.Callback):
    """Skips, placements, and an overflow written into rank 1's local gradient shards only."""

    def __init__(self, inject_overflow_at: int | None) -> None:
        self.inject_overflow_at = inject_overflow_at
        self.info: dict = {"skipped": [], "placements": {}, "allreduce_per_step": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.info["placements"] = {n: [str(pl) for pl in getattr(p, "placements", ())]
                                   for n, p in pl_module.named_parameters()}
        count_all_reduces_per_step(trainer.optimizers[0], self.info["allreduce_per_step"])

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.inject_overflow_at and trainer.global_rank == 1:
            for p in pl_module.parameters():
                if p.grad is not None and p.grad.to_local().numel():
                    p.grad.to_local().view(-1)[0] = float("inf")
                    break

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        plugin = trainer.precision_plugin
        if hasattr(plugin, "last_step_skipped"):
            self.info["skipped"].append(bool(plugin.last_step_skipped))


class SeedPerBatch(pl.Callback):
    """The same masks in every run whatever else draws from the global RNG (sharding and DTensor set-up do)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(tc.SEED + batch_idx)


def _loader(world: int, tp: int, batch_size: int, wrap=None):
    rank = int(os.environ.get("RANK", 0))
    data = rows(tc.dataset(), wrap)
    dp = world // tp
    # Every tensor-parallel rank of a data-parallel group reads the same rows.
    sampler = DistributedSampler(data, num_replicas=dp, rank=rank // tp, shuffle=False)
    return DataLoader(data, batch_size=batch_size // dp, sampler=sampler)


def _trainer(spec: dict, world: int, callbacks: list, max_epochs: int, plugins=(), **strategy) -> pl.Trainer:
    dp, tp = spec.get("layout", (1, 2))
    assert dp * tp == world, (spec, world)
    return pl.Trainer(
        accelerator="cpu", devices=world, max_epochs=max_epochs,
        strategy=EffiFSDPStrategy(tensor_parallel_size=tp, sequence_parallel=spec.get("sp", False),
                                  loss_parallel=spec.get("lp", False), **strategy),
        precision=None if plugins else "32-true", plugins=list(plugins), use_distributed_sampler=False,
        gradient_clip_val=spec.get("clip"),
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )


def _full_state(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("net."): v for k, v in full.items()}


def run_case(case: str, out: Path, world: int, resume: Path | None = None, source: str | None = None) -> None:
    from lightning_effi.callbacks import TrainingHealthMonitor
    from lightning_effi.plugins import LossScalingPrecision

    spec = tc.ALL_CASES[case]
    target = tc.case_dir(out, f"{source}_as_{case}" if source else case)
    target.mkdir(parents=True, exist_ok=True)
    observe = Observe(tc.SKIP_AT if spec.get("fp16") else None)
    callbacks: list = [observe]
    health = TrainingHealthMonitor(log_every_n_steps=1) if spec.get("health") else None
    if health is not None:
        callbacks.append(health)
    if spec.get("save") and resume is None:
        callbacks.append(save_at_epoch_end(tc.PER_EPOCH, target / "step5"))
    plugins = [LossScalingPrecision("16-mixed", "cpu", init_scale=2.0**10)] if spec.get("fp16") else []
    epochs = tc.EPOCHS if spec.get("save") else 1
    trainer = _trainer(spec, world, callbacks, epochs, plugins)
    model = LM(spec["net"], spec["optimizer"])
    ckpt = str(tc.case_dir(resume, source) / "step5") if resume is not None and source else None
    trainer.fit(model, train_dataloaders=_loader(world, trainer.strategy.tensor_parallel_size, tc.GLOBAL_BATCH),
                ckpt_path=ckpt)
    full = _full_state(model)
    info = dict(observe.info, global_step=trainer.global_step, world_size=trainer.world_size)
    if health is not None:
        info["health"] = {k: v for k, v in health.last_metrics.items() if isinstance(v, float)}
    opt = trainer.optimizers[0]
    if getattr(opt, "trust_ratios", None) is not None:
        info["trust_ratios"] = opt.trust_ratios.tolist()
    rank = trainer.global_rank
    (target / f"rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        torch.save(full, target / "final.pt")


def run_module(out: Path, world: int, kind: str = "module") -> None:
    """The package's LightningModules with their shipped plans and sequence parallelism, tensor parallel over 2
    ranks (data parallel over the rest); with one process the same run is the reference.

    ``module``: GPTLightningModule with loss parallelism, the token-sum loss and AccumulationScheduler(normalize=
    "tokens") over a window of 2 (some labels ignored, so micro-batches hold different numbers of tokens); then a DCP
    checkpoint and the model's logits on fixed tokens, which the exported state_dict must reproduce in a plain GPT.
    ``bert``: BertMLMLightningModule (masks from the global RNG, seeded per batch alike in every run)."""
    from lightning_effi.callbacks import AccumulationScheduler
    from lightning_effi.models import BertMLMLightningModule, GPTLightningModule

    tp = 2 if world > 1 else 1
    target = tc.case_dir(out, kind)
    target.mkdir(parents=True, exist_ok=True)

    def labelled(t):
        labels = t[1:].clone()
        labels[: int(t[0]) % 7] = -100  # a data-dependent number of ignored positions
        return {"input_ids": t[:-1], "labels": labels}

    pl.seed_everything(tc.SEED, verbose=False)
    shape = dict(vocab_size=tc.VOCAB, block_size=tc.BLOCK, n_layer=2, n_head=4, d_model=32, warmup_steps=1,
                 max_steps=4)
    if kind == "bert":
        # the default vocabulary: masking draws the mask id and random bytes from it
        model: pl.LightningModule = BertMLMLightningModule(**{**shape, "vocab_size": 260}, mask_prob=0.3)
        callbacks: list = [SeedPerBatch()]
    else:
        model = GPTLightningModule(**shape, loss_reduction="sum")
        callbacks = [AccumulationScheduler({0: 2}, normalize="tokens")]
    strategy: object = "auto"
    if tp > 1:
        strategy = EffiFSDPStrategy(tensor_parallel_size=tp, sequence_parallel=True, loss_parallel=kind != "bert")
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=4, callbacks=callbacks,
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=_loader(world, tp, 2, labelled))
    ckpt = target / ("ckpt" if tp > 1 else "model.ckpt")
    trainer.save_checkpoint(ckpt)
    model.eval()
    with torch.no_grad():
        logits = model(tc.dataset()[:4, :-1])
    if hasattr(logits, "full_tensor"):  # vocabulary-sharded under loss_parallel
        logits = logits.full_tensor()
    state = _full_state(model) if tp > 1 else {k: v.clone() for k, v in model.state_dict().items()}  # collective
    if trainer.global_rank == 0:
        torch.save(logits, target / "logits.pt")
        torch.save(state, target / "final.pt")
        (target / "info.json").write_text(json.dumps({"global_step": trainer.global_step}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="")
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--resume-cases", default="")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    for case in filter(None, args.cases.split(",")):
        if case in ("module", "bert"):
            run_module(args.out, world, case)
        else:
            run_case(case, args.out, world)
    for pair in filter(None, args.resume_cases.split(",")):
        source, case = pair.split(":")
        run_case(case, args.out, world, resume=args.resume, source=source)
    clean_exit()


if __name__ == "__main__":
    main()
