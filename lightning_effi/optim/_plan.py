"""What every LAMB implementation path shares: the step plan over local pieces, the cross-rank reductions of the
per-parameter sums, the skip decision and the trust-ratio rule (written once, on device tensors).

A *unit* is a local piece of a parameter (the whole tensor, a DTensor's local shard, or a segment of a ZeRO flat
partition); a *logical id* (lid) is the parameter it belongs to. Per-parameter norms are sums over a lid's units on
all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_effi.optim.norms import (
    FlatLayout,
    GroupsByRanks,
    _dtensor_type,
    all_reduce_parts,
    dtensor_reduce_groups,
    is_dtensor,
    resolve_flat_group,
    to_local,
)

__all__ = ["Plan", "build_plan", "resolve_path"]


def per_param(name: str, value, n: int, *, pair: bool = False) -> list:
    """Broadcast a hyperparameter to one value per parameter (a list of length n is taken as per-parameter)."""
    if pair:
        is_single = value is None or (
            isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
        )
        if is_single:
            return [None if value is None else (float(value[0]), float(value[1]))] * n
    elif not isinstance(value, (list, tuple)):
        if isinstance(value, Tensor) and name != "lr":
            raise TypeError(f"{name} must be a Python number, got a Tensor; pass float({name})")
        return [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"Invalid {name} {value!r}: give one value or a list with one value per parameter ({n})")
    if pair:
        return [None if v is None else (float(v[0]), float(v[1])) for v in value]
    return list(value)


def resolve_path(tensors: Sequence[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """Pick ``"fused"`` (Triton, CUDA), ``"cpu_fused"`` (the C++ kernel, CPU), ``"foreach"`` or ``"single"``; raise
    if an explicitly requested path cannot run."""
    if foreach and fused:
        raise ValueError("foreach=True and fused=True are exclusive: pick one implementation path")
    locals_ = [to_local(t) for t in tensors]
    on_cuda = bool(locals_) and all(t.is_cuda for t in locals_)
    on_cpu = bool(locals_) and all(t.device.type == "cpu" for t in locals_)
    if on_cpu and (fused or (fused is None and foreach is None)):
        from lightning_effi.optim import cpu_kernel

        reason = cpu_kernel.cpu_kernel_unavailable_reason(locals_)
        if reason is None:
            return "cpu_fused"
        if fused:
            raise RuntimeError(f"Lamb(fused=True) cannot run on the CPU: {reason}. Use foreach=True (or leave "
                               "fused=None)")
        if any(t.dtype in (torch.float32, torch.float64) for t in locals_):
            cpu_kernel.warn_fallback(reason)
        return "foreach"
    if fused:
        from lightning_effi.optim.fused import fused_unavailable_reason

        reason = fused_unavailable_reason(locals_)
        if reason is not None:
            raise RuntimeError(f"Lamb(fused=True) cannot run: {reason}. Use foreach=True (or leave fused=None)")
        return "fused"
    if fused is None and foreach is None and on_cuda:
        from lightning_effi.optim.fused import fused_unavailable_reason

        grads = [to_local(t.grad) for t in tensors if t.grad is not None]
        if fused_unavailable_reason(locals_) is None and all(g.is_contiguous() for g in grads):
            return "fused"
    if foreach is False:
        return "single"
    return "foreach"


@dataclass
class Plan:
    """Units (local pieces) of the step, with the logical parameter each belongs to."""

    p: list[Tensor] = field(default_factory=list)
    g: list[Tensor] = field(default_factory=list)
    m: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    lid: list[int] = field(default_factory=list)
    param: list[int] = field(default_factory=list)  # index into the params list, for hyperparameters
    num_lids: int = 0
    lid_group: list = field(default_factory=list)  # per lid: the process groups to sum over, in order (may be empty)
    lid_param: list[int] = field(default_factory=list)  # per lid: a param index (-1: not held on this rank)
    flat_group: object = None


def build_plan(params, grads, exp_avgs, exp_avg_sqs, flat_layouts, norm_process_group) -> Plan:
    plan = Plan()
    if flat_layouts is not None:
        if len(flat_layouts) != len(params):
            raise RuntimeError(f"flat_layouts has {len(flat_layouts)} entries for {len(params)} flat partitions")
        nl = {lay.num_logical for lay in flat_layouts}
        if len(nl) > 1:
            raise RuntimeError(f"FlatLayouts disagree on num_logical: {sorted(nl)}; it must count all groups")
        plan.num_lids = nl.pop() if nl else 0
        plan.flat_group = resolve_flat_group(norm_process_group)
        plan.lid_group = [() if plan.flat_group is None else (plan.flat_group,)] * plan.num_lids
        plan.lid_param = [-1] * plan.num_lids
        for i, (x, g, m, v, lay) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, flat_layouts)):
            if not isinstance(lay, FlatLayout):
                raise TypeError(f"flat_layouts entries must be FlatLayout, got {type(lay).__name__}")
            lay.check(x)
            for lid, off, n in lay.segments:
                sl = slice(off, off + n)
                plan.p.append(x[sl])
                plan.g.append(g[sl])
                plan.m.append(m[sl])
                plan.v.append(v[sl])
                plan.lid.append(lid)
                plan.param.append(i)
                plan.lid_param[lid] = i
        return plan
    plan.num_lids = n = len(params)
    dt = _dtensor_type()
    if dt is None or not any(isinstance(x, dt) for x in params):  # plain tensors: no per-parameter work
        plan.p, plan.g, plan.m, plan.v = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
        plan.lid, plan.param, plan.lid_param = list(range(n)), list(range(n)), list(range(n))
        plan.lid_group = [()] * n
        return plan
    same_ranks = GroupsByRanks()
    for i, (x, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if is_dtensor(x):
            if not is_dtensor(g):
                raise RuntimeError("Lamb got a DTensor parameter whose gradient is a plain tensor")
            plan.lid_group.append(tuple(same_ranks(grp) for grp in dtensor_reduce_groups(x)))
            x, g, m, v = x.to_local(), g.to_local(), to_local(m), to_local(v)
        else:
            plan.lid_group.append(())
        plan.p.append(x)
        plan.g.append(g)
        plan.m.append(m)
        plan.v.append(v)
        plan.lid.append(i)
        plan.param.append(i)
        plan.lid_param.append(i)
    return plan


def h2d(values, dtype, device) -> Tensor:
    """A small host list to the device without a host sync (pinned staging, non-blocking copy)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def distinct_groups(lid_group) -> list:
    """The process groups of all lids, each once, in first-appearance order (the same on every rank)."""
    seen, out = set(), []
    for groups in lid_group:
        for grp in groups:
            if id(grp) not in seen:
                seen.add(id(grp))
                out.append(grp)
    return out


def reduce_lid_vectors(vecs: list[Tensor], plan: Plan) -> None:
    """Sum per-lid vectors across ranks: one all_reduce per distinct group, all vectors in it. A lid sharded over
    several mesh dimensions is summed over one group after the other."""
    groups = distinct_groups(plan.lid_group)
    if not groups:
        return
    device = vecs[0].device
    if len(groups) == 1 and all(len(gs) == 1 for gs in plan.lid_group):
        flat = torch.cat(vecs)
        all_reduce_parts([(groups[0], flat)])
        for k, v in enumerate(vecs):
            v.copy_(flat[k * v.numel() : (k + 1) * v.numel()])
        return
    for grp in groups:
        idx = h2d([j for j, gs in enumerate(plan.lid_group) if any(g is grp for g in gs)], torch.long, device)
        flat = torch.cat([v[idx] for v in vecs])
        all_reduce_parts([(grp, flat)])
        for k, v in enumerate(vecs):
            v[idx] = flat[k * idx.numel() : (k + 1) * idx.numel()]


def grad_total_sumsq(plan: Plan, acc: torch.dtype, device) -> Tensor:
    """Global sum of squares of all gradients (first collective, only with max_grad_norm): units are summed per set
    of groups they are sharded over, and each set's sum reduced over its groups, one all_reduce per group."""
    if not plan.g:
        return torch.zeros((), dtype=acc, device=device)
    norms = torch.stack(torch._foreach_norm(plan.g, 2, dtype=acc))
    sq = norms * norms
    groups = distinct_groups(plan.lid_group)
    if not groups:
        return sq.sum()
    classes: dict[tuple, list[int]] = {}
    for k, lid in enumerate(plan.lid):
        classes.setdefault(tuple(id(g) for g in plan.lid_group[lid]), []).append(k)
    members = [plan.lid_group[plan.lid[ks[0]]] for ks in classes.values()]
    sums = torch.stack([sq[h2d(ks, torch.long, device)].sum() for ks in classes.values()])
    for grp in groups:
        sel = h2d([c for c, gs in enumerate(members) if any(g is grp for g in gs)], torch.long, device)
        part = sums[sel]
        all_reduce_parts([(grp, part)])
        sums[sel] = part
    return sums.sum()


def trust_ratio(xsq: Tensor, usq: Tensor, adapt: Tensor, wclip: Tensor, tclip: Tensor) -> Tensor:
    xn, un = xsq.sqrt(), usq.sqrt()
    phi = torch.minimum(torch.maximum(xn, wclip[:, 0]), wclip[:, 1])
    r = torch.minimum(torch.maximum(phi / un, tclip[:, 0]), tclip[:, 1])
    ok = adapt & (xn > 0) & (un > 0)
    return torch.where(ok, r, torch.ones_like(r))


def lid_hyper(plan, adapt, weight_norm_clip, trust_clip, acc, device, lid_param: Tensor | None = None):
    """Per-lid adapt flag and clip bounds, as device tensors (no host sync: the lid -> param map may be a device
    tensor decoded from the all_reduce in flat mode)."""
    inf = math.inf
    rows = [(0.0, 0.0, inf, 0.0, inf)]  # row 0: a lid held by no rank
    for a, w, t in zip(adapt, weight_norm_clip, trust_clip):
        w, t = w or (0.0, inf), t or (0.0, inf)
        rows.append((1.0 if a else 0.0, w[0], w[1], t[0], t[1]))
    table = h2d(rows, acc, device)
    if lid_param is None:
        lid_param = h2d(plan.lid_param, torch.long, device)
    sel = table[lid_param + 1]
    return sel[:, 0] > 0, sel[:, 1:3], sel[:, 3:5]


def encode_lid_params(plan: Plan, acc, device) -> list[Tensor]:
    """Flat mode: which param (group) owns each lid is only known where a segment lives; share it in the norms'
    all_reduce (sum of index+1 and a presence count per lid) so every rank computes every lid's ratio right."""
    if plan.flat_group is None:
        return []
    idx = h2d([i + 1 if i >= 0 else 0 for i in plan.lid_param], acc, device)
    cnt = h2d([1 if i >= 0 else 0 for i in plan.lid_param], acc, device)
    return [idx, cnt]


def decode_lid_params(plan: Plan, enc: list[Tensor]) -> Tensor | None:
    """Device tensor lid -> param index (-1: held by no rank), or None outside flat mode."""
    if not enc:
        return None
    idx, cnt = enc
    return (torch.where(cnt > 0, idx / cnt.clamp_min(1), torch.zeros_like(idx)).round() - 1).long()


def skip_and_coef(plan, max_grad_norm, grad_scale, found_inf, acc, device) -> tuple[Tensor, Tensor]:
    """The skip decision (AMP overflow, or a non-finite clipping norm) and the gradient coefficient (unscaling and
    clipping), as 0-dim device tensors: nothing is read on the host."""
    one = torch.ones((), dtype=acc, device=device)
    inv_scale = one if grad_scale is None else 1.0 / grad_scale.reshape(()).to(device, acc)
    skip = torch.zeros((), dtype=torch.bool, device=device)
    if found_inf is not None:
        skip = skip | (found_inf.reshape(()).to(device) != 0)
    coef = inv_scale
    if max_grad_norm is not None:
        norm = grad_total_sumsq(plan, acc, device).sqrt() * inv_scale
        finite = torch.isfinite(norm)
        skip = skip | ~finite
        coef = torch.where(finite, torch.clamp(max_grad_norm / norm, max=1.0) * inv_scale, torch.zeros_like(norm))
    return skip, coef


def lr_vector(lrs: list, params: list[int], device, dtype) -> Tensor:
    """Learning rates of the given parameter indices as a device vector; Python floats are copied without a sync,
    0-dim tensor learning rates (a device-side schedule) are gathered on the device."""
    if not any(isinstance(lr, Tensor) for lr in lrs):
        return h2d([float(lrs[i]) for i in params], dtype, device)
    slots: dict[int, int] = {}
    values: list[Tensor] = []
    idx = []
    for i in params:
        lr = lrs[i]
        key = id(lr)
        if key not in slots:
            slots[key] = len(values)
            values.append(lr.reshape(()).to(device, dtype) if isinstance(lr, Tensor)
                          else torch.full((), float(lr), dtype=dtype, device=device))
        idx.append(slots[key])
    return torch.stack(values)[h2d(idx, torch.long, device)]
