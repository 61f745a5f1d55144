"""Train the example GPT with the Trainer API directly (no CLI): the same job as configs/gpt_tiny.yaml.

    python examples/train_gpt.py                 # CPU, or a GPU when present
    python examples/train_gpt.py --max-steps 50  # a quick smoke run
"""

import argparse
from functools import partial

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_effi.models import CorpusDataModule, GPTLightningModule


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--out", default="runs")
    args = p.parse_args()

    pl.seed_everything(1234)
    data = CorpusDataModule(block_size=128, batch_size=16)
    model = GPTLightningModule(
        block_size=128, n_layer=4, n_head=4, d_model=128,
        optimizer=partial(torch.optim.AdamW, lr=2e-3, betas=(0.9, 0.95)),
        weight_decay=0.1, warmup_steps=50, min_lr_ratio=0.1,
    )
    ckpt = ModelCheckpoint(save_last=True)
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_steps=args.max_steps, val_check_interval=min(200, args.max_steps),
        limit_val_batches=20, log_every_n_steps=10, gradient_clip_val=1.0, callbacks=[ckpt],
        logger=CSVLogger(args.out, name="gpt_example"),
    )
    trainer.fit(model, datamodule=data)
    (res,) = trainer.validate(model, datamodule=data, verbose=False)
    print(f"final val loss {res['val/loss']:.4f} nats/token; unigram entropy {data.unigram_entropy():.4f}; "
          f"checkpoints in {ckpt.dirpath}; logs in {trainer.log_dir}")


if __name__ == "__main__":
    main()
