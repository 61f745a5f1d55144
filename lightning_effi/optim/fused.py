"""The fused CUDA path of LAMB: two Triton kernels over every parameter at once.

LAMB cannot be one pass: the update of each parameter needs the norm of its whole update direction first. The
least memory traffic is two passes over a "chunk table" covering all parameters (or all shards / flat segments):
phase 1 reads x, g, m, v, writes m, v and per-chunk partial sums of x² and u²; phase 2 reads x, m, v, recomputes u
and writes x. That is 40 bytes per fp32 parameter (28 is the floor of one read-modify-write of x, m, v plus reading
g), in 2 launches (4 with the masked tail chunks) regardless of the number of tensors: pointers are a base tensor
plus per-unit element offsets from a device table, so there is no per-tensor launch. Per-parameter sums are formed
deterministically (float64 cumulative sums over the per-chunk partials), so runs are bitwise reproducible.

No host synchronisation: the skip decision (AMP ``found_inf`` or a non-finite clipping norm), the clipping
coefficient, bias corrections (from device-resident step counts) and trust ratios are device tensors read by the
kernels; a skipped step writes nothing and leaves the step counts unchanged.

Measured on an H200 (benchmarks/results/optim_step_h200*.json), on a 103M-parameter subset: a ``torch.compile``'d
LAMB step 2.5-3.8 ms, the first Triton version 5.0-5.2 ms, fused AdamW 1.2-1.4 ms. So the compiled step beat that
first kernel; Triton is kept because (a) the sharded step needs the per-parameter sums, one all_reduce, then the
update, which a compiled graph would break around anyway, and (b) the first kernel's slowness has a found cause: one
program per 8192-element block needed 165 registers per thread, one resident block per SM. This version walks
64K-element chunks 2048 elements at a time with 60 registers per thread (the multi-tensor-apply shape); it matches the
float64 reference (Triton interpreter) but has NOT been timed on the GPU yet.
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

# A program handles CHUNK elements of one unit, BLOCK at a time, with NUM_WARPS warps. benchmarks/optim_step.py
# sweeps these on the GPU (--blocks CHUNK:BLOCK:WARPS).
CHUNK = 65536
BLOCK = 2048
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
        if not all(t.is_contiguous() for t in tensors):
            return "a parameter is not contiguous (the kernel indexes flat memory)"
    return None


if triton is not None:

    @triton.jit
    def _ld(ptr, mask, MASKED: tl.constexpr):
        if MASKED:
            val = tl.load(ptr, mask=mask, other=0.0)
        else:
            val = tl.load(ptr)
        return val

    @triton.jit
    def _st(ptr, val, mask, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptr, val, mask=mask)
        else:
            tl.store(ptr, val)

    @triton.jit
    def _sqrt(x, IS64: tl.constexpr):
        if IS64:
            r = tl.sqrt(x)
        else:
            r = tl.sqrt_rn(x)
        return r

    @triton.jit
    def _phase1_kernel(
        PB, GB, MB, VB, OFF, NUMEL, HP, BLK_UNIT, BLK_START, BLK_ID, COEF, SKIP, PARTIAL, n_units,
        DT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr,
        ALIGN: tl.constexpr, IS64: tl.constexpr,
    ):
        # One program = one CHUNK of one unit, walked BLOCK elements at a time (the multi-tensor-apply shape: few
        # registers per thread, so many programs per SM hide memory latency; per-chunk table lookups amortised).
        # Pointers are a base tensor plus a per-unit element offset (not raw addresses cast to pointers), and offsets
        # carry alignment hints, so that full chunks compile to unmasked 16-byte vector loads.
        pid = tl.program_id(0)
        if tl.load(SKIP) == 0:
            u = tl.load(BLK_UNIT + pid)
            start = tl.multiple_of(tl.load(BLK_START + pid), CHUNK)
            bid = tl.load(BLK_ID + pid)
            po = tl.multiple_of(tl.load(OFF + u), ALIGN)
            go = tl.multiple_of(tl.load(OFF + n_units + u), ALIGN)
            mo = tl.multiple_of(tl.load(OFF + 2 * n_units + u), ALIGN)
            vo = tl.multiple_of(tl.load(OFF + 3 * n_units + u), ALIGN)
            n = tl.load(NUMEL + u)
            b1 = tl.load(HP + u * 8 + 0).to(CT)
            b2 = tl.load(HP + u * 8 + 1).to(CT)
            eps = tl.load(HP + u * 8 + 2).to(CT)
            wd = tl.load(HP + u * 8 + 3).to(CT)
            rbc1 = 1.0 / tl.load(HP + u * 8 + 4).to(CT)
            rbc2 = 1.0 / tl.load(HP + u * 8 + 5).to(CT)
            coef = tl.load(COEF).to(CT)
            acc_x = tl.zeros([BLOCK], dtype=CT)
            acc_u = tl.zeros([BLOCK], dtype=CT)
            # A static trip count; in a unit's last (masked) chunk the iterations past its end load and store nothing.
            for off in range(0, CHUNK, BLOCK):
                idx = start + off + tl.arange(0, BLOCK)
                mask = idx < n
                x = _ld(PB + po + idx, mask, MASKED).to(CT)
                g = _ld(GB + go + idx, mask, MASKED).to(CT) * coef
                m = _ld(MB + mo + idx, mask, MASKED).to(CT)
                v = _ld(VB + vo + idx, mask, MASKED).to(CT)
                m = m + (1.0 - b1) * (g - m)
                v = b2 * v + (1.0 - b2) * g * g
                m_s = m.to(DT)
                v_s = v.to(DT)
                _st(MB + mo + idx, m_s, mask, MASKED)
                _st(VB + vo + idx, v_s, mask, MASKED)
                # The norm must see the moments as stored (rounded to the param dtype), as phase 2 will.
                upd = (m_s.to(CT) * rbc1) / (_sqrt(v_s.to(CT) * rbc2, IS64) + eps) + wd * x
                if MASKED:
                    upd = tl.where(mask, upd, 0.0)
                acc_x += x * x
                acc_u += upd * upd
            tl.store(PARTIAL + bid * 2, tl.sum(acc_x, axis=0))
            tl.store(PARTIAL + bid * 2 + 1, tl.sum(acc_u, axis=0))

    @triton.jit
    def _phase2_kernel(
        PB, MB, VB, OFF, NUMEL, HP, BLK_UNIT, BLK_START, SCALE, SKIP, n_units,
        DT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr,
        ALIGN: tl.constexpr, IS64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if tl.load(SKIP) == 0:
            u = tl.load(BLK_UNIT + pid)
            start = tl.multiple_of(tl.load(BLK_START + pid), CHUNK)
            po = tl.multiple_of(tl.load(OFF + u), ALIGN)
            mo = tl.multiple_of(tl.load(OFF + 2 * n_units + u), ALIGN)
            vo = tl.multiple_of(tl.load(OFF + 3 * n_units + u), ALIGN)
            n = tl.load(NUMEL + u)
            eps = tl.load(HP + u * 8 + 2).to(CT)
            wd = tl.load(HP + u * 8 + 3).to(CT)
            rbc1 = 1.0 / tl.load(HP + u * 8 + 4).to(CT)
            rbc2 = 1.0 / tl.load(HP + u * 8 + 5).to(CT)
            scale = tl.load(SCALE + u).to(CT)
            # A static trip count; in a unit's last (masked) chunk the iterations past its end load and store nothing.
            for off in range(0, CHUNK, BLOCK):
                idx = start + off + tl.arange(0, BLOCK)
                mask = idx < n
                x = _ld(PB + po + idx, mask, MASKED).to(CT)
                m = _ld(MB + mo + idx, mask, MASKED).to(CT)
                v = _ld(VB + vo + idx, mask, MASKED).to(CT)
                x = x + scale * ((m * rbc1) / (_sqrt(v * rbc2, IS64) + eps) + wd * x)
                _st(PB + po + idx, x.to(DT), mask, MASKED)


_TL = {}
_BLOCK_CACHE: dict = {}


def _tl_types(dtype: torch.dtype):
    if not _TL:
        _TL.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                    torch.float64: tl.float64})
    return _TL[dtype], (tl.float64 if dtype == torch.float64 else tl.float32)


def _block_table(numels: tuple[int, ...], block: int, device):
    """Blocks of every unit, split into full blocks (unmasked launch) and tails (masked launch); cached by sizes.

    Block ids are contiguous per unit, so a unit's sums are a difference of cumulative sums over block partials.
    """
    key = (numels, block, str(device))
    hit = _BLOCK_CACHE.get(key)
    if hit is not None:
        return hit
    nb = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.long)
    first = torch.cumsum(nb, 0) - nb
    total = int(nb.sum())
    blk_unit = torch.repeat_interleave(torch.arange(len(numels)), nb)
    blk_start = (torch.arange(total) - first[blk_unit]) * block
    sizes = torch.tensor(numels, dtype=torch.long)
    full = (blk_start + block) <= sizes[blk_unit] if total else torch.zeros(0, dtype=torch.bool)
    bid = torch.arange(total)

    def pick(sel):
        return (blk_unit[sel].to(torch.int32).to(device), blk_start[sel].to(device), bid[sel].to(device),
                int(sel.sum()))

    out = dict(full=pick(full), tail=pick(~full), first=first.to(device), nb=nb.to(device), total=total)
    if len(_BLOCK_CACHE) > 64:
        _BLOCK_CACHE.clear()
    _BLOCK_CACHE[key] = out
    return out


def _h2d(values, dtype, device) -> Tensor:
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cpu":  # only under TRITON_INTERPRET=1 (kernel debugging on CPU)
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _bases_and_offsets(tensors: list[Tensor]):
    """A base tensor and each tensor's element offset from it; and whether every tensor is 16-byte aligned."""
    base = next((t for t in tensors if t.numel() > 0), tensors[0])
    b = base.data_ptr()
    es = base.element_size()
    offs, aligned = [], True
    for t in tensors:
        a = t.data_ptr()
        if t.numel() > 0 and a % 16:
            aligned = False
        offs.append((a - b) // es if t.numel() > 0 else 0)
    return base, offs, aligned


def fused_step(plan, hp, state_steps, max_grad_norm, grad_scale, found_inf, acc, device, ctx) -> Tensor:
    num = plan.num_lids
    for kind, ts in (("gradient", plan.g), ("exp_avg", plan.m), ("exp_avg_sq", plan.v), ("parameter", plan.p)):
        if not all(t.is_contiguous() for t in ts):
            raise RuntimeError(f"Lamb(fused): a {kind} is not contiguous (the kernel indexes flat memory); "
                               "use foreach=True for such parameters")
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
    # The list overload: the single-Tensor overload of _foreach_add_ reads the scalar on the host.
    torch._foreach_add_(state_steps, [keep_f] * len(state_steps))
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
            bt = _block_table(numels, CHUNK, device)
            if bt["total"] == 0:
                continue
            bases, offsets, aligned = [], [], True
            for kind in (plan.p, plan.g, plan.m, plan.v):
                base, off, al = _bases_and_offsets([kind[k] for k in ks])
                bases.append(base)
                offsets += off
                aligned = aligned and al
            off_t = _h2d(offsets, torch.int64, device)
            numel_t = _h2d(list(numels), torch.int64, device)
            sel = _h2d(ks, torch.long, device)
            is64 = dtype == torch.float64
            t_hp = (table64 if is64 else table)[sel].contiguous()
            t_coef = coef64 if is64 else coef_t
            partial = torch.zeros(bt["total"], 2, dtype=torch.float64 if is64 else torch.float32, device=device)
            consts = dict(DT=dt, CT=ct, BLOCK=BLOCK, CHUNK=CHUNK, ALIGN=(16 // dtype.itemsize) if aligned else 1, IS64=is64,
                          num_warps=NUM_WARPS)
            for which, masked in (("full", False), ("tail", True)):
                b_unit, b_start, b_id, nblk = bt[which]
                if nblk:
                    _phase1_kernel[(nblk,)](
                        *bases, off_t, numel_t, t_hp, b_unit, b_start, b_id, t_coef, skip_t, partial, len(ks),
                        MASKED=masked, **consts,
                    )
            first, nb = bt["first"], bt["nb"]
            cs = torch.cat([torch.zeros(1, 2, dtype=torch.float64, device=device), partial.double().cumsum(0)])
            unit_sumsq[sel] = cs[first + nb] - cs[first]
            launches.append((dtype, ks, sel, bases, off_t, numel_t, t_hp, bt, consts))
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
        for dtype, ks, sel, bases, off_t, numel_t, t_hp, bt, consts in launches:
            scale = scale_all[sel].to(torch.float64 if dtype == torch.float64 else torch.float32).contiguous()
            for which, masked in (("full", False), ("tail", True)):
                b_unit, b_start, _, nblk = bt[which]
                if nblk:
                    _phase2_kernel[(nblk,)](
                        bases[0], bases[2], bases[3], off_t, numel_t, t_hp, b_unit, b_start, scale, skip_t, len(ks),
                        MASKED=masked, **consts,
                    )
    return ratio.to(torch.float32)
