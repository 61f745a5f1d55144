"""Tensor-parallel plans: every mistake is reported before anything is changed, naming the pattern, the module and
the fix. Runs without a process group: the checks need only the mesh's size (a stand-in below)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_effi.models import BertMLMLightningModule, GPTLightningModule
from lightning_effi.strategies import EffiFSDPStrategy
from lightning_effi.strategies.tensor_parallel import STYLES, apply_tensor_parallel, check_plan


class _Mesh:
    """The part of a DeviceMesh the checks read."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def _gpt(**kw) -> GPTLightningModule:
    return GPTLightningModule(**{"vocab_size": 32, "block_size": 8, "n_layer": 2, "n_head": 2, "d_model": 16, **kw})


def _apply(module, plan, tp=2, **kw):
    return apply_tensor_parallel(module, _Mesh(tp), plan, **kw)


@pytest.mark.parametrize(
    ("plan", "kwargs", "message"),
    [
        ({"model.blocks.*.attn.qkv": "columnwise"}, {}, "'columnwise' is not a tensor-parallel style"),
        ({"model.blocks.*.atn.qkv": "colwise"}, {}, "pattern 'model.blocks.*.atn.qkv' matches no module"),
        ({"model.blocks.*.attn": "colwise"}, {}, "matched 'model.blocks.0.attn' (CausalSelfAttention)"),
        ({"model.wte": "colwise"}, {}, "'colwise' splits an nn.Linear"),
        ({"model.lm_head": "embedding"}, {}, "'embedding' splits an nn.Embedding"),
        ({"model.blocks.*.mlp": "sequence"}, {}, "'sequence' is for norms and dropout"),
        ({"model.blocks.*.attn.heads": "divide"}, {}, "matches no int attribute 'heads'"),
        ({"model.blocks.*.attn.qkv": "colwise"}, {"loss_parallel": True}, "needs the logits' nn.Linear marked"),
        ({"model.wte": "embedding", "model.lm_head": "rowwise"}, {}, "are tied, but tp_plan splits them"),
        ({"model.lm_head": "output"}, {}, "are tied, but tp_plan splits them"),
    ],
)
def test_plan_errors(plan, kwargs, message):
    module = _gpt()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises((ValueError, TypeError)) as err:
        _apply(module, plan, **kwargs)
    assert message in str(err.value)
    after = module.state_dict()  # nothing was split or changed
    assert all(torch.equal(before[k], after[k]) and type(after[k]) is torch.Tensor for k in before)


def test_unknown_style_lists_the_styles():
    with pytest.raises(ValueError) as err:
        check_plan({"x": "rows"})
    for style in STYLES:
        assert repr(style) in str(err.value)


def test_head_count_that_does_not_divide():
    module = GPTLightningModule(vocab_size=32, block_size=8, n_layer=1, n_head=3, d_model=24)
    with pytest.raises(ValueError, match=r"model.blocks.0.attn.n_head = 3 is not divisible by tensor_parallel_size=2"):
        _apply(module, module.tp_plan())


def test_dropout_is_refused():
    module = _gpt(dropout=0.1)
    with pytest.raises(ValueError, match="dropout is not supported under tensor parallelism"):
        _apply(module, module.tp_plan())


def test_a_module_with_two_styles():
    module = _gpt()
    with pytest.raises(ValueError, match="gets two styles"):
        _apply(module, {"model.blocks.0.attn.qkv": "colwise", "model.blocks.*.attn.qkv": "rowwise"})


def test_plan_shape_is_checked_when_the_strategy_is_built():
    with pytest.raises(TypeError, match="must be a mapping"):
        EffiFSDPStrategy(tensor_parallel_size=2, tp_plan=["model.wte"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is not a tensor-parallel style"):
        EffiFSDPStrategy(tensor_parallel_size=2, tp_plan={"model.wte": "vocab"})
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EffiFSDPStrategy(tensor_parallel_size=0)


def test_world_size_not_divisible_by_tensor_parallel_size():
    strategy = EffiFSDPStrategy(tensor_parallel_size=2)
    strategy.parallel_devices = [torch.device("cpu")] * 3
    strategy.num_nodes = 1
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2\) does not divide the world size 3"):
        strategy.setup_environment()


def test_sequence_split_refuses_a_length_that_does_not_divide():
    from lightning_effi.strategies.tensor_parallel import _sequence_length_check

    hook = _sequence_length_check(2, "model.drop")
    hook(nn.Identity(), (torch.zeros(1, 8, 4),))
    with pytest.raises(ValueError, match="input has length 7; use sequence lengths divisible"):
        hook(nn.Identity(), (torch.zeros(1, 7, 4),))


@pytest.mark.parametrize("module", [_gpt(), BertMLMLightningModule(block_size=8, n_layer=2, n_head=2, d_model=16)])
def test_shipped_plans_match_their_models(module):
    """Every pattern of the example modules' plans resolves on the module (checked without splitting)."""
    from lightning_effi.strategies.tensor_parallel import _resolve

    styles, divided = _resolve(module, check_plan(module.tp_plan()), 2)
    assert set(styles.values()) | ({"divide"} if divided else set()) == set(module.tp_plan().values())
    assert set(divided) == {"model.blocks.0.attn.n_head", "model.blocks.1.attn.n_head"}


def test_attention_runs_on_local_heads():
    """The GPT attention with half of its heads (the rows of those heads in qkv, the matching columns of proj)
    gives half of the full attention's proj input contribution: what a tensor-parallel rank computes."""
    torch.manual_seed(0)
    full = _gpt().model.blocks[0].attn.double()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    d, half = full.head_dim, full.n_head // 2
    local = copy.deepcopy(full)
    rows = torch.arange(0, 3 * d * half)  # heads 0..half-1, grouped [q, k, v] per head
    local.qkv = nn.Linear(16, rows.numel()).double()
    local.qkv.weight.data, local.qkv.bias.data = full.qkv.weight[rows], full.qkv.bias[rows]
    local.proj = nn.Linear(d * half, 16, bias=False).double()
    local.proj.weight.data = full.proj.weight[:, : d * half]
    other = copy.deepcopy(local)
    rows2 = rows + 3 * d * half
    other.qkv.weight.data, other.qkv.bias.data = full.qkv.weight[rows2], full.qkv.bias[rows2]
    other.proj.weight.data = full.proj.weight[:, d * half:]
    with torch.no_grad():
        summed = local(x) + other(x) + full.proj.bias
        torch.testing.assert_close(summed, full(x))
