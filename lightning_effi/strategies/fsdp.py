"""EffiFSDPStrategy: FSDP2 (``torch.distributed.fsdp.fully_shard``) for any LightningModule, configured by name.

The sharding itself is :func:`~lightning_effi.strategies.parallelize.apply_fsdp`, a plain function over a module and a
mesh; this module is the Lightning side: options, precision policy, setup order and the optimizer step. Why the
strategy exists, what each override changes and the layout it produces are in ``docs/fsdp.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_effi.strategies import parallelize
from lightning_effi.strategies._local_adam import local_shard_steps
from lightning_effi.strategies._sigterm import install_host_sigterm_check, report_pending_sigterm

_DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Precision plugin -> (param_dtype, reduce_dtype) of the FSDP2 MixedPrecisionPolicy when the user says "auto".
# Mixed precision: parameters all-gathered in the compute dtype (the sharded fp32 parameters are the master copy),
# gradients reduce-scattered in fp32 so summing across ranks loses no precision. "-true" precisions already
# converted the module itself, so FSDP2 keeps that dtype end to end.
_AUTO_POLICY: dict[str, tuple[Optional[torch.dtype], Optional[torch.dtype]]] = {
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "16-mixed": (torch.float16, torch.float32),
    "32-true": (None, None),
    "64-true": (None, None),
    "bf16-true": (None, None),
    "16-true": (None, None),
}
# Marks a LightningModule this strategy already sharded, so fit() followed by validate()/test() does not reshard.
_SHARDED_FLAG = "_effi_fsdp_sharded"


class EffiFSDPStrategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) for any LightningModule, without a ``configure_model``.

    Every process is one data-parallel shard; the modules named in ``wrap`` become FSDP units and the remaining
    children of the LightningModule root units (:func:`~lightning_effi.strategies.parallelize.apply_fsdp`).
    Checkpointing, the launcher and the device mesh are ``ModelParallelStrategy``'s. More in ``docs/fsdp.md``.

    Args:
        wrap: class names (``"Block"`` or ``"pkg.module.Block"``) of the modules to shard as units, each all-gathered
            just before its forward/backward and resharded after. ``None`` (default): the classes of the children of
            every ``nn.ModuleList``. ``[]``: only the root units. A name that matches no module raises ``ValueError``.
        reshard_after_forward: ``True`` (default) frees each wrapped unit's gathered parameters after its forward
            (root units keep them until backward, as FSDP2 does for a root); ``False`` keeps them until backward for
            every unit (faster, more memory); an int reshards to a group of that size.
        activation_checkpointing: class names of modules whose activations are recomputed in backward instead of
            stored (torch's composable ``checkpoint``: parameter names and checkpoints unchanged).
        wrap_group_size: shard this many consecutive same-class entries of one ``nn.ModuleList``/``nn.Sequential``
            together as one unit (default 1): fewer hooks and larger collectives, one group's parameters alive at once.
        compile: ``torch.compile`` the ``forward`` of every wrapped module, FSDP2's hooks outside the compiled code.
            Not combinable with ``activation_checkpointing``. Default False.
        cpu_offload: keep sharded parameters, gradients and optimizer state in pinned CPU memory; the optimizer step
            runs on the CPU. GPU only; the process group then also gets a gloo backend for the CPU tensors.
        param_dtype: dtype parameters are all-gathered in for compute. ``"auto"``: from the precision plugin
            (``bfloat16`` for ``"bf16-mixed"``, ``float16`` for ``"16-mixed"``, unchanged for ``"*-true"``).
        reduce_dtype: dtype of the gradient reduce-scatter. ``"auto"``: ``float32`` for mixed precision.
        free_gradients_after_step: set gradients to ``None`` right after each optimizer step (default ``True``), so
            they are not alive through the next forward; code reading ``p.grad`` after the step sees ``None``.
        save_distributed_checkpoint: ``True`` (default) saves a torch.distributed.checkpoint directory loadable on any
            world size; ``False`` gathers one full ``.ckpt`` file on rank 0.
        fused_adam_on_local_shards: run the step of a ``torch.optim.Adam``/``AdamW(fused=True)`` on the local shards
            of the sharded tensors instead of through DTensor's dispatcher (default ``True``): the same kernel and
            results with less host time per step. Other optimizers are unaffected.
        process_group_backend: ``"nccl"`` / ``"gloo"``; default from the device (``"cpu:gloo,cuda:nccl"`` on GPUs: the
            gloo half also carries the per-batch SIGTERM agreement; with ``"nccl"`` alone Lightning's device
            broadcast and sync stay).
        timeout: collective timeout.
    """

    strategy_name = "effi_fsdp"

    def __init__(
        self,
        wrap: Optional[Sequence[str]] = None,
        reshard_after_forward: Union[bool, int] = True,
        activation_checkpointing: Optional[Sequence[str]] = None,
        wrap_group_size: int = 1,
        compile: bool = False,
        cpu_offload: bool = False,
        param_dtype: _DTypeName = "auto",
        reduce_dtype: _DTypeName = "auto",
        free_gradients_after_step: bool = True,
        save_distributed_checkpoint: bool = True,
        fused_adam_on_local_shards: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        # The checks apply_fsdp makes, here too so a bad value fails when the strategy is built, not at setup.
        self.wrap = parallelize.check_names(wrap, "wrap")
        self.activation_checkpointing = parallelize.check_names(activation_checkpointing,
                                                                "activation_checkpointing") or []
        self.reshard_after_forward = parallelize.check_reshard_after_forward(reshard_after_forward)
        self.compile = parallelize.check_flag(compile, "compile")
        parallelize.check_compile_with_checkpointing(self.compile, self.activation_checkpointing)
        self.wrap_group_size = parallelize.check_group_size(wrap_group_size, "wrap_group_size")
        self.cpu_offload = parallelize.check_flag(cpu_offload, "cpu_offload")
        for what, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value != "auto" and value not in _DTYPES:
                raise ValueError(f"Invalid {what} {value!r}: must be 'auto' or one of {sorted(_DTYPES)}")
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.free_gradients_after_step = parallelize.check_flag(free_gradients_after_step,
                                                                "free_gradients_after_step")
        self.fused_adam_on_local_shards = parallelize.check_flag(fused_adam_on_local_shards,
                                                                 "fused_adam_on_local_shards")

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="FSDP2 (fully_shard) of any LightningModule; units chosen by class name, no configure_model",
        )

    @override
    def setup_environment(self) -> None:
        # Upstream "auto" makes the data-parallel size the number of nodes (tensor parallelism inside a node);
        # this strategy is pure FSDP, so every process is one data-parallel shard.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    @override
    def _get_process_group_backend(self) -> str:
        if self._process_group_backend is None and self.root_device.type == "cuda":
            # NCCL alone cannot reduce CPU tensors: the CPU-resident shards under cpu_offload that clipping and LAMB
            # take norms of, and the per-batch SIGTERM agreement. Added on CUDA even without cpu_offload, because the
            # default group is created once per process and a later Trainer with cpu_offload=True reuses it.
            return "cpu:gloo,cuda:nccl"
        return super()._get_process_group_backend()

    @override
    def setup(self, trainer: Trainer) -> None:
        # ModelParallelStrategy.setup raises without a configure_model; Strategy.setup runs the same steps in the
        # order needed here (convert the module, model_to_device, optimizers), and model_to_device shards.
        if self.cpu_offload and self.root_device.type != "cuda":
            raise RuntimeError(
                "EffiFSDPStrategy(cpu_offload=True) moves sharded state from the GPU to the CPU, but the accelerator "
                f"is {self.root_device.type!r}; set cpu_offload=False (on CPU everything already is in host memory)."
            )
        Strategy.setup(self, trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            if self.cpu_offload:
                # Strategy.setup moved any optimizer state to the GPU; offloaded state lives with the CPU shards.
                _optimizers_to_device(self.optimizers, torch.device("cpu"))
            install_host_sigterm_check(trainer)

    @override
    def model_to_device(self) -> None:
        # Shard before anything is materialised or moved, so a too-large model never exists unsharded on one device.
        module = self.lightning_module
        assert self.model is not None and module is not None
        if not getattr(module, _SHARDED_FLAG, False):
            self._shard(module)
        _materialize_distributed_module(self.model, self.root_device)
        if not self.cpu_offload:  # upstream always moves, which would undo the offload
            super().model_to_device()  # parameters and buffers fully_shard did not own (outside every unit)
        self.barrier()

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        report_pending_sigterm(getattr(getattr(self.lightning_module, "_trainer", None), "_signal_connector", None))

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Optional[nn.Module] = None, **kwargs: Any
    ) -> Any:
        inner = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        with local_shard_steps(inner) if self.fused_adam_on_local_shards else contextlib.nullcontext():
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.free_gradients_after_step:
            # Lightning zeroes them only inside the next step's closure, after its forward.
            inner.zero_grad(set_to_none=True)
        return output

    def mixed_precision_dtypes(self) -> tuple[Optional[torch.dtype], Optional[torch.dtype]]:
        """``(param_dtype, reduce_dtype)`` of the FSDP2 policy: explicit choices, else derived from the plugin."""
        plugin = self.precision_plugin
        precision = getattr(plugin, "precision", None)
        auto = _AUTO_POLICY.get(precision) if isinstance(precision, str) else None
        if auto is None and "auto" in (self.param_dtype, self.reduce_dtype):
            raise RuntimeError(
                f"EffiFSDPStrategy cannot derive an FSDP2 mixed-precision policy from the precision plugin "
                f"{type(plugin).__name__} (precision={precision!r}); use one of {sorted(_AUTO_POLICY)} or set "
                "param_dtype and reduce_dtype explicitly."
            )
        param = auto[0] if auto is not None and self.param_dtype == "auto" else _DTYPES[self.param_dtype]
        reduce = auto[1] if auto is not None and self.reduce_dtype == "auto" else _DTYPES[self.reduce_dtype]
        return param, reduce

    def _shard(self, module: LightningModule) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param_dtype, reduce_dtype = self.mixed_precision_dtypes()
        layout = parallelize.apply_fsdp(
            module,
            self.device_mesh["data_parallel"],
            wrap=self.wrap,
            group_size=self.wrap_group_size,
            mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
            activation_checkpointing=self.activation_checkpointing,
            compile=self.compile,
            reshard_after_forward=self.reshard_after_forward,
            offload=self.cpu_offload,
        )
        object.__setattr__(module, _SHARDED_FLAG, True)
        n_wrapped = sum(map(len, layout.units))
        rank_zero_info(
            f"EffiFSDPStrategy: {len(layout.units)} unit(s) of {n_wrapped} {list(layout.unit_classes)} + "
            f"{len(layout.roots)} root(s) {list(layout.roots)} over {self.world_size} rank(s); "
            f"param_dtype={param_dtype}, reduce_dtype={reduce_dtype}, activation checkpointing on "
            f"{len(layout.checkpointed)} module(s), compiled units: {self.compile}"
        )
