"""EffiFSDPStrategy in one process: argument validation, the sharding plan's errors, the precision policy table.

Errors that need a real setup (a device mesh) run a 1-process CPU Trainer in this process; the fixture destroys the
1-rank gloo group and restores the environment Lightning wrote (MASTER_ADDR/PORT) so later tests start clean.
"""

from __future__ import annotations

import os
import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from lightning_effi.models import GPT
from lightning_effi.plugins import LossScalingPrecision, MasterWeightsPrecision
from lightning_effi.strategies import EffiFSDPStrategy
from lightning_effi.strategies.parallelize import _auto_wrap_names, _find_modules


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"wrap": "Block"}, TypeError, r"got the string 'Block'; write \['Block'\]"),
        ({"wrap": ["Block", 3]}, TypeError, r"wrap entries must be non-empty class-name strings, got 3"),
        ({"activation_checkpointing": "Block"}, TypeError, r"activation_checkpointing must be a list"),
        ({"activation_checkpointing": [""]}, TypeError, r"got ''"),
        ({"reshard_after_forward": 0}, ValueError, r"Invalid reshard_after_forward 0"),
        ({"reshard_after_forward": "yes"}, ValueError, r"Invalid reshard_after_forward 'yes'"),
        ({"cpu_offload": "yes"}, TypeError, r"Invalid cpu_offload 'yes'"),
        ({"param_dtype": "fp16"}, ValueError, r"Invalid param_dtype 'fp16': must be 'auto' or one of"),
        ({"reduce_dtype": torch.float32}, ValueError, r"Invalid reduce_dtype torch.float32"),
        ({"wrap_group_size": 0}, ValueError, r"Invalid wrap_group_size 0: must be a positive int"),
        ({"wrap_group_size": 1.5}, ValueError, r"Invalid wrap_group_size 1.5"),
        ({"fused_adam_on_local_shards": 1}, TypeError, r"Invalid fused_adam_on_local_shards 1: must be True or"),
        ({"compile": "yes"}, TypeError, r"Invalid compile 'yes': must be True or False"),
        ({"compile": 1}, TypeError, r"Invalid compile 1: must be True or False"),
        ({"compile": True, "activation_checkpointing": ["Block"]}, ValueError,
         r"compile=True with activation_checkpointing=\['Block'\] is not supported"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        EffiFSDPStrategy(**kwargs)


def test_registered_by_name():
    assert "effi_fsdp" in StrategyRegistry
    assert isinstance(StrategyRegistry.get("effi_fsdp"), EffiFSDPStrategy)


def test_wrap_names_match_class_or_qualified_name_and_errors_list_classes():
    gpt = GPT(vocab_size=16, block_size=8, n_layer=3, n_head=2, d_model=8)
    assert _auto_wrap_names(gpt) == ["Block"]
    assert _find_modules(gpt, ["Block"], "wrap") == list(gpt.blocks)
    assert _find_modules(gpt, ["lightning_effi.models.gpt.Block"], "wrap") == list(gpt.blocks)
    with pytest.raises(ValueError) as err:
        _find_modules(gpt, ["Block", "TransformerBlock"], "wrap")
    msg = str(err.value)
    assert "['TransformerBlock']" in msg and "match no module of GPT" in msg
    present = re.search(r"Module classes present: \[(.*)\]", msg).group(1)
    assert {"Block", "CausalSelfAttention", "MLP", "GPT", "LayerNorm", "Embedding", "Linear"} <= {
        s.strip(" '") for s in present.split(",")
    }


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        (Precision(), (None, None)),
        (MixedPrecision("bf16-mixed", "cpu"), (torch.bfloat16, torch.float32)),
        (MixedPrecision("16-mixed", "cpu"), (torch.float16, torch.float32)),
        (LossScalingPrecision("16-mixed"), (torch.float16, torch.float32)),
        (LossScalingPrecision("bf16-mixed"), (torch.bfloat16, torch.float32)),
        (HalfPrecision("bf16-true"), (None, None)),
    ],
    ids=["32-true", "bf16-mixed", "16-mixed", "LossScaling16", "LossScalingBf16", "bf16-true"],
)
def test_policy_derived_from_precision_plugin(plugin, expected):
    strategy = EffiFSDPStrategy()
    strategy.precision_plugin = plugin
    assert strategy.mixed_precision_dtypes() == expected


def test_explicit_dtypes_override_and_unknown_plugin_errors():
    strategy = EffiFSDPStrategy(param_dtype="bfloat16", reduce_dtype="bfloat16")
    strategy.precision_plugin = MixedPrecision("16-mixed", "cpu")
    assert strategy.mixed_precision_dtypes() == (torch.bfloat16, torch.bfloat16)

    class Exotic(Precision):
        precision = "transformer-engine"

    strategy = EffiFSDPStrategy()
    strategy.precision_plugin = Exotic()
    with pytest.raises(RuntimeError, match=r"cannot derive .* from the precision plugin Exotic .*'transformer-engine'"):
        strategy.mixed_precision_dtypes()
    explicit = EffiFSDPStrategy(param_dtype="float32", reduce_dtype="float32")
    explicit.precision_plugin = Exotic()
    assert explicit.mixed_precision_dtypes() == (torch.float32, torch.float32)


# ------------------------------------------------------------------------------------------- errors at setup
class _LM(pl.LightningModule):
    def __init__(self, extra_root_param: bool = False, pre_sharded: bool = False, reads_weights: bool = False) -> None:
        super().__init__()
        self.model = GPT(vocab_size=16, block_size=8, n_layer=2, n_head=2, d_model=8)
        if extra_root_param:
            self.temperature = nn.Parameter(torch.ones(1))
        self.pre_sharded, self.reads_weights = pre_sharded, reads_weights
        self.steps_run = 0

    def configure_model(self) -> None:
        if self.pre_sharded:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.model)

    def training_step(self, batch, batch_idx):
        if self.reads_weights:  # a sharded weight mixed with a plain tensor outside its unit's forward
            return (self.model.wte.weight * torch.ones(8)).sum()
        self.steps_run += 1
        out = self.model(batch[0]).float().mean()
        return out * self.temperature if hasattr(self, "temperature") else out

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.fixture
def one_process_fit():
    """Fit a 1-process CPU Trainer here; afterwards destroy the 1-rank group and restore os.environ."""
    env = dict(os.environ)

    def fit(strategy: EffiFSDPStrategy, module: _LM, **trainer_kwargs) -> None:
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             **{"max_steps": 1, **trainer_kwargs})
        data = torch.utils.data.TensorDataset(torch.randint(0, 16, (4, 8)))
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))

    yield fit
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


@pytest.mark.parametrize(
    ("strategy_kwargs", "module_kwargs", "trainer_kwargs", "exc", "match"),
    [
        ({"wrap": ["Blok"]}, {}, {}, ValueError, r"wrap class name\(s\) \['Blok'\] match no module of _LM\. .*'Block'"),
        ({"activation_checkpointing": ["Attention"]}, {}, {}, ValueError,
         r"activation_checkpointing class name\(s\) \['Attention'\] .*'CausalSelfAttention'"),
        ({"cpu_offload": True}, {}, {}, RuntimeError,
         r"cpu_offload=True\) .* accelerator is 'cpu'; set cpu_offload=False"),
        ({}, {"reads_weights": True}, {}, RuntimeError,
         r"_LM.training_step computed with a sharded parameter outside the forward .* Call the submodule"),
        ({}, {"pre_sharded": True}, {}, RuntimeError, r"already sharded with fully_shard \(in configure_model\)"),
        ({}, {}, {"plugins": [MasterWeightsPrecision()]}, RuntimeError,
         r"MasterWeightsPrecision does not support EffiFSDPStrategy"),
    ],
    ids=["unknown-wrap", "unknown-ac", "cpu-offload-on-cpu", "weights-outside-forward", "pre-sharded",
         "master-weights"],
)
def test_bad_setup_raises_before_training(one_process_fit, strategy_kwargs, module_kwargs, trainer_kwargs, exc, match):
    module = _LM(**module_kwargs)
    with pytest.raises(exc, match=match):
        one_process_fit(EffiFSDPStrategy(**strategy_kwargs), module, **trainer_kwargs)
    assert module.steps_run == 0


@pytest.mark.parametrize(
    ("reshard_after_forward", "wrap", "expected", "group"),
    [
        # default: the layout of hand-written FSDP2 (fully_shard per Block, then the model with FSDP2's defaults)
        (True, None, {"root": True, "blocks": [False, False], "block0_in_block1": False}, 1),
        (False, None, {"root": True, "blocks": [True, True], "block0_in_block1": True}, 1),
        # a wrapped unit that is a direct child of the LightningModule is the FSDP root: kept like a root unit
        (True, ["GPT"], {"root": True, "blocks": [True, True], "block0_in_block1": True}, 1),
        # both Blocks as one unit: still gathered while the second one runs, resharded together after it
        (True, None, {"root": True, "blocks": [False, False], "block0_in_block1": True}, 2),
    ],
    ids=["default", "no-reshard", "wrap-root", "group2"],
)
def test_which_units_keep_parameters_from_forward_to_backward(one_process_fit, reshard_after_forward, wrap, expected,
                                                              group):
    from torch.distributed.tensor import DTensor

    seen = {}

    class Probe(pl.Callback):
        # An unsharded (all-gathered) parameter is a plain tensor, a resharded one is the DTensor shard again.
        def on_train_start(self, trainer, pl_module):
            blocks = pl_module.model.blocks

            def in_block1(mod, args):  # runs after FSDP's own pre-forward hook of Block 1
                seen["block0_in_block1"] = not isinstance(blocks[0].attn.qkv.weight, DTensor)

            blocks[1].register_forward_pre_hook(in_block1)

        def on_before_backward(self, trainer, pl_module, loss):  # between forward and backward
            gpt = pl_module.model
            seen["root"] = not isinstance(gpt.wte.weight, DTensor)
            seen["blocks"] = [not isinstance(b.attn.qkv.weight, DTensor) for b in gpt.blocks]

    one_process_fit(EffiFSDPStrategy(wrap=wrap, reshard_after_forward=reshard_after_forward, wrap_group_size=group),
                    _LM(), callbacks=[Probe()])
    assert seen == expected


@pytest.mark.parametrize("on_local_shards", [True, False])
def test_fused_adamw_kernel_gets_local_shards(one_process_fit, monkeypatch, on_local_shards):
    seen: list[set] = []
    kernel = torch._fused_adamw_

    def recording(*args, **kwargs):
        seen.append({type(t).__name__ for lst in args[:4] for t in lst})  # params, grads, exp_avgs, exp_avg_sqs
        return kernel(*args, **kwargs)

    class FusedLM(_LM):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    monkeypatch.setattr(torch, "_fused_adamw_", recording)
    one_process_fit(EffiFSDPStrategy(fused_adam_on_local_shards=on_local_shards), FusedLM())
    assert seen == [{"Tensor"} if on_local_shards else {"DTensor"}]
    assert torch._fused_adamw_ is recording  # put back after the step


def test_sigterm_stops_a_single_process_run(one_process_fit):
    # One process: Lightning's loop makes no per-batch agreement, so its own handler must stay in charge and stop the
    # run after the signalled batch (the 2-rank agreement is tested in tests/distributed/test_fsdp.py).
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class SignalAfterFirstBatch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    module = _LM()
    with pytest.raises(SIGTERMException):
        one_process_fit(EffiFSDPStrategy(), module, max_steps=3, callbacks=[SignalAfterFirstBatch()])
    assert module.steps_run == 1


def test_group_siblings_groups_consecutive_list_entries_only():
    from lightning_effi.strategies.parallelize import _group_siblings

    class A(nn.Linear):
        pass

    class B(nn.Linear):
        pass

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = A(2, 2), A(2, 2)  # top-level siblings: future FSDP roots, never grouped
            self.layers = nn.ModuleList([A(2, 2), A(2, 2), A(2, 2), B(2, 2), A(2, 2), A(2, 2)])
            self.head = nn.Sequential(A(2, 2), A(2, 2))

    root = Root()
    names = {id(m): n for n, m in root.named_modules()}
    units = [m for m in root.modules() if isinstance(m, A)]
    got = [[names[id(m)] for m in g] for g in _group_siblings(root, units, names, 2)]
    assert got == [["enc"], ["dec"], ["layers.0", "layers.1"], ["layers.2"], ["layers.4", "layers.5"],
                   ["head.0", "head.1"]]
    assert [len(g) for g in _group_siblings(root, units, names, 1)] == [1] * len(units)


def test_sigterm_during_fit_is_deferred_to_the_agreement_and_reported_at_the_end():
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from lightning_effi.strategies._sigterm import _SIGTERM_PENDING, _on_sigterm

    def connector(fn):
        trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), strategy=SimpleNamespace(launcher=None))
        return SimpleNamespace(trainer=trainer, received_sigterm=False, **{_SIGTERM_PENDING: False})

    fitting = connector(TrainerFn.FITTING)
    _on_sigterm(fitting, 15, None)
    # recorded only: a rank leaving on its own mid-fit would hang the others' next collective
    assert getattr(fitting, _SIGTERM_PENDING) and not fitting.received_sigterm
    strategy = EffiFSDPStrategy()
    strategy._lightning_module = SimpleNamespace(_trainer=SimpleNamespace(_signal_connector=fitting))
    strategy.on_train_end()  # fit ended before a training batch agreed on it: reported like upstream
    assert fitting.received_sigterm and not getattr(fitting, _SIGTERM_PENDING)
    validating = connector(TrainerFn.VALIDATING)
    _on_sigterm(validating, 15, None)  # outside fit: stops at the next batch, as upstream
    assert validating.received_sigterm


def test_fused_adamw_with_lr_scheduler_steps_on_local_shards_without_warnings(one_process_fit, monkeypatch):
    import warnings

    seen: list[set] = []
    kernel = torch._fused_adamw_

    def recording(*args, **kwargs):
        seen.append({type(t).__name__ for lst in args[:4] for t in lst})
        return kernel(*args, **kwargs)

    class ScheduledLM(_LM):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    monkeypatch.setattr(torch, "_fused_adamw_", recording)
    module = ScheduledLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one_process_fit(EffiFSDPStrategy(), module, max_steps=2)
    # the scheduler's step counter wraps optimizer.step: the local path still runs and still counts the step
    assert seen == [{"Tensor"}, {"Tensor"}]
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert module.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2


# EffiFSDPStrategy.setup runs Strategy.setup instead of ModelParallelStrategy.setup (which requires configure_model)
# and shards in model_to_device; these are the upstream sources that arrangement was checked against.
_UPSTREAM_SETUP_SHA256 = {
    "ModelParallelStrategy.setup": "7a79a2378fefc19c1f08fd0556fab62dd81ec851a0f8443175603ecb0aa79b0d",
    "Strategy.setup": "199381176c649ac14f8d671c814da7c40957d9916b32c7f7e9ecc8ce0ac822e8",
}


@pytest.mark.parametrize("name", sorted(_UPSTREAM_SETUP_SHA256))
def test_upstream_setup_is_the_one_the_override_was_checked_against(name):
    import hashlib
    import inspect
    import textwrap

    import lightning
    from lightning.pytorch import strategies

    cls_name, method = name.split(".")
    source = textwrap.dedent(inspect.getsource(getattr(getattr(strategies, cls_name), method)))
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert digest == _UPSTREAM_SETUP_SHA256[name], (
        f"Lightning {lightning.__version__} changed {name}. EffiFSDPStrategy.setup skips ModelParallelStrategy.setup "
        "and runs Strategy.setup, sharding in model_to_device: re-check on this Lightning upgrade that every step "
        f"upstream now takes is still taken (or deliberately left out), then store the new hash {digest}."
    )
