"""One process per "node": Trainer(num_nodes=2, devices=1) under two torchrun launches on localhost.

Usage (the test starts both):
    torchrun --nnodes=2 --nproc_per_node=1 --node_rank=R --master_addr=127.0.0.1 --master_port=P \
        multinode_train.py --out DIR --strategies ddp,effi_fsdp

Per strategy, DIR/<strategy>/final.pt (rank 0: the full weights after one epoch of fsdp_common's "adamw" case) and
rank<r>.json (what the Trainer saw: world size, node rank, global step).
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
from _common import clean_exit, rows  # noqa: E402
from fsdp_train import LM  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402


def run(strategy: str, out: Path) -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    data = rows(fc.dataset())
    loader = DataLoader(data, batch_size=fc.GLOBAL_BATCH // world,
                        sampler=DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False))
    trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy=strategy, max_epochs=1,
                         gradient_clip_val=fc.OPTIMIZERS["adamw"]["clip"], use_distributed_sampler=False,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    model = LM("adamw")
    trainer.fit(model, train_dataloaders=loader)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    target = out / strategy
    target.mkdir(parents=True, exist_ok=True)
    info = {"world_size": trainer.world_size, "node_rank": trainer.node_rank, "num_nodes": trainer.num_nodes,
            "global_step": trainer.global_step}
    (target / f"rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        torch.save({k.removeprefix("net."): v for k, v in full.items()}, target / "final.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategies", default="ddp,effi_fsdp")
    args = parser.parse_args()
    import lightning_effi.strategies  # noqa: F401  (registers effi_fsdp)

    for strategy in args.strategies.split(","):
        run(strategy, args.out)
    clean_exit()


if __name__ == "__main__":
    main()
