"""EffiFSDPStrategy: FSDP2 (``torch.distributed.fsdp.fully_shard``) for any LightningModule, configured by name.

Lightning ships two FSDP strategies and neither fits "shard this model, I won't change it":

- ``FSDPStrategy`` is FSDP1 (flat parameters, CUDA only; CPU_DISTRIBUTED.md).
- ``ModelParallelStrategy`` is FSDP2 but requires every LightningModule to override ``configure_model`` and call
  ``fully_shard`` itself, defaults to ``data_parallel_size = num_nodes`` (so a single machine shards nothing) and
  rejects ``precision="16-mixed"`` passed next to a strategy instance.

``EffiFSDPStrategy`` subclasses ``ModelParallelStrategy`` because everything after sharding is already right
there and world-size independent: the data-parallel device mesh, the launcher, DCP (torch.distributed.checkpoint)
sharded save/load of model + optimizer (resharding on load), the metadata file that carries loops, LR schedulers,
callbacks and precision-plugin (loss scaler) state. It overrides only:

- ``__init__``: the sharding options, validated before anything runs;
- ``setup_environment``: the data-parallel size is the world size (upstream: ``num_nodes``), no tensor parallelism;
- ``_get_process_group_backend``: on CUDA adds a gloo backend for CPU tensors (``cpu_offload`` shards);
- ``optimizer_step``: steps a fused torch Adam/AdamW on the local shards (``fused_adam_on_local_shards``) and frees
  the gradients right after the step (``free_gradients_after_step``);
- the SIGTERM handler and the fit loop's per-batch SIGTERM check: agreed on over the CPU (gloo) half of the process
  group instead of with an NCCL broadcast and a GPU sync at every batch start (see ``_agree_on_sigterm``);
- ``setup``: applies activation checkpointing and ``fully_shard`` itself instead of requiring ``configure_model``
  (upstream raises ``TypeError`` without it); derives the FSDP2 ``MixedPrecisionPolicy`` from the precision plugin;
  under ``cpu_offload`` skips moving the model to the GPU (upstream always does, which would undo the offload).

fp16: pass ``plugins=[LossScalingPrecision("16-mixed")]`` (CPU and GPU; parameters all-gathered in fp16, fp32
gradients, every rank skips an overflowing step together). Lightning's accelerator connector rejects
``Trainer(strategy=EffiFSDPStrategy(...), precision="16-mixed")`` before any strategy code runs (an ``isinstance``
check on ``ModelParallelStrategy``); ``strategy="effi_fsdp", precision="16-mixed"`` passes it and gets Lightning's
``GradScaler`` (CUDA only; torch's DTensor handler makes its overflow flag agree across ranks).

Sharding plan: every module whose class name is in ``wrap`` becomes one FSDP unit (all-gathered before its
forward, resharded after), then every direct child of the LightningModule that holds parameters becomes a root
unit for the remaining parameters (embeddings, final norm, heads). The LightningModule itself is not wrapped:
Lightning calls ``training_step``, not ``forward``, and FSDP2 hooks ``forward``. With the default
``reshard_after_forward=True`` this is the layout of a hand-written FSDP2 setup (``fully_shard`` per block, then on
the model with FSDP2's defaults): wrapped units reshard after forward, root units keep their parameters until
backward, which starts with them (the output head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_effi import _compat
from lightning_effi.strategies._local_adam import local_shard_steps

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


def _check_names(value: Optional[Sequence[str]], what: str) -> Optional[list[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(f"{what} must be a list of class names, got the string {value!r}; write [{value!r}]")
    out = list(value)
    for name in out:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what} entries must be non-empty class-name strings, got {name!r}")
    return out


def _class_names(cls: type) -> tuple[str, str]:
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def _find_modules(root: nn.Module, names: Sequence[str], what: str) -> list[nn.Module]:
    """Modules of ``root`` (pre-order) whose class name, or ``module.QualName``, is in ``names``.

    Raises ``ValueError`` listing the class names present when a name matches nothing: a typo must not silently
    leave a model unsharded (or un-checkpointed), which would only show up later as memory or speed.
    """
    wanted = set(names)
    found: list[nn.Module] = []
    matched: set[str] = set()
    for module in root.modules():
        hit = wanted.intersection(_class_names(type(module)))
        if hit:
            found.append(module)
            matched |= hit
    missing = [n for n in names if n not in matched]
    if missing:
        present = sorted({type(m).__name__ for m in root.modules()})
        raise ValueError(
            f"{what} class name(s) {missing} match no module of {type(root).__name__}. Module classes present: "
            f"{present}. Use one of these names (or 'package.module.ClassName')."
        )
    return found


def _auto_wrap_names(root: nn.Module) -> list[str]:
    """Class names of the children of every ``nn.ModuleList``: the repeated blocks of a transformer."""
    names: dict[str, None] = {}
    for module in root.modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                if any(True for _ in child.parameters()):
                    names[type(child).__name__] = None
    return list(names)


# Set by _on_sigterm on the trainer's signal connector: this rank was signalled, not yet agreed on by all ranks.
_SIGTERM_PENDING = "_effi_sigterm_pending"


def _on_sigterm(connector: Any, signum: int, frame: Any) -> None:
    """SIGTERM handler replacing Lightning's ``_SignalConnector._sigterm_notifier_fn`` for multi-process fits.

    Lightning's handler broadcasts on the root device from inside the signal handler, at whatever point the main
    thread was interrupted, and sets ``trainer.received_sigterm``, which makes the signalled rank leave after the
    current batch on its own; the other ranks learn it by pairing that broadcast with their next per-batch one.
    During ``fit`` the signal is only recorded here: every rank learns it at the next training-batch start from
    ``_agree_on_sigterm`` and all leave before that batch together. A signal during fit's validation therefore takes
    effect once validation is done (leaving a rank alone in the middle of it would hang the others' collectives); one
    after the last training batch sets ``received_sigterm`` when fit ends (``EffiFSDPStrategy.on_train_end``). In
    ``validate``/``test``/``predict`` it sets ``received_sigterm`` at once, as upstream (without the broadcast).
    """
    if not getattr(connector, _SIGTERM_PENDING, False) and not connector.received_sigterm:
        launcher = connector.trainer.strategy.launcher
        if launcher is not None:
            launcher.kill(signum)  # as upstream: forward the signal to the processes Lightning started
    if connector.trainer.state.fn == TrainerFn.FITTING:
        setattr(connector, _SIGTERM_PENDING, True)
    else:
        connector.received_sigterm = True


def _agree_on_sigterm(loop: Any) -> None:
    """Replacement for ``_TrainingEpochLoop._broadcast_sigterm_tensor``: the same decision, made on the host.

    Lightning broadcasts a one-element tensor on the root device at the start of every training batch and reads it
    back with ``.item()``. On CUDA that is an NCCL broadcast plus a device sync per batch: the host waits for the
    previous step's kernels, the GPU queue drains, and the next step's launch overhead is no longer hidden
    (measured: 1.6% of compiled EffiFSDP throughput and 5.7% of hand-written FSDP2's on 2xH200, BENCHMARKS.md 3a
    v6). Here a CPU tensor is max-reduced over the gloo half of the process group: no GPU involvement, and a signal
    on any rank (not only rank 0) stops every rank at the same batch, after which ``trainer.received_sigterm`` is set
    everywhere (callbacks' ``on_exception`` see it as usual).
    """
    trainer = loop.trainer
    connector = trainer._signal_connector
    local = bool(getattr(connector, _SIGTERM_PENDING, False) or trainer.received_sigterm)
    flag = torch.tensor([int(local)], dtype=torch.int32)
    try:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    except Exception:  # a broken group: fall back to this rank's own flag rather than never stopping
        flag.fill_(int(local))
    if int(flag[0]) == 1:
        connector.received_sigterm = True
        with contextlib.suppress(Exception):
            torch.distributed.barrier()  # as upstream: every rank leaves together
        raise SIGTERMException()


def _install_host_sigterm_check(trainer: Trainer) -> bool:
    """Use ``_on_sigterm`` and ``_agree_on_sigterm`` in ``trainer`` when the default group can reduce CPU tensors.

    Called from ``setup``, before Lightning registers its signal handlers. Returns whether it was installed; a
    Lightning without these private methods keeps its own behaviour, and so do a single process (no per-batch
    agreement there) and a group without gloo (e.g. ``process_group_backend="nccl"``).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or trainer.world_size < 2:
        return False  # one process: Lightning's loop never agrees, its handler's own flag is what stops it
    if "gloo" not in str(torch.distributed.get_backend()):
        return False
    if not _compat.install_sigterm_agreement(trainer, _agree_on_sigterm, _on_sigterm):
        return False
    setattr(trainer._signal_connector, _SIGTERM_PENDING, False)
    return True


def _group_siblings(root: nn.Module, units: list[nn.Module], names: dict[int, str],
                    size: int) -> list[list[nn.Module]]:
    """``units`` cut into FSDP units of up to ``size`` modules: runs of consecutive entries of one ``nn.ModuleList`` /
    ``nn.Sequential`` with the same class (the repeated blocks, which run back to back). Anything else stays a unit
    of its own, in particular direct children of ``root``: those become FSDP roots, and FSDP2 wants one module per
    root."""
    groups: list[list[nn.Module]] = []
    previous: Optional[tuple[str, type, int]] = None  # (parent, class, index) of the last module added
    for unit in units:
        parent, _, leaf = names[id(unit)].rpartition(".")
        container = root.get_submodule(parent) if parent else None
        key = None
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and leaf.isdigit():
            key = (parent, type(unit), int(leaf))
        follows = (key is not None and previous is not None and key[:2] == previous[:2]
                   and key[2] == previous[2] + 1 and len(groups[-1]) < size)
        if follows:
            groups[-1].append(unit)
        else:
            groups.append([unit])
        previous = key
    return groups


class EffiFSDPStrategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) for any LightningModule, without a ``configure_model``.

    Args:
        wrap: class names (``"Block"`` or ``"pkg.module.Block"``) of the modules to shard as units; each unit is
            all-gathered just before its forward/backward and resharded after, so peak memory holds one unit's
            full parameters at a time. ``None`` (default): the classes of the children of every ``nn.ModuleList``
            (the transformer blocks of most models), logged at setup. ``[]``: only the root units. A name that
            matches no module raises ``ValueError`` listing the classes present.
        reshard_after_forward: free the all-gathered parameters of each wrapped unit after its forward (ZeRO-3
            memory, one more all-gather in backward). ``False`` keeps them until backward (ZeRO-2 like: faster, more
            memory). An int reshards to that smaller group size (e.g. the GPUs of one node). With ``True`` (default)
            the root units (embeddings, final norm, output head) are not resharded, as FSDP2 does for a root by
            default: backward starts with the output head, so resharding them would only add an all-gather that
            nothing can hide; the root's pre-backward prefetches the last wrapped unit instead. ``False``/int apply
            to root units too.
        activation_checkpointing: class names of modules whose activations are recomputed in backward instead of
            stored (torch's composable ``checkpoint``, so parameter names and checkpoints are unchanged).
        wrap_group_size: shard this many consecutive wrapped entries of one ``nn.ModuleList``/``nn.Sequential``
            with the same class (e.g. 2 neighbouring ``Block``) together as one FSDP unit (default 1: one unit per
            module; other wrapped modules always stay units of their own). Fewer units mean fewer FSDP hooks on the
            host and fewer, larger collectives, at the cost of one group's full parameters alive at a time instead of
            one module's. Parameter names and checkpoints do not change.
        compile: ``torch.compile`` the ``forward`` of every wrapped module (each ``Block``), keeping FSDP2's
            all-gather/reshard hooks outside the compiled code (torchtitan's per-block layout: one small graph reused
            by every block, no graph breaks at the hooks). Fuses layer norms, activations and residual adds. Parameter
            names and checkpoints are unchanged. Not combinable with ``activation_checkpointing`` yet. Default False.
        cpu_offload: keep sharded parameters, gradients and optimizer state in pinned CPU memory; the optimizer
            step runs on the CPU. GPU only. The process group then becomes ``"cpu:gloo,cuda:nccl"`` (unless
            ``process_group_backend`` is given), so collectives on the offloaded tensors (gradient-norm clipping,
            LAMB's norms) have a CPU backend.
        param_dtype: dtype parameters are all-gathered in for compute. ``"auto"``: ``bfloat16`` for
            ``"bf16-mixed"``, ``float16`` for ``"16-mixed"`` (Lightning's or ``LossScalingPrecision``), unchanged for
            ``"*-true"`` precisions.
        reduce_dtype: dtype of the gradient reduce-scatter. ``"auto"``: ``float32`` for mixed precision.
        free_gradients_after_step: set gradients to ``None`` right after each optimizer step (default ``True``).
            Lightning zeroes them inside the next step's closure *after* its forward, so the previous step's sharded
            fp32 gradients (4 bytes x parameters / world size: 2.6 GB per GPU for a 1.3B model on 2 GPUs) would stay
            alive through the forward, where activation memory peaks. Hooks up to ``on_before_optimizer_step`` still
            see the gradients; only code reading ``p.grad`` after the step (``on_train_batch_end``) sees ``None``.
        save_distributed_checkpoint: ``True`` (default) saves a torch.distributed.checkpoint directory, one shard
            file per rank plus metadata, loadable on any world size; ``False`` gathers one full ``.ckpt`` file on
            rank 0. ``lightning_effi.export.export_checkpoint`` turns either into a plain ``state_dict`` file.
        fused_adam_on_local_shards: run the step of a ``torch.optim.Adam``/``AdamW(fused=True)`` on the local shards
            of the sharded tensors instead of through DTensor's dispatcher (default ``True``): the same kernel and
            results with less host time per step. Other optimizers are unaffected.
        process_group_backend: ``"nccl"`` / ``"gloo"``; default from the device (``"cpu:gloo,cuda:nccl"`` on GPUs:
            the gloo half also carries the fit loop's per-batch SIGTERM agreement, so no batch waits for the GPU;
            with ``"nccl"`` alone Lightning's device broadcast and sync stay).
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
        self.wrap = _check_names(wrap, "wrap")
        self.activation_checkpointing = _check_names(activation_checkpointing, "activation_checkpointing") or []
        if isinstance(reshard_after_forward, bool):
            pass
        elif isinstance(reshard_after_forward, int) and reshard_after_forward >= 1:
            pass
        else:
            raise ValueError(
                f"Invalid reshard_after_forward {reshard_after_forward!r}: must be True, False or a positive group size"
            )
        self.reshard_after_forward = reshard_after_forward
        if not isinstance(compile, bool):
            raise TypeError(f"Invalid compile {compile!r}: must be True or False")
        if compile and self.activation_checkpointing:
            raise ValueError(
                f"compile=True with activation_checkpointing={self.activation_checkpointing} is not supported: the "
                "recomputation hooks would sit inside the compiled forward. Use one of the two."
            )
        self.compile = compile
        if isinstance(wrap_group_size, bool) or not isinstance(wrap_group_size, int) or wrap_group_size < 1:
            raise ValueError(f"Invalid wrap_group_size {wrap_group_size!r}: must be a positive int (1: one unit per "
                             "wrapped module)")
        self.wrap_group_size = wrap_group_size
        if not isinstance(cpu_offload, bool):
            raise TypeError(f"Invalid cpu_offload {cpu_offload!r}: must be True or False")
        self.cpu_offload = cpu_offload
        for what, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value != "auto" and value not in _DTYPES:
                raise ValueError(f"Invalid {what} {value!r}: must be 'auto' or one of {sorted(_DTYPES)}")
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        if not isinstance(free_gradients_after_step, bool):
            raise TypeError(f"Invalid free_gradients_after_step {free_gradients_after_step!r}: must be True or False")
        self.free_gradients_after_step = free_gradients_after_step
        if not isinstance(fused_adam_on_local_shards, bool):
            raise TypeError(f"Invalid fused_adam_on_local_shards {fused_adam_on_local_shards!r}: must be True or False")
        self.fused_adam_on_local_shards = fused_adam_on_local_shards

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
            # take norms of; and the per-batch SIGTERM agreement (_agree_on_sigterm). The gloo half is always added
            # on CUDA, because the default group is created once per process and a later Trainer with cpu_offload=True
            # reuses it (its cost: one small gloo group at init).
            return "cpu:gloo,cuda:nccl"
        return super()._get_process_group_backend()

    @override
    def setup(self, trainer: Trainer) -> None:
        # Replaces ModelParallelStrategy.setup, whose only difference is that it demands `configure_model`.
        # Order matters: validate and shard before anything is materialised or moved, so a too-large model never
        # exists unsharded on one device; optimizers are created afterwards and so see the sharded DTensors.
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        if self.cpu_offload and self.root_device.type != "cuda":
            raise RuntimeError(
                "EffiFSDPStrategy(cpu_offload=True) moves sharded state from the GPU to the CPU, but the accelerator "
                f"is {self.root_device.type!r}; set cpu_offload=False (on CPU everything already is in host memory)."
            )
        if not getattr(module, _SHARDED_FLAG, False):
            self.model = self.precision_plugin.convert_module(self.model)
            self._shard(module)
        _materialize_distributed_module(self.model, self.root_device)
        if not self.cpu_offload:
            self.model_to_device()  # parameters and buffers fully_shard did not own (outside every unit)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            _install_host_sigterm_check(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING and not self.cpu_offload:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        # A SIGTERM after the last training batch's agreement (last batch, final validation) was never agreed on:
        # report it like upstream would, so requeue logic that reads trainer.received_sigterm after fit sees it.
        connector = getattr(getattr(self.lightning_module, "_trainer", None), "_signal_connector", None)
        if connector is not None and getattr(connector, _SIGTERM_PENDING, False):
            connector.received_sigterm = True
            setattr(connector, _SIGTERM_PENDING, False)

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Optional[nn.Module] = None, **kwargs: Any
    ) -> Any:
        inner = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        with local_shard_steps(inner) if self.fused_adam_on_local_shards else contextlib.nullcontext():
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.free_gradients_after_step:
            # Lightning would free them only after the next forward (see the class docstring).
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
        param = auto[0] if self.param_dtype == "auto" else _DTYPES[self.param_dtype]
        reduce = auto[1] if self.reduce_dtype == "auto" else _DTYPES[self.reduce_dtype]
        return param, reduce

    def _shard(self, module: LightningModule) -> None:
        from torch.distributed._composable import checkpoint
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            FSDPModule,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )
        from torch.distributed.tensor import DTensor

        if any(isinstance(m, FSDPModule) for m in module.modules()):
            where = "configure_model" if is_overridden("configure_model", module) else "your code"
            raise RuntimeError(
                f"{type(module).__name__} is already sharded with fully_shard (in {where}). EffiFSDPStrategy shards "
                "the module itself: remove those fully_shard calls, or use Lightning's ModelParallelStrategy."
            )
        direct = [name for name, _ in module.named_parameters(recurse=False)]
        if direct:
            raise RuntimeError(
                f"EffiFSDPStrategy shards the child modules of {type(module).__name__}, but parameters {direct} are "
                "registered on the LightningModule itself and would be neither sharded nor reduced across ranks. "
                "Move them into a submodule (e.g. self.model)."
            )
        wrap = self.wrap if self.wrap is not None else _auto_wrap_names(module)
        units = _find_modules(module, wrap, "wrap") if wrap else []
        unit_classes = sorted({type(u).__name__ for u in units})  # before fully_shard renames them FSDP<cls>
        names = {id(m): name for name, m in module.named_modules()}
        ac_modules = _find_modules(module, self.activation_checkpointing, "activation_checkpointing")
        param_dtype, reduce_dtype = self.mixed_precision_dtypes()
        kwargs: dict[str, Any] = {
            "mesh": self.device_mesh["data_parallel"],
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
            "offload_policy": CPUOffloadPolicy(pin_memory=True) if self.cpu_offload else OffloadPolicy(),
        }
        for m in ac_modules:
            checkpoint(m)
        # Innermost groups first: fully_shard on a parent only takes the parameters its sharded children left over.
        groups = sorted(_group_siblings(module, units, names, self.wrap_group_size),
                        key=lambda g: -names[id(g[0])].count("."))
        # True -> None for units that end up FSDP roots (direct children of the LightningModule: the root units
        # below, or a wrapped unit such as wrap=["GPT"]): FSDP2's default, which keeps a root's parameters from
        # forward to backward. Backward starts with them (the output head), so resharding would only add an
        # all-gather of embedding + head per step that nothing can hide.
        root_reshard = None if self.reshard_after_forward is True else self.reshard_after_forward
        for group in groups:
            top_level = "." not in names[id(group[0])]
            fully_shard(group if len(group) > 1 else group[0],
                        reshard_after_forward=root_reshard if top_level else self.reshard_after_forward, **kwargs)
            for unit in group if self.compile else ():
                # An instance attribute: nn.Module.__call__ runs FSDP2's hooks eagerly around it.
                unit.forward = torch.compile(unit.forward)
        # A child whose parameters are all DTensors already is covered (a wrapped unit, or an alias such as a
        # torch.compile'd view of another child); sharding it again would create an empty unit.
        roots = [c for c in module.children() if any(not isinstance(p, DTensor) for p in c.parameters())]
        root_classes = [type(c).__name__ for c in roots]
        for child in roots:
            fully_shard(child, reshard_after_forward=root_reshard, **kwargs)
        object.__setattr__(module, _SHARDED_FLAG, True)
        rank_zero_info(
            f"EffiFSDPStrategy: {len(groups)} unit(s) of {len(units)} {unit_classes} + {len(roots)} root(s) "
            f"{root_classes} over {self.world_size} rank(s); "
            f"param_dtype={param_dtype}, reduce_dtype={reduce_dtype}, activation checkpointing on "
            f"{len(ac_modules)} module(s), compiled units: {self.compile}"
        )
