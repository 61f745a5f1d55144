"""The fused path's step plan, host side (no GPU needed): a plan redone for gradients at new addresses equals a
full build for them, table for table."""

from __future__ import annotations

import torch

import lightning_effi.optim.fused as FU
from lightning_effi.optim._plan import build_plan, per_param


def _plan_for(params, grads, exp_avgs, exp_avg_sqs):
    n = len(params)
    hp = dict(lr=per_param("lr", 1e-3, n), beta1=per_param("beta1", 0.9, n), beta2=per_param("beta2", 0.999, n),
              eps=per_param("eps", 1e-6, n), weight_decay=per_param("weight_decay", [0.01, 0.0, 0.01, 0.1][:n], n),
              adapt=per_param("adapt", True, n), bias_correction=per_param("bias_correction", True, n),
              trust_clip=per_param("trust_clip", None, n, pair=True),
              weight_norm_clip=per_param("weight_norm_clip", None, n, pair=True))
    return build_plan(params, grads, exp_avgs, exp_avg_sqs, None, None), hp


def test_plan_redone_for_moved_gradients_equals_a_full_build(monkeypatch):
    monkeypatch.setattr(FU, "_tl_types", lambda dtype: (dtype, torch.float64 if dtype == torch.float64 else
                                                        torch.float32))
    shapes = [(300, 70), (5,), (70000,), (3, 7)]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32]
    params = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    g1 = [torch.randn_like(p) for p in params]
    # the second set: other tensors, and one gradient a view at an odd offset (unaligned: ALIGN falls to 1)
    pool = torch.empty(80000, dtype=torch.float64)
    g2 = [torch.randn_like(p) for p in params]
    g2[2] = pool[1:70001]
    plan1, hp = _plan_for(params, g1, m, v)
    first = FU._build_cache(FU._signature(plan1, hp, steps), plan1, hp, torch.device("cpu"))
    plan2, _ = _plan_for(params, g2, m, v)
    key2 = FU._signature(plan2, hp, steps)
    assert FU.but_gradients(first.key) == FU.but_gradients(key2) and first.key != key2
    redone = FU._regrad_cache(first, key2, plan2, torch.device("cpu"))
    full = FU._build_cache(key2, plan2, hp, torch.device("cpu"))
    assert len(redone.launches) == len(full.launches) == 2  # one per dtype
    for a, b, old in zip(redone.launches, full.launches, first.launches):
        assert a.kbs == b.kbs and a.ks == b.ks and a.offsets == b.offsets and a.aligned == b.aligned
        assert a.consts == b.consts
        for name in ("off_t", "numel_t", "hp_t", "uparam_t", "lid_t", "lids", "uparam"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.numel_t is old.numel_t  # the tables that do not depend on the gradients are shared
    assert [L.consts["ALIGN"] for L in redone.launches] == [4, 1]
    assert redone.fast == full.fast and redone.key == key2
    # any other change in the signature is not a gradients-only change
    plan3, hp3 = _plan_for(params, g2, m, [torch.zeros_like(p) for p in params])
    assert FU.but_gradients(first.key) != FU.but_gradients(FU._signature(plan3, hp3, steps))


def test_captures_are_rationed_once_the_kept_graphs_are_captured():
    """SIGNATURES_KEPT captures whenever asked, then one per CAPTURE_EVERY eager steps (gradient addresses that keep
    changing would otherwise capture, and synchronise, again and again)."""
    ws: dict = {}
    granted = []
    for step in range(1, 2 * FU.CAPTURE_EVERY + 1):
        ws["eager_steps"] = step
        granted.append(FU._may_capture(ws))  # asked at every eager step: the worst case
    steps = [i + 1 for i, ok in enumerate(granted) if ok]
    kept = FU.SIGNATURES_KEPT
    assert steps[:kept] == list(range(1, kept + 1))
    assert steps[kept:] == [kept + FU.CAPTURE_EVERY, kept + 2 * FU.CAPTURE_EVERY][: len(steps) - kept]
    assert len(steps) == kept + 1
    assert FU._may_capture(None)
