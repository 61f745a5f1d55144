"""``ConfigureOptimizer``: the optimizer and LR schedule chosen on the Trainer, for any LightningModule."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, cast

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_effi import _compat
from lightning_effi.callbacks.accumulation import AccumulationScheduler
from lightning_effi.models._common import build_optimizers
from lightning_effi.optim.param_groups import check_rules, param_groups

OptimizerChoice = type[torch.optim.Optimizer] | str | Callable[..., torch.optim.Optimizer]
SchedulerChoice = type[torch.optim.lr_scheduler.LRScheduler] | str | Callable[..., Any]
_EXAMPLES = {torch.optim.Optimizer: "torch.optim.AdamW",
             torch.optim.lr_scheduler.LRScheduler: "torch.optim.lr_scheduler.OneCycleLR"}


def _resolve(name: str, what: str, base: type) -> type:
    """The class at the import path ``name`` (``"torch.optim.AdamW"``), checked to subclass ``base``."""
    module_name, _, attr = name.rpartition(".")
    if not module_name:
        raise ValueError(f"Invalid {what} {name!r}: give the full import path of a class, e.g. "
                         f"'torch.optim.AdamW' or 'lightning_effi.optim.Lamb'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"Invalid {what} {name!r}: {module_name!r} has no importable {attr!r} ({e}); give the full "
                         "import path of a class, e.g. 'torch.optim.AdamW' or 'lightning_effi.optim.Lamb'") from e
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise TypeError(f"Invalid {what} {name!r}: {obj!r} is not a subclass of {base.__module__}.{base.__qualname__}; "
                        f"give the import path of one, e.g. {_EXAMPLES[base]!r}")
    return obj


def _check_args(fn: Callable, args: dict[str, Any], what: str, skip: int) -> None:
    """Every key of ``args`` is a keyword ``fn`` accepts (its first ``skip`` parameters are supplied here)."""
    try:
        params = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):  # a builtin or C callable without a signature: checked when it is called
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise ValueError(f"Invalid {what} {unknown}: {getattr(fn, '__qualname__', fn)!r} takes {names}")


def schedule_length(trainer: Trainer, max_steps: int | None, owner: str) -> int:
    """Optimizer steps the LR schedule spans: ``max_steps`` when given, else Lightning's estimate.

    Raises ``ValueError`` when that estimate is wrong (an accumulation schedule in an epoch-based run: Lightning
    divides by ``accumulate_grad_batches``, which such a callback keeps at 1) or unknowable (no step or epoch limit).
    """
    if max_steps:
        return max_steps
    # AutoMicroBatch subclasses AccumulationScheduler
    if trainer.max_steps in (-1, None) and any(
            isinstance(cb, AccumulationScheduler) for cb in cast(Any, trainer).callbacks):
        raise ValueError(f"{owner}: the LR schedule's length cannot be estimated with an accumulation schedule in an "
                         f"epoch-based run; set Trainer(max_steps=...) or {owner}(max_steps=...)")
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(f"{owner}: the LR schedule's length cannot be estimated for a run without max_steps or "
                         f"max_epochs; set Trainer(max_steps=...) or {owner}(max_steps=...)")
    return int(total)


class ConfigureOptimizer(Callback):
    """Supply the optimizer and LR schedule of any LightningModule from the Trainer.

    The module's own ``configure_optimizers`` is replaced for the run (a module need not define one). Parameters are
    grouped by :func:`~lightning_effi.optim.param_groups` when the strategy asks for the optimizer, so a sharding
    strategy (``EffiFSDPStrategy``) has already replaced them with their shards.

    Args:
        optimizer: an optimizer class, its import path (``"lightning_effi.optim.Lamb"``), or a callable that takes the
            parameter groups and returns an optimizer.
        lr: the learning rate; ``None`` keeps the optimizer's default.
        optimizer_args: other keyword arguments of the optimizer (``{"betas": [0.9, 0.95]}``); weight decay is set
            by ``weight_decay`` below, per group. Default ``None``.
        weight_decay: decay of the decayed groups. Default ``0.01``.
        no_decay: categories or name regexes without decay (see ``param_groups``). Default ``("bias", "norm")``.
        no_adapt: categories or name regexes with LAMB's trust ratio fixed to 1. Default ``()``.
        warmup_steps: linear warmup over this many optimizer steps. Default ``0``.
        min_lr_ratio: the cosine decays to ``min_lr_ratio * lr`` at the end of training; ``1.0`` (the default)
            keeps the LR constant after warmup.
        max_steps: steps the cosine spans; ``None`` uses ``Trainer(max_steps)`` or Lightning's estimate.
        lr_scheduler: instead of warmup + cosine, a scheduler class, its import path, or a callable that takes the
            optimizer. Default ``None``.
        lr_scheduler_args: its keyword arguments. Default ``None``.
        lr_scheduler_interval: step the scheduler every optimizer ``"step"`` (default) or every ``"epoch"``.

    Example::

        Trainer(callbacks=[ConfigureOptimizer(Lamb, lr=1e-3, weight_decay=0.01, warmup_steps=100, min_lr_ratio=0.1)])
    """

    def __init__(
        self,
        optimizer: OptimizerChoice,
        lr: float | None = None,
        optimizer_args: dict[str, Any] | None = None,
        weight_decay: float = 0.01,
        no_decay: Sequence[str] = ("bias", "norm"),
        no_adapt: Sequence[str] = (),
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        max_steps: int | None = None,
        lr_scheduler: SchedulerChoice | None = None,
        lr_scheduler_args: dict[str, Any] | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        if isinstance(optimizer, str):
            optimizer = _resolve(optimizer, "optimizer", torch.optim.Optimizer)
        if inspect.isclass(optimizer) and not issubclass(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid optimizer {optimizer!r}: not a subclass of torch.optim.Optimizer; give an "
                            "optimizer class such as torch.optim.AdamW or lightning_effi.optim.Lamb")
        if not callable(optimizer):
            raise TypeError(f"Invalid optimizer {optimizer!r}: give an optimizer class, its import path or a callable "
                            "that takes parameter groups")
        kwargs = dict(optimizer_args or {})
        for key, where in (("params", "the callback passes the parameter groups"),
                           ("weight_decay", "set ConfigureOptimizer(weight_decay=...): it is applied per group"),
                           ("lr", "set ConfigureOptimizer(lr=...)")):
            if key in kwargs:
                raise ValueError(f"Invalid optimizer_args key {key!r}: {where}")
        if lr is not None:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"Invalid lr {lr!r}: must be > 0")
            kwargs["lr"] = lr
        _check_args(optimizer, kwargs, "optimizer_args", skip=1)
        if isinstance(lr_scheduler, str):
            lr_scheduler = _resolve(lr_scheduler, "lr_scheduler", torch.optim.lr_scheduler.LRScheduler)
        if lr_scheduler is not None:
            if inspect.isclass(lr_scheduler) and issubclass(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise ValueError("Invalid lr_scheduler ReduceLROnPlateau: it needs a monitored metric, which "
                                 "ConfigureOptimizer does not configure; return it from the module's "
                                 "configure_optimizers with a 'monitor' key")
            if warmup_steps != 0 or min_lr_ratio != 1.0:
                raise ValueError(f"lr_scheduler={lr_scheduler!r} replaces the warmup + cosine schedule; leave "
                                 f"warmup_steps ({warmup_steps!r}) at 0 and min_lr_ratio ({min_lr_ratio!r}) at 1.0")
            _check_args(lr_scheduler, dict(lr_scheduler_args or {}), "lr_scheduler_args", skip=1)
        elif lr_scheduler_args:
            raise ValueError(f"lr_scheduler_args {lr_scheduler_args!r} given without an lr_scheduler; set "
                             "lr_scheduler or drop them")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps {warmup_steps!r}: must be an integer >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"Invalid min_lr_ratio {min_lr_ratio!r}: must be in [0, 1]")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0):
            raise ValueError(f"Invalid max_steps {max_steps!r}: must be a positive integer or None")
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"Invalid lr_scheduler_interval {lr_scheduler_interval!r}: must be 'step' or 'epoch'")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay {weight_decay!r}: must be >= 0")
        check_rules(no_decay, "no_decay")
        check_rules(no_adapt, "no_adapt")
        self.optimizer: Callable[..., torch.optim.Optimizer] = optimizer
        self.optimizer_kwargs = kwargs
        self.weight_decay, self.no_decay, self.no_adapt = weight_decay, list(no_decay), list(no_adapt)
        self.warmup_steps, self.min_lr_ratio, self.max_steps = warmup_steps, min_lr_ratio, max_steps
        self.lr_scheduler: Callable[..., Any] | None = lr_scheduler
        self.lr_scheduler_args = dict(lr_scheduler_args or {})
        self.lr_scheduler_interval = lr_scheduler_interval
        self._log: Any = None
        self._patched: LightningModule | None = None

    def configure_optimizers(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """What the module's ``configure_optimizers`` returns for this run (the policy: override to change it)."""
        def factory(groups: Iterable) -> torch.optim.Optimizer:
            return self.optimizer(groups, **self.optimizer_kwargs)

        if self.lr_scheduler is None:
            decays = self.min_lr_ratio < 1.0
            total = schedule_length(trainer, self.max_steps, type(self).__name__) if decays else 1
            return build_optimizers(pl_module, factory, weight_decay=self.weight_decay, no_decay=self.no_decay,
                                    no_adapt=self.no_adapt, warmup_steps=self.warmup_steps, total_steps=total,
                                    min_lr_ratio=self.min_lr_ratio)
        groups = param_groups(pl_module, weight_decay=self.weight_decay, no_decay=self.no_decay,
                              no_adapt=self.no_adapt, with_names=True)
        optimizer = factory(groups)
        scheduler = self.lr_scheduler(optimizer, **self.lr_scheduler_args)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval, "frequency": 1}}

    # Lightning checks that the module defines configure_optimizers before the first callback hook (setup), so a
    # module without one is patched at the earlier moment the Trainer hands callbacks the module's log function.
    @property
    def log(self) -> Any:
        return self._log

    @log.setter
    def log(self, fn: Any) -> None:
        self._log = fn
        module = _compat.module_of_attached_log(fn)
        if module is not None:
            self._patch(module)

    def _patch(self, pl_module: LightningModule) -> None:
        trainer = pl_module._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or self._patched is pl_module:
            return
        if "configure_optimizers" in vars(pl_module):
            # LightningCLI's --optimizer/--lr_scheduler replace the method on the instance the same way.
            raise RuntimeError(f"{type(pl_module).__name__}.configure_optimizers was already replaced on this instance "
                               "(LightningCLI's --optimizer/--lr_scheduler do so); choose the optimizer in one place: "
                               "drop those options or the ConfigureOptimizer callback")
        callback = self

        def configure_optimizers() -> dict:
            return callback.configure_optimizers(trainer, pl_module)

        pl_module.configure_optimizers = configure_optimizers  # type: ignore[method-assign,assignment]
        self._patched = pl_module

    def _unpatch(self) -> None:
        if self._patched is not None:
            vars(self._patched).pop("configure_optimizers", None)
            self._patched = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._patch(pl_module)  # a no-op when the log assignment above already did it

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unpatch()  # the module is its own again after fit

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._unpatch()
