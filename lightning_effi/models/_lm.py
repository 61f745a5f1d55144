"""What the example language models share: the token losses, the host-side training loss for progress bars, the
token counter, validation and the optimizer + LR schedule built from init arguments."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_effi import _compat
from lightning_effi._host import HostMirror
from lightning_effi._protocols import HostMetricsProgressBar
from lightning_effi.callbacks._split import replaying
from lightning_effi.export import SPEC_KEY, model_spec
from lightning_effi.models._common import OptimizerCallable, build_optimizers, check_positive
from lightning_effi.optim.norms import is_dtensor
from lightning_effi.optim.param_groups import check_rules

IGNORE_INDEX = -100


def _logs_this_step(trainer) -> bool:
    """Whether a logger writes on_step metrics at the optimizer step in progress (the rule of Lightning's logger
    connector: every ``log_every_n_steps`` optimizer steps, and when stopping). False without a logger; True
    without a trainer."""
    if trainer is None:
        return True
    if trainer.logger is None:
        return False
    return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0 or trainer.should_stop


def block_tp_plan(prefix: str) -> dict[str, str]:
    """The tensor-parallel plan of the example models' ``Block``s under ``prefix`` (``"model.blocks.*"``):
    Megatron-style attention and MLP (``qkv``/``fc`` split by output features, the projections by input features,
    the head count divided), the two norms on sequence shards."""
    return {
        f"{prefix}.ln_1": "sequence",
        f"{prefix}.ln_2": "sequence",
        f"{prefix}.attn.qkv": "colwise",
        f"{prefix}.attn.proj": "rowwise",
        f"{prefix}.attn.n_head": "divide",
        f"{prefix}.mlp.fc": "colwise",
        f"{prefix}.mlp.proj": "rowwise",
    }


def _tensor_parallel_size(module: pl.LightningModule) -> int:
    mesh = getattr(module, "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return mesh["tensor_parallel"].size() if mesh is not None and "tensor_parallel" in names else 1


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
    #: the class of ``self.model``, built from the hyper-parameters named in ``model_init_args``
    model_class: type[nn.Module]
    model_init_args = ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "dropout")
    #: the ``CorpusDataModule.task`` this objective needs ("causal": labels shifted by one; "mlm": labels = inputs)
    data_task = "causal"

    def __init__(self, optimizer: OptimizerCallable | None, weight_decay: float, no_decay: Sequence[str],
                 no_adapt: Sequence[str], warmup_steps: int, min_lr_ratio: float, max_steps: int | None,
                 loss_reduction: str, fused_loss: bool | None = None):
        super().__init__()
        if fused_loss not in (None, True, False):
            raise ValueError(
                f"Invalid fused_loss {fused_loss!r}: must be true, false or null (auto: on GPUs with Triton)")
        self.fused_loss = fused_loss
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid loss_reduction {loss_reduction!r}: must be 'mean' or 'sum'")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps {warmup_steps!r}: must be an int >= 0")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"Invalid weight_decay {weight_decay!r}: must be a number >= 0")
        # The regexes are checked here; whether they match a parameter is known once the optimizer is built.
        check_rules(no_decay, "no_decay")
        check_rules(no_adapt, "no_adapt")
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
        if vocab is not None and self.hparams["vocab_size"] < vocab:
            raise ValueError(f"{name}.vocab_size {self.hparams['vocab_size']} is smaller than the data's vocabulary "
                             f"({type(dm).__name__}.vocab_size={vocab}); set vocab_size >= {vocab}")

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None):  # pragma: no cover - abstract
        """Return ``(summed token loss, number of valid tokens)`` for ``batch``."""
        raise NotImplementedError

    def select_token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`token_loss`, compiled (:func:`fused_token_loss`) when ``fused_loss`` says so (auto: on CUDA devices
        with Triton support)."""
        if is_dtensor(logits):
            # Logits sharded over the vocabulary (tensor parallelism with loss_parallel): torch's loss_parallel
            # cross-entropy, active around this step, reduces the shards; the scalar sum is then a plain tensor.
            loss_sum, n = token_loss(logits, labels)
            return loss_sum.full_tensor(), n  # type: ignore[attr-defined]
        fused = self.fused_loss if self.fused_loss is not None else _can_fuse_loss(logits.device)
        return fused_token_loss(logits, labels) if fused else token_loss(logits, labels)

    def val_generator(self, batch: dict, batch_idx: int) -> torch.Generator | None:
        """RNG for validation-time randomness (None: the model has none)."""
        return None

    def training_step(self, batch: dict, batch_idx: int):
        loss_sum, n = self.compute_loss(batch)
        if self.tokens_seen is None:
            self.tokens_seen = torch.full((), self._tokens_seen_loaded, dtype=torch.long, device=n.device)
        if not replaying(self):  # an out-of-memory replay runs batches again that were counted already
            self.tokens_seen += n
        # A prog_bar metric only under a progress bar that needs one: Lightning turns every prog_bar metric into a
        # Python number (.item(), a device sync) at the end of every batch once it has been logged, progress bar or
        # not, which drains the GPU queue at each step boundary. SyncFreeProgressBar shows the loss from
        # progress_bar_host_metrics() instead.
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
            # Every tensor-parallel rank of a data-parallel group counts the same tokens.
            tokens = self.tokens_seen.float() / _tensor_parallel_size(self)
            self.log("train/tokens", tokens, on_step=True, on_epoch=False, reduce_fx="sum",
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

    @classmethod
    def export_spec(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The network a checkpoint of this module holds (``lightning_effi.export.model_spec``): ``model_class``
        with its constructor arguments from ``hparams``, under the key prefix ``"model."``."""
        return model_spec(cls.model_class, {k: hparams[k] for k in cls.model_init_args}, prefix="model.")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        local = int(self.tokens_seen) if self.tokens_seen is not None else self._tokens_seen_loaded
        checkpoint["tokens_seen_local"] = local  # this rank's count; the logged value sums over ranks
        # What `effi export` records so that its file rebuilds the network without the training code's arguments.
        checkpoint[SPEC_KEY] = self.export_spec(self.hparams)

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
