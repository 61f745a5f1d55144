"""TrainingHealthMonitor: loss scale, skipped steps, gradient norm, non-finite parameters, Lamb trust ratios, tokens/s.

Everything is computed on the device and brought to the host only at the logging interval (one sync per logged
quantity group), except on a skipped step, which is rare and worth a diagnosis: the names of the parameters with
non-finite gradients are then looked up at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

__all__ = ["TrainingHealthMonitor"]

log = logging.getLogger(__name__)


class TrainingHealthMonitor(Callback):
    """Log training-health statistics every ``log_every_n_steps`` optimizer steps.

    Metrics (names prefixed by ``prefix``), each present only where it has a meaning:

    * ``loss_scale``, ``skipped_steps``: with :class:`~lightning_effi.plugins.LossScalingPrecision` (or any precision
      plugin exposing a ``scaler`` with ``get_scale()`` and ``skipped_steps``), or with DeepSpeed fp16 (read from the
      engine: its loss scaler's ``cur_scale`` and ``skipped_steps``);
    * ``grad_norm``: global L2 norm of all gradients the optimizer steps on, after unscaling and before clipping
      (DTensor gradients: the norm of the full logical tensors); non-finite when the step is skipped;
    * ``trust_ratio_min`` / ``_median`` / ``_max``: from ``optimizer.trust_ratios`` (Lamb) over the last applied step,
      non-finite entries ignored;
    * ``tokens_per_sec``: tokens trained on by all ranks since the last log, over the wall time since then; tokens come
      from the ``tokens_key`` entry of ``training_step``'s returned dict.

    When a step is skipped, a warning names the step, the new scale and the first parameters with non-finite
    gradients on this rank; the events are kept in :attr:`skip_events` as ``(step, scale, names)``.
    Metrics go to every logger of the Trainer at step ``trainer.global_step`` and are kept in :attr:`last_metrics`.

    Args:
        log_every_n_steps: interval in optimizer steps (default 50).
        tokens_key: key of the token count in ``training_step``'s output dict (default ``"num_tokens"``); if it is
            missing, ``tokens_per_sec`` is not logged and a warning says so once.
        prefix: metric name prefix (default ``"health/"``).
        max_names: how many parameter names to report for a skipped step (default 5).
    """

    def __init__(
        self, log_every_n_steps: int = 50, tokens_key: str = "num_tokens", prefix: str = "health/", max_names: int = 5
    ) -> None:
        for name, v in (("log_every_n_steps", log_every_n_steps), ("max_names", max_names)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {name} {v!r}: must be an int >= 1")
        if not isinstance(tokens_key, str) or not tokens_key:
            raise ValueError(f"Invalid tokens_key {tokens_key!r}: must be a non-empty string")
        self.log_every_n_steps = log_every_n_steps
        self.tokens_key = tokens_key
        self.prefix = prefix
        self.max_names = max_names
        self.last_metrics: dict[str, float] = {}
        self.skip_events: list[tuple[int, Optional[float], list[str]]] = []
        self._grad_norm: Optional[Tensor] = None
        self._tokens: Optional[Tensor] = None
        self._warned_tokens = False
        self._last_step = 0
        self._t_last = 0.0

    # --------------------------------------------------------------------------------------------------- hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._t_last = time.perf_counter()
        self._tokens = None
        self._grad_norm = None

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Runs after unscaling (LossScalingPrecision) and before clipping; only on steps that will be logged.
        if (trainer.global_step + 1) % self.log_every_n_steps != 0:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            self._grad_norm = None
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
        full_tensor = getattr(norm, "full_tensor", None)
        self._grad_norm = full_tensor() if callable(full_tensor) else norm

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._count_tokens(outputs)
        step = trainer.global_step
        if step == self._last_step:  # inside an accumulation window: no optimizer step happened
            return
        self._last_step = step
        if _last_step_skipped(trainer):  # a host bool: no device sync on clean steps
            self._report_skip(trainer, step, _loss_scale_state(trainer)[0])
        if step % self.log_every_n_steps == 0:
            self._emit(trainer, step)

    # ------------------------------------------------------------------------------------------------- helpers
    def _count_tokens(self, outputs: Any) -> None:
        n = outputs.get(self.tokens_key) if isinstance(outputs, dict) else None
        if n is None:
            if not self._warned_tokens:
                self._warned_tokens = True
                rank_zero_warn(
                    f"TrainingHealthMonitor: training_step's output has no {self.tokens_key!r} entry, so tokens/s is "
                    f"not logged. Return {{'loss': ..., {self.tokens_key!r}: n_tokens}} or set tokens_key."
                )
            return
        n = torch.as_tensor(n).detach().to(torch.float64)
        self._tokens = n if self._tokens is None else self._tokens + n.to(self._tokens.device)

    def _report_skip(self, trainer: pl.Trainer, step: int, scale: float) -> None:
        plugin = trainer.precision_plugin
        if hasattr(plugin, "last_nonfinite_names"):
            names = list(plugin.last_nonfinite_names)[: self.max_names]
            where = names or ["<none on this rank: the overflow was on another rank>"]
        else:  # DeepSpeed keeps gradients in its own flat partitions
            names, where = [], ["<not available: the engine holds the gradients>"]
        self.skip_events.append((step - 1, scale, names))
        log.warning(
            "rank %d: optimizer step %d skipped (non-finite gradients); loss scale now %s; first parameters with "
            "inf/nan gradients: %s",
            trainer.global_rank, step - 1, scale, where,
        )

    def _trust_ratio_stats(self, trainer: pl.Trainer) -> dict[str, float]:
        for opt in trainer.optimizers:
            ratios = getattr(opt, "trust_ratios", None)
            if ratios is None:  # DeepSpeed wraps the client optimizer
                ratios = getattr(getattr(opt, "optimizer", None), "trust_ratios", None)
            if ratios is None or ratios.numel() == 0:
                continue
            finite = ratios[torch.isfinite(ratios)].float()
            if finite.numel() == 0:
                return {}
            lo, med, hi = torch.stack([finite.min(), finite.median(), finite.max()]).tolist()
            return {"trust_ratio_min": lo, "trust_ratio_median": med, "trust_ratio_max": hi}
        return {}

    def _emit(self, trainer: pl.Trainer, step: int) -> None:
        metrics: dict[str, float] = {}
        state = _loss_scale_state(trainer)
        if state is not None:
            metrics["loss_scale"] = state[0]
            if state[1] is not None:
                metrics["skipped_steps"] = float(state[1])
        if self._grad_norm is not None:
            metrics["grad_norm"] = float(self._grad_norm)
            self._grad_norm = None
        metrics.update(self._trust_ratio_stats(trainer))
        now = time.perf_counter()
        if not self._warned_tokens or self._tokens is not None:
            local = self._tokens if self._tokens is not None else torch.zeros((), dtype=torch.float64)
            # every rank reaches this point at the same step, so the collective is matched
            total = trainer.strategy.reduce(local.to(trainer.strategy.root_device), reduce_op="sum")
            elapsed = max(now - self._t_last, 1e-9)
            metrics["tokens_per_sec"] = float(total) / elapsed
        self._tokens = None
        self._t_last = now
        metrics = {self.prefix + k: v for k, v in metrics.items()}
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _loss_scale_state(trainer: pl.Trainer) -> Optional[tuple[float, Optional[int], bool]]:
    """(scale, skipped steps so far, was the last step skipped) from the precision plugin's scaler or a DeepSpeed fp16
    engine; None when nothing scales the loss. torch's GradScaler (Lightning's MixedPrecision) counts no skips: None.
    Host values only (the scaler already synced once to decide the step)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and hasattr(scaler, "get_scale"):
        skipped = getattr(scaler, "skipped_steps", None)
        return float(scaler.get_scale()), skipped, bool(getattr(scaler, "last_step_skipped", False))
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    if engine is None or not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    ds_scaler = getattr(opt, "loss_scaler", None)
    scale = getattr(ds_scaler, "cur_scale", None) if ds_scaler is not None else getattr(opt, "cur_scale", None)
    if scale is None:
        return None
    return float(scale), int(engine.skipped_steps), not engine.was_step_applied()


def _last_step_skipped(trainer: pl.Trainer) -> bool:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        return bool(getattr(scaler, "last_step_skipped", False))
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    return engine is not None and engine.fp16_enabled() and not engine.was_step_applied()
