"""TrainingHealthMonitor: loss scale, skipped steps, gradient norm, non-finite parameters, Lamb trust ratios, tokens/s.

Everything is computed on the device; at each logging step one tensor of it starts a non-blocking copy to the host,
and the metrics are logged (at that step) once it has landed, so no step waits for the device. Skipped steps
are reported at once when the step was decided on the host (the precision plugin then also names the parameters with
non-finite gradients); when the optimizer skipped on the device, the step's flag is kept and read with the next log.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_effi import _compat
from lightning_effi._host import HostMirror
from lightning_effi._protocols import TrustRatioOptimizer
from lightning_effi.optim.norms import global_norm, is_dtensor, to_local

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

    When a step is skipped, a warning names the step, the scale and the first parameters with non-finite gradients
    on this rank (at once when the precision plugin decided the skip on the host; at the next log, without names,
    when the optimizer skipped on the device); the events are kept in :attr:`skip_events` as ``(step, scale, names)``.
    Metrics go to every logger of the Trainer at step ``trainer.global_step`` and are kept in :attr:`last_metrics`.
    Nothing here waits for the device during training: a logging step's values are copied to the host without
    blocking and logged at a later micro-batch once the copy has landed (on the CPU at once); the end of training
    waits for the last interval's.

    **Non-finite gradients without a loss scaler** (``precision="32-true"``, ``"bf16-mixed"``, ``"bf16-true"``: no
    plugin skips such a step; with ``LossScalingPrecision``, torch's GradScaler or DeepSpeed fp16 the scaler does and
    this policy stays off). Every optimizer step the gradients are checked on the device (an inf-norm per
    parameter, on the local shards; one all-reduce of the flag where gradients are sharded), and
    ``on_nonfinite`` decides (the parameters are named where the check keeps per-parameter flags: on the CPU and
    for bf16 gradients; fp16/fp32 gradients on a GPU are checked by one kernel, GradScaler's, for the step only):

    * ``"raise"`` (default): the step is skipped inside the optimizer when it takes ``found_inf`` (torch's
      ``fused=True`` Adam/AdamW/SGD, ``lightning_effi.optim.Lamb``), so weights and checkpoints stay finite; at the
      next logging step (and at the end of training) a ``RuntimeError`` names the first such step and the first
      parameters with non-finite gradients on this rank. Another optimizer steps on, and the error says the weights
      may hold inf/NaN since then.
    * ``"skip"``: such steps are skipped and counted (``nonfinite_steps``, with a warning naming the step and the
      parameters at the next log). An optimizer that takes ``found_inf`` skips on the device; for any other the
      flag is read on the host every step (one sync per step, warned once on an accelerator) and the step runs
      with every gradient set to ``None``, which torch optimizers skip. Either way the LR scheduler and
      ``global_step`` advance, as they do for a step torch's GradScaler skips in stock Lightning.
    * ``None``: no check.

    Args:
        log_every_n_steps: interval in optimizer steps (default 50).
        tokens_key: key of the token count in ``training_step``'s output dict (default ``"num_tokens"``); if it is
            missing, ``tokens_per_sec`` is not logged and a warning says so once.
        prefix: metric name prefix (default ``"health/"``).
        max_names: how many parameter names to report for a skipped step (default 5).
        on_nonfinite: ``"raise"``, ``"skip"`` or ``None``, see above (default ``"raise"``).
    """

    def __init__(
        self, log_every_n_steps: int = 50, tokens_key: str = "num_tokens", prefix: str = "health/", max_names: int = 5,
        on_nonfinite: Optional[Literal["raise", "skip"]] = "raise",
    ) -> None:
        for name, v in (("log_every_n_steps", log_every_n_steps), ("max_names", max_names)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {name} {v!r}: must be an int >= 1")
        if not isinstance(tokens_key, str) or not tokens_key:
            raise ValueError(f"Invalid tokens_key {tokens_key!r}: must be a non-empty string")
        if not isinstance(prefix, str):
            raise TypeError(f"Invalid prefix {prefix!r}: must be a string (\"\" for no prefix)")
        if on_nonfinite not in ("raise", "skip", None):
            raise ValueError(f"Invalid on_nonfinite {on_nonfinite!r}: must be 'raise', 'skip' or None (no check)")
        self.on_nonfinite = on_nonfinite
        self._nf: Optional[_NonFinite] = None
        self._mirror = HostMirror(slots=2)
        self._room = 0  # the mirror's length (float64 values), set at train start
        self._warmed = False  # the logging step's device work has run once in this fit
        self._pending: Optional[dict[str, Any]] = None
        self._nf_steps_host = 0  # skipped non-finite steps restored from a checkpoint
        self.log_every_n_steps = log_every_n_steps
        self.tokens_key = tokens_key
        self.prefix = prefix
        self.max_names = max_names
        self.last_metrics: dict[str, float] = {}
        self.skip_events: list[tuple[int, Optional[float], list[str]]] = []
        self._grad_norm: Optional[Tensor] = None
        self._tokens: Optional[Tensor] = None
        self._tokens_host = 0  # token counts returned as Python ints
        self._seen_tokens = False
        # Steps decided on the device this interval (step numbers on the host, flags in _skip_flags[:len]): one
        # persistent buffer written in place, since keeping each step's flag tensor alive until the log would grow
        # the allocator's live set every step.
        self._device_skips: list[int] = []
        self._skip_flags: Optional[Tensor] = None
        self._warned_tokens = False
        self._last_step = 0
        self._t_last = 0.0

    # --------------------------------------------------------------------------------------------------- hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._t_last = time.perf_counter()
        self._tokens = None
        self._tokens_host = 0
        self._seen_tokens = False
        self._grad_norm = None
        self._device_skips = []
        self._pending = None
        self._nf = _NonFinite(trainer, self.on_nonfinite) if self.on_nonfinite and _no_scaler(trainer) else None
        # Room for every part of an interval's metrics (grad norm, ratios, tokens, the scaler state, one skip flag
        # per step, the non-finite count, first step and one flag per parameter), allocated before the first step.
        n_params = sum(len(g["params"]) for opt in trainer.optimizers for g in getattr(opt, "param_groups", []))
        self._room = 64 + self.log_every_n_steps + n_params
        self._mirror.reserve(torch.empty(self._room, dtype=torch.float64, device=trainer.strategy.root_device))
        self._skip_flags = torch.zeros(self.log_every_n_steps, dtype=torch.float64, device=trainer.strategy.root_device)
        self._warmed = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_pending(trainer, wait=True)  # the last interval's metrics (one wait at the end)
        if self._nf is not None:  # a run shorter than the logging interval still reports (one read at the end)
            self._report_nonfinite(trainer, self._nf.read())
            self._nf.release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._nf is not None:
            self._nf.release()

    @override
    def state_dict(self) -> dict[str, Any]:
        count = self._nf_steps_host
        if self._nf is not None:
            count += int(self._nf.read()[0])  # a checkpoint may wait for the device
        return {"nonfinite_steps": count}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._nf_steps_host = int(state_dict.get("nonfinite_steps", 0))

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Runs after unscaling (LossScalingPrecision) and before clipping.
        if self._nf is not None:
            self._nf.check(optimizer, trainer.global_step, pl_module)
        if (trainer.global_step + 1) % self.log_every_n_steps != 0 and self._warmed:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            self._grad_norm = None
            return
        self._grad_norm = global_norm(grads)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._count_tokens(outputs)
        if self._pending is not None:
            self._finish_pending(trainer, wait=False)
        step = trainer.global_step
        if step == self._last_step:  # inside an accumulation window: no optimizer step happened
            return
        self._last_step = step
        skipped = _host_skip_flag(trainer)
        if skipped is None:  # decided on the device: keep the flag for the next log
            flag = _device_skip_flag(trainer)
            if flag is not None:
                k = len(self._device_skips)
                assert self._skip_flags is not None  # made at train start
                if k == self._skip_flags.numel():  # one flag per step, a log every n steps: not expected
                    self._skip_flags = torch.cat([self._skip_flags, torch.zeros_like(self._skip_flags)])
                self._skip_flags[k].copy_(flag.reshape(()))
                self._device_skips.append(step - 1)
        elif skipped:
            state = _loss_scale_state(trainer)
            self._report_skip(trainer, step - 1, state[0] if state else None, self._plugin_names(trainer))
        if step % self.log_every_n_steps == 0:
            self._emit(trainer, step)
        elif not self._warmed:
            self._warm_up(trainer)
        self._warmed = True

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
        self._seen_tokens = True
        if not isinstance(n, Tensor):
            self._tokens_host += int(n)  # a host count stays on the host (a copy to the device would sync)
            return
        n = n.detach().to(torch.float64).reshape(())
        self._tokens = n if self._tokens is None else self._tokens + n.to(self._tokens.device)

    def _plugin_names(self, trainer: pl.Trainer) -> Optional[list[str]]:
        plugin = trainer.precision_plugin
        if hasattr(plugin, "last_nonfinite_names"):
            return list(plugin.last_nonfinite_names)[: self.max_names]
        return None

    def _report_skip(self, trainer: pl.Trainer, step: int, scale: Optional[float], names: Optional[list[str]],
                     why: str = "") -> None:
        if names is None:
            where = [why or "<not available: the engine holds the gradients>"]
            names = []
        else:
            where = names or ["<none on this rank: the overflow was on another rank>"]
        self.skip_events.append((step, scale, names))
        log.warning(
            "rank %d: optimizer step %d skipped (non-finite gradients); loss scale now %s; first parameters with "
            "inf/nan gradients: %s",
            trainer.global_rank, step, scale, where,
        )

    def _report_nonfinite(self, trainer: pl.Trainer, values: list[float]) -> int:
        """Act on one read of the non-finite state (``[count, first step, per-parameter flags...]``); returns the
        count of skipped steps so far."""
        assert self._nf is not None
        count, first, flags = int(values[0]), int(values[1]), values[2:]
        if first >= 0:
            names = [n for n, bad in zip(self._nf.names, flags) if bad][: self.max_names]
            self._nf.forget_first()
            if not self._nf.named:
                where = ["<not recorded: checked on the GPU by one kernel, without per-parameter flags>"]
            else:
                where = names or ["<none on this rank: the non-finite gradients were on another rank>"]
            if self.on_nonfinite == "raise":
                kept = ("the step was skipped inside the optimizer, so the weights are still finite"
                        if self._nf.masked else "the optimizer applied it: the weights may hold inf/NaN since")
                raise RuntimeError(
                    f"TrainingHealthMonitor: non-finite gradients at optimizer step {first} without a loss scaler "
                    f"(rank {trainer.global_rank}; first parameters with inf/NaN gradients: {where}); {kept}. Check "
                    "the data and the learning rate, clip gradients (gradient_clip_val), or pass "
                    "on_nonfinite='skip' to skip such steps and go on.")
            log.warning("rank %d: optimizer step %d skipped (non-finite gradients, no loss scaler); %d skipped so "
                        "far; first parameters with inf/nan gradients: %s", trainer.global_rank, first,
                        self._nf_steps_host + count, where)
        return self._nf_steps_host + count

    def _trust_ratio_tensors(self, trainer: pl.Trainer) -> Optional[Tensor]:
        """[min, median, max] of the finite trust ratios of the last step, on the device (no host read)."""
        for opt in trainer.optimizers:
            inner = getattr(opt, "optimizer", None)  # DeepSpeed wraps the client optimizer
            source = opt if isinstance(opt, TrustRatioOptimizer) else inner
            ratios = source.trust_ratios if isinstance(source, TrustRatioOptimizer) else None
            if ratios is None or ratios.numel() == 0:
                continue
            r = ratios.float()
            finite = torch.isfinite(r)
            inf = torch.full_like(r, math.inf)
            return torch.stack([torch.where(finite, r, inf).min(), torch.nanmedian(torch.where(finite, r, math.nan)),
                                torch.where(finite, r, -inf).max()])
        return None

    def _emit(self, trainer: pl.Trainer, step: int) -> None:
        """Gather this interval's device values into one tensor and start its copy to the host without waiting; the
        metrics are logged (at ``step``) once it has landed: at once on the CPU, at a later micro-batch on an
        accelerator, so the logging step does not drain the device queue."""
        self._finish_pending(trainer, wait=True)  # the previous interval's copy, issued an interval ago
        device = trainer.strategy.root_device
        parts = self._parts(trainer, device)
        now = time.perf_counter()
        pending = {"step": step, "sizes": {k: t.numel() for k, t in parts.items()}, "seconds": now - self._t_last,
                   "device_skips": self._device_skips, "seq": None}
        self._device_skips = []
        self._tokens = None
        self._tokens_host = 0
        self._t_last = now
        if parts:
            pending["seq"] = self._mirror.push(self._flat(parts, device))
        self._pending = pending
        self._finish_pending(trainer, wait=False)

    def _warm_up(self, trainer: pl.Trainer) -> None:
        """The logging step's device work, once, at the first optimizer step, its result dropped. A kernel's first
        use loads its module (lazily, on CUDA), which holds the host for tens of milliseconds per kernel; here that
        happens at the first step, beside compilation, instead of in the middle of the run."""
        device = trainer.strategy.root_device
        parts = self._parts(trainer, device)
        if parts:
            self._flat(parts, device)

    def _flat(self, parts: dict[str, Tensor], device: torch.device) -> Tensor:
        flat = torch.cat([t.to(device, torch.float64).reshape(-1) for t in parts.values()])
        if flat.numel() > self._room:  # more than reserved (e.g. many device skips): a larger ring, once
            self._room = 2 * flat.numel()
        return torch.nn.functional.pad(flat, (0, self._room - flat.numel()))

    def _parts(self, trainer: pl.Trainer, device: torch.device) -> dict[str, Tensor]:
        """This interval's device values by name (reads the interval's state; takes the gradient norm)."""
        parts: dict[str, Tensor] = {}
        if self._grad_norm is not None:
            parts["grad_norm"] = self._grad_norm.reshape(1)
            self._grad_norm = None
        ratios = self._trust_ratio_tensors(trainer)
        if ratios is not None:
            parts["ratios"] = ratios
        if self._seen_tokens:
            local = self._tokens.to(device) if self._tokens is not None else torch.zeros((), dtype=torch.float64,
                                                                                            device=device)
            local = local + self._tokens_host
            # every rank reaches this point at the same step, so the collective is matched
            parts["tokens"] = trainer.strategy.reduce(local, reduce_op="sum").reshape(1)
        if self._device_skips:
            assert self._skip_flags is not None
            parts["skips"] = self._skip_flags[: len(self._device_skips)]
        scaler = _own_scaler(trainer)
        if scaler is not None and scaler.state_tensor is not None:
            parts["scaler"] = scaler.state_tensor
        if self._nf is not None:
            parts["nonfinite"] = self._nf.packed(device)
        return parts

    def _finish_pending(self, trainer: pl.Trainer, wait: bool) -> None:
        """Log the pending interval if its copy has landed (or, with ``wait``, once it has)."""
        pending = self._pending
        if pending is None:
            return
        flat: Any = []
        if pending["seq"] is not None:
            flat = self._mirror.get(pending["seq"]) if wait else self._mirror.peek(pending["seq"])
            if flat is None:
                return
            flat = flat.tolist()  # a NumPy view of the landed host buffer, not a device read
        self._pending = None
        host: dict[str, list[float]] = {}
        i = 0
        for k, n in pending["sizes"].items():
            host[k] = flat[i:i + n]
            i += n
        metrics: dict[str, float] = {}
        if "scaler" in host:
            from lightning_effi.plugins.scaler import SCALE, SKIPPED

            metrics["loss_scale"] = host["scaler"][SCALE]
            metrics["skipped_steps"] = float(host["scaler"][SKIPPED])
        else:
            state = _loss_scale_state(trainer)
            if state is not None:
                metrics["loss_scale"] = state[0]
                if state[1] is not None:
                    metrics["skipped_steps"] = float(state[1])
        if "nonfinite" in host:
            count = self._report_nonfinite(trainer, host["nonfinite"])
            if self.on_nonfinite == "skip":
                metrics["nonfinite_steps"] = float(count)
        for s, flag in zip(pending["device_skips"], host.get("skips", [])):
            if flag:
                self._report_skip(trainer, s, metrics.get("loss_scale"), None,
                                  "<not recorded: the optimizer skipped the step on the device>")
        if "grad_norm" in host:
            metrics["grad_norm"] = host["grad_norm"][0]
        if "ratios" in host:
            lo, med, hi = host["ratios"]
            if math.isfinite(lo):
                metrics.update(trust_ratio_min=lo, trust_ratio_median=med, trust_ratio_max=hi)
        if "tokens" in host:
            metrics["tokens_per_sec"] = host["tokens"][0] / max(pending["seconds"], 1e-9)
        metrics = {self.prefix + k: v for k, v in metrics.items()}
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=pending["step"])


def _own_scaler(trainer: pl.Trainer) -> Any:
    from lightning_effi.plugins.scaler import DynamicLossScaler

    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if isinstance(scaler, DynamicLossScaler) else None


def _host_skip_flag(trainer: pl.Trainer) -> Optional[bool]:
    """Whether the last optimizer step was skipped, when the host knows without reading the device; None when only
    the device knows (a DynamicLossScaler whose optimizer skipped inside its kernel)."""
    scaler = _own_scaler(trainer)
    if scaler is not None:
        return scaler.host_known_skip
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        return False  # torch's GradScaler counts no skips
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    return engine is not None and engine.fp16_enabled() and not engine.was_step_applied()


def _device_skip_flag(trainer: pl.Trainer) -> Optional[Tensor]:
    from lightning_effi.plugins.scaler import LAST_FOUND

    scaler = _own_scaler(trainer)
    return None if scaler is None or scaler.state_tensor is None else scaler.state_tensor[LAST_FOUND]


def _loss_scale_state(trainer: pl.Trainer) -> Optional[tuple[float, Optional[int], bool]]:
    """(scale, skipped steps so far, was the last step skipped) from the precision plugin's scaler or a DeepSpeed fp16
    engine; None when nothing scales the loss. torch's GradScaler (Lightning's MixedPrecision) counts no skips: None.
    Reads device values: for logging steps and steps the host already waited for."""
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


def _no_scaler(trainer: pl.Trainer) -> bool:
    """Nothing else skips a non-finite step: no precision-plugin scaler, no DeepSpeed (its ZeRO partitions hold the
    gradients, and its fp16 engine has its own scaler)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return getattr(trainer.precision_plugin, "scaler", None) is None and not isinstance(trainer.strategy,
                                                                                      DeepSpeedStrategy)


class _NonFinite:
    """The device-side state of the non-finite-gradient policy: a count of skipped steps, the first such step not
    reported yet and the per-parameter flags of that step, updated without a host read."""

    def __init__(self, trainer: pl.Trainer, policy: str) -> None:
        self.policy = policy
        self.world = trainer.world_size
        self.on_accelerator = trainer.strategy.root_device.type != "cpu"
        self.names: list[str] = []
        self.masked = False
        self._count: Optional[Tensor] = None
        self._first: Optional[Tensor] = None
        self._flags: Optional[Tensor] = None
        self._found: Optional[Tensor] = None
        self._one: Optional[Tensor] = None
        self.named = False  # per-parameter flags are kept (CPU, bf16 gradients), so reports can name parameters
        self._masks: dict[int, bool] = {}
        self._plans: dict[int, dict[str, Any]] = {}
        self._optimizers: list[Any] = []
        self._warned_sync = False

    def check(self, optimizer: Any, step: int, pl_module: pl.LightningModule) -> None:
        from lightning_effi.plugins.scaler import masks_step

        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        # What does not change between steps is decided once (host time per step is what this costs on a GPU).
        plan = self._plans.get(id(optimizer))
        if plan is None or plan["n"] != len(params):
            by_id = {id(p): n for n, p in pl_module.named_parameters()}
            local = [to_local(p.grad) for p in params]
            device = local[0].device
            plan = self._plans[id(optimizer)] = {
                "n": len(params), "device": device, "dtensor": any(is_dtensor(p.grad) for p in params),
                "names": [by_id.get(id(p), f"<parameter {i}>") for i, p in enumerate(params)],
                # a rank's shard may be empty (uneven FSDP sharding): finite, and no inf-norm
                "full": None if all(g.numel() for g in local) else [i for i, g in enumerate(local) if g.numel()],
                # GradScaler's one multi-tensor kernel (scale 1 is exact): the flag only, no per-parameter outputs
                "one_kernel": device.type == "cuda" and all(g.dtype in (torch.float16, torch.float32) and
                                                            g.device == device for g in local),
            }
        self.names = plan["names"]
        device = plan["device"]
        grads = [to_local(p.grad) for p in params] if plan["dtensor"] else [p.grad for p in params]
        full = grads if plan["full"] is None else [grads[i] for i in plan["full"]]
        if self._count is None or self._count.device != device or self._flags is None \
                or self._flags.numel() != len(grads):
            # Persistent buffers updated in place: the same allocations every step keep the caching allocator
            # placing the next step's gradients at the same addresses, which Lamb's captured CUDA graph replays on.
            self._count = torch.zeros((), dtype=torch.float64, device=device)
            self._first = torch.full((), -1.0, dtype=torch.float64, device=device)
            self._flags = torch.zeros(len(grads), dtype=torch.float32, device=device)
            self._found = torch.zeros((), dtype=torch.float32, device=device)
            self._one = torch.ones((), dtype=torch.float32, device=device)
        assert self._first is not None and self._found is not None and self._one is not None
        bad: Optional[Tensor] = None
        if plan["one_kernel"]:
            self._found.zero_()
            if full:
                _compat.non_finite_check_and_unscale_(full, self._found, self._one)
        else:
            # inf-norm per parameter (a NaN or inf anywhere makes it non-finite): names for the report. On the CPU
            # torch's inf-norm reduction is many times slower than aminmax, so there it is max(|min|, |max|).
            if device.type == "cpu" and full:
                mins, maxs = zip(*(torch.aminmax(g) for g in full))
                norms = list(torch._foreach_maximum(torch._foreach_abs(mins), torch._foreach_abs(maxs)))
            else:
                norms = list(torch._foreach_norm(full, float("inf"))) if full else []
            if plan["full"] is None and len({n.dtype for n in norms}) == 1:
                bad = ~torch.stack(norms).isfinite()
            else:
                it = iter(norms)
                zero = torch.zeros((), dtype=torch.float32, device=device)
                bad = ~torch.stack([next(it).to(device, torch.float32) if g.numel() else zero
                                    for g in grads]).isfinite()
            self._found.copy_(bad.any())
        if self.world > 1 and plan["dtensor"]:
            # sharded gradients: each rank saw its shards only, and every rank must skip together
            torch.distributed.all_reduce(self._found, op=torch.distributed.ReduceOp.MAX)
        found = self._found
        first_now = (found > 0) & (self._first < 0)
        if bad is not None:
            self._flags.copy_(torch.where(first_now, bad.to(torch.float32), self._flags))
            self.named = True
        self._first.copy_(torch.where(first_now, torch.full_like(self._first, step), self._first))
        masked = self._masks.get(id(optimizer))
        if masked is None:  # inspects the step's signature: once per optimizer
            masked = self._masks[id(optimizer)] = masks_step(optimizer)
        self.masked = masked
        if self.masked:
            self._count += self._found
            optimizer.grad_scale = None
            optimizer.found_inf = self._found  # the optimizer skips the whole step on the device
            if optimizer not in self._optimizers:
                self._optimizers.append(optimizer)
        elif self.policy == "skip":
            if self.on_accelerator and not self._warned_sync:
                self._warned_sync = True
                rank_zero_warn(f"TrainingHealthMonitor(on_nonfinite='skip') with {type(optimizer).__name__}, which "
                               "does not take found_inf: the flag is read on the host every step (a device sync). "
                               "torch's fused=True Adam/AdamW/SGD and lightning_effi.optim.Lamb skip on the device.")
            if bool(found):  # the documented per-step read for an optimizer that cannot skip by itself
                self._count += 1
                for p in params:
                    p.grad = None  # torch optimizers leave a parameter without a gradient, and its state, as it is

    def packed(self, device: torch.device) -> Tensor:
        if self._count is None:
            return torch.tensor([0.0, -1.0], dtype=torch.float64).to(device)
        assert self._first is not None and self._flags is not None
        return torch.cat([self._count.reshape(1), self._first.reshape(1), self._flags.to(torch.float64)]).to(device)

    def read(self) -> list[float]:
        return self.packed(self._count.device if self._count is not None else torch.device("cpu")).tolist()

    def forget_first(self) -> None:
        if self._first is not None:
            self._first.fill_(-1.0)

    def release(self) -> None:
        """Take found_inf/grad_scale off the optimizers, so a later step outside this run is not masked."""
        for opt in self._optimizers:
            for attr in ("found_inf", "grad_scale"):
                if attr in vars(opt):
                    delattr(opt, attr)
        self._optimizers = []
