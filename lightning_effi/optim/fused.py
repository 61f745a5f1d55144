"""The fused CUDA path of LAMB: two Triton kernels over every parameter at once.

LAMB cannot be one pass: the update of each parameter needs the norm of its whole update direction first. The
least memory traffic is two passes over a flat "block table" covering all parameters (or all shards / flat
segments): phase 1 reads x, g, m, v, writes m, v and per-block partial sums of x² and u²; phase 2 reads x, m, v,
recomputes u and writes x. That is 40 bytes per fp32 parameter (28 is the floor of one read-modify-write of x, m, v
plus reading g), in 2 launches regardless of the number of tensors (pointers come from a device table, so there is
no per-tensor launch and no per-tensor Python loop on the device side). Per-parameter sums are formed
deterministically (float64 cumulative sums over the per-block partials), so runs are bitwise reproducible.

No host synchronisation: the skip decision (AMP ``found_inf`` or a non-finite clipping norm), the clipping
coefficient, bias corrections (from device-resident step counts) and trust ratios are device tensors read by the
kernels; a skipped step writes nothing and leaves the step counts unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:  # Triton is an optional, GPU-only dependency; its absence is reported by fused_unavailable_reason.
    import triton
    import triton.language as tl

    _TRITON_ERROR = None
except ImportError as e:  # pragma: no cover - exercised on machines without triton
    triton = None
    _TRITON_ERROR = e

# Elements per program; a launch covers all units. Tuned on an H200 (benchmarks/optim_step.py sweeps it).
BLOCK = 4096
NUM_WARPS = 8
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fused_unavailable_reason(tensors) -> str | None:
    """Why the fused path cannot run on ``tensors`` (None: it can). ``tensors=None`` checks the machine only."""
    if triton is None:
        return f"Triton is not importable ({_TRITON_ERROR})"
    if not torch.cuda.is_available():
        return "CUDA is not available (the fused kernel is a Triton GPU kernel)"
    if tensors is not None:
        devices = {t.device.type for t in tensors}
        if devices != {"cuda"}:
            return f"parameters live on {sorted(devices)}; the fused kernel needs every parameter on a CUDA device"
        bad = {t.dtype for t in tensors} - set(_SUPPORTED)
        if bad:
            return f"unsupported parameter dtypes {sorted(map(str, bad))}"
    return None


if triton is not None:

    @triton.jit
    def _load_unit(ADDR, u, n_units, k: tl.constexpr, DT: tl.constexpr):
        return tl.load(ADDR + k * n_units + u).to(tl.pointer_type(DT))

    @triton.jit
    def _phase1_kernel(
        ADDR, NUMEL, HP, BLK_UNIT, BLK_START, COEF, SKIP, PARTIAL, n_units,
        DT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        u = tl.load(BLK_UNIT + pid)
        start = tl.load(BLK_START + pid)
        n = tl.load(NUMEL + u)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        p_ptr = _load_unit(ADDR, u, n_units, 0, DT)
        g_ptr = _load_unit(ADDR, u, n_units, 1, DT)
        m_ptr = _load_unit(ADDR, u, n_units, 2, DT)
        v_ptr = _load_unit(ADDR, u, n_units, 3, DT)
        b1 = tl.load(HP + u * 8 + 0).to(CT)
        b2 = tl.load(HP + u * 8 + 1).to(CT)
        eps = tl.load(HP + u * 8 + 2).to(CT)
        wd = tl.load(HP + u * 8 + 3).to(CT)
        bc1 = tl.load(HP + u * 8 + 4).to(CT)
        bc2 = tl.load(HP + u * 8 + 5).to(CT)
        coef = tl.load(COEF).to(CT)
        keep = mask & (tl.load(SKIP) == 0)
        x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(CT)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CT) * coef
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(CT)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CT)
        m = m + (1.0 - b1) * (g - m)
        v = b2 * v + (1.0 - b2) * g * g
        m_s = m.to(DT)
        v_s = v.to(DT)
        tl.store(m_ptr + offs, m_s, mask=keep)
        tl.store(v_ptr + offs, v_s, mask=keep)
        # The norm must see the moments as stored (rounded to the param dtype), as phase 2 will.
        m = m_s.to(CT)
        v = v_s.to(CT)
        r = (m / bc1) / (tl.sqrt_rn(v / bc2) + eps)
        upd = tl.where(mask, r + wd * x, 0.0)
        tl.store(PARTIAL + pid * 2, tl.sum(x * x, axis=0))
        tl.store(PARTIAL + pid * 2 + 1, tl.sum(upd * upd, axis=0))

    @triton.jit
    def _phase2_kernel(
        ADDR, NUMEL, HP, BLK_UNIT, BLK_START, SCALE, SKIP, n_units,
        DT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        u = tl.load(BLK_UNIT + pid)
        start = tl.load(BLK_START + pid)
        n = tl.load(NUMEL + u)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        p_ptr = _load_unit(ADDR, u, n_units, 0, DT)
        m_ptr = _load_unit(ADDR, u, n_units, 2, DT)
        v_ptr = _load_unit(ADDR, u, n_units, 3, DT)
        eps = tl.load(HP + u * 8 + 2).to(CT)
        wd = tl.load(HP + u * 8 + 3).to(CT)
        bc1 = tl.load(HP + u * 8 + 4).to(CT)
        bc2 = tl.load(HP + u * 8 + 5).to(CT)
        scale = tl.load(SCALE + u).to(CT)
        keep = mask & (tl.load(SKIP) == 0)
        x = tl.load(p_ptr + offs, mask=keep, other=0.0).to(CT)
        m = tl.load(m_ptr + offs, mask=keep, other=0.0).to(CT)
        v = tl.load(v_ptr + offs, mask=keep, other=0.0).to(CT)
        r = (m / bc1) / (tl.sqrt_rn(v / bc2) + eps)
        x = x + scale * (r + wd * x)
        tl.store(p_ptr + offs, x.to(DT), mask=keep)


_TL = {}
_BLOCK_CACHE: dict = {}


def _tl_types(dtype: torch.dtype):
    if not _TL:
        _TL.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                    torch.float64: tl.float64})
    return _TL[dtype], (tl.float64 if dtype == torch.float64 else tl.float32)


def _block_table(numels: tuple[int, ...], block: int, device):
    """(blk_unit, blk_start, first_block per unit, n_blocks per unit), cached by the units' sizes."""
    key = (numels, block, str(device))
    hit = _BLOCK_CACHE.get(key)
    if hit is not None:
        return hit
    nb = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.long)
    first = torch.cumsum(nb, 0) - nb
    total = int(nb.sum())
    blk_unit = torch.repeat_interleave(torch.arange(len(numels)), nb)
    blk_start = (torch.arange(total) - first[blk_unit]) * block
    out = (
        blk_unit.to(torch.int32).to(device),
        blk_start.to(device),
        first.to(device),
        nb.to(device),
        total,
    )
    if len(_BLOCK_CACHE) > 64:
        _BLOCK_CACHE.clear()
    _BLOCK_CACHE[key] = out
    return out


def _h2d(values, dtype, device) -> Tensor:
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True)


def fused_step(plan, hp, state_steps, max_grad_norm, grad_scale, found_inf, acc, device, ctx) -> Tensor:
    num = plan.num_lids
    for s in state_steps:
        if s.device != device:
            raise RuntimeError(f"the fused path keeps 'step' on the parameters' device; got one on {s.device}")
    # --- skip decision and clipping coefficient, on the device ---
    one = torch.ones((), dtype=acc, device=device)
    inv_scale = one if grad_scale is None else 1.0 / grad_scale.reshape(()).to(acc)
    skip = torch.zeros((), dtype=torch.bool, device=device)
    if found_inf is not None:
        skip = skip | (found_inf.reshape(()) != 0)
    coef = inv_scale
    if max_grad_norm is not None:
        norm = ctx["grad_total_sumsq"](plan, acc, device).sqrt() * inv_scale
        finite = torch.isfinite(norm)
        skip = skip | ~finite
        clip = torch.clamp(max_grad_norm / norm, max=1.0)
        coef = torch.where(finite, clip * inv_scale, torch.zeros_like(norm))
    keep_f = (~skip).to(torch.float32)
    torch._foreach_add_(state_steps, keep_f)
    # Bias corrections in float64: 1 - 0.999 in float32 is off by 1e-5 relative, visible in fp32 results.
    step_vec = torch.stack(state_steps).to(torch.float64)

    # --- per-unit hyperparameters: host values for this step, one copy to the device ---
    n_units = len(plan.p)
    host = [
        (hp["beta1"][i], hp["beta2"][i], hp["eps"][i], hp["weight_decay"][i], hp["lr"][i],
         1.0 if hp["bias_correction"][i] else 0.0)
        for i in plan.param
    ]
    hp_dev = _h2d(host, torch.float64, device).reshape(n_units, 6) if n_units else None
    unit_param = _h2d(plan.param, torch.long, device)
    xsq = torch.zeros(num, dtype=torch.float64, device=device)
    usq = torch.zeros(num, dtype=torch.float64, device=device)
    scale_all = None
    launches = []
    if n_units:
        b1, b2, eps, wd, lr, bc_on = hp_dev.unbind(1)
        st = step_vec[unit_param]
        bc1 = torch.where(bc_on > 0, 1.0 - torch.pow(b1, st), torch.ones_like(b1))
        bc2 = torch.where(bc_on > 0, 1.0 - torch.pow(b2, st), torch.ones_like(b2))
        zeros = torch.zeros_like(b1)
        table = torch.stack([b1, b2, eps, wd, bc1, bc2, zeros, zeros], 1).to(torch.float32).contiguous()
        table64 = torch.stack([b1, b2, eps, wd, bc1, bc2, zeros, zeros], 1).to(torch.float64).contiguous()
        coef_t = coef.reshape(1).to(torch.float32)
        coef64 = coef.reshape(1).to(torch.float64)
        skip_t = skip.reshape(1).to(torch.int32)
        lids = _h2d(plan.lid, torch.long, device)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for k, t in enumerate(plan.p):
            by_dtype.setdefault(t.dtype, []).append(k)
        unit_sumsq = torch.zeros(n_units, 2, dtype=torch.float64, device=device)
        for dtype, ks in by_dtype.items():
            dt, ct = _tl_types(dtype)
            numels = tuple(plan.p[k].numel() for k in ks)
            blk_unit, blk_start, first, nb, total = _block_table(numels, BLOCK, device)
            if total == 0:
                continue
            addr = _h2d(
                [plan.p[k].data_ptr() for k in ks] + [plan.g[k].data_ptr() for k in ks]
                + [plan.m[k].data_ptr() for k in ks] + [plan.v[k].data_ptr() for k in ks],
                torch.int64, device,
            )
            numel_t = _h2d(list(numels), torch.int64, device)
            sel = torch.tensor(ks, device="cpu").pin_memory().to(device, non_blocking=True)
            t_hp = (table64 if dtype == torch.float64 else table)[sel].contiguous()
            t_coef = coef64 if dtype == torch.float64 else coef_t
            partial = torch.empty(total, 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                                  device=device)
            _phase1_kernel[(total,)](
                addr, numel_t, t_hp, blk_unit, blk_start, t_coef, skip_t, partial, len(ks),
                DT=dt, CT=ct, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )
            cs = torch.cat([torch.zeros(1, 2, dtype=torch.float64, device=device), partial.double().cumsum(0)])
            unit_sumsq[sel] = cs[first + nb] - cs[first]
            launches.append((dtype, ks, sel, addr, numel_t, t_hp, blk_unit, blk_start, total, dt, ct))
        if all(lid == k for k, lid in enumerate(plan.lid)) and n_units == num:
            xsq.copy_(unit_sumsq[:, 0])
            usq.copy_(unit_sumsq[:, 1])
        else:
            xsq.index_add_(0, lids, unit_sumsq[:, 0])
            usq.index_add_(0, lids, unit_sumsq[:, 1])
    enc = ctx["encode_lid_params"](plan, torch.float64, device)
    ctx["reduce_lid_vectors"]([xsq, usq, *enc], plan)
    lid_param = ctx["decode_lid_params"](plan, enc)
    adapt_t, wclip, tclip = ctx["lid_hyper"](plan, hp["adapt"], hp["weight_norm_clip"], hp["trust_clip"],
                                             torch.float64, device, lid_param)
    ratio = ctx["trust_ratio"](xsq, usq, adapt_t, wclip, tclip)
    ratio = torch.where(skip, torch.full_like(ratio, math.nan), ratio)
    if n_units:
        scale_all = -(lr * ratio[lids])
        for dtype, ks, sel, addr, numel_t, t_hp, blk_unit, blk_start, total, dt, ct in launches:
            scale = scale_all[sel].to(torch.float64 if dtype == torch.float64 else torch.float32).contiguous()
            _phase2_kernel[(total,)](
                addr, numel_t, t_hp, blk_unit, blk_start, scale, skip_t, len(ks),
                DT=dt, CT=ct, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )
    return ratio.to(torch.float32)
