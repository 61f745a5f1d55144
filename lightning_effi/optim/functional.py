"""LAMB's math, free of Lightning: the keyword-only functional core :func:`lamb` and its implementation paths.

The algorithm (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
arXiv:1904.00962, Algorithm 2), per parameter ``x`` with gradient ``g`` at step ``t``::

    g  <- g * min(1, max_grad_norm / ‖all gradients‖)            (only when max_grad_norm is set)
    m  <- b1 m + (1 - b1) g ;   v <- b2 v + (1 - b2) g²
    m̂  = m / (1 - b1^t) ;       v̂ = v / (1 - b2^t)               (m̂ = m, v̂ = v without bias_correction)
    u  = m̂ / (√v̂ + eps) + weight_decay · x
    ratio = φ(‖x‖) / ‖u‖  if adapt and ‖x‖ > 0 and ‖u‖ > 0, else 1
            φ = identity, or clamp(·, lo, hi) with weight_norm_clip=(lo, hi);
            with trust_clip=(lo, hi) a computed ratio is clamped to [lo, hi] (the fallback 1 is not)
    x  <- x - lr · ratio · u

Every norm is the norm of the whole logical tensor, also when it is sharded (see :mod:`.norms`).

A step is three phases so that sharded norms cost the fewest collectives: (1) only with ``max_grad_norm``: the
global gradient norm (one all_reduce); (2) moments, ``u`` and the per-parameter sums of squares of ``x`` and ``u``
(one all_reduce for all parameters); (3) the update. Exact clipping needs two rounds of communication because ``u``
depends on the clipping coefficient, which depends on every shard's gradients; without ``max_grad_norm`` a step
issues exactly one all_reduce per process group.

Paths: ``single`` (a loop of plain tensor ops), ``foreach`` (multi-tensor ops on CUDA; on the CPU, where foreach
ops are per-tensor loops anyway and the step is memory bound, unsharded tensors are finished one at a time while in
cache, and sharded units in cache-sized batches), ``fused`` (Triton, CUDA; see :mod:`.fused`), ``cpu_fused`` (a
C++ kernel for unsharded float32/float64 CPU tensors, two passes over memory per tensor; see :mod:`.cpu_kernel`;
other CPU units of such a step take the foreach phases).

Skipped steps: a non-finite global gradient norm (with ``max_grad_norm``) or ``found_inf != 0`` (AMP) skips the
step entirely: weights, moments and step counts stay as they were, and the returned trust ratios are NaN. The
single-tensor and foreach paths read that decision on the host (one scalar sync, only when ``max_grad_norm``,
``found_inf`` or ``grad_scale`` is given); the fused path decides on the device without a host sync.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_effi import _compat
from lightning_effi.optim._plan import (
    Plan,
    build_plan,
    decode_lid_params,
    distinct_groups,
    encode_lid_params,
    grad_total_sumsq,
    h2d,
    lid_hyper,
    lr_vector,
    per_param,
    reduce_lid_vectors,
    resolve_path,
    skip_and_coef,
    trust_ratio,
)
from lightning_effi.optim.norms import FlatLayout, to_local

__all__ = ["lamb", "lamb_step", "resolve_path"]

# Elements per unit on the CPU foreach path: a tensor is cut into views of this size and the whole step runs one
# batch of views at a time, so the intermediate passes hit the cache instead of DRAM (the CPU foreach path is
# memory bound; without this it makes ~11 passes over DRAM per step instead of ~2).
_CPU_CHUNK = 1 << 16
_CPU_BATCH = 1 << 18
# The unsharded CPU path (see _cpu_adam_core): tensors up to _CPU_SMALL elements are stepped together in batches of
# at most cpu_piece_elements() elements; larger tensors in pieces of that size.
_CPU_SMALL = 1 << 16
_PIECE_MIN, _PIECE_MAX = 1 << 18, 1 << 21


@functools.lru_cache(maxsize=None)
def _private_l2_bytes() -> int | None:
    """Level-2 cache of one core (Linux sysfs), or None where it cannot be read."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                text = (index / "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
                return int(text.rstrip("KM")) * mult
    except (OSError, ValueError):
        return None
    return None


def cpu_piece_elements(element_size: int = 4) -> int:
    """Elements per piece on the CPU path: the piece of the update direction that the step keeps between its ops
    fills the cores' private L2 caches (L2 per core x intra-op threads), so the step does not depend on how much of
    a shared L3 it gets; a power of two in [2**18, 2**21] (smaller pieces cost more in per-op overhead than they
    save). 2**19 where the cache size is unknown."""
    l2 = _private_l2_bytes()
    if l2 is None:
        return 1 << 19
    n = l2 * max(1, torch.get_num_threads()) // element_size
    return max(_PIECE_MIN, min(_PIECE_MAX, 1 << max(0, n.bit_length() - 1)))
# A step count at which beta**t is exactly 0.0 in double for any beta < 1: bias corrections become 1.
_NO_BIAS_CORRECTION_STEP = 1e12






















def _bias_corrections(step: float, beta1: float, beta2: float, on: bool) -> tuple[float, float]:
    if not on:
        return 1.0, 1.0
    return 1.0 - beta1**step, 1.0 - beta2**step


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Sequence[float],
    beta1: float | Sequence[float],
    beta2: float | Sequence[float],
    eps: float | Sequence[float],
    weight_decay: float | Sequence[float],
    adapt: bool | Sequence[bool] = True,
    bias_correction: bool | Sequence[bool] = True,
    trust_clip=None,
    weight_norm_clip=None,
    max_grad_norm: float | None = None,
    flat_layouts: Sequence[FlatLayout] | None = None,
    norm_process_group=None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    workspace: dict | None = None,
) -> Tensor | None:
    """One LAMB step over all given parameters (see the module docstring for the algorithm).

    Hyperparameters take one value for all parameters, or a list with one value per parameter (how
    :class:`~lightning_effi.optim.Lamb` passes its param groups). ``trust_clip`` / ``weight_norm_clip`` are ``None``
    or ``(lo, hi)``. ``state_steps`` are float32 0-d tensors, incremented here (not on a skipped step); on the fused
    path they must live on the parameters' device.

    Args:
        flat_layouts: flat-partition mode (DeepSpeed ZeRO): one :class:`FlatLayout` per (flat) param.
        norm_process_group: process group summing flat-mode norms; None = the default group when initialised.
        grad_scale: gradients are scaled by this (AMP); the step divides it out (never touching ``grads``).
        found_inf: nonzero means skip the step (AMP overflow).
        foreach / fused: implementation path; see :func:`resolve_path`.
        workspace: a dict the caller keeps between steps (never saved) where the CPU path caches its scratch
            buffer; without it the buffer is allocated every step (slower on the CPU, same result).

    Returns:
        The trust ratios used, one float32 entry per logical parameter (NaN on a skipped step); None if there
        were no parameters.
    """
    if not params:
        return None
    return lamb_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, path=resolve_path(params, foreach, fused),
                     lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, adapt=adapt,
                     bias_correction=bias_correction, trust_clip=trust_clip, weight_norm_clip=weight_norm_clip,
                     max_grad_norm=max_grad_norm, flat_layouts=flat_layouts, norm_process_group=norm_process_group,
                     grad_scale=grad_scale, found_inf=found_inf, workspace=workspace)


def lamb_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              state_steps: list[Tensor], *, path: str, lr, beta1, beta2, eps, weight_decay, adapt=True,
              bias_correction=True, trust_clip=None, weight_norm_clip=None, max_grad_norm: float | None = None,
              flat_layouts: Sequence[FlatLayout] | None = None, norm_process_group=None,
              grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
              workspace: dict | None = None) -> Tensor | None:
    """:func:`lamb` on an already resolved ``path`` (``"fused"``, ``"cpu_fused"``, ``"foreach"`` or ``"single"``):
    what ``Lamb`` calls, since it resolves the path once when it builds its cached lists."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n):
        lengths = [len(x) for x in (params, grads, exp_avgs, exp_avg_sqs, state_steps)]
        raise ValueError(f"Invalid list lengths {lengths} of params, grads, exp_avgs, exp_avg_sqs and state_steps: "
                         "give one entry per parameter in each")
    if n == 0:
        return None
    hp = dict(
        lr=per_param("lr", lr, n),
        beta1=per_param("beta1", beta1, n),
        beta2=per_param("beta2", beta2, n),
        eps=per_param("eps", eps, n),
        weight_decay=per_param("weight_decay", weight_decay, n),
        adapt=per_param("adapt", adapt, n),
        bias_correction=per_param("bias_correction", bias_correction, n),
        trust_clip=per_param("trust_clip", trust_clip, n, pair=True),
        weight_norm_clip=per_param("weight_norm_clip", weight_norm_clip, n, pair=True),
    )
    plan = build_plan(params, grads, exp_avgs, exp_avg_sqs, flat_layouts, norm_process_group)
    local_p = [to_local(p) for p in params]
    device = local_p[0].device
    if any(t.device != device for t in local_p):
        raise RuntimeError(f"Lamb needs all parameters on one device, got {sorted({str(t.device) for t in local_p})}")
    acc = torch.float64 if any(t.dtype == torch.float64 for t in local_p) else torch.float32
    for lr in hp["lr"]:
        if isinstance(lr, Tensor) and (lr.numel() != 1 or lr.device != device):
            raise ValueError(f"Invalid lr tensor of shape {tuple(lr.shape)} on {lr.device}: a tensor lr must have one "
                             f"element and live on the parameters' device ({device})")
    if path == "fused":
        from lightning_effi.optim.fused import fused_step

        return fused_step(plan, hp, state_steps, max_grad_norm, grad_scale, found_inf, acc, device, workspace)
    if device.type != "cpu":
        return _device_step(plan, hp, state_steps, max_grad_norm, grad_scale, found_inf, acc, device)
    # The CPU paths read their scalars on the host: there is no device queue to drain.
    hp["lr"] = [float(lr) if isinstance(lr, Tensor) else lr for lr in hp["lr"]]
    return _host_step(plan, hp, state_steps, max_grad_norm, grad_scale, found_inf, acc, device, path, workspace)










# Integer views of the same width: selecting with integer multiplies by 0 and 1 picks one tensor's bits exactly,
# whatever they hold (a float multiply by 0 would turn inf into nan).
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _select(skip: Tensor, keep: Sequence[Tensor], instead: Sequence[Tensor]) -> list[Tensor]:
    """Per element ``instead`` when ``skip`` (a 0-dim device bool), else ``keep``, bit for bit, as new tensors."""
    dtype = keep[0].dtype
    it = _INT_VIEW[dtype]
    out = torch._foreach_mul([t.view(it) for t in keep], (~skip).to(it))
    torch._foreach_add_(out, torch._foreach_mul([t.view(it) for t in instead], skip.to(it)))
    return [o.view(dtype) for o in out]


def _device_step(plan, hp, state_steps, max_grad_norm, grad_scale, found_inf, acc, device) -> Tensor:
    """The single-tensor and foreach paths on an accelerator: multi-tensor ops with every per-step scalar (skip flag,
    unscaling and clipping coefficient, bias corrections, trust ratios, learning rates) on the device, so a step never
    makes the host wait. A skipped step runs the same ops with unchanged moments and a zero update: weights, moments
    and step counts stay bit for bit. Per-tensor scalars are applied in float32 to half-precision parameters."""
    num = plan.num_lids
    for s in state_steps:
        if s.device != device:
            raise RuntimeError(f"Lamb on {device} keeps 'step' on the parameters' device; got one on {s.device}")
    skip, coef = skip_and_coef(plan, max_grad_norm, grad_scale, found_inf, acc, device)
    torch._foreach_add_(state_steps, [(~skip).to(torch.float32)] * len(state_steps))
    batches: dict[tuple, list[int]] = {}
    for k in range(len(plan.p)):
        i = plan.param[k]
        key = (plan.p[k].dtype, hp["beta1"][i], hp["beta2"][i], hp["eps"][i], hp["weight_decay"][i],
               hp["bias_correction"][i])
        batches.setdefault(key, []).append(k)
    xsq = torch.zeros(num, dtype=acc, device=device)
    usq = torch.zeros(num, dtype=acc, device=device)
    kept = []
    for (dtype, b1, b2, eps, wd, bc_on), ks in batches.items():
        ps, ms, vs = [plan.p[k] for k in ks], [plan.m[k] for k in ks], [plan.v[k] for k in ks]
        sc = torch.float64 if dtype == torch.float64 else torch.float32  # per-unit scalars
        g = torch._foreach_mul([plan.g[k] for k in ks], coef.to(sc))
        # On a skipped step each moment is interpolated towards itself, which leaves it exactly as it was.
        torch._foreach_lerp_(ms, _select(skip, g, ms), 1 - b1)
        torch._foreach_lerp_(vs, _select(skip, torch._foreach_mul(g, g), vs), 1 - b2)
        denom = torch._foreach_sqrt(vs)
        if bc_on:
            # m̂ / (√v̂ + eps) = (√bc2 / bc1) · m / (√v + eps·√bc2), bias corrections from the device step counts
            steps = torch.stack([state_steps[plan.param[k]] for k in ks]).to(acc)
            sbc2 = (1 - b2**steps).sqrt()
            torch._foreach_add_(denom, list((eps * sbc2).to(sc).unbind(0)))
            u = torch._foreach_div(ms, denom)
            torch._foreach_mul_(u, list((sbc2 / (1 - b1**steps)).to(sc).unbind(0)))
        else:
            torch._foreach_add_(denom, eps)
            u = torch._foreach_div(ms, denom)
        if wd != 0:
            torch._foreach_add_(u, ps, alpha=wd)
        lids = h2d([plan.lid[k] for k in ks], torch.long, device)
        xsq.index_add_(0, lids, torch.stack(torch._foreach_norm(ps, 2, dtype=acc)).square())
        usq.index_add_(0, lids, torch.stack(torch._foreach_norm(u, 2, dtype=acc)).square())
        kept.append((ks, lids, ps, u, sc))
    enc = encode_lid_params(plan, acc, device)
    reduce_lid_vectors([xsq, usq, *enc], plan)
    lid_param = decode_lid_params(plan, enc)
    adapt_t, wclip, tclip = lid_hyper(plan, hp["adapt"], hp["weight_norm_clip"], hp["trust_clip"], acc, device,
                                       lid_param)
    ratio = trust_ratio(xsq, usq, adapt_t, wclip, tclip)
    zero_if_skip = (~skip).to(acc)
    for ks, lids, ps, u, sc in kept:
        lr = lr_vector(hp["lr"], [plan.param[k] for k in ks], device, acc)
        scale = -(lr * ratio[lids]) * zero_if_skip
        torch._foreach_mul_(u, list(scale.to(sc).unbind(0)))
        torch._foreach_add_(ps, u)
    return torch.where(skip, torch.full_like(ratio, math.nan), ratio).to(torch.float32)


def _host_step(plan, hp, state_steps, max_grad_norm, grad_scale, found_inf, acc, device, path,
               workspace=None) -> Tensor:
    num = plan.num_lids
    # --- phase 1: skip decision and clipping coefficient (host scalars on these paths) ---
    inv_scale = 1.0
    if grad_scale is not None:
        inv_scale = 1.0 / float(grad_scale)
    skip = found_inf is not None and float(found_inf) != 0.0
    coef = inv_scale
    if max_grad_norm is not None:
        total = float(grad_total_sumsq(plan, acc, device))
        norm = math.sqrt(total) * inv_scale if math.isfinite(total) else math.inf
        if not math.isfinite(norm):
            skip = True
        else:
            coef = inv_scale * min(1.0, max_grad_norm / norm) if norm > 0 else inv_scale
    if skip:
        return torch.full((num,), math.nan, dtype=torch.float32, device=device)
    for s in state_steps:
        if s.device.type != "cpu":
            raise RuntimeError("the single-tensor/foreach paths keep 'step' on the CPU; got one on " + str(s.device))
    torch._foreach_add_(state_steps, 1.0)

    one_unit_per_lid = len(plan.lid) == plan.num_lids and all(lid == k for k, lid in enumerate(plan.lid))
    unsharded = one_unit_per_lid and not distinct_groups(plan.lid_group)
    if path == "cpu_fused":
        from lightning_effi.optim import cpu_kernel

        if unsharded and cpu_kernel.kernel_applies(plan):
            return cpu_kernel.step(plan, [state_steps[i] for i in plan.param], _kernel_hyper(plan, hp), coef)
        path = "foreach"  # sharded units, or mixed dtypes: the norms need the generic phases
    chunked = path == "foreach" and device.type == "cpu"
    if chunked and unsharded:
        # Unsharded on the CPU: each trust ratio depends on its own tensor only, so each tensor can be finished
        # while it is still in cache, instead of two passes of the whole step over DRAM.
        if _cpu_adam_core_ok(plan):
            return _cpu_adam_core(plan, hp, state_steps, coef, acc, workspace)
        return _cpu_per_tensor(plan, hp, [float(s) for s in state_steps], coef, acc)
    steps = [float(s) for s in state_steps]

    def unit_key(k: int):
        i = plan.param[k]
        bc1, bc2 = _bias_corrections(steps[i], hp["beta1"][i], hp["beta2"][i], hp["bias_correction"][i])
        t = plan.p[k]
        return (t.dtype, hp["beta1"][i], hp["beta2"][i], hp["eps"][i], hp["weight_decay"][i], bc1, bc2)

    units = list(range(len(plan.p)))
    views = _chunk_views(plan, units) if chunked else [(k, plan.p[k], plan.g[k], plan.m[k], plan.v[k]) for k in units]
    # Batches of views sharing hyperparameters; on the chunked CPU path each batch is cache-sized.
    batches: dict[tuple, list] = {}
    for item in views:
        batches.setdefault(unit_key(item[0]), []).append(item)
    batch_list = []
    for key, items in batches.items():
        if chunked:
            cur, size = [], 0
            for it in items:
                cur.append(it)
                size += it[1].numel()
                if size >= _CPU_BATCH:
                    batch_list.append((key, cur))
                    cur, size = [], 0
            if cur:
                batch_list.append((key, cur))
        else:
            batch_list.append((key, items))

    # --- phase 2: moments, update direction, sums of squares per view ---
    view_units: list[int] = []
    xsq_parts: list[Tensor] = []
    usq_parts: list[Tensor] = []
    kept_u: list[Any] = []
    for key, items in batch_list:
        _, b1, b2, eps, wd, bc1, bc2 = key
        ps, gs, ms, vs = ([it[j] for it in items] for j in (1, 2, 3, 4))
        us: Any
        if path == "single":
            us = [_single_moments_and_u(p, g, m, v, coef, b1, b2, eps, wd, bc1, bc2)
                  for p, g, m, v in zip(ps, gs, ms, vs)]
        else:
            us = _foreach_moments_and_u(ps, gs, ms, vs, coef, b1, b2, eps, wd, bc1, bc2)
        xsq_parts.append(torch.stack(torch._foreach_norm(ps, 2, dtype=acc)))
        usq_parts.append(torch.stack(torch._foreach_norm(us, 2, dtype=acc)))
        view_units.extend(it[0] for it in items)
        # On the chunked CPU path u is recomputed in phase 3 from cached m, v (cheaper than keeping it in DRAM).
        kept_u.append(None if chunked else us)
    lids = h2d([plan.lid[k] for k in view_units], torch.long, device)
    xsq = torch.zeros(num, dtype=acc, device=device)
    usq = torch.zeros(num, dtype=acc, device=device)
    if view_units:
        xn, un = torch.cat(xsq_parts), torch.cat(usq_parts)
        xsq.index_add_(0, lids, xn * xn)
        usq.index_add_(0, lids, un * un)
    enc = encode_lid_params(plan, acc, device)
    reduce_lid_vectors([xsq, usq, *enc], plan)
    lid_param = decode_lid_params(plan, enc)
    adapt_t, wclip, tclip = lid_hyper(
        plan, hp["adapt"], hp["weight_norm_clip"], hp["trust_clip"], acc, device, lid_param
    )
    ratio = trust_ratio(xsq, usq, adapt_t, wclip, tclip)

    # --- phase 3: x <- x - lr * ratio * u ---
    ratio_host = ratio.tolist() if device.type == "cpu" or path == "single" else None
    for (key, items), us in zip(batch_list, kept_u):
        _, b1, b2, eps, wd, bc1, bc2 = key
        ps = [it[1] for it in items]
        if us is None:
            ms, vs = [it[3] for it in items], [it[4] for it in items]
            us = _foreach_u(ps, ms, vs, eps, wd, bc1, bc2)
        if ratio_host is not None:
            for it, p, u in zip(items, ps, us):
                k = it[0]
                p.add_(u, alpha=-hp["lr"][plan.param[k]] * ratio_host[plan.lid[k]])
        else:
            idx = torch.tensor([plan.lid[it[0]] for it in items], device=device)
            lr_t = torch.tensor([hp["lr"][plan.param[it[0]]] for it in items], dtype=acc, device=device)
            scale = (-(lr_t * ratio[idx])).to(torch.float64 if ps[0].dtype == torch.float64 else torch.float32)
            torch._foreach_mul_(us, list(scale.unbind(0)))
            torch._foreach_add_(ps, us)
    return ratio.to(torch.float32)


def _kernel_hyper(plan: Plan, hp: dict) -> Tensor:
    """The CPU kernel's per-unit float64 table (column order in cpu_kernel.step); the kernel reads the step counts
    itself."""
    inf = math.inf
    rows = []
    for k in range(len(plan.p)):
        i = plan.param[k]
        w = hp["weight_norm_clip"][i] or (0.0, inf)
        t = hp["trust_clip"][i] or (0.0, inf)
        rows.append((float(hp["lr"][i]), hp["beta1"][i], hp["beta2"][i], hp["eps"][i], hp["weight_decay"][i],
                     1.0 if hp["bias_correction"][i] else 0.0, 1.0 if hp["adapt"][i] else 0.0, w[0], w[1], t[0], t[1]))
    return torch.tensor(rows, dtype=torch.float64)


def _host_ratio(hp: dict, i: int, xn: float, un: float) -> float:
    """The trust ratio from host norms (the CPU paths), same rule as :func:`trust_ratio`."""
    if not (hp["adapt"][i] and xn > 0 and un > 0):
        return 1.0
    lo, hi = hp["weight_norm_clip"][i] or (0.0, math.inf)
    r = min(max(xn, lo), hi) / un
    if hp["trust_clip"][i] is not None:
        r = min(max(r, hp["trust_clip"][i][0]), hp["trust_clip"][i][1])
    return r


def _cpu_adam_core_ok(plan: Plan) -> bool:
    if not _compat.has_fused_adamw():
        return False
    for t in (*plan.p, *plan.g, *plan.m, *plan.v):
        if t.dtype not in (torch.float32, torch.float64) or not t.is_contiguous():
            return False
    return all(p.dtype == g.dtype == m.dtype == v.dtype for p, g, m, v in zip(plan.p, plan.g, plan.m, plan.v))


def _cpu_adam_core(plan: Plan, hp: dict, state_steps: list[Tensor], coef: float, acc, workspace) -> Tensor:
    """Unsharded CPU path built on torch's fused CPU AdamW kernel (``torch._fused_adamw_``).

    Eager CPU ops cost one pass over memory each (a LAMB step written with them is ~10 passes and op-bound); torch's
    fused AdamW kernel does Adam's moment updates and the bias-corrected ``m̂ / (√v̂ + eps)`` in one vectorised,
    multi-threaded pass. It is used here on a scratch copy ``y`` of the parameter, never on the parameter:
    AdamW's rule ``y <- y (1 - lr wd') - (lr / bc1) m / (√v / √bc2 + eps)`` with ``lr = -1`` and
    ``wd' = weight_decay - 1`` turns ``y = x`` into exactly LAMB's ``u = r + weight_decay x``. Then the sums of
    squares of ``x`` and ``u`` (while the piece is in cache) and, once the whole tensor's norms are known, one pass
    ``x <- x - lr ratio u``. Bias correction off: the kernel is handed a step count at which ``beta**t == 0``.
    Pieces are sized by :func:`cpu_piece_elements`.
    """
    ratios = [1.0] * plan.num_lids
    need: dict[torch.dtype, int] = {}
    small_total: dict[torch.dtype, int] = {}
    small: dict[tuple, list[int]] = {}
    large: list[int] = []
    for k, p in enumerate(plan.p):
        if p.numel() <= _CPU_SMALL:
            i = plan.param[k]
            key = (p.dtype, hp["beta1"][i], hp["beta2"][i], hp["eps"][i], hp["weight_decay"][i],
                   hp["bias_correction"][i])
            small.setdefault(key, []).append(k)
            small_total[p.dtype] = small_total.get(p.dtype, 0) + p.numel()
        else:
            large.append(k)
            need[p.dtype] = max(need.get(p.dtype, 0), p.numel())
    piece = cpu_piece_elements(plan.p[0].element_size())
    for dtype, n in small_total.items():  # a batch of small tensors spans at most one piece
        need[dtype] = max(need.get(dtype, 0), min(n, piece))
    buffers = {}
    for dtype, n in need.items():
        ws_key = ("lamb_cpu_u", dtype)
        buf = None if workspace is None else workspace.get(ws_key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            if workspace is not None:
                workspace[ws_key] = buf
        buffers[dtype] = buf
    no_bc = torch.tensor(_NO_BIAS_CORRECTION_STEP, dtype=torch.float32)

    def adam_u(ys, ps, gs, ms, vs, steps, i):
        # y <- x (unless the caller did), then the fused kernel turns y into u (see the docstring).
        if ps is not None:
            torch._foreach_copy_(ys, ps)
        if coef != 1.0:
            gs = torch._foreach_mul(gs, coef)
        _compat.fused_adamw_(
            ys, gs, ms, vs, steps if hp["bias_correction"][i] else [no_bc] * len(ys), lr=-1.0,
            beta1=hp["beta1"][i], beta2=hp["beta2"][i], weight_decay=hp["weight_decay"][i] - 1.0, eps=hp["eps"][i],
        )

    for items in small.values():
        start = 0
        while start < len(items):
            batch: list[int] = []
            total = 0
            while start < len(items) and (not batch or total + plan.p[items[start]].numel() <= piece):
                batch.append(items[start])
                total += plan.p[items[start]].numel()
                start += 1
            ps = [plan.p[k] for k in batch]
            buf, off, ys = buffers[ps[0].dtype], 0, []
            for p in ps:
                ys.append(buf[off : off + p.numel()].view_as(p))
                off += p.numel()
            i0 = plan.param[batch[0]]
            adam_u(ys, ps, [plan.g[k] for k in batch], [plan.m[k] for k in batch], [plan.v[k] for k in batch],
                   [state_steps[plan.param[k]] for k in batch], i0)
            xn = torch.stack(torch._foreach_norm(ps, 2, dtype=acc)).tolist()
            un = torch.stack(torch._foreach_norm(ys, 2, dtype=acc)).tolist()
            scale = []
            for k, a, b in zip(batch, xn, un):
                i = plan.param[k]
                r = _host_ratio(hp, i, a, b)
                ratios[plan.lid[k]] = r
                scale.append(-hp["lr"][i] * r)
            torch._foreach_mul_(ys, scale)
            torch._foreach_add_(ps, ys)

    for k in large:
        i = plan.param[k]
        p, g, m, v = plan.p[k], plan.g[k], plan.m[k], plan.v[k]
        n = p.numel()
        y = buffers[p.dtype][:n]
        fp, fg, fm, fv = p.view(-1), g.view(-1), m.view(-1), v.view(-1)
        xsq = usq = 0.0
        for s in range(0, n, piece):
            sl = slice(s, min(n, s + piece))
            pp, yy = fp[sl], y[sl]
            yy.copy_(pp)
            xsq += float(torch.dot(yy, yy))  # while the piece is in cache
            adam_u([yy], None, [fg[sl]], [fm[sl]], [fv[sl]], [state_steps[i]], i)
            usq += float(torch.dot(yy, yy))
        r = _host_ratio(hp, i, math.sqrt(xsq), math.sqrt(usq))
        ratios[plan.lid[k]] = r
        fp.add_(y, alpha=-hp["lr"][i] * r)
    return torch.tensor(ratios, dtype=torch.float32)


def _cpu_per_tensor(plan: Plan, hp: dict, steps: list[float], coef: float, acc) -> Tensor:
    """Unsharded CPU path: one tensor at a time; tensors larger than _CPU_BATCH in cache-sized pieces, two passes
    (moments + sums of squares, then the update with u recomputed from the cached-size piece)."""
    ratios = torch.ones(plan.num_lids, dtype=torch.float32)
    big = _CPU_BATCH
    for k in range(len(plan.p)):
        i = plan.param[k]
        b1, b2, eps, wd = hp["beta1"][i], hp["beta2"][i], hp["eps"][i], hp["weight_decay"][i]
        bc1, bc2 = _bias_corrections(steps[i], b1, b2, hp["bias_correction"][i])
        p, g, m, v = plan.p[k], plan.g[k], plan.m[k], plan.v[k]
        n = p.numel()
        if n <= big or not all(t.is_contiguous() for t in (p, g, m, v)):
            pieces = [(p, g, m, v)]
        else:
            fp, fg, fm, fv = p.view(-1), g.view(-1), m.view(-1), v.view(-1)
            pieces = [(fp[s : s + big], fg[s : s + big], fm[s : s + big], fv[s : s + big]) for s in range(0, n, big)]
        xsq = usq = 0.0
        kept = None
        for pp, gg, mm, vv in pieces:
            u = _single_moments_and_u(pp, gg, mm, vv, coef, b1, b2, eps, wd, bc1, bc2)
            xsq += float(torch.linalg.vector_norm(pp, dtype=acc)) ** 2
            usq += float(torch.linalg.vector_norm(u, dtype=acc)) ** 2
            kept = u if len(pieces) == 1 else None
        r = _host_ratio(hp, i, math.sqrt(xsq), math.sqrt(usq))
        ratios[plan.lid[k]] = r
        step_size = -hp["lr"][i] * r
        if kept is not None:
            p.add_(kept, alpha=step_size)
            continue
        for pp, _, mm, vv in pieces:
            pp.add_(_foreach_u([pp], [mm], [vv], eps, wd, bc1, bc2)[0], alpha=step_size)
    return ratios


def _chunk_views(plan: Plan, units: list[int]):
    out = []
    for k in units:
        p, g, m, v = plan.p[k], plan.g[k], plan.m[k], plan.v[k]
        n = p.numel()
        if n <= _CPU_CHUNK or not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            out.append((k, p, g, m, v))
            continue
        fp, fg, fm, fv = p.view(-1), g.view(-1), m.view(-1), v.view(-1)
        for s in range(0, n, _CPU_CHUNK):
            sl = slice(s, min(n, s + _CPU_CHUNK))
            out.append((k, fp[sl], fg[sl], fm[sl], fv[sl]))
    return out


def _single_moments_and_u(p, g, m, v, coef, b1, b2, eps, wd, bc1, bc2) -> Tensor:
    if coef != 1.0:
        g = g * coef
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v / bc2).sqrt_().add_(eps)
    u = (m / bc1).div_(denom)
    if wd != 0:
        u.add_(p, alpha=wd)
    return u


def _foreach_moments_and_u(ps, gs, ms, vs, coef, b1, b2, eps, wd, bc1, bc2) -> Any:
    if coef != 1.0:
        gs = torch._foreach_mul(gs, coef)
    torch._foreach_lerp_(ms, gs, 1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, 1 - b2)
    return _foreach_u(ps, ms, vs, eps, wd, bc1, bc2)


def _foreach_u(ps, ms, vs, eps, wd, bc1, bc2) -> Any:
    # m̂ / (√v̂ + eps) = (√bc2 / bc1) · m / (√v + eps·√bc2): one sqrt pass and one fused addcdiv.
    sbc2 = math.sqrt(bc2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_add_(denom, eps * sbc2)
    if wd != 0:
        u = torch._foreach_mul(ps, wd)
        torch._foreach_addcdiv_(u, ms, denom, sbc2 / bc1)
    else:
        u = torch._foreach_div(ms, denom)
        torch._foreach_mul_(u, sbc2 / bc1)
    return u
