"""The fused Adam/AdamW step on local shards against torch's own step on the DTensors (1-rank gloo mesh).

Two copies of one FSDP2-sharded model get the same gradients; one optimizer steps through torch's ``step`` (DTensor
dispatch), the other through the local-shard path. Parameters and state must stay bitwise equal for every variant of
the spec table, the kernel must get plain tensors, and anything the path does not cover must keep its own ``step``.
The 2-rank comparison (real shards, one of them empty) is tests/distributed/test_fsdp.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_effi.strategies._local_adam import can_step_on_local_shards, local_shard_steps, step_on_local_shards


def _net(mesh, sharded: bool = True) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.LayerNorm(3))
    if sharded:
        fully_shard(net[0], mesh=mesh)
        fully_shard(net, mesh=mesh)
    return net


def _backward(net: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    loss = ((net(x) - y) ** 2).mean()
    loss.backward()
    return loss


def _groups(net: nn.Module, spec: dict) -> list[dict]:
    decay = [p for n, p in net.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in net.named_parameters() if not n.endswith("weight")]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0, "lr": spec.get("lr_rest", 2e-2)}]


# One entry per variant: optimizer class and its arguments (all fused=True).
SPECS = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adam_l2": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    "adamw_amsgrad": (torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True, "betas": (0.8, 0.9)}),
    "adam_maximize": (torch.optim.Adam, {"lr": 1e-2, "maximize": True, "eps": 1e-6}),
    "adamw_tensor_lr": (torch.optim.AdamW, {"lr": torch.tensor(1e-2)}),
    "adamw_capturable": (torch.optim.AdamW, {"lr": 1e-2, "capturable": True}),
}


def _pair(mesh, name: str):
    cls, kwargs = SPECS[name]
    ref_net, net = _net(mesh), _net(mesh)
    ref = cls(_groups(ref_net, kwargs), fused=True, **kwargs)
    opt = cls(_groups(net, kwargs), fused=True, **kwargs)
    return ref_net, ref, net, opt


def _assert_same(ref_net, ref, net, opt) -> None:
    from torch.distributed.tensor import DTensor

    for (name, a), b in zip(ref_net.named_parameters(), net.parameters()):
        assert torch.equal(a.to_local(), b.to_local()), name
        sa, sb = ref.state[a], opt.state[b]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            # the same kind of tensor torch's _init_group creates: DTensor moments, a plain float32 step count
            assert type(sa[key]) is type(sb[key]) and sa[key].dtype == sb[key].dtype, (name, key)
            if isinstance(sa[key], DTensor):
                assert sa[key].placements == sb[key].placements, (name, key)
                assert torch.equal(sa[key].to_local(), sb[key].to_local()), (name, key)
            else:
                assert sa[key].device == sb[key].device and torch.equal(sa[key], sb[key]), (name, key)


@pytest.fixture
def kernel_args(monkeypatch):
    """Types of the tensors torch's fused Adam kernels are handed (the functional adam looks them up per call)."""
    seen: list[set[str]] = []
    for op in ("_fused_adam_", "_fused_adamw_"):
        real = getattr(torch, op)

        def recording(*args, _real=real, **kwargs):
            seen.append({type(t).__name__ for lst in args[:4] for t in lst})
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, op, recording)
    return seen


@pytest.mark.parametrize("name", list(SPECS))
def test_bitwise_equal_to_the_dtensor_step(one_rank_mesh, kernel_args, name):
    ref_net, ref, net, opt = _pair(one_rank_mesh, name)
    assert can_step_on_local_shards(opt)
    for step in range(4):
        _backward(ref_net, step)
        ref.step()
        _backward(net, step)
        step_on_local_shards(opt)
        _assert_same(ref_net, ref, net, opt)
        ref.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
    # per step and group: DTensors through torch's step, local shards through ours
    assert kernel_args == [{"DTensor"}, {"DTensor"}, {"Tensor"}, {"Tensor"}] * 4


@pytest.mark.parametrize(("grad_scale", "found_inf"), [(4.0, 0.0), (None, 1.0), (2.0, 1.0)],
                         ids=["scaled", "overflow", "scaled-overflow"])
def test_grad_scale_and_found_inf_as_gradscaler_sets_them(one_rank_mesh, grad_scale, found_inf):
    ref_net, ref, net, opt = _pair(one_rank_mesh, "adamw")
    for step in range(3):
        for o in (ref, opt):
            # GradScaler's protocol: attributes set around step(); the overflow only in step 1
            o.grad_scale = None if grad_scale is None else torch.tensor(grad_scale)
            o.found_inf = torch.tensor(found_inf if step == 1 else 0.0)
        _backward(ref_net, step)
        ref.step()
        _backward(net, step)
        step_on_local_shards(opt)
        _assert_same(ref_net, ref, net, opt)
        if step == 1 and found_inf:  # skipped: step counts not advanced
            assert {float(s["step"]) for s in opt.state.values()} == {1.0}
        ref.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)


def test_closure_runs_with_grad_and_its_loss_is_returned(one_rank_mesh):
    ref_net, ref, net, opt = _pair(one_rank_mesh, "adamw")

    def closure():
        assert torch.is_grad_enabled()
        return _backward(net, 0)

    with torch.no_grad():
        loss = step_on_local_shards(opt, closure)
    assert torch.equal(loss, ref.step(lambda: _backward(ref_net, 0)))
    _assert_same(ref_net, ref, net, opt)


def test_plain_parameters_in_a_group_go_through_the_same_functional_adam(one_rank_mesh, kernel_args):
    # unsharded parameters: nothing to unwrap, the update is torch's
    torch.manual_seed(0)
    ref_net, net = _net(one_rank_mesh, sharded=False), _net(one_rank_mesh, sharded=False)
    ref, opt = torch.optim.AdamW(ref_net.parameters(), fused=True), torch.optim.AdamW(net.parameters(), fused=True)
    for step in range(2):
        _backward(ref_net, step)
        ref.step()
        _backward(net, step)
        step_on_local_shards(opt)
    for a, b in zip(ref_net.parameters(), net.parameters()):
        assert torch.equal(a, b)
        assert all(torch.equal(ref.state[a][k], opt.state[b][k]) for k in ref.state[a])


def test_routed_step_runs_hooks_and_keeps_the_lr_scheduler_counter(one_rank_mesh, kernel_args):
    ref_net, ref, net, opt = _pair(one_rank_mesh, "adamw")
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for o in (ref, opt)]
    counter = opt.step  # the scheduler's wrapper around torch's step
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            _backward(ref_net, step)
            ref.step()
            _backward(net, step)
            with local_shard_steps(opt) as routed:
                assert routed
                opt.step()
            assert opt.step is counter  # the scheduler's wrapper is back
            for s in schedulers:
                s.step()
            _assert_same(ref_net, ref, net, opt)
            for o in (ref, opt):
                o.zero_grad(set_to_none=True)
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], [str(w.message) for w in caught]
    assert calls == ["pre", "post"] * 3
    assert kernel_args == [{"DTensor"}, {"DTensor"}, {"Tensor"}, {"Tensor"}] * 3
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]


def test_state_dict_round_trip_continues_bitwise(one_rank_mesh):
    ref_net, ref, net, opt = _pair(one_rank_mesh, "adamw_amsgrad")
    for step in range(2):
        _backward(ref_net, step)
        ref.step()
        _backward(net, step)
        step_on_local_shards(opt)
        ref.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
    fresh = torch.optim.AdamW(_groups(net, {}), fused=True, **SPECS["adamw_amsgrad"][1])
    fresh.load_state_dict(opt.state_dict())
    _backward(ref_net, 2)
    ref.step()
    _backward(net, 2)
    step_on_local_shards(fresh)
    _assert_same(ref_net, ref, net, fresh)


class _MyAdamW(torch.optim.AdamW):
    pass


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps),  # not fused
        lambda ps: torch.optim.AdamW(ps, foreach=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: _MyAdamW(ps, fused=True),  # a subclass may change step()
        lambda ps: torch.optim.AdamW([{"params": ps[:1]}, {"params": ps[1:], "fused": False}], fused=True),
    ],
    ids=["unfused", "foreach", "sgd", "subclass", "one-group-unfused"],
)
def test_other_optimizers_keep_their_own_step(one_rank_mesh, make):
    opt = make(list(_net(one_rank_mesh).parameters()))
    assert not can_step_on_local_shards(opt)
    with local_shard_steps(opt) as routed:
        assert not routed and "step" not in vars(opt)


def test_a_step_wrapped_by_other_code_is_kept(one_rank_mesh):
    opt = torch.optim.AdamW(_net(one_rank_mesh).parameters(), fused=True)
    inner = opt.step
    opt.step = lambda *a, **k: inner(*a, **k)  # e.g. a profiler or a callback wrapping the instance's step
    wrapped = opt.step
    assert not can_step_on_local_shards(opt)
    with local_shard_steps(opt) as routed:
        assert not routed and opt.step is wrapped
    assert opt.step is wrapped


def test_routing_is_undone_after_an_error(one_rank_mesh):
    opt = torch.optim.AdamW(_net(one_rank_mesh).parameters(), fused=True)
    with pytest.raises(ZeroDivisionError), local_shard_steps(opt):
        assert "step" in vars(opt)
        raise ZeroDivisionError
    assert "step" not in vars(opt)
