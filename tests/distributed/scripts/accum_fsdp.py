"""AccumulationScheduler under 2-process FSDP2 on CPU (gloo): Lightning's ModelParallelStrategy with
``data_parallel_size=2, tensor_parallel_size=1`` and ``fully_shard`` in ``configure_model``.

Same cases and data as accum_ddp.py (tokens, mean, mid-window resume), so the test compares with the same float64
references; tokens and the resume also run under the package's ``effi_fsdp`` (DCP checkpoint directory). Gradients
are DTensor shards here: the boundary rescale and the mid-window checkpoint go through the DTensor paths. Writes
``<out>/fsdp.pt`` on rank 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import clean_exit  # noqa: E402
from accum_ddp import LR, SCHEDULE, Recorder, SaveAndStop, global_batches  # noqa: E402

from lightning_effi.callbacks import AccumulationScheduler  # noqa: E402
from tests.callbacks._toy import ListLoader, TinyLM  # noqa: E402


class ShardedLM(TinyLM):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for sub in (self.net.emb, self.net.mix, self.net.head):
            fully_shard(sub, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def fit(normalize: str, *, optimizer: str = "sgd", callbacks=(), ckpt=None, effi: bool = False):
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    mine = global_batches()[rank::2]
    reduction = "sum" if normalize == "tokens" else "mean"
    cls = TinyLM if effi else ShardedLM  # effi_fsdp shards by class name itself, no configure_model
    module = cls(loss_reduction=reduction, lr=LR if optimizer == "sgd" else 0.02, optimizer=optimizer)
    if effi:
        from lightning_effi.strategies import EffiFSDPStrategy

        # DCP directory checkpoints (the default): the partial-window gradients travel inside it.
        strategy = EffiFSDPStrategy(wrap=["Linear", "Embedding"])
    else:
        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    rec = Recorder(hook_comm=False)
    trainer = Trainer(
        accelerator="cpu", devices=2, max_epochs=1, logger=False, enable_checkpointing=False,
        strategy=strategy,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[AccumulationScheduler(SCHEDULE, normalize=normalize), rec, *callbacks],
    )
    trainer.fit(module, ListLoader(mine), ckpt_path=ckpt)
    weights = {k: v.full_tensor().detach().clone() for k, v in module.net.state_dict().items()}
    return {"weights": weights, "sizes": rec.sizes, "losses": module.losses}


def main() -> None:
    out = Path(sys.argv[1])
    # Lightning's ModelParallelStrategy with fully_shard in configure_model...
    results = {"tokens": fit("tokens"), "mean": fit("mean")}
    # ...and the package's effi_fsdp, with its default DCP directory checkpoint for the mid-window resume.
    results["effi_tokens"] = fit("tokens", effi=True)
    results["adam_full"] = fit("tokens", optimizer="adam", effi=True)
    ckpt = str(out / "effi_mid")
    results["adam_first"] = fit("tokens", optimizer="adam", callbacks=[SaveAndStop(4, ckpt)], effi=True)
    results["adam_resumed"] = fit("tokens", optimizer="adam", ckpt=ckpt, effi=True)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(results, out / "fsdp.pt")
    clean_exit()


if __name__ == "__main__":
    main()
