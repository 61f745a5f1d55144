"""param_groups: categories by module type (not only names), regex rules, and the decay x adapt split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_effi.optim import Lamb, param_groups


class MyRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))  # a norm weight whose name says nothing


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.ln_f = nn.LayerNorm(4)
        self.rms = MyRMSNorm(4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.tok.weight  # tied: must appear once
        self.gain = nn.Parameter(torch.ones(1))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def _names(groups):
    return [(g["weight_decay"], g.get("adapt", True), sorted(g["param_names"])) for g in groups]


def test_default_split_by_module_type():
    groups = param_groups(Net(), weight_decay=0.1, with_names=True)
    assert _names(groups) == [
        (0.1, True, ["gain", "proj.weight", "tok.weight"]),
        (0.0, True, ["ln_f.bias", "ln_f.weight", "proj.bias", "rms.scale"]),
    ]


def test_decay_and_adapt_are_independent():
    groups = param_groups(Net(), weight_decay=0.1, no_decay=["bias", "norm"], no_adapt=["norm", "1d"],
                          with_names=True)
    assert _names(groups) == [
        (0.1, True, ["proj.weight", "tok.weight"]),
        (0.1, False, ["gain"]),  # decayed but not adapted
        (0.0, False, ["ln_f.bias", "ln_f.weight", "proj.bias", "rms.scale"]),
    ]
    groups = param_groups(Net(), weight_decay=0.1, no_decay=["embedding"], no_adapt=[r"^proj\."], with_names=True)
    assert _names(groups) == [
        (0.1, True, ["gain", "ln_f.bias", "ln_f.weight", "rms.scale"]),
        (0.1, False, ["proj.bias", "proj.weight"]),
        (0.0, True, ["tok.weight"]),
    ]
    # Lamb accepts the groups as they are (the adapt key is Lamb's).
    Lamb(param_groups(Net(), no_adapt=["norm"]))


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(no_decay="bias"), TypeError, r"write \['bias'\]"),
        (dict(no_adapt=["(unclosed"]), ValueError, "not a valid regex"),
        (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay -1.0"),
    ],
)
def test_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        param_groups(Net(), **kwargs)


def _hf_no_decay(model: nn.Module) -> set[str]:
    """HuggingFace Trainer's rule, the independent reference: LayerNorm parameters and names containing "bias"
    are not decayed."""
    from transformers.trainer_pt_utils import get_parameter_names

    decayed = {n for n in get_parameter_names(model, [nn.LayerNorm]) if "bias" not in n}
    return {n for n, _ in model.named_parameters()} - decayed


@pytest.mark.parametrize("make", [
    lambda: nn.MultiheadAttention(8, 2),
    lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16),
    lambda: nn.TransformerDecoderLayer(8, 2, dim_feedforward=16),
], ids=["MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer"])
def test_bias_category_matches_huggingface_rule(make):
    torch.manual_seed(0)
    model = make()
    groups = param_groups(model, weight_decay=0.1, with_names=True)
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    assert any(n.endswith("in_proj_bias") for n in no_decay)  # the name that is not just "bias"
    assert no_decay == _hf_no_decay(model)


def test_bias_kv_rows_are_not_biases():
    # add_bias_kv's learned key/value rows: HF's substring rule excludes them, the "bias" category does not; a
    # regex adds them.
    model = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    off = {n for g in param_groups(model, with_names=True) if g["weight_decay"] == 0.0 for n in g["param_names"]}
    assert off == {"in_proj_bias", "out_proj.bias"}
    assert _hf_no_decay(model) - off == {"bias_k", "bias_v"}
    off = {n for g in param_groups(model, no_decay=["bias", r"bias_[kv]$"], with_names=True)
           if g["weight_decay"] == 0.0 for n in g["param_names"]}
    assert off == _hf_no_decay(model)


def test_unmatched_entries():
    bias_free = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
    # Categories without members are fine (the defaults on a bias-free model).
    assert len(param_groups(bias_free, no_decay=["bias", "norm"], no_adapt=["embedding"])) == 1
    with pytest.raises(ValueError, match=r"Invalid no_decay entry 'nrom': not a category and no parameter name "
                                         r"matches it; use a category of \('bias', 'norm', 'embedding', '1d'\) or a "
                                         r"regex searched in names such as \[0.weight, 1.weight\]"):
        param_groups(bias_free, no_decay=["bias", "nrom"])
    with pytest.raises(ValueError, match=r"Invalid no_adapt entry '\^head\\\\.': .* a second name of a shared "
                                         r"parameter"):
        param_groups(Net(), no_adapt=[r"^head\."])
