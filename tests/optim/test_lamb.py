"""Lamb against the float64 paper reference: every path x dtype x option set, 20 steps, state_dict reload at 10."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_effi.optim import Lamb, lamb
from tests.optim._reference import ReferenceLamb

# Shapes cover matrices and vectors, a zero-size, an all-zero parameter, one whose gradient
# is None on odd steps (grad-less: no state change), and one whose gradient is always zero.
SHAPES = [(40, 30), (17, 5), (5,), (0,), (4, 3), (6,), (3, 3)]
GROUP_A, GROUP_B = [0, 1, 4, 5], [2, 3, 6]
ZERO_VALUED, SOMETIMES_NO_GRAD, ZERO_GRAD = 4, 5, 6

# (id, optimizer kwargs, overrides for group B)
SPECS = [
    ("defaults", {}, {}),
    ("no_bias_correction", {"bias_correction": False}, {}),
    ("clips", {"trust_clip": (0.2, 0.8), "weight_norm_clip": (0.5, 3.0)}, {}),
    ("max_grad_norm", {"max_grad_norm": 0.5}, {}),
    ("adapt_off", {}, {"adapt": False}),
    ("decay_off", {"weight_decay": 0.0}, {}),
    (
        "group_overrides",
        {"lr": 1e-2},
        {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.0, "adapt": False, "trust_clip": (0.1, 0.5)},
    ),
]

# Per-dtype tolerances on parameters and trust ratios after 20 steps (bf16 rounds x, m, v and u every step).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}

PATHS = [
    pytest.param("cpu", "single", id="cpu-single"),
    pytest.param("cpu", "foreach", id="cpu-foreach"),
    pytest.param("cpu", "fused", id="cpu-fused"),
    pytest.param("cuda", "foreach", id="cuda-foreach", marks=pytest.mark.gpu),
    pytest.param("cuda", "fused", id="cuda-fused", marks=pytest.mark.gpu),
]
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in TOL]

DEFAULTS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1, bias_correction=True, trust_clip=None,
                weight_norm_clip=None, adapt=True)


def _path_kwargs(path):
    return {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[path]


def _make_params(dtype, device, gen):
    params = []
    for k, shape in enumerate(SHAPES):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5
        if k == ZERO_VALUED:
            x.zero_()
        params.append(torch.nn.Parameter(x.to(dtype).to(device)))
    return params


def _make_grads(params, step, gen):
    grads = []
    for k, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if k == SOMETIMES_NO_GRAD and step % 2 == 1:
            grads.append(None)
            continue
        if k == ZERO_GRAD:
            g.zero_()
        grads.append(g.to(p.dtype).to(p.device))
    return grads


def _groups(params, opt_kwargs, b_overrides):
    return [
        {"params": [params[i] for i in GROUP_A]},
        {"params": [params[i] for i in GROUP_B], **b_overrides},
    ]


def _ref_groups(opt_kwargs, b_overrides):
    a = {**DEFAULTS, **{k: v for k, v in opt_kwargs.items() if k != "max_grad_norm"}}
    return [{"idx": GROUP_A, **a}, {"idx": GROUP_B, **a, **b_overrides}]


def _build(params, opt_kwargs, b_overrides, path):
    kw = {**{k: DEFAULTS[k] for k in ("lr", "betas", "eps", "weight_decay")}, **opt_kwargs, **_path_kwargs(path)}
    return Lamb(_groups(params, opt_kwargs, b_overrides), **kw)


@pytest.mark.parametrize("device,path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,opt_kwargs,b_overrides", SPECS, ids=[s[0] for s in SPECS])
def test_matches_float64_reference(device, path, dtype, name, opt_kwargs, b_overrides):
    gen = torch.Generator().manual_seed(0)
    params = _make_params(dtype, device, gen)
    opt = _build(params, opt_kwargs, b_overrides, path)
    if (device, path, dtype) == ("cpu", "fused", torch.bfloat16):
        for p, g in zip(params, _make_grads(params, 0, gen)):
            p.grad = g
        with pytest.raises(RuntimeError, match=r"fused=True\) cannot run on the CPU: unsupported .*bfloat16"):
            opt.step()
        return
    ref = ReferenceLamb(params, _ref_groups(opt_kwargs, b_overrides), opt_kwargs.get("max_grad_norm"))
    tol = TOL[dtype]
    assert opt.trust_ratios is None
    for step in range(20):
        if step == 10:
            # Save, rebuild everything from the state_dict, continue: must be indistinguishable.
            sd = copy.deepcopy(opt.state_dict())
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = _build(params, opt_kwargs, b_overrides, path)
            opt.load_state_dict(sd)
        grads = _make_grads(params, step, gen)
        for p, g in zip(params, grads):
            p.grad = g
        saved_grads = [None if g is None else g.clone() for g in grads]
        gradless = [k for k, g in enumerate(grads) if g is None]
        before = {k: copy.deepcopy(opt.state[params[k]]) for k in gradless}
        before_x = {k: params[k].detach().clone() for k in gradless}
        opt.step()
        ref_ratios = ref.step(grads)
        for p, g in zip(params, saved_grads):
            if g is not None:
                assert torch.equal(p.grad, g), "p.grad must never be modified"
        for k in gradless:
            assert torch.equal(params[k], before_x[k])
            assert set(opt.state[params[k]]) == set(before[k])
            for key, val in before[k].items():
                assert torch.equal(opt.state[params[k]][key], val), f"grad-less param changed state {key}"
        for k, p in enumerate(params):
            assert torch.isfinite(p).all(), f"non-finite weights in param {k} at step {step}"
            torch.testing.assert_close(p.detach().cpu().double(), ref.x[k], **tol, msg=f"param {k} step {step}")
        ratios = opt.trust_ratios
        assert ratios.dtype == torch.float32 and ratios.device == params[0].device
        torch.testing.assert_close(ratios.cpu().double(), torch.tensor(ref_ratios, dtype=torch.float64),
                                   atol=tol["atol"] * 10 + 1e-6, rtol=tol["rtol"] * 10 + 1e-6)
    if name == "clips":
        # The clip must actually have bound, or the case tests nothing.
        assert 0.8 in [pytest.approx(r) for r in ref_ratios]
    assert "trust_ratios" not in str(opt.state_dict().keys())


@pytest.mark.parametrize("device,path", PATHS)
def test_nonfinite_global_norm_skips_step(device, path):
    """max_grad_norm with an inf/NaN gradient: weights, moments and steps unchanged, ratios NaN, then recovery."""
    gen = torch.Generator().manual_seed(1)
    params = _make_params(torch.float32, device, gen)
    opt = _build(params, {"max_grad_norm": 1.0}, {}, path)
    for p, g in zip(params, _make_grads(params, 0, gen)):
        p.grad = g
    opt.step()
    snap_x = [p.detach().clone() for p in params]
    snap_s = copy.deepcopy(opt.state_dict()["state"])
    for bad in (math.inf, math.nan):
        grads = _make_grads(params, 2, gen)
        grads[1][0, 0] = bad
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        assert torch.isnan(opt.trust_ratios).all()
        for p, x in zip(params, snap_x):
            assert torch.equal(p.detach(), x)
        now = opt.state_dict()["state"]
        for k in snap_s:
            for key in snap_s[k]:
                assert torch.equal(now[k][key].cpu(), snap_s[k][key].cpu()), (k, key)
    for p, g in zip(params, _make_grads(params, 2, gen)):
        p.grad = g
    opt.step()
    assert torch.isfinite(opt.trust_ratios).all()
    assert all(float(s["step"]) == 2.0 for s in opt.state_dict()["state"].values())


def test_foreach_chunking_matches_single_in_float64(monkeypatch):
    """Tiny chunks force many views per tensor and batches spanning tensors: must equal the single-tensor path."""
    import lightning_effi.optim.functional as F

    monkeypatch.setattr(F, "_CPU_CHUNK", 7)
    monkeypatch.setattr(F, "_CPU_BATCH", 50)
    # The eager per-tensor path (bf16 and non-contiguous CPU tensors still take it), not the fused-kernel core.
    monkeypatch.setattr(F, "_cpu_adam_core_ok", lambda plan: False)
    gen = torch.Generator().manual_seed(2)
    a = _make_params(torch.float64, "cpu", gen)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa = _build(a, {"max_grad_norm": 3.0}, {"adapt": False}, "single")
    ob = _build(b, {"max_grad_norm": 3.0}, {"adapt": False}, "foreach")
    _step_pair(a, b, oa, ob, gen, 5, dict(atol=1e-13, rtol=1e-12), dict(atol=1e-6, rtol=1e-6))


def _step_pair(a, b, oa, ob, gen, steps, tol, ratio_tol):
    """Step two optimizers on the same gradients; parameters and trust ratios must agree after every step."""
    for step in range(steps):
        grads = _make_grads(a, step, gen)
        for pa, pb, g in zip(a, b, grads):
            pa.grad = g
            pb.grad = None if g is None else g.clone()
        oa.step()
        ob.step()
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, **tol)
        torch.testing.assert_close(oa.trust_ratios, ob.trust_ratios, **ratio_tol)


@pytest.mark.parametrize("name,opt_kwargs,b_overrides", SPECS, ids=[s[0] for s in SPECS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cpu_fused_adam_core_pieces_and_batches(monkeypatch, name, opt_kwargs, b_overrides, dtype):
    """The CPU default path (torch's fused AdamW kernel on a scratch copy, see _cpu_adam_core) with thresholds
    small enough that tensors are cut into pieces and small tensors share batches: equals the single-tensor path,
    which the tests above hold to the float64 reference."""
    import lightning_effi.optim.functional as F

    monkeypatch.setattr(F, "_CPU_SMALL", 10)
    monkeypatch.setattr(F, "cpu_piece_elements", lambda element_size=4: 64)
    calls = []
    real = F._cpu_adam_core
    monkeypatch.setattr(F, "_cpu_adam_core", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(4)
    a = _make_params(dtype, "cpu", gen)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa = _build(a, opt_kwargs, b_overrides, "single")
    ob = _build(b, opt_kwargs, b_overrides, "foreach")
    tol = dict(atol=1e-12, rtol=1e-11) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)
    _step_pair(a, b, oa, ob, gen, 6, tol, tol)
    assert len(calls) == 6
    for pa, pb in zip(a, b):
        sa, sb = oa.state[pa], ob.state[pb]
        if sa:
            torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], **tol)
            torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], **tol)
            assert float(sa["step"]) == float(sb["step"])


def test_functional_matches_class():
    """lamb() with scalar hyperparameters is the same step as Lamb with one group."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)]
    ps = [torch.nn.Parameter(x.clone()) for x in xs]
    opt = Lamb(ps, lr=0.1, weight_decay=0.05, trust_clip=(0.0, 5.0))
    ms = [torch.zeros_like(x) for x in xs]
    vs = [torch.zeros_like(x) for x in xs]
    steps = [torch.tensor(0.0) for _ in xs]
    for _ in range(3):
        gs = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in xs]
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        r = lamb(xs, gs, ms, vs, steps, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.05,
                 trust_clip=(0.0, 5.0))
        torch.testing.assert_close(r, opt.trust_ratios)
    for p, x in zip(ps, xs):
        torch.testing.assert_close(p.detach(), x, atol=0, rtol=0)
    assert [float(s) for s in steps] == [3.0, 3.0]
