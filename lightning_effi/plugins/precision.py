"""Lightning precision plugins: loss-scaled fp16/bf16 autocast, and bf16 weights with fp32 master copies.

Thin glue around :class:`~lightning_effi.plugins.scaler.DynamicLossScaler` (the math lives there). What these
plugins change compared with Lightning's ``MixedPrecision`` / ``HalfPrecision``:

* fp16 autocast on CPU really is fp16 (Lightning's ``precision="16-mixed"`` on CPU silently becomes bf16 without a
  scaler), so the loss-scaling paths run in CPU CI;
* a skipped step (non-finite gradients) does not advance the step-interval LR schedulers, so the schedule position
  equals the number of applied optimizer steps and torch's "lr_scheduler.step() before optimizer.step()" warning is
  never triggered by a skipped first step;
* the scale has hysteresis, a floor (with a choice between stopping and skipping when it is reached) and a ceiling,
  and is agreed on across ranks.
"""

from __future__ import annotations

import weakref
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Literal, Optional, Union

import torch
from lightning.pytorch.plugins.precision import HalfPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from lightning_effi._host import HostMirror
from lightning_effi._protocols import DeviceLROptimizer
from lightning_effi.plugins.held_schedule import HeldSchedule, can_hold
from lightning_effi.plugins.scaler import FIRST_FLOOR, FLOOR_EVENTS, LAST_FLOOR, SCALE, SKIPPED, DynamicLossScaler

__all__ = ["LossScalingPrecision", "MasterWeightsPrecision", "nonfinite_grad_names"]

_PRECISIONS = ("16-mixed", "bf16-mixed")
_ON_MIN_SCALE = ("raise", "skip")


# --------------------------------------------------------------------------------------------------------- helpers
def _lightning_module(model: Any) -> Any:
    """The LightningModule behind ``model`` (strategies may pass a DDP wrapper to ``connect``)."""
    import lightning.pytorch as pl

    seen = 0
    while not isinstance(model, pl.LightningModule) and hasattr(model, "module") and seen < 4:
        model = model.module
        seen += 1
    return model


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer behind a LightningOptimizer: the scaler keys its per-step flags by optimizer identity, and
    users pass the wrapper (``self.optimizers()``) to ``clip_gradients`` while the strategy passes the inner one."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def nonfinite_grad_names(named_params: Iterator[tuple[str, Tensor]], *, limit: int = 5) -> list[str]:
    """Names of the first ``limit`` parameters whose (local) gradient holds inf or nan.

    One host sync per parameter checked: meant for the rare skipped step, never for every step.
    """
    names = []
    for name, p in named_params:
        g = p.grad
        if g is None:
            continue
        g = g.to_local() if hasattr(g, "to_local") else g
        if g.is_sparse:
            g = g.coalesce()._values()
        if not bool(torch.isfinite(g).all()):
            names.append(name)
            if len(names) >= limit:
                break
    return names


class _HeldScheduler:
    """Mixin put in front of a step-interval LR scheduler's class while a :class:`LossScalingPrecision` trains.

    Two ways to hold the schedule on a skipped step: when the optimizer skips on the host, the plugin counts the skip
    and the next ``step()`` is cancelled; when it skips inside its kernel, a :class:`HeldSchedule` keeps the position
    and the learning rates on the device and ``state_dict()`` reports the held state. Why a class swap instead of
    wrapping ``scheduler.step`` in the instance: schedulers' ``state_dict`` copies the instance ``__dict__``, so an
    instance attribute would end up in every checkpoint. The bookkeeping lives outside the instance for the same
    reason, and the original class is restored at teardown.
    """

    _effi_pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _effi_holds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    # Declared only: set on each class _held_class builds, never on the mixin itself.
    _effi_original_class: ClassVar[type]

    def step(self, *args: Any, **kwargs: Any) -> None:
        hold = _HeldScheduler._effi_holds.get(self)
        if hold is not None and not args and not kwargs:
            return hold.step()
        pending = _HeldScheduler._effi_pending.get(self, 0)
        if pending > 0:
            # This call belongs to an optimizer step that was skipped: the schedule must not move.
            _HeldScheduler._effi_pending[self] = pending - 1
            return None
        return super().step(*args, **kwargs)  # type: ignore[misc]

    def state_dict(self) -> dict[str, Any]:
        hold = _HeldScheduler._effi_holds.get(self)
        return hold.state_dict() if hold is not None else super().state_dict()  # type: ignore[misc]

    # While held on the device the scheduler's own host state is not advanced; these read the held state instead
    # (a host read of the device position: for checks and checkpoints, not for every step).
    @property
    def last_epoch(self) -> int:
        hold = _HeldScheduler._effi_holds.get(self)
        return hold.state_dict()["last_epoch"] if hold is not None else self.__dict__["last_epoch"]

    @last_epoch.setter
    def last_epoch(self, value: int) -> None:
        self.__dict__["last_epoch"] = value

    def get_last_lr(self) -> list[Any]:
        hold = _HeldScheduler._effi_holds.get(self)
        return list(hold.state_dict()["_last_lr"]) if hold is not None else super().get_last_lr()  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        hold = _HeldScheduler._effi_holds.pop(self, None)
        if hold is not None:  # loaded mid-fit: the plugin holds it afresh at the next optimizer step
            hold.release()
        super().load_state_dict(state_dict)  # type: ignore[misc]


_HELD_CLASSES: dict[type, type] = {}


def _held_class(cls: type) -> type:
    if cls not in _HELD_CLASSES:
        _HELD_CLASSES[cls] = type(
            cls.__name__, (_HeldScheduler, cls), {"__module__": cls.__module__, "_effi_original_class": cls}
        )
    return _HELD_CLASSES[cls]


def _takes_device_lr(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` reads a 0-dim device tensor ``lr`` without a host sync: torch's fused Adam/AdamW and
    optimizers that declare it (:class:`~lightning_effi._protocols.DeviceLROptimizer`, e.g. ``Lamb``)."""
    if isinstance(optimizer, DeviceLROptimizer) and optimizer.accepts_tensor_lr:
        return True
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return all(g.get("fused") for g in optimizer.param_groups)
    return False


def _check_strategy_for_loss_scaling(trainer: Any) -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    # Exactly Lightning's DeepSpeedStrategy: its engine runs its own fp16 scaler from the precision *string* and would
    # ignore our knobs (and double-scale). EffiDeepSpeedStrategy (a subclass) maps our knobs onto DeepSpeed's config.
    if type(trainer.strategy) is DeepSpeedStrategy:
        raise RuntimeError(
            "LossScalingPrecision with Lightning's DeepSpeedStrategy is not supported: DeepSpeed would run its own "
            "loss scaler and ignore these settings. Use strategy='effi_deepspeed_stage_1|2|3' (EffiDeepSpeedStrategy), "
            "which maps LossScalingPrecision's knobs onto DeepSpeed's fp16 config."
        )


_KNOBS = ("init_scale", "growth_factor", "backoff_factor", "growth_interval", "hysteresis", "min_scale", "max_scale",
          "consecutive_hysteresis")


# ------------------------------------------------------------------------------------------- LossScalingPrecision
class LossScalingPrecision(Precision):
    """Autocast mixed precision with a :class:`DynamicLossScaler` (hysteresis, floor, ceiling, cross-rank agreement).

    Pass it as ``Trainer(plugins=[LossScalingPrecision("16-mixed")])`` (no ``precision=`` argument). Per optimizer
    step, at the accumulation boundary: gradients are unscaled exactly once (before ``on_before_optimizer_step`` and
    gradient clipping, so both see true gradients), the overflow flag is agreed on by all ranks, and the step is
    skipped by every rank together: weights and optimizer state stay untouched and the LR schedulers of interval
    ``"step"`` do not advance (automatic optimization).

    **Sync-free.** With an optimizer that skips inside its kernel (torch's ``Adam``/``AdamW(fused=True)``,
    ``lightning_effi.optim.Lamb``) nothing here reads a device value on the host: the scale rule runs on the device,
    the step is masked by the overflow flag, and a step-interval schedule is held on the device (its learning rates
    become 0-dim device tensors; see :mod:`~lightning_effi.plugins.held_schedule`). Any other optimizer is driven
    with one host read of the flag per step. In manual optimization, read :attr:`last_step_skipped` after
    ``opt.step()`` (a host read) to decide whether to step your schedulers.

    With ``"bf16-mixed"`` scaling is not needed for range but harmless (power-of-two scales are exact); the same
    check skips steps with inf/nan gradients. Use ``init_scale=1`` and a huge ``growth_interval`` to keep it at 1.

    Args:
        precision: ``"16-mixed"`` (float16 autocast) or ``"bf16-mixed"`` (bfloat16 autocast).
        device: autocast device type (``"cpu"``/``"cuda"``); default None takes the Trainer's root device.
        scaler: the :class:`DynamicLossScaler` to use. Default None: one built from the keyword arguments below.
        init_scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale, max_scale,
            consecutive_hysteresis: shorthand for ``scaler=DynamicLossScaler(...)`` (its defaults when None), for
            YAML configs; not together with ``scaler``.
        on_min_scale: when a backoff is due with the scale already at ``min_scale``: ``"raise"`` (default) stops with
            an error naming the step and the scale; ``"skip"`` keeps skipping and warns at most every
            ``warn_every_n_steps`` steps. Sync-free runs learn of it from a non-blocking copy of the scaler state,
            one or two steps later (the error names the step where it happened).
        warn_every_n_steps: minimum number of optimizer steps between two ``"skip"`` warnings (default 100).
    """

    def __init__(
        self,
        precision: Literal["16-mixed", "bf16-mixed"] = "16-mixed",
        device: Optional[str] = None,
        scaler: Optional[DynamicLossScaler] = None,
        *,
        init_scale: Optional[float] = None,
        growth_factor: Optional[float] = None,
        backoff_factor: Optional[float] = None,
        growth_interval: Optional[int] = None,
        hysteresis: Optional[int] = None,
        min_scale: Optional[float] = None,
        max_scale: Optional[float] = None,
        consecutive_hysteresis: Optional[bool] = None,
        on_min_scale: Literal["raise", "skip"] = "raise",
        warn_every_n_steps: int = 100,
    ) -> None:
        if precision not in _PRECISIONS:
            raise ValueError(
                f"Invalid precision {precision!r}: LossScalingPrecision supports {_PRECISIONS}; for bf16 weights use "
                f"MasterWeightsPrecision, for fp32 pass no plugin"
            )
        if on_min_scale not in _ON_MIN_SCALE:
            raise ValueError(f"Invalid on_min_scale {on_min_scale!r}: must be one of {_ON_MIN_SCALE}")
        if isinstance(warn_every_n_steps, bool) or not isinstance(warn_every_n_steps, int) or warn_every_n_steps < 1:
            raise ValueError(f"Invalid warn_every_n_steps {warn_every_n_steps!r}: must be an int >= 1")
        if device is not None and device not in ("cpu", "cuda"):
            raise ValueError(f"Invalid device {device!r}: must be 'cpu', 'cuda' or None (the Trainer's device)")
        values = (init_scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale, max_scale,
                  consecutive_hysteresis)
        given: dict[str, Any] = {k: v for k, v in zip(_KNOBS, values) if v is not None}
        if scaler is not None:
            if not isinstance(scaler, DynamicLossScaler):
                raise TypeError(f"Invalid scaler {scaler!r}: must be a lightning_effi.plugins.DynamicLossScaler")
            if given:
                raise ValueError(f"Give the scaler settings {sorted(given)} to the DynamicLossScaler passed as "
                                 "scaler=, "
                                 "not to LossScalingPrecision as well")
        else:
            scaler = DynamicLossScaler(**given)
        self.precision = precision
        self.device = device
        self.scaler = scaler
        self.on_min_scale = on_min_scale
        self.warn_every_n_steps = warn_every_n_steps
        #: names of the first parameters with non-finite local gradients at the last skipped step decided on the
        #: host (this rank); not recorded when the optimizer skips on the device
        self.last_nonfinite_names: list[str] = []
        self._last_floor_warning_step: Optional[int] = None
        self._patched_schedulers: list[Any] = []
        self._on_device: dict[int, bool] = {}  # optimizer id -> skipped inside its kernel (no host read)
        self._applied: set[int] = set()  # optimizers that took a step (decided on the host) in this run
        self._mirror = HostMirror(slots=4)  # the scaler state, for the floor check without a host sync
        self._floor_seen = 0

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.precision == "16-mixed" else torch.bfloat16

    @property
    def last_step_skipped(self) -> bool:
        """True if the last optimizer step was skipped because of non-finite gradients (agreed on by all ranks).
        A host read of the device flag when the optimizer skips on the device."""
        return self.scaler.last_step_skipped

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far (a host read)."""
        return self.scaler.skipped_steps

    # The scaler's settings, read by EffiDeepSpeedStrategy to build DeepSpeed's fp16 section.
    init_scale = property(lambda self: self.scaler.init_scale)
    growth_factor = property(lambda self: self.scaler.growth_factor)
    backoff_factor = property(lambda self: self.scaler.backoff_factor)
    growth_interval = property(lambda self: self.scaler.growth_interval)
    hysteresis = property(lambda self: self.scaler.hysteresis)
    min_scale = property(lambda self: self.scaler.min_scale)
    max_scale = property(lambda self: self.scaler.max_scale)
    consecutive_hysteresis = property(lambda self: self.scaler.consecutive_hysteresis)

    # ----------------------------------------------------------------------------------------------- setup hooks
    @override
    def convert_module(self, module: Module) -> Module:
        # The first hook that sees the Trainer (Strategy.setup calls it for fit, validate, test and predict).
        trainer = getattr(_lightning_module(module), "_trainer", None)
        if trainer is not None:
            _check_strategy_for_loss_scaling(trainer)
            if self.device is None:
                kind = trainer.strategy.root_device.type
                if kind not in ("cpu", "cuda"):
                    raise RuntimeError(
                        f"LossScalingPrecision supports CPU and CUDA devices, not {kind!r}; use accelerator='cpu' or "
                        f"'gpu' (CUDA), or Lightning's own precision flags on {kind!r}."
                    )
                self.device = kind
        return module

    @override
    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        if self.device is None:
            raise RuntimeError(
                "LossScalingPrecision has no device yet: pass it to a Trainer (plugins=[...]) or give "
                "device='cpu'/'cuda'"
            )
        # cache_enabled=False as in Lightning's MixedPrecision: each weight is cast once per forward in a transformer
        # anyway, and the cast cache is known to hold stale casts across no_grad/inference boundaries.
        with torch.autocast(self.device, dtype=self.dtype, cache_enabled=False):
            yield

    # ------------------------------------------------------------------------------------------ the step itself
    @override
    def pre_backward(self, tensor: Tensor, module: Any) -> Tensor:  # type: ignore[override]
        tensor = self.scaler.scale(tensor)
        return super().pre_backward(tensor, module)

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if isinstance(optimizer, LBFGS):
            raise RuntimeError(
                "LossScalingPrecision cannot drive LBFGS: it re-evaluates the closure inside step(), after the "
                "overflow check. Use fp32 (no precision plugin) with LBFGS."
            )
        optimizer = _unwrap(optimizer)
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            # training_step returned None: no backward ran, nothing to unscale or step (Lightning's behaviour).
            return closure_result
        if not self.scaler.is_unscaled(optimizer):
            self.scaler.unscale_(optimizer)
        # on_before_optimizer_step hooks and gradient clipping see unscaled gradients.
        self._after_closure(model, optimizer)
        # Steps before the first applied one are decided on the host (one read each): a skipped first step then
        # does not create the optimizer's state, so a skip leaves the optimizer exactly as it was.
        on_device = id(optimizer) in self._applied and self._skips_on_device(model, optimizer)
        step_output = self.scaler.step(optimizer, on_device=on_device, **kwargs)
        found_inf = self.scaler.found_inf(optimizer)
        self.scaler.update()
        if on_device:
            assert found_inf is not None  # unscale_ recorded it
            self._hold_on_device(model, optimizer, found_inf)
            self._check_floor(model)
        elif self.scaler.last_step_skipped:
            self._on_skipped_step(model, optimizer)
        else:
            self._applied.add(id(optimizer))
        return step_output

    @override
    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: Union[int, float] = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        # In manual optimization users call clip_gradients before opt.step(): unscale now (the step will not again).
        optimizer = _unwrap(optimizer)
        if clip_val > 0 and not self.scaler.is_unscaled(optimizer):
            self.scaler.unscale_(optimizer)
        super().clip_gradients(optimizer, clip_val=clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    # ------------------------------------------------------------------------------- skipping on the device
    def _step_schedulers(self, model: Any, optimizer: Optimizer) -> list[Any]:
        trainer = getattr(model, "_trainer", None)
        if trainer is None or not model.automatic_optimization:
            return []
        return [c.scheduler for c in trainer.lr_scheduler_configs
                if c.interval == "step" and not c.reduce_on_plateau and c.scheduler.optimizer is optimizer]

    def _skips_on_device(self, model: Any, optimizer: Optimizer) -> bool:
        """Decided once per optimizer: it takes ``found_inf``, and its step-interval schedulers can be held on the
        device (which needs the optimizer to read a device learning rate)."""
        key = id(optimizer)
        if key not in self._on_device:
            ok = self.scaler.masks_step(optimizer)
            schedulers = self._step_schedulers(model, optimizer) if ok else []
            why = None
            if schedulers and not _takes_device_lr(optimizer):
                why = f"{type(optimizer).__name__} does not take a device learning rate"
            for s in schedulers:
                why = why or can_hold(s)
            if why is not None:
                ok = False
                rank_zero_warn(f"LossScalingPrecision: {why}, so the LR schedule is held with one host read of the "
                               "overflow flag per optimizer step.")
            self._on_device[key] = ok
        return self._on_device[key]

    def _hold_on_device(self, model: Any, optimizer: Optimizer, found_inf: Tensor) -> None:
        for scheduler in self._step_schedulers(model, optimizer):
            hold = _HeldScheduler._effi_holds.get(scheduler)
            if hold is None:
                # Installed after the first masked step (which had the scheduler's current learning rate), so a
                # checkpoint restored at fit start is already in the scheduler.
                device = found_inf.device
                lr_dtype = torch.float32 if device.type == "cuda" else torch.float64
                hold = HeldSchedule(scheduler, device, lr_dtype)
                self._patch(scheduler)
                _HeldScheduler._effi_holds[scheduler] = hold
            hold.add_pending(found_inf)

    def _patch(self, scheduler: Any) -> None:
        if not isinstance(scheduler, _HeldScheduler):
            scheduler.__class__ = _held_class(type(scheduler))
            self._patched_schedulers.append(weakref.ref(scheduler))

    def _check_floor(self, model: Any, *, wait: bool = False) -> None:
        """Floor events seen in a landed copy of the scaler state (never waits unless ``wait``)."""
        state = self.scaler.state_tensor
        if state is None:
            return
        if wait:
            values = state.tolist()
        else:
            self._mirror.push(state)
            landed = self._mirror.latest()
            if landed is None:
                return
            values = landed.tolist()
        events = int(values[FLOOR_EVENTS])
        if events <= self._floor_seen:
            return
        first = int(values[FIRST_FLOOR]) if self._floor_seen == 0 else int(values[LAST_FLOOR])
        self._floor_seen = events
        self._floor_reached(first, values[SCALE], None, int(values[SKIPPED]))

    # ------------------------------------------------------------------------------- skipping on the host
    def _on_skipped_step(self, model: Any, optimizer: Any) -> None:
        trainer = getattr(model, "_trainer", None)
        step = trainer.global_step if trainer is not None else self.scaler.num_updates - 1
        self.last_nonfinite_names = nonfinite_grad_names(model.named_parameters())
        if trainer is not None and model.automatic_optimization:
            self._hold_schedulers(trainer, optimizer)
        if self.scaler.overflow_at_min_scale:
            state = self.scaler.state_dict()
            self._floor_seen = state["floor_events"]
            self._floor_reached(step, state["scale"], self.last_nonfinite_names, state["skipped_steps"])

    def _floor_reached(self, step: int, scale: float, names: Optional[list[str]], skipped: int) -> None:
        if names is None:
            where = "not recorded: the optimizer skipped the step on the device"
        else:
            where = str(names or ["<none on this rank: the overflow came from another rank>"])
        message = (
            f"Loss scale is at its floor min_scale={self.min_scale} and step {step} still has non-finite gradients "
            f"(scale {scale}; first parameters with inf/nan gradients on this rank: {where})."
        )
        if self.on_min_scale == "raise":
            raise RuntimeError(
                message + " The run is diverging or a layer overflows fp16 even unscaled; lower the learning rate, "
                "use 'bf16-mixed', or pass on_min_scale='skip' to keep skipping such steps."
            )
        if self._last_floor_warning_step is None or step - self._last_floor_warning_step >= self.warn_every_n_steps:
            self._last_floor_warning_step = step
            rank_zero_warn(message + f" Skipping ({skipped} skipped so far).", category=RuntimeWarning)

    def _hold_schedulers(self, trainer: Any, optimizer: Any) -> None:
        """Cancel the next step() of every step-interval scheduler attached to ``optimizer``."""
        inner = _unwrap(optimizer)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if config.interval != "step" or config.reduce_on_plateau or scheduler.optimizer is not inner:
                continue
            self._patch(scheduler)
            pending = _HeldScheduler._effi_pending
            pending[scheduler] = pending.get(scheduler, 0) + 1

    @override
    def teardown(self) -> None:
        # Give the schedulers their own class and float learning rates back: nothing of this plugin outlives the run.
        for ref in self._patched_schedulers:
            scheduler = ref()
            if scheduler is not None and isinstance(scheduler, _HeldScheduler):
                hold = _HeldScheduler._effi_holds.pop(scheduler, None)
                if hold is not None:
                    hold.release()
                _HeldScheduler._effi_pending.pop(scheduler, None)
                scheduler.__class__ = type(scheduler)._effi_original_class
        self._patched_schedulers.clear()
        on_device = any(self._on_device.values())
        self._on_device.clear()
        self._applied.clear()
        self._mirror.clear()
        super().teardown()
        if on_device:  # a floor event in the last steps of a sync-free run may not have been seen yet
            self._check_floor(None, wait=True)

    # ------------------------------------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state_dict)
        self._floor_seen = int(state_dict.get("floor_events", 0))


# ------------------------------------------------------------------------------------------ MasterWeightsPrecision
_MASTER_MODES = ("fp32", "kahan")


class MasterWeightsPrecision(HalfPrecision):
    """bf16 weights for compute and storage, with the optimizer updating higher-precision master weights.

    The module is cast to bfloat16 (half the parameter memory of fp32, bf16 compute with no autocast casts: Lightning's
    ``precision="bf16-true"``), but the optimizer never updates the bf16 tensors directly: an update smaller than half
    a bf16 ulp of the weight (2**-9 relative) would be rounded away, which is why pure bf16 training drifts from fp32.
    Instead, per optimizer step: the bf16 gradients are moved (as fp32) onto master parameters that the optimizer owns,
    hooks and clipping run on those, the optimizer steps them, and the result is rounded back into the bf16 weights.

    Modes:
        ``"fp32"`` (default): persistent fp32 masters (4 extra bytes per parameter, the apex/DeepSpeed/Megatron way).
        ``"kahan"``: no persistent fp32 copy; a bf16 compensation buffer (2 extra bytes per parameter) holds the low
            bits lost when rounding the new weight to bf16 (Kahan-compensated summation, as in the optimi library).
            The master is rebuilt as ``weight + compensation`` in fp32 for the duration of the step only.

    Works with any ``torch.optim.Optimizer`` whose state is keyed by parameter (AdamW, Lamb, SGD, ...). The optimizer
    is built by ``configure_optimizers`` on the bf16 parameters as usual; the plugin swaps the masters into its
    ``param_groups`` before the first step, so optimizer state is fp32. Masters (or compensations) are saved in the
    checkpoint, so resuming is exact. Gradients are accumulated across micro-batches in bf16 (the parameters' dtype),
    as with ``precision="bf16-true"``.

    Supported strategies: single device and DDP (including spawn/fork). FSDP2 keeps fp32 sharded parameters and
    computes in bf16 through its own MixedPrecisionPolicy, and DeepSpeed keeps fp32 masters with ``bf16.enabled``:
    use those; other strategies raise at setup.

    Args:
        mode: ``"fp32"`` or ``"kahan"`` (see above).
    """

    def __init__(self, mode: Literal["fp32", "kahan"] = "fp32") -> None:
        if mode not in _MASTER_MODES:
            raise ValueError(f"Invalid mode {mode!r}: must be one of {_MASTER_MODES}")
        super().__init__("bf16-true")
        self.mode = mode
        # master parameter -> model parameter, per optimizer: list[(model_param, master)]
        self._pairs: dict[int, list[tuple[torch.nn.Parameter, torch.nn.Parameter]]] = {}
        self._comp: dict[int, Tensor] = {}  # id(master) -> bf16 compensation (kahan)
        self._master_to_model: dict[int, torch.nn.Parameter] = {}
        self._pending_state: Optional[dict[str, Any]] = None

    @override
    def convert_module(self, module: Module) -> Module:
        trainer = getattr(_lightning_module(module), "_trainer", None)
        if trainer is not None:
            self._check_strategy(trainer)
        return super().convert_module(module)

    @staticmethod
    def _check_strategy(trainer: Any) -> None:
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise RuntimeError(
                f"MasterWeightsPrecision does not support {type(strategy).__name__}: it keeps its own fp32 masters "
                f"beside replicated bf16 weights, which only single-device and DDP training have. With FSDP2 use "
                f"strategy='effi_fsdp' with precision 'bf16-mixed' (fp32 sharded parameters, bf16 compute); with "
                f"DeepSpeed use strategy='effi_deepspeed_stage_N' with precision='bf16-mixed' (DeepSpeed keeps fp32 "
                f"master partitions)."
            )

    @override
    def connect(self, model: Module, optimizers: list[Optimizer], lr_schedulers: list[Any]) -> tuple:
        for optimizer in optimizers:
            self._attach(optimizer)
        if self._pending_state is not None:  # state loaded before connect (only possible outside the Trainer)
            self.load_state_dict(self._pending_state)
        return model, optimizers, lr_schedulers

    def _attach(self, optimizer: Optimizer) -> None:
        if id(optimizer) in self._pairs:
            return
        if optimizer.state:
            raise RuntimeError(
                "MasterWeightsPrecision must attach before the optimizer's first step (its state would be bf16 and "
                "keyed by the bf16 weights); let the Trainer build the optimizer from configure_optimizers."
            )
        pairs = []
        for group in optimizer.param_groups:
            masters = []
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise RuntimeError(
                        f"MasterWeightsPrecision found a {p.dtype} parameter of shape {tuple(p.shape)} in the "
                        "optimizer; "
                        f"the module should be bf16 (it converts it in convert_module). Do not cast parameters back."
                    )
                master = torch.nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
                if self.mode == "kahan":
                    self._comp[id(master)] = torch.zeros_like(p, dtype=torch.bfloat16)
                    master.data = _empty_like(master)
                masters.append(master)
                pairs.append((p, master))
                self._master_to_model[id(master)] = p
            group["params"] = masters
        self._pairs[id(optimizer)] = pairs

    def model_param(self, master: Tensor) -> Optional[torch.nn.Parameter]:
        """The bf16 model parameter a master belongs to (None if ``master`` is not one of ours)."""
        return self._master_to_model.get(id(master))

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if isinstance(optimizer, LBFGS):
            raise RuntimeError("MasterWeightsPrecision cannot drive LBFGS (it re-evaluates the closure inside step()).")
        inner = _unwrap(optimizer)
        if id(inner) not in self._pairs:
            self._attach(inner)
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            return closure_result
        self._grads_to_masters(inner)
        self._after_closure(model, optimizer)
        step_output = inner.step(**kwargs)
        with torch.no_grad():
            for p, master in self._pairs[id(inner)]:
                p.copy_(master)  # round to nearest bf16
                if self.mode == "kahan":
                    # the low bits the rounding dropped, kept for the next step
                    self._comp[id(master)].copy_(master.sub_(p.float()))
                    master.grad = None
                    master.data = _empty_like(master)
        return step_output

    def _grads_to_masters(self, optimizer: Optimizer) -> None:
        """Move the bf16 model gradients (as fp32) onto the masters; idempotent within a step, so manual optimization
        can clip (``self.clip_gradients``) before ``opt.step()``. In "kahan" mode the masters are rebuilt first."""
        for p, master in self._pairs[id(optimizer)]:
            if self.mode == "kahan" and master.numel() == 0:
                master.data = p.detach().float().add_(self._comp[id(master)])
            if p.grad is None:
                continue  # already moved this step, or no gradient (the optimizer's zero_grad clears master grads)
            # One parameter at a time: peak extra memory is a single fp32 gradient beyond the masters' own.
            master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad)
            p.grad = None

    @override
    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: Union[int, float] = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        # Clipping acts on the optimizer's parameters, i.e. the masters: make sure their gradients are there (manual
        # optimization calls this before opt.step()).
        inner = _unwrap(optimizer)
        if clip_val > 0 and id(inner) in self._pairs:
            self._grads_to_masters(inner)
        super().clip_gradients(optimizer, clip_val=clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    @override
    def state_dict(self) -> dict[str, Any]:
        tensors = []
        for pairs in self._pairs.values():
            for _, master in pairs:
                tensors.append(self._comp[id(master)] if self.mode == "kahan" else master.detach())
        return {"mode": self.mode, "tensors": tensors} if tensors else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._pairs:
            self._pending_state = state_dict
            return
        self._pending_state = None
        if state_dict.get("mode") != self.mode:
            raise RuntimeError(
                f"Checkpoint holds MasterWeightsPrecision(mode={state_dict.get('mode')!r}) state but this run uses "
                f"mode={self.mode!r}; resume with the same mode."
            )
        own = [m for pairs in self._pairs.values() for _, m in pairs]
        saved = state_dict["tensors"]
        if len(saved) != len(own):
            raise RuntimeError(
                f"Checkpoint holds {len(saved)} master tensors but the optimizers have {len(own)} parameters; the "
                f"model or optimizer grouping changed since the checkpoint was written."
            )
        with torch.no_grad():
            for master, src in zip(own, saved):
                dst = self._comp[id(master)] if self.mode == "kahan" else master
                if dst.shape != src.shape:
                    raise RuntimeError(f"Master shape mismatch: checkpoint {tuple(src.shape)} vs {tuple(dst.shape)}")
                dst.copy_(src)


def _empty_like(t: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=t.device)
