"""A HuggingFace GPT-2 (built from a local config, nothing downloaded) trained with lightning_effi's plugins.

    python examples/hf_gpt2.py                          # 1 process: CPU, or a GPU when present
    python examples/hf_gpt2.py --devices 2 --fsdp       # FSDP2 over 2 processes (CPU gloo or 2 GPUs)
    python examples/hf_gpt2.py --max-steps 3 --max-bytes 200000   # a smoke run

Nothing in the model is specific to lightning_effi: the LightningModule below wraps ``GPT2LMHeadModel`` as any
Lightning user would. Two choices make every plugin work with it:

- ``training_step`` returns ``{"loss": summed token loss, "num_tokens": n}`` (the token-sum protocol), so
  ``AccumulationScheduler(normalize="tokens")`` divides each accumulation window by its real token count;
- the optimizer is ``Lamb`` over ``param_groups``, which finds GPT-2's ``Conv1D`` biases and LayerNorms by name and
  exempts them from weight decay and from LAMB's trust ratio.

Under ``--fsdp`` every ``GPT2Block`` is one FSDP unit; the tied embedding and head stay together in the root unit.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_effi.callbacks import AccumulationScheduler, TrainingHealthMonitor
from lightning_effi.models import CorpusDataModule
from lightning_effi.optim import Lamb, param_groups
from lightning_effi.plugins import LossScalingPrecision
from lightning_effi.strategies import EffiFSDPStrategy


class HFCausalLM(pl.LightningModule):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 2, n_head: int = 4, d_model: int = 128,
                 lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=d_model, n_layer=n_layer,
                            n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self.model(input_ids=batch["input_ids"]).logits
        labels = batch["labels"]  # already shifted by CorpusDataModule(task="causal"); -100 = ignored
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        n = (labels != -100).sum()
        self.log("train/loss", loss_sum.detach() / n.clamp_min(1), on_step=True, prog_bar=False)
        return {"loss": loss_sum, "num_tokens": n}

    def configure_optimizers(self):
        groups = param_groups(self.model, weight_decay=0.01, no_decay=["bias", "norm"], no_adapt=["bias", "norm"])
        optimizer = Lamb(groups, lr=self.hparams["lr"], max_grad_norm=1.0)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--fsdp", action="store_true", help="EffiFSDPStrategy with every GPT2Block one FSDP unit")
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="bytes of the corpus to read")
    p.add_argument("--out", default="runs")
    args = p.parse_args()

    pl.seed_everything(1234)
    data = CorpusDataModule(block_size=128, batch_size=8, max_bytes=args.max_bytes)
    model = HFCausalLM(vocab_size=data.vocab_size, block_size=128)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=args.devices,
        strategy=EffiFSDPStrategy(wrap=["GPT2Block"]) if args.fsdp else "auto",
        # fp16 with a dynamic loss scaler (real fp16 autocast on CPU too)
        plugins=[LossScalingPrecision("16-mixed", "cuda" if accelerator == "gpu" else "cpu")],
        callbacks=[AccumulationScheduler({0: 1, 10: 2}, unit="step", normalize="tokens"),
                   TrainingHealthMonitor(log_every_n_steps=10)],
        max_steps=args.max_steps,
        log_every_n_steps=10,
        limit_val_batches=0,
        logger=pl.loggers.CSVLogger(args.out, name="hf_gpt2"),
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    log_dir = trainer.log_dir  # a broadcast from rank 0: every rank asks
    if trainer.is_global_zero:
        print(f"hf_gpt2: {trainer.global_step} optimizer steps; logs in {log_dir}")
    if torch.distributed.is_initialized():
        # Gloo's worker threads must not outlive the interpreter's teardown (an exit-time abort otherwise);
        # the barrier keeps a rank from leaving while another still talks to it.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
