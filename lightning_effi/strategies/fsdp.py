"""EffiFSDPStrategy: FSDP2 (``torch.distributed.fsdp.fully_shard``) for any LightningModule, configured by name.

The sharding itself is :func:`~lightning_effi.strategies.parallelize.apply_fsdp`, a plain function over a module and a
mesh; this module is the Lightning side: options, precision policy, setup order and the optimizer step. Why the
strategy exists, what each override changes and the layout it produces are in ``docs/fsdp.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_effi import _compat
from lightning_effi.callbacks.failfast import FailFastStrategyMixin
from lightning_effi.plugins import _atomic
from lightning_effi.plugins.checkpoint_io import AtomicCheckpointIODefault, raise_if_problem
from lightning_effi.strategies import parallelize, tensor_parallel
from lightning_effi.strategies._atomic_save import save_directory
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
# Marks a LightningModule sharded as the FSDP root (it holds parameters itself): its steps run through its forward.
_ROOT_FLAG = "_effi_fsdp_root_unit"


class EffiFSDPStrategy(FailFastStrategyMixin, AtomicCheckpointIODefault, ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) for any LightningModule, without a ``configure_model``.

    Every process is one data-parallel shard; the modules named in ``wrap`` become FSDP units and the remaining
    children of the LightningModule root units (:func:`~lightning_effi.strategies.parallelize.apply_fsdp`).
    The launcher and the device mesh are ``ModelParallelStrategy``'s, and so is the checkpoint layout; checkpoints are
    written crash-safely (``docs/checkpoints.md``). More in ``docs/fsdp.md``.

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
        tensor_parallel_size: split every layer of the model over this many ranks (default 1: pure FSDP). The
            processes form a ``data_parallel x tensor_parallel`` mesh (``world_size / tensor_parallel_size`` by
            ``tensor_parallel_size``, neighbouring ranks in one tensor-parallel group); tensor parallelism is applied
            first, then FSDP2 shards over the data-parallel dimension. Every tensor-parallel rank of a data-parallel
            group reads the same batches (Lightning's sampler is over the data-parallel dimension).
        tp_plan: module-path glob -> style (``colwise``, ``rowwise``, ``sequence``, ``sequence_split``,
            ``sequence_gather``, ``embedding``, ``output``, ``divide``; see ``docs/tensor_parallel.md``). ``None``
            (default): the LightningModule's ``tp_plan`` (a method returning the mapping, or a mapping attribute),
            which the example GPT and BERT modules define. Ignored when ``tensor_parallel_size`` is 1.
        sequence_parallel: shard the activations between blocks (norms, residuals) along the sequence, so their
            memory per rank drops with ``tensor_parallel_size``; sequence lengths must divide by it. Default False.
        loss_parallel: keep the logits sharded over the vocabulary and compute the cross-entropy on the shards
            (torch's ``loss_parallel``, entered around every training/validation/test step and the backward); the
            step's loss must be computed with ``F.cross_entropy`` on the logits DTensor. Default False.
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
        tensor_parallel_size: int = 1,
        tp_plan: Optional[Mapping[str, str]] = None,
        sequence_parallel: bool = False,
        loss_parallel: bool = False,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=parallelize.check_group_size(tensor_parallel_size, "tensor_parallel_size"),
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
        self.tensor_parallel_size = tensor_parallel_size
        self.tp_plan = tensor_parallel.check_plan(tp_plan)
        self.sequence_parallel = parallelize.check_flag(sequence_parallel, "sequence_parallel")
        self.loss_parallel = parallelize.check_flag(loss_parallel, "loss_parallel")

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
        # Upstream "auto" makes the data-parallel size the number of nodes (tensor parallelism inside a node); here
        # the data-parallel size is whatever the tensor-parallel size leaves.
        world, tp = self.num_nodes * self.num_processes, self.tensor_parallel_size
        if world % tp:
            raise ValueError(
                f"EffiFSDPStrategy(tensor_parallel_size={tp}) does not divide the world size {world} (num_nodes="
                f"{self.num_nodes} x {self.num_processes} processes per node); choose a tensor_parallel_size that "
                f"divides {world}, or change the number of devices"
            )
        self._data_parallel_size = world // tp
        self._tensor_parallel_size = tp
        super().setup_environment()
        self._effi_start_watchdog()  # one rank's exception ends every rank (lightning_effi._failfast)

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
        if self.tensor_parallel_size > 1:
            _clip_over_meshes(self.precision_plugin)
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

    def _loss_context(self) -> contextlib.AbstractContextManager:
        if self.loss_parallel and self.tensor_parallel_size > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def _step(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``*_step``, run through the LightningModule's forward when it is an FSDP unit itself (it holds
        parameters of its own): FSDP2 gathers a unit's parameters in the hooks around its forward, and Lightning calls
        ``training_step`` directly. Also names the fix when a step reads a sharded parameter outside any forward."""
        module = self.lightning_module
        try:
            with self._loss_context():
                if getattr(module, _ROOT_FLAG, False):
                    assert module is not None
                    contexts = {"training_step": self.precision_plugin.train_step_context,
                                "validation_step": self.precision_plugin.val_step_context,
                                "test_step": self.precision_plugin.test_step_context,
                                "predict_step": self.precision_plugin.predict_step_context}
                    with contexts[name]():
                        return _compat.forward_redirection(self, module, name, *args, **kwargs)
                return getattr(super(), name)(*args, **kwargs)
        except RuntimeError as e:
            if "mixed torch.Tensor and DTensor" not in str(e):
                raise
            raise RuntimeError(
                f"{type(module).__name__}.{name} computed with a sharded parameter outside the forward of the module "
                "that holds it: under EffiFSDPStrategy a parameter is whole only inside its FSDP unit's forward. Call "
                "the submodule (self.model(x)) instead of reading its weights, or use p.full_tensor() for a read-only "
                f"value. Original error: {e}"
            ) from e

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return _local_loss(self._step("training_step", *args, **kwargs))

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("validation_step", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("test_step", *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("predict_step", *args, **kwargs)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optional[Optimizer], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        # loss_parallel's cross-entropy has its own backward rule, dispatched only inside the context.
        with self._loss_context():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

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

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        # Upstream writes the shards and meta.pt into filepath itself, over the previous checkpoint of that name; here
        # they go to a temporary sibling that replaces it once complete. A full-state file goes through the
        # CheckpointIO (AtomicCheckpointIO by default).
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)

        def write(tmp: Path) -> None:
            super(EffiFSDPStrategy, self).save_checkpoint(checkpoint, tmp, storage_options)

        def seal(tmp: Path) -> None:
            # DCP fsyncs its own files; Lightning's meta.pt, written last, is plain torch.save
            _atomic.fsync_file(tmp / _atomic.LIGHTNING_META)
            _atomic.fsync_dir(tmp)

        save_directory(self, filepath, write, seal=seal, sync_every_file=False)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # Upstream reports an incomplete or foreign path with whatever torch or DCP raise on it first.
        path = Path(self.broadcast(str(checkpoint_path)))
        raise_if_problem(path, self.effi_checkpoint_problem(path))
        try:
            checkpoint = super().load_checkpoint(path, weights_only)
        except Exception as e:
            problem = _atomic.file_content_problem(path) if path.is_file() else None
            if problem is None:
                raise
            raise ValueError(f"Checkpoint {str(path)!r} {problem}") from e
        raise_if_problem(path, _atomic.content_problem(checkpoint))
        return checkpoint

    def effi_checkpoint_problem(self, path: Path) -> Optional[str]:
        """What is wrong with ``path`` as a checkpoint this strategy resumes from (a DCP directory or a full-state
        file); None when it looks complete."""
        return _atomic.checkpoint_problem(path, ("file", "dcp"), "EffiFSDPStrategy")

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

    def _tensor_parallel(self, module: LightningModule) -> Optional[tensor_parallel.TPLayout]:
        if self.tensor_parallel_size == 1:
            return None
        plan = self.tp_plan if self.tp_plan is not None else _module_plan(module)
        layout = tensor_parallel.apply_tensor_parallel(
            module, self.device_mesh["tensor_parallel"], plan,
            sequence_parallel=self.sequence_parallel, loss_parallel=self.loss_parallel,
        )
        rank_zero_info(
            f"EffiFSDPStrategy: tensor parallel over {self.tensor_parallel_size} rank(s) x data parallel over "
            f"{self._data_parallel_size}; {len(layout.styles)} module(s) planned, divided {layout.divided}, "
            f"sequence_parallel={self.sequence_parallel}, loss_parallel={self.loss_parallel}"
        )
        return layout

    def _shard(self, module: LightningModule) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param_dtype, reduce_dtype = self.mixed_precision_dtypes()
        self._tensor_parallel(module)
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
        object.__setattr__(module, _ROOT_FLAG, bool(layout.root_params))
        n_wrapped = sum(map(len, layout.units))
        rank_zero_info(
            f"EffiFSDPStrategy: {len(layout.units)} unit(s) of {n_wrapped} {list(layout.unit_classes)} + "
            f"{len(layout.roots)} root(s) {list(layout.roots)} over {self.world_size} rank(s); "
            f"param_dtype={param_dtype}, reduce_dtype={reduce_dtype}, activation checkpointing on "
            f"{len(layout.checkpointed)} module(s), compiled units: {self.compile}"
        )


def _module_plan(module: LightningModule) -> Mapping[str, str]:
    plan = getattr(module, "tp_plan", None)
    if callable(plan):
        plan = plan()
    if plan is None:
        raise ValueError(
            f"EffiFSDPStrategy(tensor_parallel_size > 1) needs a tensor-parallel plan, but {type(module).__name__} "
            "has no tp_plan: pass EffiFSDPStrategy(tp_plan={'model.layers.*.attn.q': 'colwise', ...}) or define "
            "a tp_plan() method on the LightningModule (docs/tensor_parallel.md shows how)"
        )
    return plan


def _local_loss(output: Any) -> Any:
    """A training step's loss as a plain tensor: under loss_parallel the cross-entropy returns a DTensor, which
    Lightning's loop and the precision plugins would mix with plain tensors."""
    from torch.distributed.tensor import DTensor

    if isinstance(output, DTensor):
        return output.full_tensor()
    if isinstance(output, dict) and isinstance(output.get("loss"), DTensor):
        return {**output, "loss": output["loss"].full_tensor()}
    return output


def _clip_over_meshes(plugin: Any) -> None:
    """Trainer(gradient_clip_val=...) under tensor parallelism: torch's clip_grad_norm_, which the precision plugins
    call, stacks the per-parameter norms and fails when gradients live on different meshes (the 2-D mesh for split
    weights, the data-parallel one for the rest). This plugin instance clips with the package's global norm instead:
    the same rule, one all_reduce per mesh dimension, no host sync."""
    from lightning_effi.optim.norms import clip_grad_norm_

    def clip_grad_by_norm(optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        grads = [p.grad for p in plugin.main_params(optimizer) if p.grad is not None]
        if grads:
            clip_grad_norm_(grads, float(clip_val))

    plugin.clip_grad_by_norm = clip_grad_by_norm
