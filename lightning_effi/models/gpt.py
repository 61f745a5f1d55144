"""A decoder-only transformer (GPT) and its causal-LM LightningModule.

The network is pre-LayerNorm (LN before attention and MLP, a final LN), uses
``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal=True`` (so the fastest available kernel runs on
GPU) and ties the output projection to the token embedding. It has no data-dependent Python control flow, so it
compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lightning_effi.export import ExportableModule
from lightning_effi.models._common import OptimizerCallable, check_positive
from lightning_effi.models._lm import IGNORE_INDEX, _LMModule, block_tp_plan, fused_token_loss, token_loss

__all__ = ["GPT", "Block", "GPTLightningModule", "IGNORE_INDEX", "fused_token_loss", "token_loss"]



class CausalSelfAttention(nn.Module):
    """Multi-head self-attention whose ``qkv`` output features are grouped by head: ``[q, k, v]`` of head 0, then of
    head 1, and so on. Splitting ``qkv`` by output features across tensor-parallel ranks therefore hands each rank
    whole heads, and the head count is read from the tensor's shape, so the same forward runs on a rank's local
    heads (the tensor-parallel plan divides ``n_head`` so the attribute stays true)."""

    def __init__(self, d_model: int, n_head: int, dropout: float, causal: bool = True):
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)
        self.causal = causal

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, heads, 3, head_dim) -> three (B, heads, T, head_dim) views
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
        )
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """One pre-LN transformer block; the unit that sharding strategies wrap (``wrap=["Block"]``)."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout, causal)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


def _check_shapes(vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int, dropout: float):
    for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                        ("n_head", n_head), ("d_model", d_model)):
        check_positive(name, value)
    if d_model % n_head:
        raise ValueError(f"Invalid d_model {d_model!r}: must be divisible by n_head={n_head!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Invalid dropout {dropout!r}: must be in [0, 1)")


class GPT(ExportableModule):
    """Decoder-only transformer language model. ``GPT.from_export(path)`` rebuilds one from an ``effi export`` file.

    Args:
        vocab_size: number of token ids (default 260: 256 bytes + 4 special ids of ``CorpusDataModule``).
        block_size: maximum sequence length (learned positional embeddings). Default 128.
        n_layer: number of :class:`Block`. Default 2.
        n_head: attention heads; must divide ``d_model``. Default 2.
        d_model: residual width. Default 64.
        dropout: dropout on attention probabilities and residual branches. Default 0.0.
    """

    def __init__(self, vocab_size: int = 260, block_size: int = 128, n_layer: int = 2, n_head: int = 2,
                 d_model: int = 64, dropout: float = 0.0):
        super().__init__()
        _check_shapes(vocab_size, block_size, n_layer, n_head, d_model, dropout)
        self.vocab_size, self.block_size = vocab_size, block_size
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.reset_parameters(n_layer)

    def reset_parameters(self, n_layer: int | None = None) -> None:
        n_layer = n_layer if n_layer is not None else len(self.blocks)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                # GPT-2 init; residual projections scaled by 1/sqrt(2*n_layer) so the residual stream's variance
                # does not grow with depth.
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def num_params(self, non_embedding: bool = True) -> int:
        # ZeRO-3 leaves each rank an empty placeholder; ds_numel is the full size
        def size(p: torch.Tensor) -> int:
            return int(getattr(p, "ds_numel", p.numel()))

        n = sum(size(p) for p in self.parameters())
        return n - size(self.wpe.weight) if non_embedding else n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class GPTLightningModule(_LMModule):
    """Causal language modelling with :class:`GPT`.

    Args:
        vocab_size, block_size, n_layer, n_head, d_model, dropout: see :class:`GPT`.
        optimizer: a callable taking parameter groups and returning an optimizer (LightningCLI:
            ``class_path``/``init_args``). Default ``torch.optim.AdamW(lr=3e-4, betas=(0.9, 0.95))``.
        weight_decay: decay of the decayed group (``param_groups``). Default 0.1.
        no_decay: parameter categories/regexes without decay. Default ``["bias", "norm"]``.
        no_adapt: parameter categories/regexes with LAMB trust ratio fixed to 1. Default ``[]``.
        warmup_steps: linear LR warmup in optimizer steps. Default 100.
        min_lr_ratio: the cosine decays to ``min_lr_ratio * lr``. Default 0.1.
        max_steps: length of the cosine; default ``trainer.estimated_stepping_batches``.
        loss_reduction: ``"mean"`` (default) or ``"sum"`` (token-sum protocol for token-normalised accumulation).
        compile: wrap the network in ``torch.compile``. Default False.
        fused_loss: compute the loss with :func:`fused_token_loss` (``torch.compile``: no fp32 copies of the
            logits; same values). ``None`` (default): when the logits are on a GPU that inductor supports (Triton
            installed, compute capability >= 7.0). ``False``: always eager.
    """

    _forward: Callable[[torch.Tensor], torch.Tensor]  # the network, compiled or not (not a submodule)
    model_class = GPT

    def __init__(self, vocab_size: int = 260, block_size: int = 128, n_layer: int = 2, n_head: int = 2,
                 d_model: int = 64, dropout: float = 0.0, optimizer: OptimizerCallable | None = None,
                 weight_decay: float = 0.1, no_decay: list[str] = ["bias", "norm"],  # noqa: B006 (CLI default)
                 no_adapt: list[str] = [],  # noqa: B006
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, max_steps: int | None = None,
                 loss_reduction: Literal["mean", "sum"] = "mean", compile: bool = False,
                 fused_loss: bool | None = None):
        super().__init__(optimizer, weight_decay, no_decay, no_adapt, warmup_steps, min_lr_ratio, max_steps,
                         loss_reduction, fused_loss)
        if not isinstance(compile, bool):
            raise TypeError(f"Invalid compile {compile!r}: must be True or False")
        self.save_hyperparameters(ignore=["optimizer"])
        self.model = GPT(vocab_size, block_size, n_layer, n_head, d_model, dropout)
        # Not a registered submodule (nn.Module.__setattr__ would add the network a second time to state_dict,
        # under keys that change with `compile`).
        object.__setattr__(self, "_forward", torch.compile(self.model) if compile else self.model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._forward(idx)

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None):
        return self.select_token_loss(self(batch["input_ids"]), batch["labels"])

    def tp_plan(self) -> dict[str, str]:
        """The tensor-parallel plan ``EffiFSDPStrategy(tensor_parallel_size=N)`` uses when given none: attention and
        MLP split Megatron-style (``qkv``/``fc`` by output features, the projections by input features), the
        vocabulary split in the tied embedding and head, the sequence split after the position embedding."""
        return {
            "model.wte": "embedding",
            "model.drop": "sequence_split",
            **block_tp_plan("model.blocks.*"),
            "model.ln_f": "sequence",
            "model.lm_head": "output",
        }

    @rank_zero_only
    def on_fit_start(self) -> None:
        n = self.model.num_params()  # type: ignore[operator]  # GPT.num_params (self.model is typed nn.Module)
        self.print(f"GPT: {n / 1e6:.2f}M non-embedding parameters")

