"""Dynamic loss scaling with hysteresis, a floor and a ceiling, framework-free (torch only, no Lightning).

The surface is the one of :class:`torch.amp.GradScaler` (``scale``, ``unscale_``, ``step``, ``update``,
``get_scale``, ``state_dict``, ``load_state_dict``) so code written for it reads the same. What GradScaler lacks and
this class adds:

* **Hysteresis** (DeepSpeed / Megatron-LM semantics): an overflow always skips the step, but the scale only backs off
  once ``hysteresis`` overflows have been seen. Two counting rules are offered:

  - ``consecutive_hysteresis=False`` (default, DeepSpeed's default and Megatron-LM's only rule): the tolerance is
    refilled only when the scale grows, so the overflows that add up to a backoff need not be consecutive; any
    ``hysteresis`` overflows inside one growth window back off.
  - ``consecutive_hysteresis=True``: every clean step refills the tolerance, so only ``hysteresis`` overflows in a
    row back off. This tolerates isolated spikes indefinitely.

  Once the tolerance is spent, every further overflow backs off again until it is refilled (both rules; as in
  DeepSpeed and Megatron-LM).
* **A floor and a ceiling**: ``min_scale <= scale <= max_scale``. A backoff that is due while the scale already sits
  at the floor is reported through :attr:`overflow_at_min_scale` so the caller can stop the run or keep skipping.
* **Cross-rank agreement**: the non-finite flag is ``all_reduce(MAX)``-ed over the process group, one scalar per
  optimizer step, so every rank skips together even when only one rank's (local, sharded or not yet reduced)
  gradients overflowed. DTensor gradients (FSDP2) are checked and unscaled through their local shards.
* **Accounting**: the number of skipped steps, the number of updates, and the trackers are in ``state_dict``.

The update rule, written out once (``tol`` is the hysteresis tracker, ``g`` the growth tracker; initially
``tol = hysteresis``, ``g = 0``)::

    overflow:  step skipped; g = 0
               if tol == 1: scale = max(scale * backoff_factor, min_scale)     # backoff due
               else:        tol -= 1                                          # tolerated
    clean:     step taken;  g += 1
               if consecutive_hysteresis: tol = hysteresis
               if g == growth_interval: scale = min(scale * growth_factor, max_scale); g = 0; tol = hysteresis

Peers, checked number by number in the tests: with ``hysteresis=1`` this is torch's GradScaler rule exactly;
backoff and hysteresis (both counting rules) are DeepSpeed 0.19's exactly. Growth follows torch and Megatron-LM (after
``growth_interval`` clean steps); DeepSpeed counts its window from the step after an overflow (or the start), so its
first growth comes one clean step later.

Cost: one fused non-finite-check-and-unscale kernel per (device, dtype) group of gradients, one scalar all_reduce when
distributed, and one host sync per optimizer step (to decide whether to call ``optimizer.step``; GradScaler does the
same). No per-tensor host sync.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["DynamicLossScaler"]

_STATE_KEYS = ("scale", "growth_tracker", "hysteresis_tracker", "skipped_steps", "num_updates")


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage, so in-place unscaling reaches the DTensor)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class DynamicLossScaler:
    """Dynamic loss scaler with hysteresis, floor, ceiling and cross-rank overflow agreement.

    Args:
        init_scale: initial scale (default ``2**16``); must lie in ``[min_scale, max_scale]``.
        growth_factor: multiplier applied after ``growth_interval`` clean steps in a row (default 2.0), > 1.
        backoff_factor: multiplier applied on a backoff (default 0.5), in (0, 1).
        growth_interval: clean steps in a row before the scale grows (default 1000), >= 1.
        hysteresis: overflows needed before the scale backs off (default 2), >= 1; 1 = back off on every overflow
            (torch GradScaler's behaviour).
        min_scale: floor of the scale (default 1.0), > 0.
        max_scale: ceiling of the scale (default ``2**24``), >= ``min_scale``.
        consecutive_hysteresis: if True, a clean step refills the hysteresis tolerance, so only consecutive
            overflows count; if False (default) it is refilled only when the scale grows (see module docstring).
        process_group: group over which the overflow flag is agreed on (``None``: the default world group).
        sync_across_ranks: if True (default) and torch.distributed is initialized with more than one rank in the
            group, the overflow flag is all_reduce(MAX)-ed so all ranks skip together.
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
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            hysteresis=hysteresis,
            min_scale=min_scale,
            max_scale=max_scale,
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

        self._scale = self.init_scale
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis
        self._skipped_steps = 0
        self._num_updates = 0
        #: True when the last :meth:`update` saw an overflow, a backoff was due and the scale was already at the floor.
        self.overflow_at_min_scale = False
        #: True when the last :meth:`update` followed a skipped step.
        self.last_step_skipped = False
        # per-optimizer state between unscale_/step and update: {"found_inf": Tensor, "unscaled": bool, "found": bool}
        self._per_optimizer: dict[int, dict[str, Any]] = {}

    # ----------------------------------------------------------------------------------------------- the GradScaler API
    def scale(self, outputs: Tensor) -> Tensor:
        """Multiply a loss (a tensor) by the current scale; the product keeps the autograd graph."""
        if not isinstance(outputs, Tensor):
            raise TypeError(f"DynamicLossScaler.scale expects a Tensor, got {type(outputs).__name__}")
        return outputs * self._scale

    def is_unscaled(self, optimizer: Optimizer) -> bool:
        """Whether :meth:`unscale_` already ran for ``optimizer`` since the last :meth:`update`."""
        state = self._per_optimizer.get(id(optimizer))
        return bool(state and state["unscaled"])

    def unscale_(self, optimizer: Optimizer) -> Tensor:
        """Divide ``optimizer``'s gradients by the scale in place and record whether any is non-finite.

        One fused check-and-unscale per (device, dtype) group; DTensor gradients through their local shards. When
        distributed, the flag is all_reduce(MAX)-ed over the group (one scalar), so every rank holds the same flag.
        Returns the flag (a float32 device tensor, 1.0 = overflow); no host sync here.

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
                    # Sparse gradients may hold duplicate indices whose sum can overflow: coalesce first (as torch does).
                    if g.dtype == torch.float16:
                        g = g.coalesce()
                        p.grad = g
                    g = g._values()
                groups[(g.device, g.dtype)].append(g)
                device = device or g.device
        if device is None:
            device = _first_param_device(optimizer)
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        per_device: dict[torch.device, tuple[Tensor, Tensor]] = {}
        for (dev, _), grads in groups.items():
            if dev not in per_device:
                per_device[dev] = (
                    torch.zeros(1, dtype=torch.float32, device=dev),
                    torch.full((1,), 1.0 / self._scale, dtype=torch.float32, device=dev),
                )
            dev_found, inv_scale = per_device[dev]
            if dev.type == "cuda" and grads[0].dtype == torch.bfloat16:
                # torch's fused CUDA kernel has no bf16 instantiation (bf16 grads appear with bf16-true/master-weight
                # models); the same check in two foreach launches, still with no host sync. A NaN makes the max-norm
                # NaN, so the isfinite test catches it as well as an inf.
                norms = torch._foreach_norm(grads, float("inf"))
                dev_found.copy_(torch.maximum(dev_found, (~torch.stack(norms).isfinite()).any().float().view(1)))
                torch._foreach_mul_(grads, inv_scale.to(torch.bfloat16).reshape(()))
            else:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, dev_found, inv_scale)
        for dev_found, _ in per_device.values():
            found_inf = torch.maximum(found_inf, dev_found.to(device, non_blocking=True))
        if self._should_sync():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.process_group)
        self._per_optimizer[id(optimizer)] = {"found_inf": found_inf, "unscaled": True, "found": None}
        return found_inf

    def step(self, optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (if not done yet) and call ``optimizer.step(*args, **kwargs)`` unless a gradient is non-finite.

        Returns what ``optimizer.step`` returns, or None when the step is skipped. This is the one host sync per step.
        """
        if "closure" in kwargs or args:
            raise RuntimeError(
                "DynamicLossScaler.step does not support closures: the closure would run after the overflow check. "
                "Run forward/backward first, then call step(optimizer)."
            )
        if not self.is_unscaled(optimizer):
            self.unscale_(optimizer)
        state = self._per_optimizer[id(optimizer)]
        found = bool(state["found_inf"].item())
        state["found"] = found
        if found:
            self._skipped_steps += 1
            return None
        return optimizer.step(**kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """Apply the growth/backoff/hysteresis rule once for this iteration and clear the per-optimizer flags.

        Args:
            new_scale: if given, set the scale to this value instead (trackers untouched), as GradScaler allows.

        Raises:
            RuntimeError: if no :meth:`step` ran since the last update.
        """
        stepped = [s for s in self._per_optimizer.values() if s["found"] is not None]
        if not stepped:
            raise RuntimeError("update() called with no step(optimizer) since the last update(): nothing to update.")
        found_inf = any(s["found"] for s in stepped)
        self._per_optimizer.clear()
        self._num_updates += 1
        self.last_step_skipped = found_inf
        if new_scale is not None:
            if not (math.isfinite(new_scale) and new_scale > 0):
                raise ValueError(f"Invalid new_scale {new_scale!r}: must be a finite float > 0")
            self._scale = float(new_scale)
            self.overflow_at_min_scale = False
            return
        self.overflow_at_min_scale = self._apply_rule(found_inf)

    def _apply_rule(self, found_inf: bool) -> bool:
        """The scale policy (overridable). Returns True if a backoff was due with the scale already at the floor."""
        at_floor = False
        if found_inf:
            self._growth_tracker = 0
            if self._hysteresis_tracker <= 1:
                at_floor = self._scale <= self.min_scale
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            else:
                self._hysteresis_tracker -= 1
        else:
            self._growth_tracker += 1
            if self.consecutive_hysteresis:
                self._hysteresis_tracker = self.hysteresis
            if self._growth_tracker >= self.growth_interval:
                self._scale = min(self._scale * self.growth_factor, self.max_scale)
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
        return at_floor

    def get_scale(self) -> float:
        """The current scale (a Python float; no sync)."""
        return self._scale

    @property
    def growth_tracker(self) -> int:
        """Clean steps in a row since the last overflow or growth."""
        return self._growth_tracker

    @property
    def hysteresis_tracker(self) -> int:
        """Overflows still tolerated before a backoff, counting the one that backs off (1 = next overflow backs off)."""
        return self._hysteresis_tracker

    @property
    def skipped_steps(self) -> int:
        """Total optimizer steps skipped because of non-finite gradients."""
        return self._skipped_steps

    @property
    def num_updates(self) -> int:
        """Number of :meth:`update` calls (optimizer steps, taken or skipped)."""
        return self._num_updates

    def found_inf(self, optimizer: Optimizer) -> Tensor | None:
        """The device flag recorded by :meth:`unscale_` for ``optimizer`` since the last update (None if none)."""
        state = self._per_optimizer.get(id(optimizer))
        return None if state is None else state["found_inf"]

    # -------------------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Scale, trackers and counters (plain Python values), plus the knobs for inspection."""
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
            "skipped_steps": self._skipped_steps,
            "num_updates": self._num_updates,
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
        self._scale = scale
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._hysteresis_tracker = int(state_dict["hysteresis_tracker"])
        self._skipped_steps = int(state_dict["skipped_steps"])
        self._num_updates = int(state_dict["num_updates"])
        self._per_optimizer.clear()

    def _should_sync(self) -> bool:
        if not (self.sync_across_ranks and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group) > 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scale={self._scale}, growth_tracker={self._growth_tracker}, "
            f"hysteresis_tracker={self._hysteresis_tracker}, skipped_steps={self._skipped_steps})"
        )


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
        raise ValueError(f"Invalid growth_factor {growth_factor!r}: must be > 1 (use a huge growth_interval to never grow)")
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
