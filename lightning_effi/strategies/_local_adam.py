"""torch's fused Adam/AdamW step run on the local shards of FSDP2's DTensor parameters.

For an element-wise update whose tensors share one placement, DTensor's dispatcher ends up running the op on the
local shards, but first unwraps, propagates the sharding of and re-wraps every argument on the host: several tensors
per parameter at every step. :func:`step_on_local_shards` is ``torch.optim.Adam.step`` with the DTensors unwrapped
first: the state is created as torch creates it (DTensors, so checkpoints and resharding are unchanged) and the update
is torch's functional ``adam(..., fused=True)`` on the local shards, the same kernel on the same memory as through
DTensor, so the results are bitwise equal. :func:`local_shard_steps` routes one optimizer's ``step`` to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam

from lightning_effi import _compat

__all__ = ["can_step_on_local_shards", "local_shard_steps", "step_on_local_shards"]

# Exactly these classes: a subclass may change step() or its state.
_ADAM_CLASSES = (torch.optim.Adam, torch.optim.AdamW)


def can_step_on_local_shards(optimizer: Optimizer) -> bool:
    """Whether :func:`step_on_local_shards` may stand in for ``optimizer.step()``.

    True for a ``torch.optim.Adam``/``AdamW`` with ``fused=True`` (and not ``differentiable``) in every group whose
    ``step`` is torch's own, at most wrapped by an LR scheduler's step counter, outside compilation and CUDA-graph
    capture (torch's ``step`` checks the capture itself). Anything else keeps its own ``step``.
    """
    if type(optimizer) not in _ADAM_CLASSES:
        return False
    if not all(group["fused"] and not group["differentiable"] for group in optimizer.param_groups):
        return False
    own = vars(optimizer).get("step")
    if own is not None and not _compat.is_lr_scheduler_step_counter(optimizer, own):
        return False
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _init_group(optimizer: Optimizer, group: dict[str, Any], lists: tuple[list[Tensor], ...]) -> bool:
    """``torch.optim.Adam._init_group`` for a fused group: fills ``lists`` and creates missing state the same way."""
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = lists
    has_complex = False
    for p in group["params"]:
        if p.grad is None:
            continue
        has_complex |= torch.is_complex(p)
        params.append(p)
        if p.grad.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
        grads.append(p.grad)
        state = optimizer.state[p]
        if len(state) == 0:
            _compat.check_fused_param(p)
            # fused: a float32 step count on the parameter's device; moments shaped (and placed) like the parameter
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        if group["amsgrad"]:
            max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        state_steps.append(state["step"])
    return has_complex


def _local_shards(lists: tuple[list[Tensor], ...]) -> Optional[tuple[list[Tensor], ...]]:
    """``lists`` with every DTensor replaced by its local shard, or None unless that is exactly the op DTensor would
    run: per parameter, the parameter, its gradient and moments all DTensors with the parameter's single, non-partial
    placement on its mesh; step counts plain tensors."""
    from torch.distributed.tensor import DTensor

    params, *per_param, state_steps = lists
    out: tuple[list[Tensor], ...] = tuple([] for _ in range(5))
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            return None
        placements, mesh = p.placements, p.device_mesh
        if len(placements) != 1 or placements[0].is_partial():
            return None
        out[0].append(p.to_local())
        for lst, local in zip(per_param, out[1:]):
            if not lst:  # max_exp_avg_sqs without amsgrad
                continue
            t = lst[i]
            if not isinstance(t, DTensor) or t.placements != placements or (
                    t.device_mesh is not mesh and t.device_mesh != mesh):
                return None
            local.append(t.to_local())
    if any(type(s) is not Tensor for s in state_steps):
        return None
    return (*out, state_steps)


def _plain(*values: Any) -> bool:
    """No tensor subclass among the hyperparameters: a DTensor ``lr`` or ``found_inf`` needs DTensor's dispatch."""
    return all(not isinstance(v, Tensor) or type(v) is Tensor for v in values)


def step_on_local_shards(optimizer: Optimizer, closure: Optional[Callable[[], Any]] = None) -> Any:
    """``optimizer.step(closure)`` of a :func:`can_step_on_local_shards` optimizer, on the local shards.

    Reads ``grad_scale``/``found_inf`` from the optimizer as torch's step does (GradScaler's protocol, also
    :class:`~lightning_effi.plugins.LossScalingPrecision`'s) and passes a tensor ``lr`` through. A group whose tensors
    are not all such DTensors is stepped on the DTensors, as torch's step would. Step hooks are not run here; see
    :func:`local_shard_steps`.
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    with torch.no_grad():
        for group in optimizer.param_groups:
            lists: tuple[list[Tensor], ...] = tuple([] for _ in range(6))
            has_complex = _init_group(optimizer, group, lists)
            beta1, beta2 = group["betas"]
            local = _local_shards(lists) if _plain(group["lr"], beta1, beta2, grad_scale, found_inf) else None
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = lists if local is None else local
            adam(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                state_steps,
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                fused=group["fused"],
                grad_scale=grad_scale,
                found_inf=found_inf,
                has_complex=has_complex,
                decoupled_weight_decay=group["decoupled_weight_decay"],
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )
    return loss


# torch's step wrapper: the optimizer's pre/post step hooks (and the global ones) and the profiler range, as for
# torch's own Optimizer.step.
_hooked_step = Optimizer.profile_hook_step(step_on_local_shards)


@contextlib.contextmanager
def local_shard_steps(optimizer: Optimizer) -> Iterator[bool]:
    """While active, ``optimizer.step(...)`` runs :func:`step_on_local_shards` with the optimizer's step hooks, if
    :func:`can_step_on_local_shards`; yields whether it does. Only this optimizer object is affected, and its own
    ``step`` is back afterwards."""
    if not can_step_on_local_shards(optimizer):
        yield False
        return
    own = vars(optimizer).get("step")  # None, or the LR scheduler's step counter

    def step(*args: Any, **kwargs: Any) -> Any:
        if own is not None:
            _compat.mark_stepped_for_lr_scheduler(optimizer)  # what the counter records when it wraps a step
        return _hooked_step(optimizer, *args, **kwargs)

    optimizer.step = step  # type: ignore[method-assign]
    try:
        yield True
    finally:
        if own is None:
            vars(optimizer).pop("step", None)
        else:
            optimizer.step = own  # type: ignore[method-assign]
