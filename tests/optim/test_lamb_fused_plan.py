"""The fused path's step plan, host side (no GPU needed): gradients at new addresses are retargeted in place, and the
offset tables then address exactly the new gradients, as a full build for them would."""

from __future__ import annotations

import torch

import lightning_effi.optim.fused as FU
from lightning_effi.optim._plan import build_plan, per_param

CPU = torch.device("cpu")


def _plan_for(params, grads, exp_avgs, exp_avg_sqs):
    n = len(params)
    hp = dict(lr=per_param("lr", 1e-3, n), beta1=per_param("beta1", 0.9, n), beta2=per_param("beta2", 0.999, n),
              eps=per_param("eps", 1e-6, n), weight_decay=per_param("weight_decay", [0.01, 0.0, 0.01, 0.1, 0.0][:n], n),
              adapt=per_param("adapt", True, n), bias_correction=per_param("bias_correction", True, n),
              trust_clip=per_param("trust_clip", None, n, pair=True),
              weight_norm_clip=per_param("weight_norm_clip", None, n, pair=True))
    return build_plan(params, grads, exp_avgs, exp_avg_sqs, None, None), hp


def _addresses(cache, plan) -> list[list[list[int]]]:
    """Per launch and kind (p, g, m, v): the address each unit's offset resolves to, from the device table."""
    out = []
    for L in cache.launches:
        bases = [plan.p[L.kbs[0]], L.g_anchor, plan.m[L.kbs[2]], plan.v[L.kbs[3]]]
        offs = L.off_t.view(4, L.n).tolist()
        out.append([[b.data_ptr() + o * b.element_size() if plan.p[k].numel() else 0 for o, k in zip(row, L.ks)]
                    for b, row in zip(bases, offs)])
    return out


def _own(cache, plan) -> list[list[list[int]]]:
    """The reference for _addresses: the tensors' own addresses."""
    return [[[t.data_ptr() if t.numel() else 0 for t in (kind[k] for k in L.ks)]
             for kind in (plan.p, plan.g, plan.m, plan.v)] for L in cache.launches]


def _cpu_types(monkeypatch):
    monkeypatch.setattr(FU, "_tl_types", lambda dtype: (dtype, torch.float64 if dtype == torch.float64 else
                                                        torch.float32))


def test_retargeted_offsets_address_the_new_gradients_like_a_full_build(monkeypatch):
    _cpu_types(monkeypatch)
    shapes = [(300, 70), (5,), (70000,), (3, 7), (0,)]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float32]
    params = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    plan1, hp = _plan_for(params, [torch.randn_like(p) for p in params], m, v)
    key = FU._signature(plan1, hp, steps)
    cache = FU._build_cache(key, plan1, hp, CPU)
    before = [L.off_t.clone() for L in cache.launches]
    assert _addresses(cache, plan1) == _own(cache, plan1)

    g2 = [torch.randn_like(p) for p in params]  # other tensors: other addresses
    plan2, _ = _plan_for(params, g2, m, v)
    assert FU._signature(plan2, hp, steps) == key  # gradient addresses are not part of the signature
    ptrs = tuple(g.data_ptr() for g in g2)
    assert FU.retarget(cache, plan2.g, ptrs, False) and cache.grad_ptrs == ptrs
    full = FU._build_cache(key, plan2, hp, CPU)
    assert _addresses(cache, plan2) == _addresses(full, plan2) == _own(cache, plan2)
    for L, old in zip(cache.launches, before):  # in place, and only the gradients' rows
        rows, old_rows = L.off_t.view(4, L.n), old.view(4, L.n)
        assert torch.equal(rows[[0, 2, 3]], old_rows[[0, 2, 3]])
    assert [L.consts["ALIGN"] for L in cache.launches] == [4, 2]


def test_retarget_refuses_an_unaligned_gradient_where_the_kernels_assume_alignment(monkeypatch):
    _cpu_types(monkeypatch)
    params = [torch.randn(64), torch.randn(40)]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    plan, hp = _plan_for(params, [torch.randn_like(p) for p in params], m, v)
    cache = FU._build_cache(FU._signature(plan, hp, [torch.zeros(())] * 2), plan, hp, CPU)
    assert cache.launches[0].consts["ALIGN"] == 4
    pool = torch.empty(200)
    odd = [pool[1:65], pool[100:140]]  # the first at a 4-byte, not 16-byte, boundary
    old = cache.launches[0].off_t.clone()
    assert not FU.retarget(cache, odd, tuple(g.data_ptr() for g in odd), False)
    assert torch.equal(cache.launches[0].off_t, old)  # nothing written: the caller rebuilds
    # a plan built for unaligned gradients assumes nothing, so it takes aligned and unaligned ones alike
    plan_odd, _ = _plan_for(params, odd, m, v)
    loose = FU._build_cache(FU._signature(plan_odd, hp, [torch.zeros(())] * 2), plan_odd, hp, CPU)
    assert loose.launches[0].consts["ALIGN"] == 1
    assert FU.retarget(loose, plan.g, tuple(g.data_ptr() for g in plan.g), False)
    assert _addresses(loose, plan) == _addresses(cache, plan)


def test_retarget_keeps_a_graph_but_drops_one_that_clips(monkeypatch):
    """A captured clipping norm reads the gradients at their captured addresses; the kernels read them via the
    offset tables. So only a graph without clipping survives a retarget."""
    _cpu_types(monkeypatch)
    params = [torch.randn(64)]
    plan, hp = _plan_for(params, [torch.randn(64)], [torch.zeros(64)], [torch.zeros(64)])
    key = FU._signature(plan, hp, [torch.zeros(())])
    for clips, kept in ((False, True), (True, False)):
        cache = FU._build_cache(key, plan, hp, CPU)
        cache.graph, cache.hits = object(), 5
        g = [torch.randn(64)]
        assert FU.retarget(cache, g, (g[0].data_ptr(),), clips)
        assert (cache.graph is not None) is kept and (cache.hits == 5) is kept
