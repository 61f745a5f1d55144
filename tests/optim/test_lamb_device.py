"""The sync-free parts of Lamb: the accelerator step (every scalar on the device), tensor learning rates, and the
overflow skip on every path, against the float64 paper reference."""

from __future__ import annotations

import pytest
import torch

from lightning_effi.optim import Lamb
from lightning_effi.optim import functional as F
from lightning_effi.optim._plan import build_plan
from tests.optim._reference import ReferenceLamb
from tests.optim.test_lamb import DEFAULTS, SPECS, _build, _make_grads, _make_params, _ref_groups

SKIP_AT = 5


def _hp(opt_kwargs, b_overrides, params_in_groups):
    """Per-parameter hyperparameter lists, as Lamb passes them, for the parameters that have gradients."""
    a = {**DEFAULTS, **{k: v for k, v in opt_kwargs.items() if k != "max_grad_norm"}}
    b = {**a, **b_overrides}
    out = {k: [] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "adapt", "bias_correction", "trust_clip",
                           "weight_norm_clip")}
    for grp in params_in_groups:
        g = a if grp == 0 else b
        for k in ("lr", "eps", "weight_decay", "adapt", "bias_correction", "trust_clip", "weight_norm_clip"):
            out[k].append(g[k])
        out["beta1"].append(g["betas"][0])
        out["beta2"].append(g["betas"][1])
    return out


@pytest.mark.parametrize("name,opt_kwargs,b_overrides", SPECS, ids=[s[0] for s in SPECS])
def test_accelerator_step_matches_reference_and_skips_exactly(name, opt_kwargs, b_overrides):
    """The accelerator step (run here on CPU tensors) against the reference, float64, with an overflow skipped."""
    from tests.optim.test_lamb import GROUP_A, GROUP_B

    gen = torch.Generator().manual_seed(3)
    params = [p.detach() for p in _make_params(torch.float64, "cpu", gen)]
    ref = ReferenceLamb(params, _ref_groups(opt_kwargs, b_overrides), max_grad_norm=opt_kwargs.get("max_grad_norm"))
    order = GROUP_A + GROUP_B
    m = {i: torch.zeros_like(params[i]) for i in order}
    v = {i: torch.zeros_like(params[i]) for i in order}
    steps = {i: torch.zeros((), dtype=torch.float32) for i in order}
    for step in range(12):
        grads = _make_grads(params, step, gen)
        live = [i for i in order if grads[i] is not None]
        skip = step == SKIP_AT
        if skip:
            grads[live[0]] = grads[live[0]].clone().fill_(float("inf"))
        before = [params[i].clone() for i in live], [m[i].clone() for i in live], [steps[i].clone() for i in live]
        hp = _hp(opt_kwargs, b_overrides, [0 if i in GROUP_A else 1 for i in live])
        hp["lr"] = [torch.tensor(lr, dtype=torch.float64) for lr in hp["lr"]]  # a device-side schedule's values
        plan = build_plan([params[i] for i in live], [grads[i] for i in live], [m[i] for i in live],
                             [v[i] for i in live], None, None)
        ratios = F._device_step(plan, hp, [steps[i] for i in live], opt_kwargs.get("max_grad_norm"), None,
                                torch.tensor(float(skip)), torch.float64, torch.device("cpu"))
        if skip:
            assert torch.isnan(ratios).all()
            for now, was in zip(([params[i] for i in live], [m[i] for i in live], [steps[i] for i in live]), before):
                assert all(torch.equal(a, b) for a, b in zip(now, was))
            continue
        want = ref.step(grads)
        for i in live:
            torch.testing.assert_close(params[i], ref.x[i], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(ratios.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["single", "foreach"])
def test_tensor_lr_equals_float_lr_under_a_scheduler(path):
    """torch's test_tensor_lr, for Lamb: the same run with ``lr=torch.tensor(...)`` (a scheduler fills it in place)
    gives the same parameters as with a float lr."""
    runs = []
    for as_tensor in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = _make_params(torch.float64, "cpu", gen)
        opt = _build(params, {"lr": torch.tensor(2e-2, dtype=torch.float64) if as_tensor else 2e-2}, {}, path)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9**k)
        for step in range(8):
            for p, g in zip(params, _make_grads(params, step, gen)):
                p.grad = g
            opt.step()
            sched.step()
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == as_tensor
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_found_inf_skips_on_the_cpu_paths_without_touching_state():
    gen = torch.Generator().manual_seed(0)
    params = _make_params(torch.float32, "cpu", gen)
    opt = Lamb(params, lr=1e-2)
    for p, g in zip(params, _make_grads(params, 0, gen)):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in params], {k: {n: t.clone() for n, t in s.items()} for k, s in
                                                     opt.state.items()}
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before[0]))
    assert all(torch.equal(opt.state[k][n], t) for k, s in before[1].items() for n, t in s.items())


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_cuda_tensor_lr_and_found_inf_need_no_host_sync(path):
    gen = torch.Generator().manual_seed(0)
    params = _make_params(torch.float32, "cuda", gen)
    lr = torch.tensor(1e-2, device="cuda")
    opt = _build(params, {"lr": lr, "max_grad_norm": 1.0}, {}, path)
    ref = _build([torch.nn.Parameter(p.detach().clone()) for p in params], {"lr": 1e-2, "max_grad_norm": 1.0}, {},
                 path)
    for step in range(4):
        grads = _make_grads(params, step, gen)
        for o in (opt, ref):
            for p, g in zip(o.param_groups[0]["params"] + o.param_groups[1]["params"],
                            [grads[i] for i in (0, 1, 4, 5, 2, 3, 6)]):
                p.grad = None if g is None else g.clone()
        found = torch.tensor(1.0 if step == 2 else 0.0, device="cuda")
        opt.found_inf = found
        if step >= 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if step != 2:
            ref.step()
    for a, b in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)
