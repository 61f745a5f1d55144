"""The fused CUDA path of LAMB: Triton kernels over every parameter at once.

LAMB cannot be one pass: the update of each parameter needs the norm of its whole update direction first. The
least memory traffic is two passes over a "chunk table" covering all parameters (or all shards / flat segments):
phase 1 reads x, g, m, v, writes m, v and per-chunk partial sums of x² and u²; phase 2 reads x, m, v, recomputes u
and writes x. That is 40 bytes per fp32 parameter (28 is the floor of one read-modify-write of x, m, v plus reading
g). Pointers are a base tensor plus per-unit element offsets from a device table, so there is no per-tensor launch.
Gradients are offsets from an anchor tensor the plan owns: autograd hands out gradients at new addresses whenever
other allocations between steps change, and then only their offsets are rewritten in place (the plan, and a captured
CUDA graph, stay valid).
Between the phases a reduce kernel (one program per unit) sums each unit's chunk partials in a fixed order (runs are
bitwise reproducible) and, when every unit is a whole unsharded parameter, computes the trust ratio and the step
scale ``-lr * ratio`` itself; sharded units instead go through one all_reduce of the per-parameter sums (see
:mod:`.functional`). Bias corrections are computed in the kernels from the device-resident step counts.

A step is therefore, unsharded: one multi-tensor add (step counts), one stack, and per dtype 2 + 1 + 2 launches
(full and masked tail chunks of each phase, and the reduce). Everything that depends only on tensor addresses,
sizes and hyperparameters (offset tables, block tables, hyperparameter rows) is built once and cached in the
optimizer's workspace under a signature of those; only the learning rates are re-sent when they change (rebuilding
them is host time per tensor, during which a GPU that finished the backward pass waits).

No host synchronisation: the skip decision (AMP ``found_inf`` or a non-finite clipping norm), the clipping
coefficient, bias corrections and trust ratios are device tensors read by the kernels; a skipped step writes
nothing and leaves the step counts unchanged.

Why Triton and not ``torch.compile``: a compiled LAMB step was about twice as slow as fused AdamW on the same
tensors (``benchmarks/optim_step.py`` compares them), and the sharded step needs the per-parameter sums, one
all_reduce, then the update, which a compiled graph would break around anyway. The kernel shape is the one
``optim_step.py --blocks`` found fastest.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from lightning_effi.optim._plan import (
    decode_lid_params,
    encode_lid_params,
    h2d,
    lid_hyper,
    lr_vector,
    reduce_lid_vectors,
    skip_and_coef,
    trust_ratio,
)

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
# Row width of the per-unit float64 hyperparameter table: b1, b2, eps, wd, bias_correction on, adapt,
# weight_norm_clip lo/hi, trust_clip lo/hi (clips absent: 0, inf), padding.
HPW = 16
# Partials summed per iteration by the reduce kernel.
REDUCE_BLOCK = 256
# Unsharded steps without a scaler or clipping are captured as one CUDA graph after this many steps with an unchanged
# signature (the first steps compile the kernels; a capture costs one device synchronisation). Set
# LIGHTNING_EFFI_LAMB_CUDA_GRAPHS=0 to always launch eagerly.
CUDA_GRAPHS = os.environ.get("LIGHTNING_EFFI_LAMB_CUDA_GRAPHS", "1") != "0"
GRAPH_AFTER = 3
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
    def _rbc(HP, STEPS, UPARAM, u, CT: tl.constexpr, HPW: tl.constexpr):
        # 1 / bias corrections from the unit's device-resident step count, in float64 (1 - 0.999 is off by 1e-5
        # relative in float32); b**t = exp(t log b), and log(0) = -inf gives 0**t = 0. Host-free: nothing per step.
        t = tl.load(STEPS + tl.load(UPARAM + u)).to(tl.float64)
        on = tl.load(HP + u * HPW + 4)
        bc1 = 1.0 - tl.exp(t * tl.log(tl.load(HP + u * HPW + 0)))
        bc2 = 1.0 - tl.exp(t * tl.log(tl.load(HP + u * HPW + 1)))
        rbc1 = tl.where(on > 0, 1.0 / bc1, 1.0)
        rbc2 = tl.where(on > 0, 1.0 / bc2, 1.0)
        return rbc1.to(CT), rbc2.to(CT)

    @triton.jit
    def _phase1_chunk(PB, GB, MB, VB, po, go, mo, vo, start, n, b1, b2, eps, wd, rbc1, rbc2, coef,
                      DT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                      MASKED: tl.constexpr, IS64: tl.constexpr):
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
        return tl.sum(acc_x, axis=0), tl.sum(acc_u, axis=0)

    @triton.jit
    def _phase1_kernel(
        PB, GB, MB, VB, OFF, NUMEL, HP, STEPS, UPARAM, BLK_UNIT, BLK_START, BLK_ID, COEF, SKIP, PARTIAL, n_units,
        n_full, DT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr,
        ALIGN: tl.constexpr, IS64: tl.constexpr, HPW: tl.constexpr,
    ):
        # One program = one CHUNK of one unit, walked BLOCK elements at a time (the multi-tensor-apply shape: few
        # registers per thread, so many programs per SM hide memory latency; per-chunk table lookups amortised).
        # Pointers are a base tensor plus a per-unit element offset (not raw addresses cast to pointers), and offsets
        # carry alignment hints, so that full chunks compile to unmasked 16-byte vector loads. With MASKED (the
        # launch has partial chunks), the first n_full programs take full chunks and the rest the units' last
        # chunks, masked: one launch for both.
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
            b1 = tl.load(HP + u * HPW + 0).to(CT)
            b2 = tl.load(HP + u * HPW + 1).to(CT)
            eps = tl.load(HP + u * HPW + 2).to(CT)
            wd = tl.load(HP + u * HPW + 3).to(CT)
            rbc1, rbc2 = _rbc(HP, STEPS, UPARAM, u, CT, HPW)
            coef = tl.load(COEF).to(CT)
            if MASKED:
                if pid < n_full:
                    sx, su = _phase1_chunk(PB, GB, MB, VB, po, go, mo, vo, start, n, b1, b2, eps, wd, rbc1, rbc2,
                                           coef, DT, CT, BLOCK, CHUNK, False, IS64)
                else:
                    sx, su = _phase1_chunk(PB, GB, MB, VB, po, go, mo, vo, start, n, b1, b2, eps, wd, rbc1, rbc2,
                                           coef, DT, CT, BLOCK, CHUNK, True, IS64)
            else:
                sx, su = _phase1_chunk(PB, GB, MB, VB, po, go, mo, vo, start, n, b1, b2, eps, wd, rbc1, rbc2, coef,
                                       DT, CT, BLOCK, CHUNK, False, IS64)
            tl.store(PARTIAL + bid * 2, sx)
            tl.store(PARTIAL + bid * 2 + 1, su)

    @triton.jit
    def _reduce_kernel(
        PARTIAL, FIRST, NB, SUMSQ, HP, LR, UPARAM, LID, SCALE, RATIO, SKIP, RB: tl.constexpr, FAST: tl.constexpr,
        HPW: tl.constexpr,
    ):
        # One program per unit: its sums of squares from its chunks' partials (a fixed order: deterministic), and,
        # when every unit is a whole unsharded parameter (FAST), its trust ratio and step scale -lr*ratio right here
        # instead of ~20 small torch ops between the two phases.
        u = tl.program_id(0)
        if tl.load(SKIP) == 0:
            f = tl.load(FIRST + u)
            nb = tl.load(NB + u)
            ax = tl.zeros([RB], dtype=tl.float64)
            au = tl.zeros([RB], dtype=tl.float64)
            s = 0
            while s < nb:  # (a while loop: the Triton interpreter cannot range() over a loaded bound)
                j = s + tl.arange(0, RB)
                msk = j < nb
                ax += tl.load(PARTIAL + (f + j) * 2, mask=msk, other=0.0).to(tl.float64)
                au += tl.load(PARTIAL + (f + j) * 2 + 1, mask=msk, other=0.0).to(tl.float64)
                s += RB
            xsq = tl.sum(ax, axis=0)
            usq = tl.sum(au, axis=0)
            tl.store(SUMSQ + u * 2, xsq)
            tl.store(SUMSQ + u * 2 + 1, usq)
            if FAST:
                xn = tl.sqrt(xsq)
                un = tl.sqrt(usq)
                phi = tl.minimum(tl.maximum(xn, tl.load(HP + u * HPW + 6)), tl.load(HP + u * HPW + 7))
                r = tl.minimum(tl.maximum(phi / un, tl.load(HP + u * HPW + 8)), tl.load(HP + u * HPW + 9))
                ok = (tl.load(HP + u * HPW + 5) > 0) & (xn > 0) & (un > 0)
                r = tl.where(ok, r, 1.0)
                tl.store(SCALE + u, -tl.load(LR + tl.load(UPARAM + u)) * r)
                tl.store(RATIO + tl.load(LID + u), r.to(tl.float32))

    @triton.jit
    def _phase2_chunk(PB, MB, VB, po, mo, vo, start, n, eps, wd, rbc1, rbc2, scale, DT: tl.constexpr,
                      CT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr,
                      IS64: tl.constexpr):
        # A static trip count; in a unit's last (masked) chunk the iterations past its end load and store nothing.
        for off in range(0, CHUNK, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < n
            x = _ld(PB + po + idx, mask, MASKED).to(CT)
            m = _ld(MB + mo + idx, mask, MASKED).to(CT)
            v = _ld(VB + vo + idx, mask, MASKED).to(CT)
            x = x + scale * ((m * rbc1) / (_sqrt(v * rbc2, IS64) + eps) + wd * x)
            _st(PB + po + idx, x.to(DT), mask, MASKED)

    @triton.jit
    def _phase2_kernel(
        PB, MB, VB, OFF, NUMEL, HP, STEPS, UPARAM, BLK_UNIT, BLK_START, SCALE, SKIP, n_units, n_full,
        DT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr,
        ALIGN: tl.constexpr, IS64: tl.constexpr, HPW: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if tl.load(SKIP) == 0:
            u = tl.load(BLK_UNIT + pid)
            start = tl.multiple_of(tl.load(BLK_START + pid), CHUNK)
            po = tl.multiple_of(tl.load(OFF + u), ALIGN)
            mo = tl.multiple_of(tl.load(OFF + 2 * n_units + u), ALIGN)
            vo = tl.multiple_of(tl.load(OFF + 3 * n_units + u), ALIGN)
            n = tl.load(NUMEL + u)
            eps = tl.load(HP + u * HPW + 2).to(CT)
            wd = tl.load(HP + u * HPW + 3).to(CT)
            rbc1, rbc2 = _rbc(HP, STEPS, UPARAM, u, CT, HPW)
            scale = tl.load(SCALE + u).to(CT)
            if MASKED:  # as in phase 1: full chunks first, then the masked last chunks
                if pid < n_full:
                    _phase2_chunk(PB, MB, VB, po, mo, vo, start, n, eps, wd, rbc1, rbc2, scale, DT, CT, BLOCK,
                                  CHUNK, False, IS64)
                else:
                    _phase2_chunk(PB, MB, VB, po, mo, vo, start, n, eps, wd, rbc1, rbc2, scale, DT, CT, BLOCK,
                                  CHUNK, True, IS64)
            else:
                _phase2_chunk(PB, MB, VB, po, mo, vo, start, n, eps, wd, rbc1, rbc2, scale, DT, CT, BLOCK, CHUNK,
                              False, IS64)


_TL: dict = {}
_BLOCK_CACHE: dict = {}


def _tl_types(dtype: torch.dtype):
    if not _TL:
        _TL.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                    torch.float64: tl.float64})
    return _TL[dtype], (tl.float64 if dtype == torch.float64 else tl.float32)


def _block_table(numels: tuple[int, ...], block: int, device):
    """Blocks of every unit for one launch per phase: full blocks first (unmasked), then the units' last, partial
    blocks (masked); cached by sizes. One launch instead of a second, masked one for the tails saves the second
    launch's ramp and the gap between the two, which is most of what the tails cost.

    Block ids are contiguous per unit (``first``, ``nb``), so the reduce kernel sums a unit's partials in order.
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
    order = torch.cat([bid[full], bid[~full]])  # the programs below n_full run unmasked
    out = dict(unit=blk_unit[order].to(torch.int32).to(device), start=blk_start[order].to(device),
               bid=order.to(device), n_full=int(full.sum()), first=first.to(device), nb=nb.to(device), total=total)
    if len(_BLOCK_CACHE) > 64:
        _BLOCK_CACHE.clear()
    _BLOCK_CACHE[key] = out
    return out


class _Launch:
    """One dtype's launch arguments. Valid while the signature (addresses, sizes, hyperparameters, sharding
    structure) is unchanged: built once, not every step."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Cache:
    def __init__(self, key, launches, fast, lid_hyper, device):
        self.key, self.launches, self.fast = key, launches, fast
        self.lid_hyper = lid_hyper
        self.lr_key, self.lr_t = None, None
        self.hits, self.graph, self.graph_ratio, self.graph_mode = 0, None, None, None
        self.grad_ptrs: tuple = ()  # the gradient addresses the offset tables point at (see retarget)
        self.group_lrs: Any = None  # the groups' float learning rates lr_t was last filled from (replay)
        # Static inputs of a captured graph: the AMP flag and scale are copied in before each replay.
        self.found_buf = torch.zeros((), dtype=torch.float32, device=device)
        self.scale_buf = torch.ones((), dtype=torch.float32, device=device)
        self.zero_i32 = torch.zeros(1, dtype=torch.int32, device=device)
        self.one32 = torch.ones(1, dtype=torch.float32, device=device)
        self.one64 = torch.ones(1, dtype=torch.float64, device=device)


def _signature(plan, hp, state_steps) -> tuple:
    # Not the gradient addresses: those are offsets rewritten in place (retarget).
    return (
        tuple(t.data_ptr() for t in state_steps),
        tuple(t.data_ptr() for t in plan.p),
        tuple(t.data_ptr() for t in plan.m), tuple(t.data_ptr() for t in plan.v),
        tuple(t.numel() for t in plan.p), tuple(t.dtype for t in plan.p),
        tuple(hp["beta1"]), tuple(hp["beta2"]), tuple(hp["eps"]), tuple(hp["weight_decay"]),
        tuple(hp["bias_correction"]), tuple(hp["adapt"]), tuple(hp["trust_clip"]), tuple(hp["weight_norm_clip"]),
        tuple(plan.lid), tuple(plan.param), plan.num_lids, tuple(plan.lid_param),
        tuple(tuple(id(g) for g in gs) for gs in plan.lid_group), id(plan.flat_group),
    )


def _offsets(tensors: list[Tensor], anchor: Tensor | None = None):
    """Index of the base tensor (None: ``anchor`` is the base), each tensor's element offset from it, and whether all
    are 16-byte aligned."""
    kb: int | None = None
    if anchor is None:
        kb = next((k for k, t in enumerate(tensors) if t.numel() > 0), 0)
        anchor = tensors[kb]
    b = anchor.data_ptr()
    es = anchor.element_size()
    offs, aligned = [], True
    for t in tensors:
        a = t.data_ptr()
        if t.numel() > 0 and a % 16:
            aligned = False
        offs.append((a - b) // es if t.numel() > 0 else 0)
    return kb, offs, aligned


def _check_contiguous(kind: str, tensors) -> None:
    if not all(t.is_contiguous() for t in tensors):
        raise RuntimeError(f"Lamb(fused): a {kind} is not contiguous (the kernel indexes flat memory); "
                           "use foreach=True for such parameters")


def _build_cache(key, plan, hp, device) -> _Cache:
    for kind, ts in (("gradient", plan.g), ("exp_avg", plan.m), ("exp_avg_sq", plan.v), ("parameter", plan.p)):
        _check_contiguous(kind, ts)
    n_units = len(plan.p)
    fast = (n_units == plan.num_lids and all(lid == k for k, lid in enumerate(plan.lid))
            and plan.flat_group is None and all(not gs for gs in plan.lid_group))
    inf = math.inf
    rows = []
    for i in plan.param:
        w = hp["weight_norm_clip"][i] or (0.0, inf)
        t = hp["trust_clip"][i] or (0.0, inf)
        rows.append([hp["beta1"][i], hp["beta2"][i], hp["eps"][i], hp["weight_decay"][i],
                     1.0 if hp["bias_correction"][i] else 0.0, 1.0 if hp["adapt"][i] else 0.0,
                     w[0], w[1], t[0], t[1]] + [0.0] * (HPW - 10))
    by_dtype: dict[torch.dtype, list[int]] = {}
    for k, t in enumerate(plan.p):
        by_dtype.setdefault(t.dtype, []).append(k)
    launches = []
    for dtype, ks in by_dtype.items():
        dt, ct = _tl_types(dtype)
        numels = tuple(plan.p[k].numel() for k in ks)
        bt = _block_table(numels, CHUNK, device)
        # 16 bytes, so that the anchor itself is aligned as the kernels' vector loads assume of every base
        anchor = torch.empty(max(1, 16 // dtype.itemsize), dtype=dtype, device=device)
        kbs, offsets, aligned = [], [], []
        for kind in (plan.p, plan.g, plan.m, plan.v):
            kb, off, al = _offsets([kind[k] for k in ks], anchor if kind is plan.g else None)
            kbs.append(None if kb is None else ks[kb])
            offsets.append(off)
            aligned.append(al)
        is64 = dtype == torch.float64
        launches.append(_Launch(
            dtype=dtype, ks=ks, kbs=kbs, g_anchor=anchor, bt=bt, n=len(ks), is64=is64, offsets=offsets,
            aligned=aligned,
            off_t=h2d([o for part in offsets for o in part], torch.int64, device),
            numel_t=h2d(list(numels), torch.int64, device),
            hp_t=h2d([rows[k] for k in ks], torch.float64, device).reshape(-1).contiguous(),
            uparam_t=h2d([plan.param[k] for k in ks], torch.int32, device),
            lid_t=h2d([plan.lid[k] for k in ks], torch.int32, device),
            lids=h2d([plan.lid[k] for k in ks], torch.long, device),
            uparam=h2d([plan.param[k] for k in ks], torch.long, device),
            consts=dict(DT=dt, CT=ct, BLOCK=BLOCK, CHUNK=CHUNK, ALIGN=(16 // dtype.itemsize) if all(aligned) else 1,
                        IS64=is64, HPW=HPW, num_warps=NUM_WARPS),
        ))
    static_hyper = None
    if not fast and plan.flat_group is None:  # the lid -> param map is static outside flat mode
        static_hyper = lid_hyper(plan, hp["adapt"], hp["weight_norm_clip"], hp["trust_clip"], torch.float64, device,
                                 None)
    cache = _Cache(key, launches, fast, static_hyper, device)
    cache.grad_ptrs = tuple(g.data_ptr() for g in plan.g)
    return cache


def retarget(cache: _Cache, grads: list[Tensor], ptrs: tuple, clips: bool) -> bool:
    """Point ``cache`` (and its graph) at gradients at new addresses ``ptrs``, ``grads`` in the plan's unit order:
    their offsets from the anchor are written into the offset tables in place, stream-ordered after the kernels
    that read the old ones. False where the kernels' alignment assumption no longer holds (the caller rebuilds).
    A step that clips reads the gradients in its norm too, which a graph captures at their addresses: its graph is
    dropped and the count towards a capture restarts (gradients that keep moving then run eagerly)."""
    new = []
    for L in cache.launches:
        gs = [grads[k] for k in L.ks]
        _check_contiguous("gradient", gs)
        _, off, al = _offsets(gs, L.g_anchor)
        if not al and L.consts["ALIGN"] > 1:
            return False
        new.append((off, al))
    for L, (off, al) in zip(cache.launches, new):
        if L.n:
            src = torch.tensor(off, dtype=torch.int64)
            L.off_t[L.n : 2 * L.n].copy_(src.pin_memory() if L.off_t.is_cuda else src, non_blocking=True)
        L.offsets[1], L.aligned[1] = off, al
    cache.grad_ptrs = ptrs
    if clips:
        cache.graph, cache.graph_ratio, cache.hits = None, None, 0
    return True


def fused_step(plan, hp, state_steps, max_grad_norm, grad_scale, found_inf, acc, device, workspace=None) -> Tensor:
    num = plan.num_lids
    key = _signature(plan, hp, state_steps)
    cache = None if workspace is None else workspace.get("lamb_fused")
    if cache is not None and cache.key == key:
        ptrs = tuple(g.data_ptr() for g in plan.g)
        if ptrs != cache.grad_ptrs and not retarget(cache, plan.g, ptrs, max_grad_norm is not None):
            cache = None
    if cache is None or cache.key != key:
        for s in state_steps:
            if s.device != device:
                raise RuntimeError(f"the fused path keeps 'step' on the parameters' device; got one on {s.device}")
        cache = _build_cache(key, plan, hp, device)
        if workspace is not None:
            workspace["lamb_fused"] = cache
    update_lrs(cache, hp["lr"], device)
    mode = (found_inf is not None, grad_scale is not None, max_grad_norm)
    if cache.fast and device.type == "cuda" and CUDA_GRAPHS:
        # The whole step as one CUDA graph once the signature has held for GRAPH_AFTER steps: host work per step
        # drops to the signature check and one replay instead of the launches and torch ops of an eager step.
        # The AMP flag and scale enter through static buffers, so loss-scaled and clipped steps replay too.
        if cache.graph is not None and cache.graph_mode != mode:
            cache.graph, cache.graph_ratio, cache.hits = None, None, 0
        cache.hits += 1
        if cache.graph is None and cache.hits >= GRAPH_AFTER:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = _advance_and_launch(cache, plan, hp, state_steps, max_grad_norm,
                                          cache.scale_buf if mode[1] else None, cache.found_buf if mode[0] else None,
                                          acc, num, device)
            cache.graph, cache.graph_ratio, cache.graph_mode = graph, out, mode
        if cache.graph is not None:
            return replay(cache, grad_scale, found_inf)
    return _advance_and_launch(cache, plan, hp, state_steps, max_grad_norm, grad_scale, found_inf, acc, num, device)


def update_lrs(cache: _Cache, lrs: list, device) -> None:
    """Bring the cached per-unit learning rates (the buffer a captured graph reads) up to date without a sync."""
    cache.group_lrs = None  # the replay's record of what lr_t holds is stale after an eager step
    if any(isinstance(lr, torch.Tensor) for lr in lrs):
        # Device learning rates (a device-side schedule): gathered on the device every step.
        vec = lr_vector(lrs, list(range(len(lrs))), device, torch.float64)
        if cache.lr_t is None:
            cache.lr_t = vec
        else:
            cache.lr_t.copy_(vec)
        cache.lr_key = None
        return
    lr_key = tuple(lrs)
    if cache.lr_key != lr_key:
        if cache.lr_t is None:
            cache.lr_t = h2d(list(lr_key), torch.float64, device)
        else:  # in place: a captured graph reads this address (pinned source: no host sync)
            cache.lr_t.copy_(torch.tensor(lr_key, dtype=torch.float64).pin_memory(), non_blocking=True)
        cache.lr_key = lr_key


def replay(cache: _Cache, grad_scale, found_inf) -> Tensor:
    """One step from the captured graph (the caller checked that its inputs are the same tensors)."""
    if found_inf is not None:
        cache.found_buf.copy_(found_inf.reshape(()))
    if grad_scale is not None:
        cache.scale_buf.copy_(grad_scale.reshape(()))
    cache.graph.replay()
    return cache.graph_ratio.clone()


def _advance_and_launch(cache, plan, hp, state_steps, max_grad_norm, grad_scale, found_inf, acc, num, device):
    """The skip decision and clipping coefficient on the device, the step counts, then every kernel."""
    if grad_scale is None and found_inf is None and max_grad_norm is None:
        torch._foreach_add_(state_steps, 1.0)
        return _launch_all(cache, plan, hp, state_steps, None, cache.zero_i32, cache.one32, cache.one64, num, device)
    skip, coef = skip_and_coef(plan, max_grad_norm, grad_scale, found_inf, acc, device)
    # The list overload: the single-Tensor overload of _foreach_add_ reads the scalar on the host.
    torch._foreach_add_(state_steps, [(~skip).to(torch.float32)] * len(state_steps))
    skip_t = skip.reshape(1).to(torch.int32)
    coef32, coef64 = coef.reshape(1).to(torch.float32), coef.reshape(1).to(torch.float64)
    return _launch_all(cache, plan, hp, state_steps, skip, skip_t, coef32, coef64, num, device)


def _launch_all(cache, plan, hp, state_steps, skip, skip_t, coef32, coef64, num, device) -> Tensor:
    """Everything after the step counts were advanced: phase 1, the reduce (or the sharded reduction), phase 2."""
    steps = torch.stack(state_steps)
    lr_t = cache.lr_t

    # --- phase 1 and the per-unit sums (and, on the fast path, ratios and step scales) ---
    ratio = torch.empty(num, dtype=torch.float32, device=device) if cache.fast else None
    live = []
    for L in cache.launches:
        bases = [plan.p[L.kbs[0]], L.g_anchor, plan.m[L.kbs[2]], plan.v[L.kbs[3]]]
        bt = L.bt
        partial = torch.empty(max(bt["total"], 1), 2, dtype=torch.float64 if L.is64 else torch.float32,
                              device=device)
        coef_t = coef64 if L.is64 else coef32
        if bt["total"]:
            _phase1_kernel[(bt["total"],)](
                *bases, L.off_t, L.numel_t, L.hp_t, steps, L.uparam_t, bt["unit"], bt["start"], bt["bid"], coef_t,
                skip_t, partial, L.n, bt["n_full"], MASKED=bt["n_full"] < bt["total"], **L.consts,
            )
        sumsq = torch.empty(L.n, 2, dtype=torch.float64, device=device)
        scale = torch.empty(L.n, dtype=torch.float64, device=device)
        _reduce_kernel[(L.n,)](
            partial, bt["first"], bt["nb"], sumsq, L.hp_t, lr_t, L.uparam_t, L.lid_t, scale,
            ratio if ratio is not None else scale, skip_t, RB=REDUCE_BLOCK, FAST=cache.fast, HPW=HPW,
        )
        live.append((L, bases, sumsq, scale))

    if not cache.fast:
        xsq = torch.zeros(num, dtype=torch.float64, device=device)
        usq = torch.zeros(num, dtype=torch.float64, device=device)
        for L, _, sumsq, _ in live:
            xsq.index_add_(0, L.lids, sumsq[:, 0])
            usq.index_add_(0, L.lids, sumsq[:, 1])
        enc = encode_lid_params(plan, torch.float64, device)
        reduce_lid_vectors([xsq, usq, *enc], plan)
        lid_param = decode_lid_params(plan, enc)
        if cache.lid_hyper is not None and lid_param is None:
            adapt_t, wclip, tclip = cache.lid_hyper
        else:
            adapt_t, wclip, tclip = lid_hyper(plan, hp["adapt"], hp["weight_norm_clip"], hp["trust_clip"],
                                              torch.float64, device, lid_param)
        ratio = trust_ratio(xsq, usq, adapt_t, wclip, tclip)
        for L, _, _, scale in live:
            torch.mul(lr_t[L.uparam], ratio[L.lids], out=scale).neg_()
    assert ratio is not None  # the fast reduce kernel or the sharded reduction above filled it
    if skip is not None:
        ratio = torch.where(skip, torch.full_like(ratio, math.nan), ratio)

    # --- phase 2: x <- x + scale * u ---
    for L, bases, _, scale in live:
        bt = L.bt
        if bt["total"]:
            _phase2_kernel[(bt["total"],)](
                bases[0], bases[2], bases[3], L.off_t, L.numel_t, L.hp_t, steps, L.uparam_t, bt["unit"], bt["start"],
                scale, skip_t, L.n, bt["n_full"], MASKED=bt["n_full"] < bt["total"], **L.consts,
            )
    return ratio if ratio.dtype == torch.float32 else ratio.to(torch.float32)
