"""Every invalid argument raises before any step, with a message naming the value and the fix; plus state migration."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from lightning_effi.optim import FlatLayout, Lamb, lamb


def _p(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


ERRORS = [
    (dict(lr=-1.0), ValueError, "Invalid learning rate -1.0"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, r"Invalid lr tensor of shape \(2,\).*one element"),
    (dict(lr=torch.tensor(1)), ValueError, r"Invalid lr tensor of shape \(\) and dtype torch.int64"),
    (dict(lr=torch.tensor(-0.5)), ValueError, "Invalid learning rate -0.5"),
    (dict(betas=(1.0, 0.9)), ValueError, r"Invalid beta1 1.0: must be in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta2 -0.1"),
    (dict(betas=(0.9,)), ValueError, "Invalid betas"),
    (dict(eps=-1e-8), ValueError, "Invalid eps"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay -0.1"),
    (dict(trust_clip=(2.0, 1.0)), ValueError, r"Invalid trust_clip \(2.0, 1.0\): must satisfy 0 <= lo <= hi"),
    (dict(trust_clip=(1.0,)), ValueError, "Invalid trust_clip"),
    (dict(trust_clip=("a", 1.0)), TypeError, "lo and hi must be numbers"),
    (dict(weight_norm_clip=(-1.0, 1.0)), ValueError, "Invalid weight_norm_clip"),
    (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm 0.0"),
    (dict(max_grad_norm=-1.0), ValueError, "Invalid max_grad_norm"),
    (dict(bias_correction="yes"), TypeError, "Invalid bias_correction 'yes'"),
    (dict(foreach=True, fused=True), ValueError, "exclusive"),
]


@pytest.mark.parametrize("kwargs,exc,msg", ERRORS, ids=[str(e[0]) for e in ERRORS])
def test_invalid_constructor_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        Lamb([_p(3)], **kwargs)


@pytest.mark.parametrize(
    "group,exc,msg",
    [
        ({"adapt": 1}, TypeError, "Invalid adapt 1"),
        ({"betas": (0.9, 1.5)}, ValueError, "Invalid beta2 1.5"),
        ({"max_grad_norm": 2.0}, ValueError, "can only be set on the optimizer"),
        ({"lr": -3.0}, ValueError, "Invalid learning rate -3.0"),
    ],
)
def test_invalid_group_overrides(group, exc, msg):
    with pytest.raises(exc, match=msg):
        Lamb([{"params": [_p(3)]}, {"params": [_p(2)], **group}], max_grad_norm=1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where fused cannot run")
def test_fused_unavailable_names_the_reason():
    # Parameters not on the CPU ask for the Triton kernel (meta tensors: no memory, no CUDA needed).
    with pytest.raises(RuntimeError, match=r"Lamb\(fused=True\) cannot run: .*(CUDA|Triton).*Use foreach=True"):
        Lamb([torch.nn.Parameter(torch.empty(3, device="meta"))], fused=True)


def test_cpu_fused_unavailable_names_the_reason(monkeypatch):
    from lightning_effi.optim import cpu_kernel

    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setenv(cpu_kernel.ENV, "0")
    with pytest.raises(RuntimeError, match=r"Lamb\(fused=True\) cannot run: it is switched off by "
                                           r"LIGHTNING_EFFI_LAMB_CPU_KERNEL=0. Use foreach=True"):
        Lamb([_p(3)], fused=True)


def test_step_time_errors():
    p = _p(4)
    p.grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        Lamb([p]).step()
    c = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    c.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        Lamb([c]).step()
    a, b = _p(4), _p(4)
    a.grad, b.grad = torch.randn(4), torch.randn(4)
    opt = Lamb([{"params": [a]}, {"params": [b]}])
    opt.param_groups[0]["flat_layouts"] = [FlatLayout(segments=((0, 0, 4),), num_logical=2)]
    with pytest.raises(RuntimeError, match="some param groups have flat_layouts"):
        opt.step()
    opt.param_groups[1]["flat_layouts"] = [FlatLayout(segments=((1, 0, 5),), num_logical=2)]
    with pytest.raises(RuntimeError, match="covers 5 elements but the flat partition has only 4"):
        opt.step()
    opt.param_groups[1]["flat_layouts"] = []
    with pytest.raises(RuntimeError, match="flat_layouts'\\] has 0 entries for 1 params"):
        opt.step()


@pytest.mark.parametrize(
    "segments,num,msg",
    [
        (((2, 0, 3),), 2, r"logical_id 2: must be in \[0, num_logical=2\)"),
        (((0, 0, 3), (1, 2, 3)), 2, "overlap"),
        (((0, -1, 3),), 1, "must be >= 0"),
        (((0, 1),), 1, r"must be \(logical_id, offset, numel\)"),
        (((0, 0, 1),), -1, "num_logical -1"),
    ],
)
def test_invalid_flat_layout(segments, num, msg):
    with pytest.raises(ValueError, match=msg):
        FlatLayout(segments=segments, num_logical=num)


def test_functional_argument_errors():
    x, g = [torch.randn(3)], [torch.randn(3)]
    m, v, s = [torch.zeros(3)], [torch.zeros(3)], [torch.tensor(0.0)]
    with pytest.raises(ValueError, match=r"Invalid list lengths \[1, 2, 1, 1, 1\] of params, grads"):
        lamb(x, g + g, m, v, s, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0)
    with pytest.raises(ValueError, match="one value per parameter"):
        lamb(x, g, m, v, s, lr=[0.1, 0.2], beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0)
    with pytest.raises(ValueError, match="exclusive"):
        lamb(x, g, m, v, s, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, foreach=True, fused=True)


def test_setstate_migrates_old_state_dicts():
    """A state_dict from before the newer options (and with a Python-number step) loads and continues exactly."""
    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))]
    b = [torch.nn.Parameter(a[0].detach().clone())]
    oa = Lamb(a, lr=0.1)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    for g in grads[:2]:
        a[0].grad = g
        oa.step()
    old = copy.deepcopy(oa.state_dict())
    for grp in old["param_groups"]:
        for key in ("trust_clip", "weight_norm_clip", "max_grad_norm", "adapt", "foreach", "fused", "bias_correction"):
            del grp[key]
    for st in old["state"].values():
        st["step"] = int(st["step"])
    b[0].data.copy_(a[0].detach())
    ob = Lamb(b, lr=0.1)
    ob.load_state_dict(old)
    assert ob.param_groups[0]["adapt"] is True and torch.is_tensor(ob.state[b[0]]["step"])
    for g in grads[2:]:
        a[0].grad, b[0].grad = g, g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    assert not re.search("trust_ratios", repr(ob.state_dict()))
