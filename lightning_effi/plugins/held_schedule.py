"""Holding a step-interval LR schedule on skipped optimizer steps without reading the skip flag on the host.

With a loss scaler whose optimizer skips overflowing steps inside its kernel (``found_inf``), the host never learns
which steps were skipped, yet the schedule position must count applied steps only. :class:`HeldSchedule` keeps the
position on the device and makes the learning rate a device tensor looked up from a table:

* a *shadow* of the scheduler (same class and state, bound to a stand-in optimizer that holds only the param
  groups' hyperparameters) is stepped on the host, ahead of need, and its learning rates for positions 0, 1, 2, ...
  fill a device table (one pinned, non-blocking copy per block of positions);
* per optimizer step the device counts pending skips (``pending += found_inf``); per scheduler call one pending skip
  is consumed instead of advancing (``position += 1 - cancel``), the rule the host-side hold applies, and the
  param groups' learning rates (views of one device buffer) are set to ``table[position]``;
* the real scheduler's host state is brought to the held position only where a host value is needed
  (:meth:`state_dict`, :meth:`release`), from state snapshots the shadow took at every position.

Because the shadow runs torch's own ``step()``, the table holds exactly the values the host-side hold would give, for
any scheduler whose learning rates depend only on how often it was stepped (LambdaLR, LinearLR, CosineAnnealingLR,
SequentialLR, OneCycleLR's learning rate, ...). A scheduler that also changes other hyperparameters (momentum
cycling) cannot be held this way: :func:`can_hold` says so.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from lightning_effi._host import HostMirror

__all__ = ["HeldSchedule", "can_hold"]

# Positions computed ahead per extension of the table (one host-to-device copy each).
_LOOKAHEAD = 64


class _StandIn:
    """What a torch scheduler needs of its optimizer: param groups (hyperparameters only) and a wrapped ``step``."""

    def __init__(self, groups: list[dict]) -> None:
        self.param_groups = []
        for g in groups:
            d = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            d["params"] = []
            if isinstance(d.get("lr"), Tensor):
                d["lr"] = float(d["lr"])
            self.param_groups.append(d)
        self._opt_called = True

    def step(self) -> None:  # pragma: no cover - never called; schedulers only inspect it
        pass

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


def _shadow(scheduler: Any, stand_in: _StandIn, cls: type) -> Any:
    """A copy of ``scheduler`` bound to ``stand_in`` (nested schedulers too); shared callables, copied containers."""
    c: Any = object.__new__(cls)
    d: dict[str, Any] = {}
    for k, v in vars(scheduler).items():
        if k == "optimizer":
            d[k] = stand_in
        elif k == "_schedulers":
            d[k] = [_shadow(s, stand_in, getattr(type(s), "_effi_original_class", type(s))) for s in v]
        elif k == "lr_lambdas":
            d[k] = list(v)
        elif isinstance(v, (list, dict, tuple)):
            d[k] = copy.deepcopy(v)
        else:
            d[k] = v
    c.__dict__.update(d)
    return c


def can_hold(scheduler: Any) -> str | None:
    """None if :class:`HeldSchedule` can hold ``scheduler``, else why not (a sentence)."""
    if getattr(scheduler, "cycle_momentum", False):
        return (f"{type(scheduler).__name__}(cycle_momentum=True) also changes the optimizer's momentum, which a "
                "learning-rate table cannot carry")
    if not hasattr(scheduler, "optimizer") or not hasattr(scheduler, "state_dict"):
        return f"{type(scheduler).__name__} is not a torch LRScheduler"
    return None


class HeldSchedule:
    """Device-side position and learning rates of one step-interval scheduler (see the module docstring).

    Args:
        scheduler: the scheduler; its optimizer's param groups get 0-dim device tensor learning rates.
        device: where the learning rates live (the parameters' device).
        lr_dtype: dtype of the learning-rate tensors (torch's fused CUDA kernels read float32).
    """

    def __init__(self, scheduler: Any, device: torch.device, lr_dtype: torch.dtype = torch.float32) -> None:
        reason = can_hold(scheduler)
        if reason is not None:
            raise RuntimeError(reason)
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.optimizer = scheduler.optimizer
        self._cls = getattr(type(scheduler), "_effi_original_class", type(scheduler))
        groups = self.optimizer.param_groups
        self._stand_in = _StandIn(groups)
        self._shadow = _shadow(scheduler, self._stand_in, self._cls)
        n = len(groups)
        # Positions [_base, _base + len(_host_lrs)) are in the tables; position 0 is the state now (the value the
        # optimizer steps with next). Entries below the position last seen on the host are dropped.
        self._base = 0
        self._host_lrs: list[list[float]] = [[float(g["lr"]) for g in self._stand_in.param_groups]]
        self._snapshots: dict[int, dict] = {0: copy.deepcopy(self._cls.state_dict(scheduler))}
        self._end: int | None = None  # first position the shadow could not reach
        self._error: BaseException | None = None
        self._table = torch.empty(0, n, dtype=torch.float64, device=self.device)
        self._calls = 0
        # [pending skips, position], float64 on the device
        self._ctr = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._mirror = HostMirror(slots=4)
        self._known_pos = 0
        self._lr = torch.empty(n, dtype=lr_dtype, device=self.device)
        self._extend(1 + _LOOKAHEAD)
        self._lr.copy_(self._table[0])
        for k, g in enumerate(groups):
            g["lr"] = self._lr[k]
        # Checkpoints keep float learning rates, the type a fresh optimizer has when the state is loaded back (a
        # torch.distributed.checkpoint load refuses a tensor where the fresh optimizer has a float).
        self._state_dict_hook = self.optimizer.register_state_dict_post_hook(_float_lrs)

    # ------------------------------------------------------------------------------------------------ table
    def _filled(self) -> int:
        """One past the last position computed."""
        return self._base + len(self._host_lrs)

    def _extend(self, upto: int) -> None:
        """Step the shadow until positions below ``upto`` are in the device table (or it fails)."""
        start = self._table.shape[0]
        while self._filled() < upto and self._end is None:
            try:
                self._shadow.step()
            except Exception as e:  # noqa: BLE001 - e.g. OneCycleLR past total_steps: raised if ever needed
                self._end, self._error = self._filled(), e
                break
            self._host_lrs.append([float(g["lr"]) for g in self._stand_in.param_groups])
            self._snapshots[self._filled() - 1] = copy.deepcopy(self._shadow.state_dict())
        if len(self._host_lrs) <= start:
            return
        block = torch.tensor(self._host_lrs[start:], dtype=torch.float64)
        if self.device.type == "cuda":
            block = block.pin_memory().to(self.device, non_blocking=True)
        else:
            block = block.to(self.device)
        self._table = torch.cat([self._table, block])

    # ------------------------------------------------------------------------------------------------ per step
    def add_pending(self, found_inf: Tensor) -> None:
        """Count one optimizer step's overflow flag (0-dim, any device); call once per optimizer step."""
        self._ctr[0] += found_inf.to(self._ctr.device, torch.float64).reshape(())

    def step(self) -> None:
        """The scheduler call after an optimizer step: consume a pending skip or advance, then set the LRs."""
        self._calls += 1
        need = self._calls + 1
        if self._end is not None and need > self._end:
            self._check_end()
        if self._filled() < need and self._end is None:
            self._extend(need + _LOOKAHEAD)
        pending, pos = self._ctr[0], self._ctr[1]
        cancel = (pending > 0).to(torch.float64)
        self._ctr = torch.stack([pending - cancel, pos + 1.0 - cancel])
        last = self._table.shape[0] - 1
        idx = (self._ctr[1] - self._base).clamp(max=last).long().reshape(1)
        self._lr.copy_(self._table.index_select(0, idx).reshape(-1))
        self._mirror.push(self._ctr[1])
        landed = self._mirror.latest()
        if landed is not None:
            self._prune(int(landed))

    def _prune(self, known: int) -> None:
        # The position never decreases: entries below a position already seen on the host are never needed.
        if known <= self._known_pos:
            return
        for k in [k for k in self._snapshots if k < known]:
            del self._snapshots[k]
        self._known_pos = known
        cut = known - self._base
        if cut >= 4 * _LOOKAHEAD:
            self._table = self._table[cut:].clone()
            del self._host_lrs[:cut]
            self._base = known

    def _check_end(self) -> None:
        pos = self.position()
        if self._end is not None and pos >= self._end and self._error is not None:
            raise self._error

    # ------------------------------------------------------------------------------------------------ host reads
    def position(self) -> int:
        """Applied scheduler steps since this hold began (reads the device: a sync)."""
        pos = int(self._ctr[1].item())
        self._prune(pos)
        return pos

    def state_dict(self) -> dict:
        """The scheduler's state at the held position (a sync)."""
        pos = self.position()
        if self._end is not None and pos >= self._end and self._error is not None:
            raise self._error
        return copy.deepcopy(self._snapshots[pos])

    def release(self) -> None:
        """Bring the real scheduler to the held position and give the param groups float learning rates again."""
        pos = self.position()
        state = self.state_dict()
        self._cls.load_state_dict(self.scheduler, state)
        for g, lr in zip(self.optimizer.param_groups, self._host_lrs[pos - self._base]):
            g["lr"] = lr
        self._state_dict_hook.remove()
        self._mirror.clear()


def _float_lrs(optimizer: Any, state_dict: dict) -> dict:
    """Optimizer state-dict post-hook: the held learning rates as floats (a host read, at checkpoint time only)."""
    for group in state_dict["param_groups"]:
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
    return state_dict
