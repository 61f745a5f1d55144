"""AutoMicroBatch with an out-of-memory error injected on one rank of 2 (gloo).

Usage: python microbatch_oom.py STRATEGY OUT CASE   (Lightning's launcher, 2 processes)

STRATEGY ddp, CASE: ``none`` (on_oom="split", no error), ``stock`` (AccumulationScheduler under DDP's own reducer),
``fwd1`` (rank 1, the forward of a window's only batch), ``bwd1`` (rank 1, the backward of a window's second batch:
a replay), ``bwd0`` (rank 0, the backward of the first batch), ``floor1`` (rank 1 runs out of memory at every size),
``raise1`` (on_oom="raise", a backward error on rank 1: the job must end).
Each rank writes ``OUT/CASE-rank{r}.pt``: weights, part size, recoveries.
STRATEGY effi_fsdp / effi_deepspeed_stage_2, CASE ``fwd1`` / ``bwd1``: the run must end with AutoMicroBatch's error;
``probe`` (the fit-start probe on both ranks, out of memory above 4 on both) against ``fixed`` (4 given); ``probe1``
(out of memory above 4 on rank 1 only: rank 0 waits inside the sharded forward) must end with the probe's error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import lightning_effi.strategies  # noqa: E402,F401  (registers effi_fsdp, effi_deepspeed_stage_N)
from lightning_effi.callbacks import AccumulationScheduler, AutoMicroBatch  # noqa: E402
from lightning_effi.callbacks.microbatch import _ProbeAgreement  # noqa: E402
from tests.callbacks.test_microbatch_oom import OOMLM  # noqa: E402

STRATEGY, OUT, CASE = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
# 48 samples, 24 per rank, loader batch 8, global batch 32: factor 2, windows of 2 and 1 batches per epoch
INJECT = {"fwd1": ({(1, 2): ("forward", 4)}, 1), "bwd1": ({(2, 1): ("backward", 2)}, 1),
          "bwd0": ({(0, 0): ("backward", 4)}, 0), "floor1": ({(1, 2): ("forward", 0)}, 1),
          "raise1": ({(1, 2): ("backward", 4)}, 1)}


class _Probing(AutoMicroBatch):
    @staticmethod
    def _can_probe(trainer) -> bool:
        return True


def main() -> None:
    oom, rank = INJECT.get(CASE, ({}, None))
    if CASE in ("probe", "probe1"):
        oom = {(0, 0): ("forward", 4)}  # the probe runs training_step at step 0 with batch_idx 0
        rank = 1 if CASE == "probe1" else None
        _ProbeAgreement.TIMEOUT_S = 10.0  # rank 0 waits in FSDP2's all-gather for rank 1, which never comes
    module = OOMLM(oom, rank=rank, resumable=False, optimizer="adam" if STRATEGY == "ddp" else "sgd", lr=0.05)
    if CASE == "stock":
        callback: pl.Callback = AccumulationScheduler({0: 2})
    elif CASE in ("probe", "probe1", "fixed"):
        # probe: the fit-start probe on every rank (CPU stands in for CUDA), out of memory above 4 on both ranks
        # (rank 1 only with "probe1"); fixed: the size given, no probe
        cls = AutoMicroBatch if CASE == "fixed" else _Probing
        callback = cls(32, max_micro_batch_size=4 if CASE == "fixed" else None, grow_after=None)
    else:
        split = STRATEGY == "ddp" and CASE != "raise1"  # else the default here: "raise"
        callback = AutoMicroBatch(32, max_micro_batch_size=8, on_oom="split" if split else None, grow_after=None)
    strategy: object = STRATEGY
    if STRATEGY == "effi_fsdp":
        from lightning_effi.strategies import EffiFSDPStrategy

        strategy = EffiFSDPStrategy(wrap=["Linear", "Embedding"])
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    trainer.fit(module)
    r = trainer.global_rank
    split = getattr(callback, "split", None)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in module.net.state_dict().items()}
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": weights,
                "size": split.size if split is not None else None, "probed": getattr(callback, "probed", {}),
                "loader": getattr(callback, "loader_batch_size", None),
                "recoveries": getattr(callback, "recoveries", []), "raised": module.raised,
                "parts": module.parts}, OUT / f"{CASE}-rank{r}.pt")
    print(f"rank {r} finished without error", flush=True)


if __name__ == "__main__":
    main()
