"""Dynamic loss scaling with hysteresis, a floor and a ceiling, framework-free (torch only, no Lightning).

The surface is the one of :class:`torch.amp.GradScaler` (``scale``, ``unscale_``, ``step``, ``update``,
``get_scale``, ``state_dict``, ``load_state_dict``) so code written for it reads the same. What GradScaler lacks and
this class adds:

* **Hysteresis** (DeepSpeed / Megatron-LM semantics): an overflow always skips the step, but the scale only backs off
  once ``hysteresis`` overflows have been seen. ``consecutive_hysteresis=False`` (default, DeepSpeed's default and
  Megatron-LM's only rule) refills the tolerance only when the scale grows; ``True`` refills it on every clean step,
  so only ``hysteresis`` overflows in a row back off. Once spent, every further overflow backs off until refilled.
* **A floor and a ceiling**: ``min_scale <= scale <= max_scale``; a backoff due with the scale at the floor is
  counted as a *floor event* (:attr:`floor_events`, the update index in :attr:`first_floor_update`) so the caller can
  stop the run or keep skipping.
* **Cross-rank agreement**: the non-finite flag is ``all_reduce(MAX)``-ed over the process group, one scalar per
  optimizer step, so every rank skips together; DTensor gradients (FSDP2) are checked through their local shards.
* **No host synchronisation**: the scale, trackers and counters live in one float64 device tensor and the rule runs
  there (``torch.where`` on 0-dim tensors). An optimizer that takes ``found_inf`` (torch's fused Adam/AdamW/SGD,
  ``lightning_effi.optim.Lamb``: they set ``_step_supports_amp_scaling``) is always stepped and skips inside its
  kernel; any other optimizer costs one host read of the flag per step to decide whether to call ``step``.

The rule, written out once (``tol`` is the hysteresis tracker, ``g`` the growth tracker; initially
``tol = hysteresis``, ``g = 0``)::

    overflow:  step skipped; g = 0
               if tol <= 1: scale = max(scale * backoff_factor, min_scale)    # backoff due (a floor event if the
               else:        tol -= 1                                          # scale was already at min_scale)
    clean:     step taken;  g += 1
               if consecutive_hysteresis: tol = hysteresis
               if g == growth_interval: scale = min(scale * growth_factor, max_scale); g = 0; tol = hysteresis

With ``hysteresis=1`` this is torch's GradScaler rule; backoff and hysteresis are DeepSpeed 0.19's (its first growth
comes one clean step later than here, torch's and Megatron-LM's). Reading a value on the host (:meth:`get_scale`,
the tracker properties, :meth:`state_dict`) waits for the device: do it on logging steps and checkpoints.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_effi import _compat

__all__ = ["DynamicLossScaler", "validate_scaler_knobs"]

_STATE_KEYS = ("scale", "growth_tracker", "hysteresis_tracker", "skipped_steps", "num_updates")
# Layout of the device state vector (float64; counts are exact integers below 2**53).
SCALE, GROWTH, TOL, SKIPPED, FLOOR_EVENTS, FIRST_FLOOR, LAST_FLOOR, LAST_FOUND, UPDATES = range(9)
_STATE_LEN = 9


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage, so in-place unscaling reaches the DTensor)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def masks_step(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` skips an overflowing step itself when given ``optimizer.found_inf``.

    torch's protocol (``GradScaler.step``): optimizers that set ``_step_supports_amp_scaling`` read the
    ``grad_scale``/``found_inf`` attributes, unless their ``step`` still takes the deprecated ``grad_scaler`` keyword.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    try:
        return "grad_scaler" not in inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):  # pragma: no cover - a step without a signature
        return False


def _to_device(values: list[float], device: torch.device) -> Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DynamicLossScaler:
    """Dynamic loss scaler with hysteresis, floor, ceiling and cross-rank overflow agreement, kept on the device.

    Args:
        init_scale: initial scale (default ``2**16``); must lie in ``[min_scale, max_scale]``.
        growth_factor: multiplier applied after ``growth_interval`` clean steps in a row (default 2.0), > 1.
        backoff_factor: multiplier applied on a backoff (default 0.5), in (0, 1).
        growth_interval: clean steps in a row before the scale grows (default 1000), >= 1.
        hysteresis: overflows needed before the scale backs off (default 2), >= 1; 1 = torch GradScaler's rule.
        min_scale: floor of the scale (default 1.0), > 0.
        max_scale: ceiling of the scale (default ``2**24``), >= ``min_scale``.
        consecutive_hysteresis: refill the tolerance on every clean step (default False: only on growth).
        process_group: group over which the overflow flag is agreed on (``None``: the default world group).
        sync_across_ranks: all_reduce(MAX) the overflow flag when distributed (default True).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        consecutive_hysteresis: bool = False,
        *,
        process_group: Any = None,
        sync_across_ranks: bool = True,
    ) -> None:
        validate_scaler_knobs(
            init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
            growth_interval=growth_interval, hysteresis=hysteresis, min_scale=min_scale, max_scale=max_scale,
            consecutive_hysteresis=consecutive_hysteresis,
        )
        self.init_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.process_group = process_group
        self.sync_across_ranks = bool(sync_across_ranks)
        self._host_init = self._initial_values()
        self._state: Tensor | None = None  # created on the first device that asks
        self._scale_cast: dict[torch.dtype, Tensor] = {}
        self._num_updates = 0
        # The last update's flag as a host bool when the step was decided on the host (no read needed), else None.
        self._last_found_host: bool | None = False
        # per-optimizer state between unscale_/step and update: {"found_inf": Tensor, "unscaled": bool, "found": ...}
        self._per_optimizer: dict[int, dict[str, Any]] = {}
        self._masks_cache: dict[int, bool] = {}

    def _initial_values(self) -> list[float]:
        v = [0.0] * _STATE_LEN
        v[SCALE], v[TOL], v[FIRST_FLOOR], v[LAST_FLOOR] = self.init_scale, float(self.hysteresis), -1.0, -1.0
        return v

    # ------------------------------------------------------------------------------------------------ device state
    def _ensure(self, device: torch.device) -> Tensor:
        if self._state is None:
            self._state = _to_device(self._host_init, device)
        elif self._state.device != device:
            self._state = self._state.to(device)
            self._scale_cast.clear()
        return self._state

    @property
    def state_tensor(self) -> Tensor | None:
        """The device state vector (scale, trackers, counters; see the ``SCALE``... indices), None before first use.
        Copy it to the host without blocking (``lightning_effi._host.HostMirror``) to watch the scaler sync-free."""
        return self._state

    def _read(self) -> list[float]:
        """Host copy of the state (waits for the device)."""
        return self._host_init if self._state is None else self._state.tolist()

    # ----------------------------------------------------------------------------------------------- GradScaler API
    def scale(self, outputs: Tensor) -> Tensor:
        """Multiply a loss (a tensor) by the current scale (a device tensor; no host sync); keeps the graph."""
        if not isinstance(outputs, Tensor):
            raise TypeError(f"DynamicLossScaler.scale expects a Tensor, got {type(outputs).__name__}")
        state = self._ensure(outputs.device)
        scale = self._scale_cast.get(outputs.dtype)
        if scale is None:
            # Rounded to the loss dtype, as multiplying by a Python float would be.
            scale = self._scale_cast[outputs.dtype] = state[SCALE].to(outputs.dtype)
        return outputs * scale

    def is_unscaled(self, optimizer: Optimizer) -> bool:
        """Whether :meth:`unscale_` already ran for ``optimizer`` since the last :meth:`update`."""
        state = self._per_optimizer.get(id(optimizer))
        return bool(state and state["unscaled"])

    def unscale_(self, optimizer: Optimizer) -> Tensor:
        """Divide ``optimizer``'s gradients by the scale in place and record whether any is non-finite.

        One fused check-and-unscale per (device, dtype) group; DTensor gradients through their local shards. When
        distributed, the flag is all_reduce(MAX)-ed over the group (one scalar). Returns the flag (a 0-dim float32
        device tensor, 1.0 = overflow); no host sync.

        Raises:
            RuntimeError: if called twice for the same optimizer before :meth:`update`.
        """
        if self.is_unscaled(optimizer):
            raise RuntimeError(
                "unscale_() was already called on this optimizer since the last update(); gradients would be divided "
                "by the scale twice. Call it once per optimizer step (DynamicLossScaler.is_unscaled tells)."
            )
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        device = None
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = _local(p.grad)
                if g.is_sparse:
                    # Sparse gradients may hold duplicate indices whose sum can overflow: coalesce first (as torch
                    # does).
                    if g.dtype == torch.float16:
                        g = g.coalesce()
                        p.grad = g
                    g = g._values()
                groups[(g.device, g.dtype)].append(g)
                device = device or g.device
        if device is None:
            device = _first_param_device(optimizer)
        state = self._ensure(device)
        inv = state[SCALE].reciprocal().to(torch.float32)
        found_inf = torch.zeros((), dtype=torch.float32, device=device)
        per_device: dict[torch.device, tuple[Tensor, Tensor]] = {}
        for (dev, _), grads in groups.items():
            if dev not in per_device:
                per_device[dev] = (torch.zeros((), dtype=torch.float32, device=dev), inv.to(dev, non_blocking=True))
            dev_found, inv_scale = per_device[dev]
            if dev.type == "cuda" and grads[0].dtype == torch.bfloat16:
                # torch's fused CUDA kernel has no bf16 instantiation (bf16 grads appear with bf16-true/master-weight
                # models); the same check in two foreach launches. A NaN makes the max-norm NaN, which isfinite sees.
                # an empty local shard (uneven FSDP sharding) has no inf-norm, and nothing to check
                norms = torch._foreach_norm([g for g in grads if g.numel()] or [dev_found], float("inf"))
                dev_found.copy_(torch.maximum(dev_found, (~torch.stack(norms).isfinite()).any().float()))
                torch._foreach_mul_(grads, inv_scale.to(torch.bfloat16))
            else:
                _compat.non_finite_check_and_unscale_(grads, dev_found, inv_scale)
        for dev_found, _ in per_device.values():
            found_inf = torch.maximum(found_inf, dev_found.to(device, non_blocking=True))
        if self._should_sync():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.process_group)
        self._per_optimizer[id(optimizer)] = {"found_inf": found_inf, "unscaled": True, "found": None}
        return found_inf

    def masks_step(self, optimizer: Optimizer) -> bool:
        """Whether :meth:`step` hands ``found_inf`` to ``optimizer`` (no host sync) instead of deciding on the host."""
        key = id(optimizer)
        hit = self._masks_cache.get(key)
        if hit is None:
            hit = self._masks_cache[key] = masks_step(optimizer)
        return hit

    def step(self, optimizer: Optimizer, *args: Any, on_device: bool | None = None, **kwargs: Any) -> Any:
        """Unscale (if not done yet) and step ``optimizer`` unless a gradient is non-finite.

        An optimizer that takes ``found_inf`` (:func:`masks_step`) is always called and skips inside its kernel: no
        host sync. Any other optimizer is called only when the flag, read on the host (one sync), is clear. Returns
        what ``optimizer.step`` returns, or None when the step was skipped on the host.

        Args:
            on_device: force the choice (``False``: decide on the host even if the optimizer could skip itself);
                None (default): :meth:`masks_step`.
        """
        if "closure" in kwargs or args:
            raise RuntimeError(
                "DynamicLossScaler.step does not support closures: the closure would run after the overflow check. "
                "Run forward/backward first, then call step(optimizer)."
            )
        if not self.is_unscaled(optimizer):
            self.unscale_(optimizer)
        state = self._per_optimizer[id(optimizer)]
        found_inf = state["found_inf"]
        if on_device is None:
            on_device = self.masks_step(optimizer)
        elif on_device and not self.masks_step(optimizer):
            raise RuntimeError(f"{type(optimizer).__name__} does not take found_inf; it cannot skip on the device")
        if on_device:
            # GradScaler's protocol; gradients are already unscaled, so grad_scale stays None.
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            optimizer.found_inf = found_inf  # type: ignore[attr-defined]
            try:
                out = optimizer.step(**kwargs)
            finally:
                del optimizer.grad_scale  # type: ignore[attr-defined]
                del optimizer.found_inf  # type: ignore[attr-defined]
            state["found"] = found_inf
            return out
        found = bool(found_inf.item())  # the one host sync of an optimizer that cannot skip by itself
        state["found"] = found
        return None if found else optimizer.step(**kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """Apply the growth/backoff/hysteresis rule once for this iteration, on the device.

        Args:
            new_scale: if given, set the scale to this value instead (trackers untouched), as GradScaler allows.

        Raises:
            RuntimeError: if no :meth:`step` ran since the last update.
        """
        stepped = [s for s in self._per_optimizer.values() if s["found"] is not None]
        if not stepped:
            raise RuntimeError("update() called with no step(optimizer) since the last update(): nothing to update.")
        host = [s["found"] for s in stepped if isinstance(s["found"], bool)]
        dev = [s["found"] for s in stepped if not isinstance(s["found"], bool)]
        self._last_found_host = any(host) if not dev else None
        state = self._state
        assert state is not None  # unscale_ created it
        if dev:
            found = torch.stack([d.to(state.device) for d in dev]).amax() > 0
            if host and any(host):
                found = torch.ones_like(found)
        else:
            found = torch.full((), any(host), dtype=torch.bool, device=state.device)
        self._per_optimizer.clear()
        self._num_updates += 1
        if new_scale is not None:
            if not (math.isfinite(new_scale) and new_scale > 0):
                raise ValueError(f"Invalid new_scale {new_scale!r}: must be a finite float > 0")
            new = state.clone()
            new[SCALE] = float(new_scale)
            new[LAST_FOUND] = found.to(torch.float64)
            new[UPDATES] += 1
            self._state = new
        else:
            self._state = self._apply_rule(state, found)
        self._scale_cast.clear()

    def _apply_rule(self, state: Tensor, found: Tensor) -> Tensor:
        """The scale policy on device tensors (overridable): returns the next state vector."""
        knobs = (self.backoff_factor, self.growth_factor, self.growth_interval, float(self.hysteresis),
                 self.min_scale, self.max_scale, self.consecutive_hysteresis)
        rule = _compiled_rule() if state.is_cuda else _rule
        return rule(state, found, *knobs)

    # -------------------------------------------------------------------------------- host reads (they wait)
    def get_scale(self) -> float:
        """The current scale as a Python float (reads the device: a sync)."""
        return float(self._read()[SCALE])

    def get_scale_tensor(self) -> Tensor | None:
        """The current scale as a 0-dim float64 device tensor (no sync), None before first use."""
        return None if self._state is None else self._state[SCALE]

    @property
    def growth_tracker(self) -> int:
        """Clean steps in a row since the last overflow or growth (a sync)."""
        return int(self._read()[GROWTH])

    @property
    def hysteresis_tracker(self) -> int:
        """Overflows still tolerated before a backoff, counting the one that backs off (a sync)."""
        return int(self._read()[TOL])

    @property
    def skipped_steps(self) -> int:
        """Total optimizer steps skipped because of non-finite gradients (a sync)."""
        return int(self._read()[SKIPPED])

    @property
    def floor_events(self) -> int:
        """Backoffs that were due with the scale already at ``min_scale`` (a sync)."""
        return int(self._read()[FLOOR_EVENTS])

    @property
    def first_floor_update(self) -> int:
        """0-based index of the update with the first floor event, -1 if none (a sync)."""
        return int(self._read()[FIRST_FLOOR])

    @property
    def overflow_at_min_scale(self) -> bool:
        """True when the last :meth:`update` was a floor event (a sync)."""
        s = self._read()
        return s[FLOOR_EVENTS] > 0 and int(s[LAST_FLOOR]) == int(s[UPDATES]) - 1

    @property
    def last_step_skipped(self) -> bool:
        """True when the last :meth:`update` followed a skipped step (a sync unless the step was decided on the
        host, for an optimizer that does not take ``found_inf``)."""
        if self._last_found_host is not None:
            return self._last_found_host
        return bool(self._read()[LAST_FOUND])

    @property
    def host_known_skip(self) -> bool | None:
        """Whether the last update followed a skipped step, when the host knows it without a read (the step was
        decided on the host); None when only the device knows."""
        return self._last_found_host

    @property
    def num_updates(self) -> int:
        """Number of :meth:`update` calls (optimizer steps, taken or skipped); a host count."""
        return self._num_updates

    def found_inf(self, optimizer: Optimizer) -> Tensor | None:
        """The device flag recorded by :meth:`unscale_` for ``optimizer`` since the last update (None if none)."""
        state = self._per_optimizer.get(id(optimizer))
        return None if state is None else state["found_inf"]

    # -------------------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Scale, trackers and counters (plain Python values; a sync), plus the knobs for inspection."""
        s = self._read()
        return {
            "scale": s[SCALE],
            "growth_tracker": int(s[GROWTH]),
            "hysteresis_tracker": int(s[TOL]),
            "skipped_steps": int(s[SKIPPED]),
            "num_updates": self._num_updates,
            "floor_events": int(s[FLOOR_EVENTS]),
            "first_floor_update": int(s[FIRST_FLOOR]),
            "last_floor_update": int(s[LAST_FLOOR]),
            "last_step_skipped": bool(s[LAST_FOUND]),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "hysteresis": self.hysteresis,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "consecutive_hysteresis": self.consecutive_hysteresis,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore scale, trackers and counters exactly. The knobs stay those given to the constructor (so a run can
        be resumed with, e.g., a different growth_interval); they are stored only for inspection."""
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise KeyError(
                f"DynamicLossScaler state_dict is missing {missing}; it must come from DynamicLossScaler.state_dict() "
                f"(a torch GradScaler state has different keys)."
            )
        scale = float(state_dict["scale"])
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"Invalid scale {scale!r} in state_dict: must be a finite float > 0")
        v = [0.0] * _STATE_LEN
        v[SCALE] = scale
        v[GROWTH] = float(state_dict["growth_tracker"])
        v[TOL] = float(state_dict["hysteresis_tracker"])
        v[SKIPPED] = float(state_dict["skipped_steps"])
        v[FLOOR_EVENTS] = float(state_dict.get("floor_events", 0))
        v[FIRST_FLOOR] = float(state_dict.get("first_floor_update", -1))
        v[LAST_FLOOR] = float(state_dict.get("last_floor_update", -1))
        v[LAST_FOUND] = float(bool(state_dict.get("last_step_skipped", False)))
        self._num_updates = int(state_dict["num_updates"])
        v[UPDATES] = float(self._num_updates)
        self._host_init = v
        self._last_found_host = bool(v[LAST_FOUND])
        self._state = None if self._state is None else _to_device(v, self._state.device)
        self._scale_cast.clear()
        self._per_optimizer.clear()

    def _should_sync(self) -> bool:
        if not (self.sync_across_ranks and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group) > 1

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(init_scale={self.init_scale}, hysteresis={self.hysteresis}, "
                f"growth_interval={self.growth_interval}, min_scale={self.min_scale}, max_scale={self.max_scale})")


def _rule(state: Tensor, found: Tensor, backoff_factor: float, growth_factor: float, growth_interval: int,
          hysteresis: float, min_scale: float, max_scale: float, consecutive: bool) -> Tensor:
    """One update of the state vector (see the module docstring); 0-dim tensor ops only."""
    scale, g, tol = state[SCALE], state[GROWTH], state[TOL]
    backoff = found & (tol <= 1)
    at_floor = backoff & (scale <= min_scale)
    new_scale = torch.where(backoff, torch.clamp(scale * backoff_factor, min=min_scale), scale)
    new_tol = torch.where(found & ~backoff, tol - 1, tol)
    new_g = torch.where(found, torch.zeros_like(g), g + 1)
    if consecutive:
        new_tol = torch.where(found, new_tol, torch.full_like(tol, hysteresis))
    grow = ~found & (new_g >= growth_interval)
    new_scale = torch.where(grow, torch.clamp(new_scale * growth_factor, max=max_scale), new_scale)
    new_g = torch.where(grow, torch.zeros_like(new_g), new_g)
    new_tol = torch.where(grow, torch.full_like(tol, hysteresis), new_tol)
    updates = state[UPDATES]
    first = state[FIRST_FLOOR]
    return torch.stack([
        new_scale, new_g, new_tol, state[SKIPPED] + found, state[FLOOR_EVENTS] + at_floor,
        torch.where(at_floor & (first < 0), updates, first), torch.where(at_floor, updates, state[LAST_FLOOR]),
        found.to(torch.float64), updates + 1,
    ])


@functools.lru_cache(maxsize=None)
def _compiled_rule():
    """The rule as one fused GPU kernel (about twenty launches of 0-dim ops otherwise), where inductor generates
    Triton kernels; the eager rule elsewhere. The same float64 arithmetic either way."""
    return torch.compile(_rule, fullgraph=True, dynamic=False) if _compat.has_triton() else _rule


def _first_param_device(optimizer: Optimizer) -> torch.device:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return _local(p).device
    return torch.device("cpu")


def validate_scaler_knobs(
    *,
    init_scale: float,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    hysteresis: int,
    min_scale: float,
    max_scale: float,
    consecutive_hysteresis: bool,
) -> None:
    """Check the scaler knobs; shared with the Lightning plugin so both raise the same messages before training."""

    def _finite_pos(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"Invalid {name} {v!r}: must be a finite number > 0")

    def _int_ge1(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"Invalid {name} {v!r}: must be an int >= 1")

    for name, v in (("init_scale", init_scale), ("min_scale", min_scale), ("max_scale", max_scale)):
        _finite_pos(name, v)
    _finite_pos("growth_factor", growth_factor)
    if growth_factor <= 1:
        raise ValueError(
            f"Invalid growth_factor {growth_factor!r}: must be > 1 (use a huge growth_interval to never grow)")
    _finite_pos("backoff_factor", backoff_factor)
    if backoff_factor >= 1:
        raise ValueError(f"Invalid backoff_factor {backoff_factor!r}: must be in (0, 1)")
    _int_ge1("growth_interval", growth_interval)
    _int_ge1("hysteresis", hysteresis)
    if max_scale < min_scale:
        raise ValueError(f"Invalid max_scale {max_scale!r}: must be >= min_scale ({min_scale!r})")
    if not (min_scale <= init_scale <= max_scale):
        raise ValueError(
            f"Invalid init_scale {init_scale!r}: must lie in [min_scale, max_scale] = [{min_scale!r}, {max_scale!r}]"
        )
    if not isinstance(consecutive_hysteresis, bool):
        raise TypeError(f"Invalid consecutive_hysteresis {consecutive_hysteresis!r}: must be a bool")
