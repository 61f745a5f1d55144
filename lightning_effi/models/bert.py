"""A BERT-style bidirectional encoder trained with the masked-LM objective (the classic LAMB workload)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_effi.export import ExportableModule
from lightning_effi.models._common import OptimizerCallable
from lightning_effi.models._lm import IGNORE_INDEX, _LMModule, block_tp_plan
from lightning_effi.models.data import MASK_ID, NUM_BYTES, VOCAB_SIZE
from lightning_effi.models.gpt import Block, _check_shapes


def mlm_mask(input_ids: torch.Tensor, *, mask_id: int = MASK_ID, num_random: int = NUM_BYTES, prob: float = 0.15,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``prob`` of the positions; of those 80% become ``mask_id``, 10% a random token in
    ``[0, num_random)``, 10% stay. Returns ``(corrupted_ids, labels)`` with labels ``-100`` at unchosen positions.

    ``generator`` must live on ``input_ids``' device; ``None`` uses the global RNG (seeded by ``seed_everything``).
    """
    dev = input_ids.device
    u = torch.rand(input_ids.shape, device=dev, generator=generator)
    chosen = u < prob
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    # Reuse the same uniform draw to split the chosen positions 80/10/10: u/prob is uniform on [0, 1) given chosen.
    r = u / prob
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(0, num_random, input_ids.shape, device=dev, generator=generator)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(to_random, random_ids, out)
    return out, labels


class BertEncoder(ExportableModule):
    """Bidirectional pre-LN transformer encoder with a tied MLM head (dense + GELU + LayerNorm + decoder bias).
    ``BertEncoder.from_export(path)`` rebuilds one from an ``effi export`` file."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, block_size: int = 128, n_layer: int = 2, n_head: int = 2,
                 d_model: int = 64, dropout: float = 0.0):
        super().__init__()
        _check_shapes(vocab_size, block_size, n_layer, n_head, d_model, dropout)
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.emb_ln = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout, causal=False) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head_dense = nn.Linear(d_model, d_model)
        self.head_ln = nn.LayerNorm(d_model)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.block_size}")
        x = self.drop(self.emb_ln(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))))
        for block in self.blocks:
            x = block(x)
        h = self.head_ln(F.gelu(self.head_dense(self.ln_f(x))))
        return F.linear(h, self.wte.weight, self.head_bias)


class BertMLMLightningModule(_LMModule):
    """Masked-LM pre-training of :class:`BertEncoder` (15% of positions, 80/10/10 mask/random/keep).

    Validation masks with a generator seeded per batch, so the validation loss of different epochs and runs is
    computed on the same corrupted inputs. Arguments as :class:`~lightning_effi.models.GPTLightningModule`
    (``fused_loss`` included), plus ``mask_prob`` (default 0.15). Defaults follow BERT + LAMB practice: no decay and
    no adaptation for biases and normalisation weights.
    """

    data_task = "mlm"
    model_class = BertEncoder

    def __init__(self, vocab_size: int = VOCAB_SIZE, block_size: int = 128, n_layer: int = 2, n_head: int = 2,
                 d_model: int = 64, dropout: float = 0.0, mask_prob: float = 0.15,
                 optimizer: OptimizerCallable | None = None, weight_decay: float = 0.01,
                 no_decay: list[str] = ["bias", "norm"],  # noqa: B006 (CLI default)
                 no_adapt: list[str] = ["bias", "norm"],  # noqa: B006
                 warmup_steps: int = 100, min_lr_ratio: float = 0.0, max_steps: int | None = None,
                 loss_reduction: Literal["mean", "sum"] = "mean", fused_loss: bool | None = None):
        super().__init__(optimizer, weight_decay, no_decay, no_adapt, warmup_steps, min_lr_ratio, max_steps,
                         loss_reduction, fused_loss)
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"Invalid mask_prob {mask_prob!r}: must be in (0, 1)")
        self.save_hyperparameters(ignore=["optimizer"])
        self.model = BertEncoder(vocab_size, block_size, n_layer, n_head, d_model, dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None):
        ids, labels = mlm_mask(batch["input_ids"], prob=self.hparams["mask_prob"], generator=generator)
        return self.select_token_loss(self(ids), labels)

    def tp_plan(self) -> dict[str, str]:
        """The default tensor-parallel plan: the blocks split as in :meth:`GPTLightningModule.tp_plan`; the
        embedding and the MLM head (which reuses the embedding weight functionally) stay replicated, so the sequence
        is gathered again before the head."""
        return {
            "model.drop": "sequence_split",
            **block_tp_plan("model.blocks.*"),
            "model.ln_f": "sequence",
            "model.head_dense": "sequence_gather",
        }

    def val_generator(self, batch: dict, batch_idx: int) -> torch.Generator:
        return torch.Generator(device=batch["input_ids"].device).manual_seed(10_000 + batch_idx)
