"""Every runtime patch of another library and every use of a private API, in one place.

Upgrading torch, Lightning or DeepSpeed is the main risk to this package: a private function that changes its
signature, or a method an override relies on, would otherwise break silently (a lost speed-up) or late (a crash mid
run). Each entry below says what it relies on and the versions it was written for, and :data:`CHECKS` holds one
check per entry that the test suite runs (``tests/test_compat.py``), so an upgrade fails loudly in CI instead.

Written for: torch 2.11-2.13, lightning 2.6, deepspeed 0.19.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import re
import types
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

import torch

WRITTEN_FOR = {"torch": "2.11-2.13", "lightning": "2.6", "deepspeed": "0.19"}


@dataclass(frozen=True)
class Check:
    """One private dependency: ``check()`` raises ``AssertionError`` naming what changed, or ``ImportError`` when
    the optional package is not installed (the test then skips)."""

    name: str
    relies_on: str
    check: Callable[[], None]


CHECKS: list[Check] = []


def _register(name: str, relies_on: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def deco(fn: Callable[[], None]) -> Callable[[], None]:
        CHECKS.append(Check(name, relies_on, fn))
        return fn

    return deco


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _has_params(fn: Any, names: Iterable[str], what: str) -> None:
    have = _params(fn)
    missing = [n for n in names if n not in have]
    assert not missing, f"{what} lost the parameters {missing}; it takes {have} now"


def _schema_args(op: str) -> list[str]:
    """Argument names of every overload of a native torch operator."""
    names: list[str] = []
    for schema in torch._C._jit_get_schemas_for_operator(op):
        names += [a.name for a in schema.arguments]
    return names


# ------------------------------------------------------------------------------------------------- torch kernels
def fused_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], state_steps: list[torch.Tensor], *, lr: float, beta1: float,
                 beta2: float, weight_decay: float, eps: float) -> None:
    """torch's fused AdamW kernel (``torch._fused_adamw_``), used by Lamb's CPU path on a scratch copy."""
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], state_steps, amsgrad=False, lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False)


def has_fused_adamw() -> bool:
    return hasattr(torch, "_fused_adamw_")


@_register("torch._fused_adamw_", "Lamb's CPU step runs torch's fused AdamW kernel on a copy of each parameter")
def _check_fused_adamw() -> None:
    assert has_fused_adamw(), "torch._fused_adamw_ is gone"
    args = _schema_args("aten::_fused_adamw_")
    for name in ("lr", "beta1", "beta2", "weight_decay", "eps", "amsgrad", "maximize", "grad_scale", "found_inf"):
        assert name in args, f"aten::_fused_adamw_ has no argument {name!r} any more ({sorted(set(args))})"


def non_finite_check_and_unscale_(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """torch's fused overflow check + unscale (what GradScaler uses)."""
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)


@_register("torch._amp_foreach_non_finite_check_and_unscale_", "DynamicLossScaler's one-kernel check and unscale")
def _check_amp_unscale() -> None:
    args = _schema_args("aten::_amp_foreach_non_finite_check_and_unscale_")
    assert args[:3] == ["self", "found_inf", "inv_scale"], f"its arguments are {args} now"


@_register("torch.optim fused Adam/AdamW: grad_scale/found_inf and a tensor lr",
           "LossScalingPrecision steps torch's fused optimizers with found_inf (they skip an overflowing step in "
           "their kernel) and a 0-dim device lr (a schedule held on the device)")
def _check_fused_adam_protocol() -> None:
    from torch.optim import adam, adamw

    _has_params(adam.adam, ("grad_scale", "found_inf", "fused", "lr", "decoupled_weight_decay"),
                "torch.optim.adam.adam")
    _has_params(adam._fused_adam, ("grad_scale", "found_inf", "lr"), "torch.optim.adam._fused_adam")
    p = torch.nn.Parameter(torch.zeros(1))
    assert getattr(adamw.AdamW([p], fused=True), "_step_supports_amp_scaling", False), \
        "AdamW(fused=True) no longer sets _step_supports_amp_scaling"


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """Whether inductor can generate Triton kernels here (torch's private helper)."""
    try:
        from torch.utils._triton import has_triton as _has_triton
    except ImportError:
        return False
    return bool(_has_triton())


@_register("torch.utils._triton.has_triton", "compile the loss and the scaler rule only where Triton kernels exist")
def _check_has_triton() -> None:
    from torch.utils._triton import has_triton as _has_triton

    assert _params(_has_triton) == [], f"has_triton takes {_params(_has_triton)} now"


@_register("torch.optim.lr_scheduler internals",
           "held schedules copy a scheduler (its __dict__, nested _schedulers), step the copy and load its "
           "state_dict snapshots into the original")
def _check_lr_scheduler() -> None:
    from torch.optim.lr_scheduler import LRScheduler, SequentialLR

    _has_params(LRScheduler.step, ("epoch",), "LRScheduler.step")
    _has_params(LRScheduler.load_state_dict, ("state_dict",), "LRScheduler.load_state_dict")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    seq = SequentialLR(opt, [torch.optim.lr_scheduler.ConstantLR(opt, total_iters=1)] * 2, milestones=[1])
    assert isinstance(getattr(seq, "_schedulers", None), list), "SequentialLR keeps its schedulers elsewhere now"


# ---------------------------------------------------------------------------------------- torch.distributed.checkpoint
def dcp_load_keys(keys: set[str], checkpoint_id: str) -> dict[str, Any]:
    """Load only ``keys`` of a DCP checkpoint in one process (torch's private reader; the public
    ``dcp_to_torch_save`` would also load every optimizer state)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return _load_state_dict_from_keys(keys=keys, checkpoint_id=checkpoint_id)


@_register("torch.distributed.checkpoint.state_dict_loader._load_state_dict_from_keys",
           "effi export reads a sharded checkpoint's model weights without its optimizer state")
def _check_dcp_loader() -> None:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    _has_params(_load_state_dict_from_keys, ("keys", "checkpoint_id"), "_load_state_dict_from_keys")


# --------------------------------------------------------------------------------------------------- Lightning
def install_sigterm_agreement(trainer: Any, agree: Callable[[Any], None],
                              on_signal: Callable[[Any, int, Any], None]) -> bool:
    """Replace, on this trainer's instances only, Lightning's per-batch SIGTERM broadcast
    (``_TrainingEpochLoop._broadcast_sigterm_tensor``) and its signal handler (``_SignalConnector.
    _sigterm_notifier_fn``). Returns False (nothing replaced) on a Lightning without them."""
    loop: Any = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    connector: Any = getattr(trainer, "_signal_connector", None)
    if not (hasattr(type(loop), "_broadcast_sigterm_tensor") and hasattr(type(connector), "_sigterm_notifier_fn")):
        return False
    loop._broadcast_sigterm_tensor = types.MethodType(agree, loop)
    connector._sigterm_notifier_fn = types.MethodType(on_signal, connector)
    return True


@_register("lightning _broadcast_sigterm_tensor / _sigterm_notifier_fn",
           "EffiFSDPStrategy agrees on SIGTERM over gloo on the host instead of a per-batch device broadcast")
def _check_sigterm_hooks() -> None:
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    assert _params(_TrainingEpochLoop._broadcast_sigterm_tensor) == ["self"]
    assert _params(_SignalConnector._sigterm_notifier_fn)[1:] == ["signum", "_"] or \
        len(_params(_SignalConnector._sigterm_notifier_fn)) == 3, "_sigterm_notifier_fn(self, signum, frame) changed"
    src = inspect.getsource(_TrainingEpochLoop.advance)
    assert "_broadcast_sigterm_tensor" in src, "the training loop no longer calls _broadcast_sigterm_tensor"


def module_of_attached_log(fn: Any) -> Any:
    """The LightningModule whose ``log`` method ``fn`` is, else None. ``Trainer._run`` assigns every callback
    ``callback.log = lightning_module.log`` (``_CallbackConnector._attach_model_logging_functions``) before it checks
    that the module defines ``configure_optimizers``: the one point before that check where a callback sees the
    module."""
    from lightning.pytorch import LightningModule

    module = getattr(fn, "__self__", None)
    return module if isinstance(module, LightningModule) else None


@_register("lightning _attach_model_logging_functions order",
           "ConfigureOptimizer supplies configure_optimizers when the Trainer assigns callback.log, before "
           "_verify_loop_configurations requires the method")
def _check_attached_log() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.connectors.callback_connector import _CallbackConnector

    src = inspect.getsource(_CallbackConnector._attach_model_logging_functions)
    assert "callback.log = lightning_module.log" in src, "callbacks no longer get the module's log assigned"
    run = inspect.getsource(Trainer._run)
    order = [run.find(s) for s in ("_attach_model_logging_functions()", "_verify_loop_configurations(",
                                   "_call_setup_hook(")]
    assert -1 not in order and order == sorted(order), \
        "Trainer._run no longer attaches logging functions before verifying the loop configuration and setup"


def filter_last_checkpoints(select: Callable[[Any, set[str]], set[str]]) -> None:
    """Pass the candidates Lightning considers for ``ckpt_path="last"`` (``ModelCheckpoint._find_last_checkpoints(
    trainer)``, the ``last*.ckpt`` entries of its directory; the Trainer loads the newest) through
    ``select(trainer, candidates)``. Installed once for the class: Lightning resolves "last" before any strategy or
    plugin hook sees the Trainer, and under torchrun no launcher runs first either; ``select`` returns the candidates
    unchanged for a Trainer that uses none of the package's checkpointing."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if getattr(ModelCheckpoint._find_last_checkpoints, "_effi_select", None) is not None:
        return
    original = ModelCheckpoint._find_last_checkpoints

    @functools.wraps(original)
    def _find_last_checkpoints(self: Any, trainer: Any) -> set[str]:
        return select(trainer, original(self, trainer))

    _find_last_checkpoints._effi_select = select  # type: ignore[attr-defined]
    ModelCheckpoint._find_last_checkpoints = _find_last_checkpoints  # type: ignore[method-assign]


@_register("lightning ModelCheckpoint._find_last_checkpoints and ckpt_path='last'",
           "AtomicCheckpointIO drops incomplete candidates of ckpt_path='last'; a directory replaced without an "
           "atomic swap is moved aside under <stem>.old-<token>.ckpt, which Lightning still takes for a last "
           "checkpoint")
def _check_find_last_checkpoints() -> None:
    import tempfile
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    find = inspect.unwrap(ModelCheckpoint._find_last_checkpoints)
    assert _params(find) == ["self", "trainer"], f"_find_last_checkpoints takes {_params(find)} now"
    src = inspect.getsource(_CheckpointConnector._parse_ckpt_path)
    assert "callback._find_last_checkpoints(self.trainer)" in src, \
        "ckpt_path='last' no longer collects ModelCheckpoint._find_last_checkpoints(trainer)"
    assert re.search(r"max\(candidates_ts", src), "ckpt_path='last' no longer takes the newest candidate"
    with tempfile.TemporaryDirectory() as d:
        names = ["last.ckpt", "last-v1.ckpt", "last.old-0123456789ab.ckpt", "last.ckpt.tmp-0123456789ab",
                 "last.ckpt.del-0123456789ab", "epoch=0.ckpt"]
        for name in names:
            Path(d, name).touch()
        found = {Path(p).name for p in find(ModelCheckpoint(dirpath=d), None)}
        assert found == set(names[:3]), f"the 'last' candidates of {sorted(names)} are {sorted(found)} now"


def default_store() -> Any:
    """The default process group's key-value store (rank 0's ``TCPStore`` under torchrun and Lightning's launchers),
    or None when no process group is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()


@_register("torch default store", "the fail-fast watchdog posts and polls a rank's failure in the job's store")
def _check_default_store() -> None:
    import torch.distributed as dist

    fn = dist.distributed_c10d._get_default_store
    assert callable(fn) and not _params(fn), "distributed_c10d._get_default_store() changed"
    for name in ("set", "get", "check"):
        assert hasattr(dist.Store, name), f"torch.distributed.Store lost {name}()"


def coalesced_all_reduce(tensors: list[torch.Tensor], group: Any = None) -> None:
    """Sum ``tensors`` (one dtype) over ``group`` in one coalesced all-reduce (one NCCL group call, gloo's
    ``allreduce_coalesced``), without copying them into a flat buffer."""
    import torch.distributed as dist

    with dist._coalescing_manager(group=group, async_ops=True) as cm:
        for t in tensors:
            dist.all_reduce(t, group=group)
    cm.wait()


@_register("torch.distributed._coalescing_manager and DDP.require_backward_grad_sync",
           "AutoMicroBatch(on_oom='split') turns DDP's reducer off inside backward and averages the gradients itself "
           "in one coalesced all-reduce at the window's end")
def _check_coalescing_and_ddp_sync_flag() -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    _has_params(dist._coalescing_manager, ["group", "async_ops"], "torch.distributed._coalescing_manager")
    assert hasattr(dist.ProcessGroup, "allreduce_coalesced"), "ProcessGroup lost allreduce_coalesced"
    for where in (DistributedDataParallel._pre_forward, DistributedDataParallel._post_forward,
                  DistributedDataParallel.no_sync):
        assert "require_backward_grad_sync" in inspect.getsource(where), \
            f"DistributedDataParallel.{where.__name__} no longer reads require_backward_grad_sync"


@_register("lightning Closure order: training_step, zero_grad, backward",
           "AutoMicroBatch sets the parts' gradients aside across the zero_grad the loop runs between a window's "
           "first training_step and its backward")
def _check_closure_order() -> None:
    from lightning.pytorch.loops.optimization.automatic import Closure

    src = inspect.getsource(Closure.closure)
    order = [src.find(s) for s in ("self._step_fn()", "self._zero_grad_fn()", "self._backward_fn(")]
    assert -1 not in order and order == sorted(order), \
        "Lightning's Closure no longer runs training_step, then zero_grad, then backward"


@_register("LightningCLI private methods",
           "the effi command overrides _parse_ckpt_path (resume checks), _instantiate_trainer (always-on callbacks "
           "and the --optimizer callback) and _add_configure_optimizers_method_to_model (--optimizer through "
           "ConfigureOptimizer), which must run before the Trainer is built")
def _check_lightning_cli_private() -> None:
    from lightning.pytorch.cli import LightningCLI

    assert _params(LightningCLI._parse_ckpt_path) == ["self"], "LightningCLI._parse_ckpt_path changed"
    assert _params(LightningCLI._instantiate_trainer) == ["self", "config", "callbacks"], \
        "LightningCLI._instantiate_trainer changed"
    assert _params(LightningCLI._add_configure_optimizers_method_to_model) == ["self", "subcommand"], \
        "LightningCLI._add_configure_optimizers_method_to_model changed"
    src = inspect.getsource(LightningCLI.instantiate_classes)
    order = [src.find(s) for s in ("_add_configure_optimizers_method_to_model(", "instantiate_trainer(")]
    assert -1 not in order and order == sorted(order), \
        "LightningCLI no longer adds the optimizer method before it instantiates the Trainer"


@_register("lightning private helpers", "the strategies use Lightning's registry, materialisation and optimizer moves")
def _check_lightning_helpers() -> None:
    from lightning.fabric.strategies.registry import _StrategyRegistry
    from lightning.fabric.utilities.init import _materialize_distributed_module
    from lightning.fabric.utilities.optimizer import _optimizers_to_device
    from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    _has_params(_StrategyRegistry.register, ("name", "strategy", "description"), "_StrategyRegistry.register")
    _has_params(_materialize_distributed_module, ("module", "device"), "_materialize_distributed_module")
    _has_params(_optimizers_to_device, ("optimizers", "device"), "_optimizers_to_device")
    _has_params(_init_optimizers_and_lr_schedulers, ("model",), "_init_optimizers_and_lr_schedulers")
    _has_params(_SubprocessScriptLauncher.launch, ("function",), "_SubprocessScriptLauncher.launch")


@_register("lightning ModelParallelStrategy hooks", "EffiFSDPStrategy overrides them")
def _check_model_parallel() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    for name, params in (("setup_environment", ["self"]), ("setup", ["self", "trainer"]),
                         ("optimizer_step", ["self", "optimizer", "closure", "model"]),
                         ("_get_process_group_backend", ["self"])):
        have = _params(getattr(ModelParallelStrategy, name))
        assert have[:len(params)] == params, f"ModelParallelStrategy.{name} takes {have} now"


@_register("lightning DeepSpeedStrategy private methods", "EffiDeepSpeedStrategy overrides them")
def _check_deepspeed_strategy() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    for name, params in (("_setup_model_and_optimizer", ["self", "model", "optimizer"]),
                         ("_initialize_deepspeed_train", ["self", "model"]),
                         ("_initialize_deepspeed_inference", ["self", "model"]),
                         ("_format_config", ["self"]), ("_configure_launcher", ["self"]),
                         ("_init_deepspeed_distributed", ["self"]), ("_auto_select_batch_size", ["self"])):
        assert hasattr(DeepSpeedStrategy, name), f"DeepSpeedStrategy.{name} is gone"
        have = _params(getattr(DeepSpeedStrategy, name))
        assert have[:len(params)] == params, f"DeepSpeedStrategy.{name} takes {have} now"


# --------------------------------------------------------------------------------------------------- DeepSpeed
@contextlib.contextmanager
def deepspeed_without_shm_build() -> Generator[None, None, None]:
    """Skip DeepSpeed's shared-memory all-reduce op while its communication backend initialises.

    DeepSpeed's TorchBackend JIT-compiles ``deepspeed_shm_comm`` (tens of seconds per process, needs a C++ compiler)
    the first time it starts; it is an intra-node fast path for all_reduce of CPU tensors, which gloo (CPU) or NCCL
    (GPU) also do. The module is fetched with importlib because ``import deepspeed.comm.torch`` binds the ``torch``
    package instead (``deepspeed.comm`` re-exports a ``torch`` name). The original is restored afterwards.
    """
    ds_torch: Any = importlib.import_module("deepspeed.comm.torch")
    original = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = original


@_register("deepspeed.comm.torch.build_shm_op", "skipped while DeepSpeed's communication backend initialises")
def _check_build_shm_op() -> None:
    ds_torch: Any = importlib.import_module("deepspeed.comm.torch")
    assert callable(getattr(ds_torch, "build_shm_op", None)), "deepspeed.comm.torch.build_shm_op is gone"
    assert _params(ds_torch.build_shm_op) == [], f"build_shm_op takes {_params(ds_torch.build_shm_op)} now"


@contextlib.contextmanager
def deepspeed_fp16_on_cpu() -> Generator[None, None, None]:
    """DeepSpeed's CPU accelerator reports fp16 support only where oneDNN has native fp16 kernels for the CPU model,
    while PyTorch computes fp16 on any CPU: report it while DeepSpeed builds its engine, then restore the
    accelerator's own answer."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    had = "is_fp16_supported" in vars(acc)
    original = vars(acc).get("is_fp16_supported")
    acc.is_fp16_supported = lambda: True
    try:
        yield
    finally:
        if had:
            acc.is_fp16_supported = original
        else:
            del acc.is_fp16_supported


@_register("deepspeed accelerator is_fp16_supported", "reported True while an fp16 engine is built on the CPU")
def _check_fp16_supported() -> None:
    from deepspeed.accelerator import get_accelerator

    assert _params(get_accelerator().is_fp16_supported) == [], "is_fp16_supported() takes arguments now"


# ------------------------------------------------------------------------------------ torch.optim Adam on local shards
# The param-group options of torch's Adam/AdamW that EffiFSDPStrategy's local-shard step passes to the functional adam.
_ADAM_OPTIONS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                           "differentiable", "fused", "decoupled_weight_decay"})
_ADAM_STATE = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})


def check_fused_param(p: torch.Tensor) -> None:
    """torch's check that ``p`` suits a fused optimizer (floating point, on a device with fused kernels): raises the
    ``RuntimeError`` torch's Adam raises when it creates the state."""
    from torch.optim.optimizer import _device_dtype_check_for_fused

    _device_dtype_check_for_fused(p)


@_register("torch.optim.adam.adam and the state of Adam(fused=True)",
           "EffiFSDPStrategy steps fused Adam/AdamW on local shards (strategies/_local_adam.py): it creates the state "
           "as Adam._init_group does, calls the functional adam with every option of the param group, and runs the "
           "step hooks through Optimizer.profile_hook_step")
def _check_functional_adam() -> None:
    from torch.optim import Optimizer
    from torch.optim.adam import adam
    from torch.optim.optimizer import _device_dtype_check_for_fused

    lists = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"]
    assert _params(adam)[:6] == lists, f"torch.optim.adam.adam takes {_params(adam)} now"
    _has_params(adam, ("foreach", "capturable", "differentiable", "fused", "grad_scale", "found_inf", "has_complex",
                       "decoupled_weight_decay", "amsgrad", "beta1", "beta2", "lr", "weight_decay", "eps", "maximize"),
                "torch.optim.adam.adam")
    _has_params(_device_dtype_check_for_fused, ("p",), "torch.optim.optimizer._device_dtype_check_for_fused")
    assert callable(getattr(Optimizer, "profile_hook_step", None)), "Optimizer.profile_hook_step is gone"
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        p = torch.nn.Parameter(torch.randn(3))
        opt = cls([p], fused=True, amsgrad=True)
        assert getattr(type(opt).step, "hooked", False), f"{cls.__name__}.step is not wrapped by profile_hook_step"
        options = set(opt.param_groups[0]) - {"params"}
        assert options == _ADAM_OPTIONS, (
            f"{cls.__name__}'s param groups changed options: new {sorted(options - _ADAM_OPTIONS)}, gone "
            f"{sorted(_ADAM_OPTIONS - options)}; step_on_local_shards passes each one to adam(): update it")
        p.grad = torch.ones(3)
        opt.step()
        state = opt.state[p]
        assert set(state) == _ADAM_STATE, f"{cls.__name__}(fused=True, amsgrad=True) keeps the state {sorted(state)}"
        step = state["step"]
        assert (step.shape, step.dtype, step.device) == ((), torch.float32, p.device), \
            f"the fused step count is {step.shape} {step.dtype} on {step.device} now"


def is_lr_scheduler_step_counter(optimizer: Any, step: Any) -> bool:
    """Whether ``step`` (an instance attribute of ``optimizer``) is the wrapper torch's LR schedulers put around the
    optimizer's own ``step`` to record that it ran."""
    return bool(getattr(step, "_wrapped_by_lr_sched", False)) and \
        getattr(step, "__wrapped__", None) is type(optimizer).step


def mark_stepped_for_lr_scheduler(optimizer: Any) -> None:
    """Record that ``optimizer.step`` ran, as that wrapper does (a scheduler's first ``step`` warns otherwise)."""
    optimizer._opt_called = True


@_register("torch.optim.lr_scheduler's optimizer.step counter",
           "the local-shard Adam step stands in for a step the LR scheduler wrapped and records the call as it does")
def _check_lr_scheduler_step_counter() -> None:
    from torch.optim.lr_scheduler import LambdaLR, LRScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    LambdaLR(opt, lambda _: 1.0)
    own = vars(opt).get("step")
    assert own is not None and is_lr_scheduler_step_counter(opt, own), \
        "LR schedulers no longer wrap optimizer.step in the instance (_wrapped_by_lr_sched, __wrapped__)"
    assert not getattr(opt, "_opt_called", False)
    opt.step()
    assert getattr(opt, "_opt_called", False) is True, "the scheduler's step wrapper no longer sets _opt_called"
    assert "_opt_called" in inspect.getsource(LRScheduler.step), "LRScheduler.step no longer reads _opt_called"


def composable_checkpoint(module: torch.nn.Module) -> None:
    """torch's composable activation checkpointing: ``module``'s activations are recomputed in backward, its
    parameter names stay as they are."""
    from torch.distributed._composable import checkpoint

    checkpoint(module)


@_register("torch.distributed._composable.checkpoint", "apply_fsdp's activation checkpointing keeps parameter names")
def _check_composable_checkpoint() -> None:
    from torch.distributed._composable import checkpoint

    _has_params(checkpoint, ("module",), "torch.distributed._composable.checkpoint")
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    names = [n for n, _ in m.named_parameters()]
    checkpoint(m[0])
    assert [n for n, _ in m.named_parameters()] == names, "checkpoint() renames parameters now"


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO
# ZeRO's optimizers and parameters only get these attributes when they are built, which needs a process group; the
# checks read the assignments in the constructors' source instead.
def _set_in(fn: Any, names: Iterable[str], what: str) -> None:
    src = inspect.getsource(fn)
    missing = [n for n in names if not re.search(rf"\bself\.{n}\s*(:[^=\n]*)?=(?!=)", src)]
    assert not missing, f"{what} no longer sets {missing}"


def _undecorated(fn: Any, name: str) -> Any:
    """``fn`` under decorators that return a closure without ``functools.wraps`` (DeepSpeed's ``instrument_w_nvtx``)."""
    fn = inspect.unwrap(fn)
    if fn.__name__ == name:
        return fn
    for cell in fn.__closure__ or ():
        inner = cell.cell_contents
        if inspect.isfunction(inner) and inner.__name__ == name:
            return inner
    raise AssertionError(f"cannot find the function {name!r} under its decorator {fn.__qualname__}")


@_register("deepspeed ZeRO-1/2 and bf16 optimizers: bit16_groups / bf16_groups, dp_process_group, _hp_mapping",
           "Lamb's flat layouts under ZeRO 1/2 (strategies/_zero_layout.stage12_segments) read the model's parameters "
           "per param group and each one's (start, numel) in this rank's flat fp32 partition")
def _check_zero12_layout() -> None:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils.mixed_precision_linkage import link_hp_params

    for cls, groups in ((DeepSpeedZeroOptimizer, "bit16_groups"), (BF16_Optimizer, "bf16_groups")):
        _set_in(cls.__init__, (groups, "dp_process_group", "optimizer"), f"{cls.__name__}.__init__")
        assert re.search(rf"link_hp_params\(\s*lp_param_list=self\.{groups}\[", inspect.getsource(cls)), \
            f"{cls.__name__} no longer links its {groups} to the flat partition with link_hp_params"
    # is_stage3 tells the optimizers apart by the ZeRO-3 attributes
    assert not re.search(r"\bself\.fp32_partitioned_groups_flat\s*=", inspect.getsource(DeepSpeedZeroOptimizer)), \
        "DeepSpeedZeroOptimizer now has fp32_partitioned_groups_flat, which _zero_layout.is_stage3 reads as ZeRO-3"
    _has_params(link_hp_params, ("lp_param_list", "flat_hp_partition", "partition_start", "partition_size",
                                 "dp_group"), "deepspeed link_hp_params")
    # A group of two 4-element parameters (Any: link_hp_params adds _hp_mapping to the tensors). A partition holding
    # elements [2, 6) of the flattened group has a piece of each; one holding [6, 8) has none of the first.
    a: Any = torch.zeros(4)
    b: Any = torch.zeros(4)
    for start, size in ((2, 4), (6, 2)):
        link_hp_params(lp_param_list=[a, b], flat_hp_partition=torch.zeros(size), gradient_dict={},
                       offload_gradient_dict={}, use_offload=False, param_group_index=0, partition_start=start,
                       partition_size=size, dp_group=None)
        got = [None if p._hp_mapping is None else
               (p._hp_mapping.get_hp_fragment_address().start, p._hp_mapping.get_hp_fragment_address().numel)
               for p in (a, b)]
        want = [(0, 2), (2, 2)] if start == 2 else [None, (0, 2)]
        assert got == want, f"_hp_mapping.get_hp_fragment_address() (start, numel) are {got} now, not {want}"


def wrap_zero3_optimizer_step(ds_optimizer: Any, around: Callable[[int, Callable[[int], None]], None]) -> None:
    """Route ZeRO-3's per-sub-group step ``ds_optimizer._optimizer_step(sub_group_id)`` through ``around(sub_group_id,
    original_step)``, on this optimizer instance only. Calling it again wraps DeepSpeed's own method, not the
    previous wrapper (after a checkpoint load)."""
    original = ds_optimizer._optimizer_step
    original = getattr(original, "_effi_original", original)

    def _optimizer_step(sub_group_id: int) -> None:
        around(sub_group_id, original)

    _optimizer_step._effi_original = original  # type: ignore[attr-defined]
    ds_optimizer._optimizer_step = _optimizer_step


@_register("deepspeed ZeRO-3 optimizer: fp16_groups, fp32_partitioned_groups_flat, sub-groups, _optimizer_step; "
           "ds_numel / ds_tensor.ds_numel",
           "Lamb's flat layouts under ZeRO-3 (strategies/_zero_layout.stage3_segments) cut each parameter into equal "
           "per-rank pieces laid back to back per sub-group, and wrap_zero3_optimizer_step sets the sub-group's "
           "layout around each of DeepSpeed's per-sub-group optimizer steps")
def _check_zero3_layout() -> None:
    import deepspeed.comm as ds_dist
    from deepspeed.runtime.zero.partition_parameters import Init
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    _set_in(Stage3.__init__, ("fp16_groups", "fp32_partitioned_groups_flat", "sub_group_process_groups",
                              "sub_group_to_group_id", "dp_process_group", "optimizer"),
            "DeepSpeedZeroOptimizer_Stage3.__init__")
    assert _params(Stage3._optimizer_step) == ["self", "sub_group_id"], \
        f"DeepSpeedZeroOptimizer_Stage3._optimizer_step takes {_params(Stage3._optimizer_step)} now"
    step_src = inspect.getsource(Stage3._optimizer_step)
    for read in ("self.sub_group_to_group_id[sub_group_id]", "self.fp32_partitioned_groups_flat[sub_group_id]"):
        assert read in step_src, f"_optimizer_step no longer reads {read}"
    # an instance attribute replaces the method only while DeepSpeed calls it through self
    assert "self._optimizer_step(sub_group_id)" in inspect.getsource(Stage3), \
        "DeepSpeedZeroOptimizer_Stage3 no longer calls self._optimizer_step(sub_group_id)"
    assert re.search(r"for sub_group in self\.fp16_groups for param in sub_group",
                     inspect.getsource(Stage3._get_parameter_partitions)), \
        "the flat fp32 sub-groups are no longer the parameters' pieces in fp16_groups order"
    assert "param.ds_numel = " in inspect.getsource(Init._convert_to_deepspeed_param), \
        "zero.Init no longer sets param.ds_numel"
    partition_src = inspect.getsource(_undecorated(Init._partition_param, "_partition_param"))
    assert "param.ds_tensor.ds_numel = partition_size" in partition_src, \
        "zero.Init no longer sets param.ds_tensor.ds_numel to the size of one rank's piece"
    assert "start = partition_size * self._partition_rank(param)" in partition_src, \
        "rank r no longer holds elements [r * piece, (r + 1) * piece) of a ZeRO-3 parameter"
    _has_params(ds_dist.get_rank, ("group",), "deepspeed.comm.get_rank")


@_register("deepspeed engine: set_gradient_accumulation_boundary, backward(scale_wrt_gas=), set_train_batch_size",
           "EffiDeepSpeedStrategy tells the engine where Lightning's accumulation window ends, backs without a second "
           "division by gradient_accumulation_steps, and resizes the engine's batch when the factor changes")
def _check_deepspeed_engine() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert _params(DeepSpeedEngine.set_gradient_accumulation_boundary) == ["self", "is_boundary"]
    assert "self._is_gradient_accumulation_boundary" in inspect.getsource(
        DeepSpeedEngine.is_gradient_accumulation_boundary), "the engine no longer honours the boundary it is told"
    backward = _undecorated(DeepSpeedEngine.backward, "backward")
    _has_params(backward, ("loss", "scale_wrt_gas"), "DeepSpeedEngine.backward")
    assert re.search(r"gradient_accumulation_steps\(\) if scale_wrt_gas", inspect.getsource(backward)), \
        "DeepSpeedEngine.backward no longer divides by gradient_accumulation_steps only when scale_wrt_gas"
    assert _params(DeepSpeedEngine.set_train_batch_size) == ["self", "train_batch_size"]
    assert _params(DeepSpeedEngine.train_micro_batch_size_per_gpu) == ["self"]
    _set_in(DeepSpeedEngine._configure_distributed_model, ("dp_world_size",),
            "DeepSpeedEngine._configure_distributed_model")
    # deepspeed.initialize(args=Namespace(device_rank=...)) picks the device on the CPU, where root_device.index is None
    assert "args.device_rank" in inspect.getsource(DeepSpeedEngine._set_distributed_vars), \
        "DeepSpeedEngine no longer reads args.device_rank"


@_register("deepspeed ZeRO loss_scaler.cur_scale",
           "LossScalingPrecision(max_scale) under DeepSpeed fp16 clamps the ZeRO optimizer's dynamic loss scale "
           "after each step; HealthMonitor reads it")
def _check_deepspeed_loss_scaler() -> None:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        _set_in(cls.__init__, ("loss_scaler",), f"{cls.__name__}.__init__")
    scaler = DynamicLossScaler(init_scale=16.0, scale_window=1, min_scale=1.0, delayed_shift=1,
                               consecutive_hysteresis=False)
    scaler.cur_scale = 4.0
    assert scaler.loss_scale == 4.0, "the loss scale is no longer DynamicLossScaler.cur_scale"
    # growth happens in update_scale (called by the optimizer's step) and starts from the clamped value
    scaler.update_scale(False)
    scaler.update_scale(False)
    assert scaler.cur_scale == 8.0, f"DynamicLossScaler grows to {scaler.cur_scale} from 4 after one clean window"


@_register("deepspeed checkpoint layout and universal conversion",
           "the world-size check counts one *_optim_states.pt per rank under <dir>/checkpoint or the 'latest' tag; "
           "save_checkpoint adds UNIVERSAL_CHECKPOINT_INFO, which ds_to_universal requires; load_universal resumes")
def _check_deepspeed_checkpoint() -> None:
    from deepspeed.checkpoint import constants as ckpt_constants
    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.runtime import constants
    from deepspeed.runtime.engine import DeepSpeedEngine
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert "_optim_states.pt" in inspect.getsource(DeepSpeedEngine._get_rank_zero_ckpt_name) and \
        "dp_rank" in _params(DeepSpeedEngine._get_rank_zero_ckpt_name), "ZeRO shard files are named differently now"
    assert '"latest"' in inspect.getsource(DeepSpeedEngine.load_checkpoint), "the 'latest' tag file is gone"
    assert 'tag="checkpoint"' in inspect.getsource(DeepSpeedStrategy.save_checkpoint), \
        "Lightning's DeepSpeedStrategy saves under another tag than 'checkpoint'"
    for name in ("UNIVERSAL_CHECKPOINT_INFO", "UNIVERSAL_CHECKPOINT_VERSION_KEY", "UNIVERSAL_CHECKPOINT_VERSION_VALUE"):
        assert hasattr(ckpt_constants, name), f"deepspeed.checkpoint.constants.{name} is gone"
    assert re.search(r"\bUNIVERSAL_CHECKPOINT_INFO\b", inspect.getsource(ds_to_universal)), \
        "ds_to_universal no longer reads UNIVERSAL_CHECKPOINT_INFO"
    assert constants.LOAD_UNIVERSAL_CHECKPOINT == "load_universal", \
        f"the config key is {constants.LOAD_UNIVERSAL_CHECKPOINT!r} now"


def should_accumulate(trainer: Any) -> bool:
    """Whether Lightning's loop will accumulate after this micro-batch's backward rather than step
    (``_FitLoop._should_accumulate``, what its automatic optimization decides the step with)."""
    return bool(trainer.fit_loop._should_accumulate())


@_register("lightning fit_loop._should_accumulate",
           "EffiDeepSpeedStrategy's backward tells DeepSpeed's engine where Lightning's accumulation window ends")
def _check_should_accumulate() -> None:
    from lightning.pytorch.loops.fit_loop import _FitLoop
    from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert _params(_FitLoop._should_accumulate) == ["self"], \
        f"_FitLoop._should_accumulate takes {_params(_FitLoop._should_accumulate)} now"
    assert "fit_loop._should_accumulate()" in inspect.getsource(_AutomaticOptimization), \
        "automatic optimization no longer decides the step with fit_loop._should_accumulate()"
    # handles_gradient_accumulation=False is what makes Lightning step on an epoch's partial last window
    assert "handles_gradient_accumulation" in inspect.getsource(_TrainingEpochLoop._should_accumulate)


@_register("lightning DeepSpeedStrategy internals",
           "EffiDeepSpeedStrategy calls _init_config_if_needed, _set_deepspeed_activation_checkpointing and "
           "remove_module_hooks, repeats setup_distributed and _initialize_deepspeed_inference without the CUDA "
           "device index, skips setup_environment's CUDA check, and keeps its default precision plugin out of "
           "_precision_plugin, which the Trainer reads as the user's choice")
def _check_deepspeed_strategy_internals() -> None:
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.strategies import deepspeed as pl_deepspeed
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    assert _params(DeepSpeedStrategy._init_config_if_needed) == ["self"]
    assert "self._format_config()" in inspect.getsource(DeepSpeedStrategy._init_config_if_needed), \
        "_init_config_if_needed no longer builds the config through _format_config"
    assert _params(DeepSpeedStrategy._set_deepspeed_activation_checkpointing) == ["self"]
    assert _params(pl_deepspeed.remove_module_hooks) == ["model"]
    _has_params(DeepSpeedStrategy._setup_model_and_optimizer, ("lr_scheduler",), "_setup_model_and_optimizer")
    src = inspect.getsource(DeepSpeedStrategy.setup_distributed)
    for call in ("reset_seed()", "self.set_world_ranks()", "self._init_deepspeed_distributed()"):
        assert call in src, f"DeepSpeedStrategy.setup_distributed no longer calls {call}"
    src = inspect.getsource(DeepSpeedStrategy._initialize_deepspeed_inference)
    for part in ("remove_module_hooks(model)", "zero_allow_untested_optimizer", "device_rank="):
        assert part in src, f"DeepSpeedStrategy._initialize_deepspeed_inference changed ({part!r} is gone)"
    src = inspect.getsource(DeepSpeedStrategy.setup_environment)
    assert "CUDAAccelerator" in src and "super().setup_environment()" in src, \
        "DeepSpeedStrategy.setup_environment changed; on the CPU it is skipped for its CUDA check only"
    assert "_strategy_flag._precision_plugin" in inspect.getsource(_AcceleratorConnector), \
        "the Trainer no longer reads strategy._precision_plugin as the user's precision plugin"
    assert ".step(" in inspect.getsource(DeepSpeedPrecision.optimizer_step), \
        "DeepSpeedPrecision.optimizer_step no longer steps the engine"


def is_strided_shard(placement: Any) -> bool:
    """Whether a DTensor placement is FSDP2's ``_StridedShard`` (its data-parallel dimension over a tensor-parallel
    shard): private, not a ``Shard`` subclass and ``is_shard()`` is False, yet ranks hold disjoint pieces."""
    from torch.distributed.tensor import placement_types

    cls = getattr(placement_types, "_StridedShard", None)
    return cls is not None and isinstance(placement, cls)


@_register("torch _StridedShard",
           "norms over FSDP2 x tensor parallel count _StridedShard dimensions as sharded (a sum over their group)")
def _check_strided_shard() -> None:
    from torch.distributed.tensor import placement_types

    cls = getattr(placement_types, "_StridedShard", None)
    assert cls is not None, "torch.distributed.tensor.placement_types._StridedShard is gone; re-check norms.py"
    assert "split_factor" in _params(cls.__init__) or hasattr(cls, "split_factor"), \
        "_StridedShard no longer has a split_factor; check how FSDP2 lays out tensor-parallel shards"


@_register("torch tensor-parallel styles",
           "apply_tensor_parallel builds ColwiseParallel/RowwiseParallel/PrepareModuleInput/SequenceParallel with "
           "these keyword arguments and relies on parallelize_module replacing each planned module's parameters")
def _check_tensor_parallel_styles() -> None:
    from torch.distributed.tensor import parallel as tp

    for cls in (tp.ColwiseParallel, tp.RowwiseParallel):
        _has_params(cls.__init__, ("input_layouts", "output_layouts", "use_local_output"), cls.__name__)
    _has_params(tp.PrepareModuleInput.__init__, ("input_layouts", "desired_input_layouts", "use_local_output"),
                "PrepareModuleInput")
    _has_params(tp.SequenceParallel.__init__, ("sequence_dim", "use_local_output"), "SequenceParallel")
    _has_params(tp.parallelize_module, ("module", "device_mesh", "parallelize_plan"), "parallelize_module")


def forward_redirection(strategy: Any, module: Any, method_name: str, *args: Any, **kwargs: Any) -> Any:
    """Lightning's forward redirection (``Strategy._forward_redirection``): ``module.<method_name>(*args)`` run as
    ``module(*args)``, so the hooks around ``module``'s forward (FSDP2's gather and reduce) fire around the step."""
    return strategy._forward_redirection(module, module, method_name, *args, **kwargs)


@_register("lightning forward redirection",
           "EffiFSDPStrategy runs the steps of a LightningModule that is an FSDP unit itself through its forward")
def _check_forward_redirection() -> None:
    from lightning.pytorch.strategies import Strategy
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    assert re.search(r"self\._forward_redirection(: _ForwardRedirection)? = _ForwardRedirection\(\)",
                     inspect.getsource(Strategy.__init__)), \
        "Strategy no longer holds a _ForwardRedirection in _forward_redirection"
    _has_params(_ForwardRedirection.__call__, ("wrapper_module", "original_module", "method_name"),
                "_ForwardRedirection.__call__")
