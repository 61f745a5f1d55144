"""A decoder-only transformer (GPT) and its causal-LM LightningModule.

The network is pre-LayerNorm (LN before attention and MLP, a final LN), uses
``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal=True`` (so the fastest available kernel runs on
GPU) and ties the output projection to the token embedding. It has no data-dependent Python control flow, so it
compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lightning_effi import _compat
from lightning_effi._host import HostMirror
from lightning_effi._protocols import HostMetricsProgressBar
from lightning_effi.models._common import OptimizerCallable, build_optimizers, check_positive

IGNORE_INDEX = -100


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, causal: bool = True):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)
        self.causal = causal

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
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


class GPT(nn.Module):
    """Decoder-only transformer language model.

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
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _logs_this_step(trainer) -> bool:
    """Whether a logger writes on_step metrics at this optimizer step (the rule of Lightning's logger connector,
    ``should_update_logs``: every ``log_every_n_steps`` optimizer steps, and when stopping). False without a logger;
    True when unsure."""
    if trainer is None:
        return True
    if trainer.logger is None:
        return False
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    if not isinstance(stepped, int):
        return True
    return (stepped + 1) % max(1, trainer.log_every_n_steps) == 0 or trainer.should_stop


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over valid tokens (labels != -100) and the number of valid tokens (a device tensor)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # the softmax of half-precision logits loses the small probabilities
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (labels != IGNORE_INDEX).sum()


_COMPILED_TOKEN_LOSS = None
_HOST_LOSS_SLOTS = 4


def fused_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_loss` compiled with ``torch.compile``: the same values, without the fp32 copies.

    Eager, half-precision logits of shape (B, T, V) are upcast to an fp32 copy, log-softmaxed into a second one, and
    backward writes a third fp32 tensor before casting the gradient back: for the benchmark GPT (8 x 1024 tokens,
    V = 50304) three 1.65 GB tensors and about 14 GB of memory traffic per step. Compiled, the upcast, row max,
    log-sum-exp and target gather are one fused reduction over the bf16 logits, and backward writes the bf16 gradient
    directly. One compiled function is shared by every module (compiled once per shape and grad mode).
    """
    global _COMPILED_TOKEN_LOSS
    if _COMPILED_TOKEN_LOSS is None:
        _COMPILED_TOKEN_LOSS = torch.compile(token_loss)
    return _COMPILED_TOKEN_LOSS(logits, labels)


@functools.lru_cache(maxsize=None)
def _can_fuse_loss(device: torch.device) -> bool:
    """``fused_loss=None`` (auto): compile the loss on CUDA devices inductor generates Triton kernels for (Triton
    installed, compute capability >= 7.0); elsewhere (CPU, older GPUs) the eager loss."""
    if device.type != "cuda":
        return False
    return _compat.has_triton() and torch.cuda.get_device_capability(device) >= (7, 0)


class _LMModule(pl.LightningModule):
    """Shared training/validation logic of the example language models.

    ``training_step`` returns ``{"loss": loss, "num_tokens": n}``: ``loss`` is the per-token mean when
    ``loss_reduction="mean"`` and the per-token *sum* when ``loss_reduction="sum"``, the protocol that
    ``AccumulationScheduler(normalize="tokens")`` uses to divide the whole accumulation window's summed loss by
    the window's total valid tokens on all ranks.
    """

    model: nn.Module
    #: the ``CorpusDataModule.task`` this objective needs ("causal": labels shifted by one; "mlm": labels = inputs)
    data_task = "causal"

    def __init__(self, optimizer: OptimizerCallable | None, weight_decay: float, no_decay: Sequence[str],
                 no_adapt: Sequence[str], warmup_steps: int, min_lr_ratio: float, max_steps: int | None,
                 loss_reduction: str, fused_loss: bool | None = None):
        super().__init__()
        if fused_loss not in (None, True, False):
            raise ValueError(f"Invalid fused_loss {fused_loss!r}: must be true, false or null (auto: on GPUs with Triton)")
        self.fused_loss = fused_loss
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid loss_reduction {loss_reduction!r}: must be 'mean' or 'sum'")
        if warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps {warmup_steps!r}: must be >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"Invalid min_lr_ratio {min_lr_ratio!r}: must be in [0, 1]")
        if max_steps is not None:
            check_positive("max_steps", max_steps)
        self.optimizer_factory = optimizer
        self.loss_reduction = loss_reduction
        # A device tensor (no host sync per step) created on the first step, not a buffer: a buffer would be left
        # uninitialised when a strategy builds the module on the meta device. Checkpointed by the hooks below.
        self.tokens_seen: torch.Tensor | None = None
        self._tokens_seen_loaded = 0
        # The training loss for progress bars that read host values (SyncFreeProgressBar): non-blocking copies into a
        # ring of host slots, read only once a copy has landed (never a device sync). A ring, so a host running
        # several steps ahead still finds a finished copy.
        self._host_loss = HostMirror(slots=_HOST_LOSS_SLOTS)
        self._last_loss: float | None = None

    def setup(self, stage: str) -> None:
        # Mismatches that would otherwise train silently wrong (a GPT on MLM blocks learns to copy its input) or crash
        # many steps in (a token id >= vocab_size appears only once a rare byte or EOS is sampled).
        dm = getattr(self.trainer, "datamodule", None)
        task, vocab = getattr(dm, "task", None), getattr(dm, "vocab_size", None)
        name = type(self).__name__
        if task is not None and task != self.data_task:
            raise ValueError(f"{name} needs data with task={self.data_task!r}, but {type(dm).__name__}.task is "
                             f"{task!r}; set the data module's task to {self.data_task!r}")
        if vocab is not None and self.hparams.vocab_size < vocab:
            raise ValueError(f"{name}.vocab_size {self.hparams.vocab_size} is smaller than the data's vocabulary "
                             f"({type(dm).__name__}.vocab_size={vocab}); set vocab_size >= {vocab}")

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None):  # pragma: no cover - abstract
        """Return ``(summed token loss, number of valid tokens)`` for ``batch``."""
        raise NotImplementedError

    def select_token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`token_loss`, compiled (:func:`fused_token_loss`) when ``fused_loss`` says so (auto: on CUDA devices
        with Triton support)."""
        fused = self.fused_loss if self.fused_loss is not None else _can_fuse_loss(logits.device)
        return fused_token_loss(logits, labels) if fused else token_loss(logits, labels)

    def val_generator(self, batch: dict, batch_idx: int) -> torch.Generator | None:
        """RNG for validation-time randomness (None: the model has none)."""
        return None

    def training_step(self, batch: dict, batch_idx: int):
        loss_sum, n = self.compute_loss(batch)
        if self.tokens_seen is None:
            self.tokens_seen = torch.full((), self._tokens_seen_loaded, dtype=torch.long, device=n.device)
        self.tokens_seen += n
        # A prog_bar metric only under a progress bar that needs one: Lightning turns every prog_bar metric into a
        # Python number (.item(), a device sync) at the end of every batch once it has been logged, progress bar or
        # not, which drains the GPU queue at each step boundary (measured on 1xH200 with the benchmark GPT,
        # BENCHMARKS.md 3d). SyncFreeProgressBar shows the loss from progress_bar_host_metrics() instead.
        trainer = self._trainer
        bar = trainer.progress_bar_callback if trainer is not None else None
        host_bar = isinstance(bar, HostMetricsProgressBar) and bar.reads_host_metrics
        pbar = trainer is None or (bar is not None and not host_bar)
        mean = loss_sum.detach() / n.clamp_min(1)
        if host_bar:
            self._note_loss(mean)
        self.log("train/loss", mean, prog_bar=pbar, on_step=True, on_epoch=False, batch_size=batch["labels"].shape[0])
        # Local counters summed over ranks: the global number of valid tokens trained on so far. Summed only on the
        # logger's steps: sync_dist is a barrier plus an all_reduce (even on one process under torchrun), which on
        # every step would block the host in the middle of the step (the GPU queue drains while it waits).
        if _logs_this_step(trainer):
            self.log("train/tokens", self.tokens_seen.float(), on_step=True, on_epoch=False, reduce_fx="sum",
                     sync_dist=trainer is not None and trainer.world_size > 1)
        loss = loss_sum if self.loss_reduction == "sum" else loss_sum / n.clamp_min(1)
        return {"loss": loss, "num_tokens": n}

    def _note_loss(self, mean: torch.Tensor) -> None:
        self._host_loss.push(mean.float())

    def progress_bar_host_metrics(self) -> dict[str, float]:
        """``{"train/loss": value}`` without a device sync: the newest training loss whose copy to the host has
        landed (on a GPU, up to a few steps behind the ones in flight); ``{}`` before the first. Read by
        :class:`~lightning_effi.callbacks.SyncFreeProgressBar`."""
        landed = self._host_loss.latest()
        if landed is not None:
            self._last_loss = float(landed)
        return {} if self._last_loss is None else {"train/loss": self._last_loss}

    def on_train_end(self) -> None:
        self._host_loss.clear()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        local = int(self.tokens_seen) if self.tokens_seen is not None else self._tokens_seen_loaded
        checkpoint["tokens_seen_local"] = local  # this rank's count; the logged value sums over ranks

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._tokens_seen_loaded = int(checkpoint.get("tokens_seen_local", 0))
        self.tokens_seen = None

    def validation_step(self, batch: dict, batch_idx: int):
        loss_sum, n = self.compute_loss(batch, generator=self.val_generator(batch, batch_idx))
        # Token-weighted: the epoch value is sum(loss) / sum(tokens), not a mean of batch means.
        self.log("val/loss_sum", loss_sum, on_epoch=True, reduce_fx="sum", sync_dist=True, logger=False)
        self.log("val/tokens", n.float(), on_epoch=True, reduce_fx="sum", sync_dist=True, logger=False)

    def on_validation_epoch_end(self) -> None:
        m = self.trainer.callback_metrics
        if "val/loss_sum" in m and float(m["val/tokens"]) > 0:
            # Already reduced over ranks (the two sums above); sync_dist=True only averages identical values.
            self.log("val/loss", m["val/loss_sum"] / m["val/tokens"], prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        h = self.hparams
        from lightning_effi.callbacks.accumulation import AccumulationScheduler  # AutoMicroBatch subclasses it

        if h.min_lr_ratio < 1.0 and not h.max_steps and self.trainer.max_steps in (-1, None) and any(
            isinstance(cb, AccumulationScheduler) for cb in self.trainer.callbacks
        ):
            # Lightning's estimate counts micro-batches / accumulate_grad_batches, which is 1 when the callback sets
            # the factor per window: the cosine would be stretched by the accumulation factor.
            raise ValueError(f"{type(self).__name__}: the LR schedule's length cannot be estimated with an "
                             "accumulation schedule in an epoch-based run; set Trainer(max_steps=...) or the "
                             "module's max_steps")
        total = h.max_steps or int(self.trainer.estimated_stepping_batches)
        return build_optimizers(self.model, self.optimizer_factory, weight_decay=h.weight_decay,
                                no_decay=h.no_decay, no_adapt=h.no_adapt, warmup_steps=h.warmup_steps,
                                total_steps=total, min_lr_ratio=h.min_lr_ratio)


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

    def __init__(self, vocab_size: int = 260, block_size: int = 128, n_layer: int = 2, n_head: int = 2,
                 d_model: int = 64, dropout: float = 0.0, optimizer: OptimizerCallable | None = None,
                 weight_decay: float = 0.1, no_decay: list[str] = ["bias", "norm"],  # noqa: B006 (CLI default)
                 no_adapt: list[str] = [],  # noqa: B006
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, max_steps: int | None = None,
                 loss_reduction: Literal["mean", "sum"] = "mean", compile: bool = False,
                 fused_loss: bool | None = None):
        super().__init__(optimizer, weight_decay, no_decay, no_adapt, warmup_steps, min_lr_ratio, max_steps,
                         loss_reduction, fused_loss)
        self.save_hyperparameters(ignore=["optimizer"])
        self.model = GPT(vocab_size, block_size, n_layer, n_head, d_model, dropout)
        # Not a registered submodule (nn.Module.__setattr__ would add the network a second time to state_dict,
        # under keys that change with `compile`).
        object.__setattr__(self, "_forward", torch.compile(self.model) if compile else self.model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._forward(idx)

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None):
        return self.select_token_loss(self(batch["input_ids"]), batch["labels"])

    @rank_zero_only
    def on_fit_start(self) -> None:
        n = self.model.num_params()
        self.print(f"GPT: {n / 1e6:.2f}M non-embedding parameters")

