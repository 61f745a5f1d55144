"""EffiDeepSpeedStrategy: Lightning's DeepSpeedStrategy on CPU and GPU, one config, Lightning-driven accumulation,
ZeRO-correct LAMB.

This module holds the Lightning overrides only; each says why it differs from upstream. The config merge lives in
:mod:`lightning_effi.strategies._config`, the description of ZeRO's flat partitions in
:mod:`lightning_effi.strategies._zero_layout`. What the strategy changes and why is in ``docs/deepspeed.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Generator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.accelerators import Accelerator, CUDAAccelerator
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_effi import _compat, _quiet
from lightning_effi.callbacks.failfast import FailFastStrategyMixin
from lightning_effi.plugins import _atomic
from lightning_effi.plugins.checkpoint_io import AtomicCheckpointIODefault, raise_if_problem
from lightning_effi.strategies import _zero_layout
from lightning_effi.strategies._atomic_save import save_directory
from lightning_effi.strategies._config import build_deepspeed_config, load_user_config
from lightning_effi.strategies._zero_layout import check_world_size as _check_world_size

if TYPE_CHECKING:
    import deepspeed
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

# Attributes of lightning_effi.plugins.LossScalingPrecision that map onto DeepSpeed's fp16 section: a plugin that has
# them all contributes its loss-scaler settings to the config instead of being rejected.
_SCALER_KNOBS = ("init_scale", "growth_interval", "hysteresis", "min_scale", "backoff_factor", "growth_factor",
                 "max_scale", "consecutive_hysteresis")
_OPTIONAL_SCALER_KNOBS = ("on_min_scale",)


def _engine(model: pl.LightningModule) -> deepspeed.DeepSpeedEngine:
    # Trainer.model is typed as an optional Module; under this strategy it is the DeepSpeed engine once set up.
    return cast("deepspeed.DeepSpeedEngine", model.trainer.model)


class _EffiDeepSpeedPrecision(DeepSpeedPrecision):
    """DeepSpeed precision whose backward lets Lightning decide the accumulation boundary.

    Upstream calls ``engine.backward(loss)``, which divides the (already Lightning-normalised) loss by
    ``gradient_accumulation_steps`` a second time and lets DeepSpeed count its own window, which drifts from
    Lightning's when the factor changes or an epoch ends on a partial window.
    """

    def __init__(self, precision: str, max_scale: float | None = None) -> None:
        super().__init__(precision)  # type: ignore[arg-type]
        self.max_scale = max_scale

    # The narrower signature is Lightning's own DeepSpeedPrecision.backward, which also ignores [override] for it.
    @override
    def backward(  # type: ignore[override]
        self, tensor: torch.Tensor, model: pl.LightningModule, optimizer: Any, *args: Any, **kwargs: Any
    ) -> None:
        engine = _engine(model)
        engine.set_gradient_accumulation_boundary(not _compat.should_accumulate(model.trainer))
        engine.backward(tensor, *args, scale_wrt_gas=False, **kwargs)

    # As Lightning's DeepSpeedPrecision.optimizer_step, which also ignores [override] for this signature.
    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: pl.LightningModule, closure: Any, **kwargs: Any
    ) -> Any:
        out = super().optimizer_step(optimizer, model, closure, **kwargs)
        if self.max_scale is not None:
            # DeepSpeed's dynamic scaler has no ceiling; LossScalingPrecision's max_scale caps growth. Clamping after
            # every step gives exactly the capped sequence (growth happens only inside step()).
            scaler = getattr(_engine(model).optimizer, "loss_scaler", None)
            if scaler is None or not hasattr(scaler, "cur_scale"):
                raise RuntimeError("EffiDeepSpeedStrategy: fp16 is enabled but the DeepSpeed optimizer has no dynamic "
                                   "loss scaler to apply LossScalingPrecision(max_scale) to")
            if scaler.cur_scale > self.max_scale:
                scaler.cur_scale = float(self.max_scale)
        return out


class _ValidatingLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher, but the merged DeepSpeed config is built (and conflicts raised) before any
    worker process is started."""

    def __init__(self, strategy: EffiDeepSpeedStrategy, *args: Any) -> None:
        super().__init__(*args)
        self._strategy = strategy

    @override
    def launch(self, function: Any, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is not None:
            micro = _known_micro_batch_size(args, kwargs) if getattr(function, "__name__", "") == "_fit_impl" else None
            self._strategy._build_config(trainer, micro_batch_size=micro)
        return super().launch(function, *args, trainer=trainer, **kwargs)


def _known_micro_batch_size(args: tuple, kwargs: dict) -> int | None:
    """The train loader's batch size when ``fit`` was handed a DataLoader, or a datamodule whose hyper-parameters
    record ``batch_size``, so a micro-batch conflict is reported with the others before any worker starts; None
    otherwise. After launch the config is built again from the real loader, which decides."""
    from lightning.pytorch import LightningDataModule
    from torch.utils.data import DataLoader

    loaders = kwargs.get("train_dataloaders", args[1] if len(args) > 1 else None)
    datamodule = kwargs.get("datamodule", args[3] if len(args) > 3 else None)
    if isinstance(loaders, LightningDataModule):
        datamodule, loaders = loaders, None
    if isinstance(loaders, DataLoader):
        size = loaders.batch_size
    else:
        size = getattr(datamodule, "hparams", {}).get("batch_size") if datamodule is not None else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


class EffiDeepSpeedStrategy(FailFastStrategyMixin, AtomicCheckpointIODefault, DeepSpeedStrategy):
    """DeepSpeed ZeRO stage 1/2/3 on CPU (gloo) or CUDA (NCCL), configured from one source of truth.

    Registered as ``"effi_deepspeed_stage_1"``, ``"effi_deepspeed_stage_2"``, ``"effi_deepspeed_stage_3"``.

    Args:
        stage: ZeRO stage (1: optimizer state sharded, 2: + gradients, 3: + parameters). Default 2.
        config: optional DeepSpeed config (dict or path to a JSON file). Keys that duplicate Trainer arguments
            (``gradient_accumulation_steps``, ``gradient_clipping``, ``train_micro_batch_size_per_gpu``,
            ``train_batch_size``, ``fp16``/``bf16``, ``zero_optimization.stage``) must agree with them or be
            ``"auto"``; disagreements raise before launch. Everything else is passed to DeepSpeed as is.
        offload_optimizer: keep optimizer state on CPU and step there (ZeRO-Offload). Default False.
        offload_parameters: ZeRO-3 only: keep parameters on CPU. Default False.
        logging_level: DeepSpeed's logger level. Default ``None``: ``logging.WARNING`` (no per-step memory and
            timing printouts), ``logging.INFO`` with ``EFFI_VERBOSE=1`` (``effi --verbose``).
        load_full_weights: load a single-file checkpoint into a ZeRO-3 model (weights only). Default False.
        exclude_frozen_parameters: leave frozen parameters out of checkpoints. Default False.
        process_group_backend: ``"gloo"``/``"nccl"``; default picks by accelerator.
        timeout: collective timeout.

    Precision: ``"bf16-mixed"``/``"bf16-true"`` enable DeepSpeed's bf16, ``"16-mixed"`` its fp16 with dynamic loss
    scaling, configured from ``plugins=[LossScalingPrecision(...)]`` if given (settings DeepSpeed cannot express
    raise). Checkpoints are DeepSpeed directories, written crash-safely with an ``effi_complete`` marker
    (``docs/checkpoints.md``); resuming on another number of processes needs a one-time conversion to a universal
    checkpoint. Both are described in ``docs/deepspeed.md``.
    """

    strategy_name = "effi_deepspeed"

    def __init__(
        self,
        stage: Literal[1, 2, 3] = 2,
        config: _PATH | dict[str, Any] | None = None,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        logging_level: int | None = None,
        load_full_weights: bool = False,
        exclude_frozen_parameters: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"Invalid ZeRO stage {stage!r}: must be 1, 2 or 3 (stage 0 is plain DDP: use 'ddp')")
        if offload_parameters and stage != 3:
            raise ValueError(f"offload_parameters=True needs ZeRO stage 3 (got stage={stage}): use stage=3")
        self._user_config = load_user_config(config)
        self._stage = int(stage)
        self._offload_optimizer = bool(offload_optimizer)
        self._offload_parameters = bool(offload_parameters)
        self._loss_scaler: dict[str, Any] | None = None
        # Upstream builds its own default config when config is None (or reads PL_DEEPSPEED_CONFIG_PATH); an empty
        # dict skips both, the real config is built by _build_config.
        super().__init__(
            accelerator=accelerator,
            stage=stage,
            config={},
            logging_level=(logging.INFO if _quiet.verbose() else logging.WARNING) if logging_level is None
            else logging_level,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            load_full_weights=load_full_weights,
            exclude_frozen_parameters=exclude_frozen_parameters,
        )
        self._flat_layouts: list[Any] | None = None
        self._logical_numels: list[int] = []

    # ------------------------------------------------------------------------------------------------- registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for stage in (1, 2, 3):
            strategy_registry.register(
                f"effi_deepspeed_stage_{stage}", cls,
                description=f"lightning_effi DeepSpeed ZeRO stage {stage} (CPU and GPU)", stage=stage,
            )

    # ------------------------------------------------------------------------------------------------ precision
    @property
    @override
    def precision_plugin(self) -> Precision:
        if self._precision_plugin is not None:
            return self._precision_plugin
        # The default is kept apart from _precision_plugin: the Trainer reads a set _precision_plugin as the user's
        # choice, which would override Trainer(precision=...). Built once, so every read sees the same object.
        default = self.__dict__.get("_default_precision_plugin")
        if default is None:
            default = self.__dict__["_default_precision_plugin"] = _EffiDeepSpeedPrecision("32-true")
        return default

    @precision_plugin.setter
    @override
    def precision_plugin(self, plugin: Precision | None) -> None:
        # The Trainer hands every strategy a precision plugin. DeepSpeed does autocast, loss scaling and the backward
        # itself, so any plugin is replaced by ours; LossScalingPrecision contributes its knobs to the fp16 config.
        if plugin is None or isinstance(plugin, _EffiDeepSpeedPrecision):
            self._precision_plugin = plugin
            return
        if all(hasattr(plugin, k) for k in _SCALER_KNOBS) and hasattr(plugin, "precision"):
            self._loss_scaler = {k: getattr(plugin, k) for k in _SCALER_KNOBS}
            self._loss_scaler.update({k: getattr(plugin, k) for k in _OPTIONAL_SCALER_KNOBS if hasattr(plugin, k)})
            max_scale = self._loss_scaler["max_scale"] if plugin.precision.startswith("16") else None
            self._precision_plugin = _EffiDeepSpeedPrecision(plugin.precision, max_scale=max_scale)
            return
        if isinstance(plugin, DeepSpeedPrecision):
            self._precision_plugin = _EffiDeepSpeedPrecision(plugin.precision)
            return
        raise RuntimeError(
            f"EffiDeepSpeedStrategy cannot use the precision plugin {type(plugin).__name__}: DeepSpeed casts, scales "
            "and keeps fp32 master weights itself. Use Trainer(precision='bf16-mixed' | '16-mixed' | '32-true'), "
            "plugins=[LossScalingPrecision(...)] for fp16 loss-scaler settings, or EffiFSDPStrategy for other plugins"
        )

    # --------------------------------------------------------------------------------------------------- config
    def _build_config(self, trainer: pl.Trainer, *, micro_batch_size: int | None) -> dict[str, Any]:
        precision = self.precision_plugin.precision
        return build_deepspeed_config(
            user_config=self._user_config,
            stage=self._stage,
            precision=precision,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            gradient_clip_val=trainer.gradient_clip_val,
            gradient_clip_algorithm=None if trainer.gradient_clip_algorithm is None else
            str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)),
            world_size=self.world_size,
            micro_batch_size=micro_batch_size,
            loss_scaler=self._loss_scaler if precision in ("16-mixed", "16-true") else None,
            offload_optimizer=self._offload_optimizer,
            offload_parameters=self._offload_parameters,
            client_optimizer="optimizer" not in self._user_config,
        )

    @override
    def _format_config(self) -> None:
        # Replaces upstream's formatting (which silently keeps the JSON's value when both sides set one).
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        micro = self._auto_select_batch_size() if trainer.training or trainer.state.fn == TrainerFn.FITTING else 1
        self.config = self._build_config(trainer, micro_batch_size=micro)
        if self.config.get("fp16", {}).get("enabled"):
            rank_zero_info(
                "EffiDeepSpeedStrategy: DeepSpeed fp16 (fp16 weights and activations, fp32 master weights, dynamic "
                f"loss scaling {({k: v for k, v in self.config['fp16'].items() if k != 'enabled'})})"
            )

    @property
    @override
    def zero_stage_3(self) -> bool:
        # Upstream reads the config, which here is only built at setup; the stage argument is the source of truth
        # (a config that says otherwise is a conflict).
        return self._stage == 3

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = _ValidatingLauncher(self, self.cluster_environment, self.num_processes, self.num_nodes)

    # ----------------------------------------------------------------------------------------------- environment
    @override
    def setup_environment(self) -> None:
        # Upstream raises for any accelerator other than CUDA; DeepSpeed's CPU accelerator runs ZeRO 1/2/3 with gloo.
        if isinstance(self.accelerator, CUDAAccelerator):
            super().setup_environment()
        else:
            super(DeepSpeedStrategy, self).setup_environment()
        self._effi_start_watchdog()  # one rank's exception ends every rank (lightning_effi._failfast)

    @override
    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            # NCCL carries the GPU collectives; the CPU shared-memory op would only be a JIT build at startup.
            with _compat.deepspeed_without_shm_build():
                super().setup_distributed()
            return
        # Upstream validates device indices, which are [None, None] on CPU.
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(
                f"Trainer(accelerator='cpu') but DeepSpeed selected its {get_accelerator().device_name()!r} "
                "accelerator: set the environment variable DS_ACCELERATOR=cpu"
            )
        reset_seed()
        self.set_world_ranks()
        with _compat.deepspeed_without_shm_build():
            self._init_deepspeed_distributed()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._init_config_if_needed()
        assert self.config is not None  # upstream types it Optional; it is a dict from __init__ on
        cpu_fp16 = self.config.get("fp16", {}).get("enabled") and not isinstance(self.accelerator, CUDAAccelerator)
        # fp16 on the CPU, whatever DeepSpeed's oneDNN check says about this CPU model, while the engine is built
        with _compat.deepspeed_fp16_on_cpu() if cpu_fp16 else contextlib.nullcontext():
            super().setup(trainer)

    def _device_rank(self) -> int:
        # DeepSpeed uses args.device_rank to pick its device; root_device.index is None on CPU.
        return self.root_device.index if self.root_device.type == "cuda" else self.local_rank

    # ------------------------------------------------------------------------------------------ model/optimizer
    @override
    def _setup_model_and_optimizer(self, model: Module, optimizer: Optimizer | None,
                                   lr_scheduler: Any = None) -> tuple[deepspeed.DeepSpeedEngine, Optimizer]:
        import deepspeed

        logical_ids = _zero_layout.logical_ids(optimizer) if optimizer is not None else {}
        if optimizer is not None:
            _zero_layout.check_optimizer_supported(optimizer)
            # sizes of the logical parameters (ZeRO-3 params built under zero.Init report numel 0: use ds_numel)
            self._logical_numels = [0] * len(logical_ids)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    self._logical_numels[logical_ids[id(p)]] = int(getattr(p, "ds_numel", p.numel()))
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        if optimizer is not None:
            self._flat_layouts = _zero_layout.install_flat_layouts(ds_optimizer, optimizer, logical_ids)
        return engine, ds_optimizer

    @override
    def _initialize_deepspeed_train(self, model: Module) -> None:
        # Upstream detaches the scheduler from the engine and lets Lightning step it after every optimizer step, also
        # after steps DeepSpeed skipped (fp16 overflow). A scheduler stepped once per optimizer step is left to
        # DeepSpeed, which steps it only when the update was applied; Lightning keeps it in lr_scheduler_configs
        # (checkpointing, LearningRateMonitor) but never reaches its frequency.
        assert self.config is not None  # upstream types it Optional; it is a dict from __init__ on
        if "optimizer" in self.config:
            return super()._initialize_deepspeed_train(model)
        assert self.lightning_module is not None  # training is being set up for it
        optimizers, configs = _init_optimizers_and_lr_schedulers(self.lightning_module)
        if len(optimizers) != 1 or len(configs) > 1:
            raise RuntimeError(
                f"EffiDeepSpeedStrategy supports one optimizer and at most one LR scheduler; configure_optimizers "
                f"returned {len(optimizers)} optimizers and {len(configs)} schedulers"
            )
        optimizer = optimizers[0]
        config = configs[0] if configs else None
        ds_scheduler = None
        if config is not None and config.interval == "step" and config.frequency == 1 and not config.reduce_on_plateau:
            ds_scheduler = config.scheduler
            config.frequency = sys.maxsize
        elif config is not None and self.config.get("fp16", {}).get("enabled"):
            raise RuntimeError(
                f"With fp16, skipped steps must not advance the LR scheduler, but a scheduler with interval="
                f"{config.interval!r}, frequency={config.frequency} cannot be stepped by DeepSpeed: use interval='step'"
                " with frequency=1, or bf16"
            )
        max_grad_norm = _zero_layout.move_max_grad_norm_to_deepspeed(optimizer, self.config)
        if max_grad_norm is not None:
            rank_zero_info(f"EffiDeepSpeedStrategy: {type(optimizer).__name__}(max_grad_norm={max_grad_norm}) is "
                           f"applied by DeepSpeed as gradient_clipping={self.config['gradient_clipping']} over all "
                           "ZeRO partitions")
        engine, ds_optimizer = self._setup_model_and_optimizer(model, optimizer, ds_scheduler)
        self._set_deepspeed_activation_checkpointing()
        self.optimizers = [ds_optimizer]
        self.lr_scheduler_configs = [config] if config is not None else []
        self.model = engine

    @override
    def _initialize_deepspeed_inference(self, model: Module) -> None:
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        # Same as upstream except the device rank (root_device.index is None on CPU).
        assert self.config is not None  # upstream types it Optional; it is a dict from __init__ on
        inference_config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                inference_config[key] = self.config[key]
        if self.zero_stage_3:
            inference_config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            inference_config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        engine, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()), config=inference_config, model=model,
            optimizer=None, lr_scheduler=None, model_parameters=[], dist_init_required=False,
        )
        self.model = engine

    @property
    @override
    def handles_gradient_accumulation(self) -> bool:
        # Upstream says True, which makes Lightning call engine.step() on every micro-batch and leave the accumulation
        # window to DeepSpeed's own counter; Lightning then also never steps on the partial last window of an epoch.
        # False keeps the window in Lightning's loop (as for DDP); _EffiDeepSpeedPrecision.backward tells the engine
        # where each boundary is.
        return False

    @contextlib.contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        # Lightning wraps non-boundary backwards in the model's no_sync(); DeepSpeed's engine refuses it under ZeRO 2/3
        # and does not need it: the boundary flag set in _EffiDeepSpeedPrecision.backward already defers reduction.
        yield None

    # ------------------------------------------------------------------------------------------- accumulation
    def effi_set_accumulation(self, factor: int) -> None:
        """Change the number of micro-batches per optimizer step (called by ``AccumulationScheduler``).

        Lightning's loop decides the boundaries (see :class:`_EffiDeepSpeedPrecision`); the engine's batch-size
        bookkeeping (``train_batch_size``, ``gradient_accumulation_steps``) is updated to match.
        """
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"Invalid accumulation factor {factor!r}: must be an int >= 1")
        if self.lightning_module is not None and self.lightning_module._trainer is not None:
            self.lightning_module.trainer.accumulate_grad_batches = factor
        if isinstance(self.config, dict) and self.config:
            self.config["gradient_accumulation_steps"] = factor
            if "train_micro_batch_size_per_gpu" in self.config:
                micro = self.config["train_micro_batch_size_per_gpu"]
                self.config["train_batch_size"] = micro * self.world_size * factor
        # None before setup, else the DeepSpeed engine (self.model is typed as a plain Module upstream)
        engine = cast("deepspeed.DeepSpeedEngine | None", self.model)
        if engine is not None and hasattr(engine, "set_train_batch_size"):
            engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * engine.dp_world_size * factor)

    # ---------------------------------------------------------------------------------------------- checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict, filepath: _PATH, storage_options: Any | None = None) -> None:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        # DeepSpeed's converter to universal checkpoints (resume on another world size) requires this entry, which
        # only Megatron-style clients write; pure data parallelism needs no tensor-parallel merge patterns.
        checkpoint = {**checkpoint,
                      UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}

        # Upstream lets every rank write into filepath itself, over the previous checkpoint of that name, and
        # DeepSpeed writes its 'latest' tag before the other ranks are done: here the ranks write a temporary sibling,
        # rank 0 marks it complete after all of them and moves it into place.
        def write(tmp: Path) -> None:
            super(EffiDeepSpeedStrategy, self).save_checkpoint(checkpoint, tmp, storage_options)

        def seal(tmp: Path) -> None:
            marker = tmp / _atomic.MARKER
            marker.touch()
            _atomic.fsync_file(marker)
            _atomic.fsync_dir(tmp)

        # DeepSpeed's torch.save of each shard does not sync
        save_directory(self, filepath, write, seal=seal, sync_every_file=True)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        assert self.config is not None  # upstream types it Optional; it is a dict from __init__ on
        universal = bool((self.config.get("checkpoint") or {}).get("load_universal", False))
        if not (self.load_full_weights and self.zero_stage_3):
            # a file is checked by the CheckpointIO; upstream's check of a directory takes any 'latest' for complete
            path = Path(checkpoint_path)
            raise_if_problem(path, self.effi_checkpoint_problem(path))
            if not universal:
                _check_world_size(checkpoint_path, self.world_size)
        client_state = super().load_checkpoint(checkpoint_path, weights_only)
        # Optimizer.load_state_dict replaced the param groups; layouts are strategy wiring, not state.
        if self._flat_layouts is not None:
            ds_optimizer = self.deepspeed_engine.optimizer
            self._flat_layouts = _zero_layout.install_flat_layouts(
                ds_optimizer, _zero_layout.client_optimizer(ds_optimizer), None, layouts=self._flat_layouts,
            )
        return client_state

    def effi_checkpoint_problem(self, path: Path) -> str | None:
        """What is wrong with ``path`` as a checkpoint this strategy resumes from (a DeepSpeed directory with the
        ``effi_complete`` marker; with ``load_full_weights`` under stage 3 also a file); None when it looks
        complete."""
        accepts = ("deepspeed", "file") if self.load_full_weights and self.zero_stage_3 else ("deepspeed",)
        return _atomic.checkpoint_problem(path, accepts, "EffiDeepSpeedStrategy")
