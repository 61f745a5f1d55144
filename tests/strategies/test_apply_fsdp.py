"""apply_fsdp on its own: a small model sharded over a 1-rank gloo mesh, no Trainer.

Checks the units and their grouping, which units keep their parameters from forward to backward, activation
checkpointing, compilation, the mixed-precision policy, and that every bad argument fails with its message before
anything is sharded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_effi.strategies import FSDPLayout, apply_fsdp


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.relu(self.fc(x)))


class Net(nn.Module):
    def __init__(self, n_blocks: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([Block() for _ in range(n_blocks)])
        self.head = nn.Linear(4, 10)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Root(nn.Module):
    """The LightningModule's place: not wrapped itself, its children become root units."""

    def __init__(self, n_blocks: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net(n_blocks)
        self.extra = nn.Linear(10, 10)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.extra(self.net(idx))


def _idx() -> torch.Tensor:
    return torch.randint(0, 10, (2, 3), generator=torch.Generator().manual_seed(1))


def _is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def test_default_plan_wraps_list_children_and_shards_the_rest_as_roots(one_rank_mesh):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Shard

    root = Root()
    names = [n for n, _ in root.named_parameters()]
    layout = apply_fsdp(root, one_rank_mesh)
    assert layout == FSDPLayout(
        units=(("net.blocks.0",), ("net.blocks.1",), ("net.blocks.2",), ("net.blocks.3",)),
        unit_classes=("Block",), roots=("net", "extra"), checkpointed=(), compiled=(),
    )
    assert [n for n, _ in root.named_parameters()] == names  # checkpoints keep their keys
    assert not isinstance(root, FSDPModule)
    assert all(isinstance(m, FSDPModule) for m in (*root.net.blocks, root.net, root.extra))
    for p in root.parameters():
        assert _is_sharded(p) and p.device_mesh is one_rank_mesh and p.placements == (Shard(0),)


@pytest.mark.parametrize(
    ("group_size", "units"),
    [
        (2, (("net.blocks.0", "net.blocks.1"), ("net.blocks.2", "net.blocks.3"))),
        (3, (("net.blocks.0", "net.blocks.1", "net.blocks.2"), ("net.blocks.3",))),
        (8, (("net.blocks.0", "net.blocks.1", "net.blocks.2", "net.blocks.3"),)),
    ],
    ids=["2", "3", "more-than-blocks"],
)
def test_group_size_shards_neighbouring_blocks_as_one_unit(one_rank_mesh, group_size, units):
    root = Root()
    layout = apply_fsdp(root, one_rank_mesh, group_size=group_size)
    assert layout.units == units
    blocks = {f"net.blocks.{i}": b for i, b in enumerate(root.net.blocks)}
    for unit in units:  # one FSDP state per unit, shared by the modules sharded together
        states = {id(blocks[name]._get_fsdp_state()) for name in unit}
        assert len(states) == 1
    assert len({id(b._get_fsdp_state()) for b in blocks.values()}) == len(units)


def test_deepest_units_first_and_a_wrapped_child_is_a_root(one_rank_mesh):
    root = Root()
    layout = apply_fsdp(root, one_rank_mesh, wrap=["Block", "tests.strategies.test_apply_fsdp.Net"])
    assert layout.units == (*((f"net.blocks.{i}",) for i in range(4)), ("net",))
    assert layout.unit_classes == ("Block", "Net")
    assert layout.roots == ("extra",)  # net is a wrapped unit already


def test_empty_wrap_gives_root_units_only(one_rank_mesh):
    root = Root()
    layout = apply_fsdp(root, one_rank_mesh, wrap=[])
    assert layout.units == () and layout.roots == ("net", "extra")


@pytest.mark.parametrize(
    ("reshard_after_forward", "wrap", "kept"),
    [
        # wrapped units reshard after forward; the roots (net, extra) keep FSDP2's root default: kept until backward
        (True, None, {"net": True, "extra": True, "blocks": [False] * 4}),
        (False, None, {"net": True, "extra": True, "blocks": [True] * 4}),
        # net wrapped: a top-level unit, so an FSDP root, kept like one; its blocks are its own units
        (True, ["Block", "Net"], {"net": True, "extra": True, "blocks": [False] * 4}),
    ],
    ids=["default", "no-reshard", "wrapped-root"],
)
def test_which_units_keep_parameters_from_forward_to_backward(one_rank_mesh, reshard_after_forward, wrap,
                                                              kept):
    root = Root()
    apply_fsdp(root, one_rank_mesh, wrap=wrap, reshard_after_forward=reshard_after_forward)
    out = root(_idx())
    # between forward and backward: an all-gathered parameter is a plain tensor, a resharded one the DTensor again
    got = {"net": not _is_sharded(root.net.emb.weight), "extra": not _is_sharded(root.extra.weight),
           "blocks": [not _is_sharded(b.fc.weight) for b in root.net.blocks]}
    assert got == kept
    out.sum().backward()
    assert all(_is_sharded(p) and _is_sharded(p.grad) for p in root.parameters())


@pytest.mark.parametrize(
    ("reshard_after_forward", "wrap", "group_size", "expected"),
    [
        # True: None (FSDP2's root default) for the units that are FSDP roots, True for the others
        (True, None, 1, {"net.blocks.0": True, "net.blocks.1": True, "net": None, "extra": None}),
        (False, None, 1, {"net.blocks.0": False, "net.blocks.1": False, "net": False, "extra": False}),
        (2, None, 1, {"net.blocks.0": 2, "net.blocks.1": 2, "net": 2, "extra": 2}),
        (True, None, 2, {"net.blocks.0+net.blocks.1": True, "net": None, "extra": None}),
        (True, ["Block", "Net"], 1, {"net.blocks.0": True, "net.blocks.1": True, "net": None, "extra": None}),
    ],
    ids=["default", "false", "int", "group", "wrapped-root"],
)
def test_reshard_setting_of_every_fully_shard_call(one_rank_mesh, monkeypatch, reshard_after_forward, wrap,
                                                   group_size, expected):
    import torch.distributed.fsdp as fsdp

    real, calls = fsdp.fully_shard, {}
    root = Root(n_blocks=2)
    names = {id(m): n for n, m in root.named_modules()}

    def spy(modules, **kwargs):
        key = "+".join(names[id(m)] for m in (modules if isinstance(modules, list) else [modules]))
        value = calls[key] = kwargs["reshard_after_forward"]
        assert kwargs["mesh"] is one_rank_mesh
        # A 1-rank mesh has no group of 2 to reshard to: record the 2, shard with False. (2 rather than 1, which
        # would compare equal to True.)
        return real(modules, **{**kwargs, "reshard_after_forward": False if value == 2 else value})

    monkeypatch.setattr(fsdp, "fully_shard", spy)
    apply_fsdp(root, one_rank_mesh, wrap=wrap, group_size=group_size, reshard_after_forward=reshard_after_forward)
    assert calls == expected
    assert list(calls) == list(expected)  # deepest first, root units last


def test_activation_checkpointing_recomputes_the_named_modules(one_rank_mesh):
    root = Root(n_blocks=2)
    calls = []
    for b in root.net.blocks:
        b.fc.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    layout = apply_fsdp(root, one_rank_mesh, activation_checkpointing=["Block"])
    assert layout.checkpointed == ("net.blocks.0", "net.blocks.1")
    root(_idx()).sum().backward()
    assert len(calls) == 4  # each block's forward once more in backward


def test_compile_compiles_each_wrapped_forward(one_rank_mesh, monkeypatch):
    compiled = []

    def record(fn, **kwargs):
        compiled.append(fn.__self__)
        return fn

    monkeypatch.setattr(torch, "compile", record)  # which forwards apply_fsdp compiles, without compiling them
    root = Root(n_blocks=3)
    layout = apply_fsdp(root, one_rank_mesh, compile=True, group_size=2)
    assert compiled == list(root.net.blocks)
    assert layout.compiled == ("net.blocks.0", "net.blocks.1", "net.blocks.2")
    assert all("forward" in vars(b) for b in root.net.blocks) and "forward" not in vars(root.net)


def test_mixed_precision_policy_sets_the_compute_dtype(one_rank_mesh):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    root = Root(n_blocks=1)
    seen = []
    root.net.blocks[0].fc.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.dtype))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    apply_fsdp(root, one_rank_mesh, mp_policy=policy)
    root(_idx()).float().sum().backward()
    assert seen == [torch.bfloat16]
    assert {p.dtype for p in root.parameters()} == {torch.float32}  # the sharded master copy stays fp32
    assert {p.grad.dtype for p in root.parameters()} == {torch.float32}


class _WithOwnParam(Root):
    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return super().forward(idx) * self.temperature


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"wrap": "Block"}, TypeError,
         r"wrap must be a list of class names, got the string 'Block'; write \['Block'\]"),
        ({"wrap": ["Block", None]}, TypeError, r"wrap entries must be non-empty class-name strings, got None"),
        ({"wrap": ["Block", "Blok"]}, ValueError,
         r"wrap class name\(s\) \['Blok'\] match no module of Root\. Module classes present: \[.*'Block'.*\]"),
        ({"activation_checkpointing": ["Attention"]}, ValueError,
         r"activation_checkpointing class name\(s\) \['Attention'\] match no module of Root"),
        ({"activation_checkpointing": "Block"}, TypeError, r"activation_checkpointing must be a list of class names"),
        ({"group_size": 0}, ValueError, r"Invalid group_size 0: must be a positive int"),
        ({"group_size": True}, ValueError, r"Invalid group_size True"),
        ({"reshard_after_forward": 0}, ValueError,
         r"Invalid reshard_after_forward 0: must be True, False or a positive group size"),
        ({"reshard_after_forward": None}, ValueError, r"Invalid reshard_after_forward None"),
        ({"compile": 1}, TypeError, r"Invalid compile 1: must be True or False"),
        ({"offload": "yes"}, TypeError, r"Invalid offload 'yes': must be True or False"),
        ({"compile": True, "activation_checkpointing": ["Block"]}, ValueError,
         r"compile=True with activation_checkpointing=\['Block'\] is not supported"),
        ({"mp_policy": torch.bfloat16}, TypeError,
         r"Invalid mp_policy torch.bfloat16: must be a .*MixedPrecisionPolicy"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments_fail_before_anything_is_sharded(one_rank_mesh, kwargs, exc, match):
    from torch.distributed.fsdp import FSDPModule

    root = Root()
    with pytest.raises(exc, match=match):
        apply_fsdp(root, one_rank_mesh, **kwargs)
    assert not any(isinstance(m, FSDPModule) for m in root.modules())
    assert not any(_is_sharded(p) for p in root.parameters())


def test_parameters_on_the_root_itself_are_sharded_with_the_root(one_rank_mesh):
    """Parameters registered on the root make it the FSDP root unit, gathered by its forward; the result equals the
    unsharded module."""
    from torch.distributed.fsdp import FSDPModule

    torch.manual_seed(0)
    root = _WithOwnParam()
    ref = copy.deepcopy(root)
    layout = apply_fsdp(root, one_rank_mesh)
    assert layout.root_params == ("temperature",)
    assert isinstance(root, FSDPModule) and _is_sharded(root.temperature)
    x = torch.randint(0, 10, (2, 8))
    torch.testing.assert_close(root(x), ref(x))
    root(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(root.temperature.grad.full_tensor(), ref.temperature.grad)


def test_tied_parameters_in_two_units_are_refused_naming_both(one_rank_mesh):
    """The example GPT ties its head to its embedding: wrapping the embedding as its own unit would put one tensor
    in two units."""
    from lightning_effi.models import GPT

    gpt = GPT(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=8)
    holder = nn.Module()
    holder.model = gpt
    expected = (r"parameters 'model.wte.weight' and 'model.lm_head.weight' are one tensor \(tied\) but would be "
                r"sharded in two FSDP units \('model.wte' and 'model'\)")
    with pytest.raises(ValueError, match=expected):
        apply_fsdp(holder, one_rank_mesh, wrap=["Embedding", "Block"])
    assert not any(_is_sharded(p) for p in holder.parameters())


def test_an_already_sharded_module_is_refused(one_rank_mesh):
    from torch.distributed.fsdp import fully_shard

    root = Root()
    fully_shard(root.net.head, mesh=one_rank_mesh)
    with pytest.raises(RuntimeError, match=r"Root is already sharded with fully_shard \(in your code\)"):
        apply_fsdp(root, one_rank_mesh)
