"""AccumulationScheduler with EffiDeepSpeedStrategy (ZeRO-2, CPU/gloo, 2 ranks under torchrun).

Same data and windows as accum_ddp.py ({0: 2, 1: 3} over 9 micro-batches per rank: 2, 3, 3, 1, with an unaligned
change and a partial last window), normalize="mean", SGD. Rank 0 writes ``<out>/deepspeed.pt`` with the gathered
fp32 master weights, micro-batches per step and the factors passed to ``effi_set_accumulation``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import clean_exit  # noqa: E402
from accum_ddp import LR, SCHEDULE, Recorder, global_batches  # noqa: E402
from ds_common import full_fp32_params  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_effi.callbacks import AccumulationScheduler  # noqa: E402
from lightning_effi.strategies import EffiDeepSpeedStrategy  # noqa: E402
from tests.callbacks._toy import TinyLM  # noqa: E402


class Spy(EffiDeepSpeedStrategy):
    factors: list[int] = []

    def effi_set_accumulation(self, factor: int) -> None:
        self.factors.append(factor)
        super().effi_set_accumulation(factor)


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    mine = global_batches()[rank::2]
    # Each item is already a micro-batch of 3 sequences; stack them back so the engine sees micro-batch size 3.
    flat = [{k: b[k][i] for k in b} for b in mine for i in range(3)]
    module = TinyLM(loss_reduction="mean", lr=LR)
    rec = Recorder(hook_comm=False)
    strategy = Spy(stage=2)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[AccumulationScheduler(SCHEDULE, normalize="mean"), rec],
    )
    trainer.fit(module, DataLoader(flat, batch_size=3, shuffle=False))
    params = full_fp32_params(module)
    if rank == 0:
        weights = {k.removeprefix("net."): v for k, v in params.items()}
        torch.save({"weights": weights, "sizes": rec.sizes, "factors": Spy.factors}, out / "deepspeed.pt")
    clean_exit()


if __name__ == "__main__":
    main()
