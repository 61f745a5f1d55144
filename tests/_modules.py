"""Small LightningModules importable by class path (``tests._modules.<Name>``) for CLI and callback tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn


def regression_data(n: int = 24, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))


def make_sequential(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))


class SequentialRegressor(LightningModule):
    """An ``nn.Sequential`` on random regression data, without ``configure_optimizers``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = make_sequential(seed)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(regression_data(), batch_size=4)


class SequentialRegressorSGD(SequentialRegressor):
    """The same with its own ``configure_optimizers`` (plain SGD)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class TinyCorpusLM(LightningModule):
    """A bigram language model over ``CorpusDataModule`` batches, without ``configure_optimizers`` (the optimizer
    comes from the command line). ``block_size`` is only accepted: the ``effi`` CLI links the data's into it."""

    def __init__(self, block_size: int = 16, vocab_size: int = 260, d_model: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab_size, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def training_step(self, batch, batch_idx):
        logits = self.head(self.norm(self.emb(batch["input_ids"])))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
