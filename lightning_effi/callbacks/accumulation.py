"""``AccumulationScheduler``: step/sample/token-keyed gradient-accumulation schedules with exact windows.

The schedule math lives in :mod:`lightning_effi.callbacks.schedule`; this module is the Lightning glue.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from lightning_effi._host import device_scalar
from lightning_effi._protocols import AccumulationEngine
from lightning_effi.callbacks._logging import metrics_due
from lightning_effi.callbacks.schedule import NORMALIZE, UNITS, AccumulationWindow, parse_ramp, parse_schedule
from lightning_effi.optim.norms import is_dtensor, to_local

_WINDOW_KEY = "lightning_effi.accumulation.partial_window"


class AccumulationScheduler(Callback):
    r"""Gradient accumulation whose factor follows a schedule, with exact windows and exact loss normalisation.

    A *window* is the run of micro-batches (per rank) whose gradients make one optimizer step; its size (the
    *factor*) is read from the schedule when the window opens, so a window never straddles a schedule change or an
    epoch end (the last window of an epoch is cut short and normalised by what it holds). ``normalize="tokens"``
    makes the applied gradient the exact per-token mean over the whole window on all ranks; ``training_step`` then
    returns ``{"loss": summed_token_loss, "num_tokens": n}`` (the example models with ``loss_reduction="sum"``).
    Nothing reads a device value on the host between logging steps; ``unit="token"`` positions leave out the window
    that closed last. Single device, DDP, FSDP2 and ``effi_deepspeed_*`` (mean normalisation); checkpoints and
    resumes mid-window. How the loop is driven, the strategies and the exact rules: ``docs/accumulation.md``.

    Example::

        Trainer(callbacks=[AccumulationScheduler({0: 1, 1000: 4}, unit="step")])
        Trainer(callbacks=[AccumulationScheduler(ramp=(1, 8, 2_000_000), unit="token", normalize="tokens")])
        Trainer(callbacks=[AccumulationScheduler(global_batch_size=512)])

    Args:
        schedule: ``{threshold: factor}``; factor 1 before the first threshold. Keys may be strings (YAML).
            Default ``None``.
        unit: what thresholds and ramp length count: ``"epoch"``, ``"step"`` (optimizer steps), ``"sample"`` or
            ``"token"`` (valid tokens, all ranks). Default ``"step"``.
        ramp: ``(start_factor, end_factor, length)``, a linear ramp over ``length`` units. Default ``None``.
        global_batch_size: samples per optimizer step over all ranks; the factor is
            ``global_batch_size / (micro_batch_size * data_parallel_size)``, and must divide. Default ``None``.
        normalize: ``"mean"`` or ``"tokens"`` (see above). Default ``"mean"``.
    """

    def __init__(
        self,
        schedule: dict[int | str, int] | None = None,
        *,
        unit: Literal["epoch", "step", "sample", "token"] = "step",
        ramp: tuple[int, int, int] | None = None,
        global_batch_size: int | None = None,
        normalize: Literal["mean", "tokens"] = "mean",
    ) -> None:
        if unit not in UNITS:
            raise ValueError(f"Invalid unit {unit!r}: must be one of {', '.join(map(repr, UNITS))}")
        if normalize not in NORMALIZE:
            raise ValueError(f"Invalid normalize {normalize!r}: must be one of {', '.join(map(repr, NORMALIZE))}")
        self.schedule = parse_schedule(schedule)
        self.ramp = parse_ramp(ramp)
        if self.schedule and self.ramp is not None:
            raise ValueError(f"Invalid schedule={schedule!r} with ramp={ramp!r}: give either schedule or ramp, "
                             "not both (a ramp followed by a schedule is ambiguous)")
        if global_batch_size is not None:
            if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
                raise ValueError(f"Invalid global_batch_size {global_batch_size!r}: must be an integer >= 1")
            if self.schedule or self.ramp is not None:
                raise ValueError(
                    f"global_batch_size={global_batch_size} fixes the factor; it cannot be combined with a schedule "
                    "or ramp (give those in micro-batches per rank instead)"
                )
        self.unit = unit
        self.global_batch_size = global_batch_size
        self.normalize = normalize
        self._needs_tokens = normalize == "tokens" or unit == "token"
        self._reset_state()
        self._original_training_step: Any = None
        self._trainer: Trainer | None = None
        self._pending_window: dict[str, Any] | None = None
        self._deferred_saves: list[tuple[Any, ...]] = []
        self._deferred_removals: list[Any] = []

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self.window = AccumulationWindow(
            unit=self.unit, normalize=self.normalize, schedule=self.schedule, ramp=self.ramp,
            global_batch_size=self.global_batch_size,
        )

    @property
    def factor(self) -> int:
        """Micro-batches per rank in the current window (the last window's between windows, 1 before the first):
        a host value, what a progress bar shows. ``trainer.accumulate_grad_batches`` is not always it: a window that
        starts at an unaligned batch index gets another loop value (see ``loop_accumulate_value``)."""
        w = self.window
        return w.size if w.is_open else max(w.last_size, 1)

    @property
    def window_progress(self) -> tuple[int, int]:
        """``(micro-batches run, size)`` of the open window; ``(0, 0)`` between windows."""
        w = self.window
        return (w.pos, w.size) if w.is_open else (0, 0)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.window.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.window.load_state_dict(state_dict)

    # ------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "AccumulationScheduler drives Lightning's automatic optimization; this module sets "
                "automatic_optimization=False. Accumulate inside training_step yourself, or remove the callback."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) conflicts with "
                "AccumulationScheduler, which sets it per micro-batch; remove the Trainer argument and give the factor "
                "to the callback (schedule={0: k})."
            )
        others = [type(c).__name__ for c in getattr(trainer, "callbacks", ())
                  if isinstance(c, AccumulationScheduler) and c is not self]
        if others:
            raise ValueError(
                f"{type(self).__name__} and {', '.join(others)} both drive the accumulation window; use one "
                "(AutoMicroBatch is an AccumulationScheduler with global_batch_size set)."
            )
        strategy = trainer.strategy
        name = type(strategy).__name__
        if strategy.handles_gradient_accumulation and not isinstance(strategy, AccumulationEngine):
            raise RuntimeError(
                f"{name} accumulates gradients inside its engine and cannot change the factor during training; "
                "use strategy='effi_deepspeed_stage_1' / '_2' / '_3', or Trainer(accumulate_grad_batches=k) "
                "without AccumulationScheduler."
            )
        if self.normalize == "tokens" and not _grads_reachable(strategy):
            raise RuntimeError(
                f"AccumulationScheduler(normalize='tokens') with {name}: the engine keeps gradients in private "
                "partitions (p.grad is not the accumulated gradient), so the exact per-token rescale cannot be "
                "applied. "
                "Use normalize='mean' with DeepSpeed, or strategy='ddp' / 'effi_fsdp' for token-exact normalisation."
            )
        self._trainer = trainer
        self._install_training_step(pl_module)
        if _defers_saves(trainer):
            self._install_deferred_saves(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = None
        self._deferred_saves.clear()
        self._deferred_removals.clear()
        vars(trainer).pop("save_checkpoint", None)  # the deferring wrappers, if installed
        vars(trainer.strategy).pop("remove_checkpoint", None)
        if self._original_training_step is not None:
            # Remove the instance attribute so the class method is visible again.
            if "training_step" in vars(pl_module):
                del pl_module.training_step
            self._original_training_step = None
        trainer.accumulate_grad_batches = 1

    def _install_training_step(self, pl_module: LightningModule) -> None:
        if self._original_training_step is not None:
            return
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._after_training_step(original(*args, **kwargs), args, kwargs)

        self._original_training_step = original
        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _install_deferred_saves(self, trainer: Trainer) -> None:
        """Where partial gradients cannot be saved (DeepSpeed's private partitions, a tensor-parallel mesh), a save
        requested inside a window (ModelCheckpoint at a mid-window validation, a user's call) is deferred to the
        window's end, which is the next optimizer step: the file then holds that step's consistent state. Removals of
        older checkpoints wait for it too, so a kill in between leaves them in place."""
        save, strategy = trainer.save_checkpoint, trainer.strategy
        remove = strategy.remove_checkpoint

        def deferred_save(filepath: Any, weights_only: bool | None = None, storage_options: Any = None) -> None:
            if self._mid_window():
                self._deferred_saves.append((save, filepath, weights_only, storage_options))
                return
            save(filepath, weights_only, storage_options)

        def deferred_remove(filepath: Any) -> None:
            if self._deferred_saves:
                self._deferred_removals.append((remove, filepath))
                return
            remove(filepath)

        trainer.save_checkpoint = deferred_save  # type: ignore[method-assign]
        strategy.remove_checkpoint = deferred_remove  # type: ignore[method-assign]

    def _mid_window(self) -> bool:
        w = self.window
        return w.is_open and 0 < w.pos < w.size

    def _flush_deferred_saves(self) -> None:
        saves, self._deferred_saves = self._deferred_saves, []
        removals, self._deferred_removals = self._deferred_removals, []
        written = set()
        for save, filepath, weights_only, storage_options in saves:
            save(filepath, weights_only, storage_options)
            written.add(str(filepath))
        for remove, filepath in removals:
            if str(filepath) not in written:  # a later save may have reused the name
                remove(filepath)

    def _data_parallel_size(self, trainer: Trainer) -> int:
        return _data_parallel(trainer)[0]

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._dp = self._data_parallel_size(trainer)
        self.window.data_parallel_size = self._dp
        # Samples and tokens are counted over the data-parallel dimension only: the tensor-parallel ranks of one
        # data-parallel group read the same batch.
        self.window.reduce_sum = functools.partial(_all_reduce_sum, group=_data_parallel(trainer)[1]) \
            if self._dp > 1 else None
        if not _grads_reachable(trainer.strategy) and math.isinf(trainer.num_training_batches):
            raise RuntimeError(
                f"AccumulationScheduler with {type(trainer.strategy).__name__} needs a sized train DataLoader: the "
                "epoch's last window may be partial, and with an unsized loader that is only known after its first "
                "micro-batches were weighted, which needs a gradient rescale the engine's private partitions prevent."
            )
        # Lightning's restart bookkeeping reads accumulate_grad_batches before the first resumed batch.
        trainer.accumulate_grad_batches = self.window.accumulate
        if self._pending_window is not None:
            self._restore_window(trainer, pl_module)

    # --------------------------------------------------------------- per batch

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        strategy, w = trainer.strategy, self.window
        is_last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if w.is_open:  # inside a window: no schedule position to read
            plan = w.advance(batch_idx=batch_idx, is_last_batch=is_last,
                             engine_accumulates=strategy.handles_gradient_accumulation)
        else:
            plan = w.start(
                batch_idx=batch_idx, num_batches=trainer.num_training_batches, is_last_batch=is_last,
                step=trainer.global_step, epoch=trainer.current_epoch,
                batch_size=extract_batch_size(batch) if self.global_batch_size else 0,
                engine_accumulates=strategy.handles_gradient_accumulation,
            )
        if plan.engine_factor is not None and isinstance(strategy, AccumulationEngine):
            strategy.effi_set_accumulation(plan.engine_factor)
        trainer.accumulate_grad_batches = plan.accumulate  # after the engine hook, which sets the factor itself
        if plan.zero_grad:
            # The only window start Lightning's modulo rule cannot zero (batch 1 after a window of one): do it here.
            pl_module.optimizer_zero_grad(trainer.current_epoch, batch_idx, trainer.optimizers[0])

    def _after_training_step(self, output: Any, args: tuple, kwargs: dict) -> Any:
        """Runs right after the wrapped ``training_step`` (before its backward): count and scale the loss."""
        if output is None:
            self.window.pos += 1
            return None
        batch = kwargs["batch"] if "batch" in kwargs else args[0]
        unpacked = self._unpack_output(output)
        if unpacked is None:
            self.window.pos += 1
            return output  # Lightning raises its own error for other types
        loss, num_tokens = unpacked
        weighted = self.window.scale_loss(loss, samples=_batch_size(batch), num_tokens=num_tokens)
        if weighted is loss:
            return output
        return {**output, "loss": weighted} if isinstance(output, Mapping) else weighted

    def _unpack_output(self, output: Any) -> tuple[torch.Tensor, Any] | None:
        """``(loss, num_tokens or None)`` of a training_step output, the token protocol checked; None for an output
        that is neither a loss tensor nor a dict."""
        if isinstance(output, Mapping):
            if "num_tokens" not in output and self._needs_tokens:
                raise RuntimeError(self._protocol_error(f"a dict without 'num_tokens' (keys: {sorted(output)})"))
            return output["loss"], output.get("num_tokens")
        if isinstance(output, torch.Tensor):
            if self._needs_tokens:
                raise RuntimeError(self._protocol_error("a bare loss tensor"))
            return output, None
        return None

    def _protocol_error(self, got: str) -> str:
        what = "normalize='tokens'" if self.normalize == "tokens" else "unit='token'"
        return (
            f"AccumulationScheduler({what}) needs training_step to return {{'loss': summed_token_loss, "
            f"'num_tokens': n}} (the loss summed over valid tokens, e.g. the example models with "
            f"loss_reduction='sum'); it returned {got}."
        )

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the window's last backward the gradients are reduced (DDP's reducer and FSDP2's reduce-scatter finish
        # inside backward). Fixing them here, rather than in on_before_optimizer_step, means every callback's
        # on_before_optimizer_step (gradient-norm monitors, ...) sees the final gradient whatever the callback order.
        self._maybe_close(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._maybe_close(trainer, pl_module)  # the last training_step returned None: no backward ran

    def _maybe_close(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.window.ready_to_close() and not trainer.strategy.handles_gradient_accumulation:
            self._close_window(trainer, pl_module, fix_grads=True)

    def _close_window(self, trainer: Trainer, pl_module: LightningModule, *, fix_grads: bool) -> None:
        fix = self.window.close(trainer.strategy.root_device)
        if fix_grads and fix is not None:
            if not _grads_reachable(trainer.strategy):  # pragma: no cover - refused at setup/train start
                raise RuntimeError(
                    f"AccumulationScheduler: cannot rescale gradients under {type(trainer.strategy).__name__}")
            _scale_grads([p.grad for p in pl_module.parameters() if p.grad is not None], fix)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        w = self.window
        if not (w.is_open and w.pos >= w.size):
            return
        if not w.closed:
            self._close_window(trainer, pl_module, fix_grads=False)
        w.finish()
        if self._deferred_saves:
            self._flush_deferred_saves()
        if not metrics_due(trainer):
            return
        # Device tensors: a Python number would be copied to the device, which waits for it.
        device = trainer.strategy.root_device
        pl_module.log("accumulation/factor", device_scalar(w.last_size, device), on_step=True, on_epoch=False)
        counts = w.last_counts
        pl_module.log("accumulation/global_batch_samples", counts[0], on_step=True, on_epoch=False)
        if w.saw_tokens:
            pl_module.log("accumulation/global_batch_tokens", counts[1], on_step=True, on_epoch=False)

    # ------------------------------------------------------------- checkpoint

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        w = self.window
        if not (w.is_open and 0 < w.pos < w.size):
            return  # at a boundary the optimizer state already holds everything
        if _defers_saves(trainer):  # pragma: no cover - save_checkpoint is deferred to the window's end
            raise RuntimeError(f"AccumulationScheduler: a mid-window save reached {type(trainer.strategy).__name__}; "
                               "call trainer.save_checkpoint, which defers it to the window's end")
        counts = w.window_counts(trainer.strategy.root_device)
        dp, group, _ = _data_parallel(trainer)
        if dp > 1:
            _all_reduce_sum(counts, group=group)
        samples, tokens = (int(v) for v in counts.tolist())  # a checkpoint may wait for the device
        checkpoint[_WINDOW_KEY] = {
            "samples": samples, "tokens": tokens, "grads": self._gather_grads(trainer, pl_module)
        }

    def _gather_grads(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        for name, p in pl_module.named_parameters():
            g: Any = p.grad
            if g is None:
                continue
            if is_dtensor(g):
                # FSDP2 reduces every micro-batch: the shards are already the rank average; save the full tensor.
                out[name] = g.full_tensor().detach().cpu().clone()
                continue
            g = g.detach().clone()
            if distributed:
                # DDP under no_sync: each rank holds its own partial sum; their sum restored on one rank is exact.
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
            out[name] = g.cpu()
        return out

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending_window = checkpoint.get(_WINDOW_KEY)

    def _restore_window(self, trainer: Trainer, pl_module: LightningModule) -> None:
        window, self._pending_window = self._pending_window, None
        assert window is not None
        # Counts and gradients were summed over ranks at save time: rank 0 carries them, the others start from zero,
        # and the boundary all-reduce / DDP average add the rest exactly as without the interruption.
        first = _data_parallel(trainer)[2] == 0
        self.window.win_samples = window["samples"] if first else 0
        self.window.win_tokens = window["tokens"] if first else 0
        grads = window["grads"]
        params = dict(pl_module.named_parameters())
        missing = sorted(set(grads) - set(params))
        if missing:
            raise RuntimeError(f"Checkpoint holds partial gradients for unknown parameters {missing[:5]}")
        for name, saved in grads.items():
            p: Any = params[name]
            if is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                p.grad = distribute_tensor(saved.to(p.device, p.dtype), p.device_mesh, p.placements)
            else:
                g = saved.to(p.device, p.dtype)
                p.grad = g if first else torch.zeros_like(g)


def _batch_size(batch: Any) -> int:
    """Lightning's ``extract_batch_size`` (the size of the first tensor it finds), without its walk over the whole
    batch for the common dict-of-tensors batch: that walk is a generator per level on every micro-batch, host time
    in a step the host may bound. Any other layout, and a dict whose first value is no tensor, take Lightning's."""
    if type(batch) is dict and batch:
        first = next(iter(batch.values()))
        if isinstance(first, torch.Tensor) and first.ndim:
            return first.shape[0]
    return extract_batch_size(batch)


def _all_reduce_sum(t: torch.Tensor, group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def _data_parallel(trainer: Trainer) -> tuple[int, Any, int]:
    """(size, process group, this rank's index) of the data-parallel dimension: the ``data_parallel`` dimension of
    a tensor-parallel device mesh, else the whole world (group None)."""
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()):
        dp = mesh["data_parallel"]
        return dp.size(), dp.get_group(), dp.get_local_rank()
    return trainer.world_size, None, trainer.global_rank


def _scale_grads(grads: list[torch.Tensor], fix: Any) -> None:
    """Multiply gradients (DTensors through their local shards: the factor is the same on every rank) by ``fix``, a
    float or a 0-dim device tensor, in each gradient's dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        local = to_local(g)
        by_dtype.setdefault(local.dtype, []).append(local)
    for dtype, gs in by_dtype.items():
        torch._foreach_mul_(gs, fix.to(gs[0].device, dtype) if isinstance(fix, torch.Tensor) else fix)


def _defers_saves(trainer: Trainer) -> bool:
    """Whether a mid-window checkpoint cannot hold the partial gradients, so saves wait for the window's end."""
    if not _grads_reachable(trainer.strategy):
        return True
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    return mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1


def _grads_reachable(strategy: Any) -> bool:
    """Whether ``p.grad`` holds the accumulated gradient (not under DeepSpeed ZeRO, whose partitions are private)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy  # Lightning's class; does not import deepspeed

    return not (strategy.handles_gradient_accumulation or isinstance(strategy, DeepSpeedStrategy))
