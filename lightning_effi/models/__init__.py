"""Example LightningModules and the shipped corpus."""

from lightning_effi.models.bert import BertEncoder, BertMLMLightningModule
from lightning_effi.models.data import CorpusDataModule
from lightning_effi.models.gpt import GPT, Block, GPTLightningModule

__all__ = ["GPT", "Block", "GPTLightningModule", "BertEncoder", "BertMLMLightningModule", "CorpusDataModule"]
