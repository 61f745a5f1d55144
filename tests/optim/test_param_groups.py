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
