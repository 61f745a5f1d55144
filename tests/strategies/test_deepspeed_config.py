"""The DeepSpeed config merge (pure dict logic) and the conflicts raised before launch."""

from __future__ import annotations

import json
import re

import pytest

from lightning_effi.strategies._config import (
    DeepSpeedConfigConflict,
    build_deepspeed_config,
    load_user_config,
    loss_scaler_to_fp16,
    merge_accumulation,
    merge_batch_sizes,
    merge_gradient_clipping,
    merge_optimizer,
    merge_precision,
    merge_zero_optimization,
)

BASE = dict(stage=2, precision="32-true", accumulate_grad_batches=1, gradient_clip_val=None,
            gradient_clip_algorithm=None, world_size=2, micro_batch_size=4)
SCALER = dict(init_scale=2.0**16, growth_interval=1000, hysteresis=2, min_scale=1.0, backoff_factor=0.5,
              growth_factor=2.0, max_scale=2.0**24, consecutive_hysteresis=False)


def build(user=None, **kw):
    return build_deepspeed_config(user_config=user, **{**BASE, **kw})


def test_defaults_from_trainer_arguments():
    cfg = build(accumulate_grad_batches=3, gradient_clip_val=0.5, precision="bf16-mixed")
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["zero_allow_untested_optimizer"] is True


def test_user_config_is_kept_and_not_mutated():
    user = {"zero_optimization": {"reduce_bucket_size": 123, "stage": 2}, "steps_per_print": 7,
            "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_clipping": "auto"}
    snapshot = json.loads(json.dumps(user))
    cfg = build(user, accumulate_grad_batches=2, gradient_clip_val=1.0)
    assert user == snapshot
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 123 and cfg["steps_per_print"] == 7
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_clipping"] == 1.0


def test_clip_from_config_when_trainer_does_not_set_it():
    assert build({"gradient_clipping": 0.3})["gradient_clipping"] == 0.3


def test_json_path(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert build(load_user_config(path), stage=3)["zero_optimization"]["stage"] == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_user_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_user_config(tmp_path / "bad.json")


# (user config, trainer overrides, regexes that must all appear in the message)
CONFLICTS = {
    "fp16_vs_bf16": ({"fp16": {"enabled": True}}, dict(precision="bf16-mixed"),
                     [r"fp16\.enabled is true", r"precision='bf16-mixed'", r"set Trainer\(precision='16-mixed'\)"]),
    "bf16_vs_fp16": ({"bf16": {"enabled": True}}, dict(precision="16-mixed"),
                     [r"bf16\.enabled is true", r"precision='16-mixed'"]),
    "half_vs_fp32": ({"bf16": {"enabled": True}}, dict(precision="32-true"), [r"precision='32-true'"]),
    "accumulation": ({"gradient_accumulation_steps": 4}, dict(accumulate_grad_batches=2),
                     [r"gradient_accumulation_steps is 4", r"accumulate_grad_batches=2", r"accumulate_grad_batches=4"]),
    "clip": ({"gradient_clipping": 1.0}, dict(gradient_clip_val=0.5),
             [r"gradient_clipping is 1\.0", r"gradient_clip_val=0\.5", r"remove 'gradient_clipping'"]),
    "stage": ({"zero_optimization": {"stage": 3}}, dict(stage=2),
              [r"stage is 3", r"strategy is stage 2", r"effi_deepspeed_stage_3"]),
    "micro_batch": ({"train_micro_batch_size_per_gpu": 8}, {}, [r"is 8", r"batches of 4"]),
    "train_batch_size": ({"train_batch_size": 64}, dict(accumulate_grad_batches=2),
                         [r"train_batch_size is 64", r"= 16"]),
    "fp16_disabled": ({"fp16": {"enabled": False}}, dict(precision="16-mixed"), [r"fp16\.enabled is false"]),
    "scaler_knob": ({"fp16": {"loss_scale_window": 500}}, dict(precision="16-mixed", loss_scaler=SCALER),
                    [r"fp16\.loss_scale_window is 500", r"growth_interval=1000"]),
    "offload_device_none": ({"zero_optimization": {"offload_optimizer": {"device": "none"}}},
                            dict(offload_optimizer=True), [r"offload_optimizer\.device is 'none'"]),
}


@pytest.mark.parametrize("case", list(CONFLICTS), ids=list(CONFLICTS))
def test_conflicts_name_both_values(case):
    user, kw, patterns = CONFLICTS[case]
    with pytest.raises(DeepSpeedConfigConflict) as err:
        build(user, **kw)
    for pattern in patterns:
        assert re.search(pattern, str(err.value)), (pattern, str(err.value))


def test_all_conflicts_reported_together():
    with pytest.raises(DeepSpeedConfigConflict) as err:
        build({"gradient_accumulation_steps": 4, "gradient_clipping": 2.0, "fp16": {"enabled": True}},
              accumulate_grad_batches=1, gradient_clip_val=1.0, precision="bf16-mixed")
    assert len(err.value.conflicts) == 3


def test_equal_values_are_not_conflicts():
    cfg = build({"gradient_accumulation_steps": 2, "gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": 4,
                 "train_batch_size": 16, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
                accumulate_grad_batches=2, gradient_clip_val=0.5, precision="bf16-mixed")
    assert cfg["train_batch_size"] == 16


def test_loss_scaler_knobs_map_onto_fp16():
    knobs = {**SCALER, "init_scale": 2.0**10, "growth_interval": 50, "hysteresis": 3, "min_scale": 4.0,
             "consecutive_hysteresis": True}
    cfg = build(precision="16-mixed", loss_scaler=knobs)
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "loss_scale_window": 50,
                           "hysteresis": 3, "consecutive_hysteresis": True, "min_loss_scale": 4}


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        ("init_scale", 3000.0, r"init_scale=3000\.0.*power of two"),
        ("growth_factor", 4.0, r"growth_factor=4\.0.*2\.0"),
        ("backoff_factor", 0.25, r"backoff_factor=0\.25.*0\.5"),
        ("min_scale", 0.5, r"min_scale=0\.5.*integer"),
        ("on_min_scale", "skip", r"on_min_scale='skip'"),
    ],
)
def test_loss_scaler_knobs_deepspeed_cannot_express(knob, value, message):
    with pytest.raises(ValueError, match=message):
        loss_scaler_to_fp16({**SCALER, knob: value})


@pytest.mark.parametrize(
    ("kw", "exc", "message"),
    [
        (dict(stage=0), ValueError, r"Invalid ZeRO stage 0"),
        (dict(precision="64-true"), ValueError, r"Invalid precision '64-true'"),
        (dict(accumulate_grad_batches=0), ValueError, r"Invalid accumulate_grad_batches 0"),
        (dict(gradient_clip_algorithm="value"), ValueError, r"gradient_clip_algorithm='value'.*'norm'"),
        (dict(offload_parameters=True, stage=2), ValueError, r"offload_parameters=True needs ZeRO stage 3"),
    ],
)
def test_invalid_arguments(kw, exc, message):
    with pytest.raises(exc, match=message):
        build(**kw)


def test_offload_with_client_optimizer_unforces_ds_cpu_adam():
    cfg = build(offload_optimizer=True)
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert cfg["zero_force_ds_cpu_optimizer"] is False


def test_conflict_raises_before_launch_in_trainer(tmp_path):
    """The Trainer-level path: the launcher builds the config before any process or engine is started."""
    import lightning.pytorch as pl
    import torch

    from lightning_effi.strategies import EffiDeepSpeedStrategy

    class Never(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def setup(self, stage):  # would run after launch, on every rank
            raise AssertionError("setup reached: the conflict was not raised before launch")

    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", gradient_clip_val=0.5,
                         strategy=EffiDeepSpeedStrategy(stage=2, config={"fp16": {"enabled": True},
                                                                         "gradient_clipping": 1.0}),
                         logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(DeepSpeedConfigConflict) as err:
        trainer.fit(Never())
    assert "fp16.enabled is true" in str(err.value) and "gradient_clipping is 1.0" in str(err.value)


@pytest.mark.parametrize("how", ["dataloader", "datamodule"])
def test_every_conflict_including_the_micro_batch_is_reported_before_launch_at_once(tmp_path, how):
    """The loader's batch size is known before launch when fit is handed a DataLoader or a datamodule that records
    batch_size: three conflicts, one error, nothing launched."""
    import lightning.pytorch as pl
    import torch

    from lightning_effi.strategies import EffiDeepSpeedStrategy

    class Never(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def setup(self, stage):
            raise AssertionError("setup reached: the conflicts were not raised before launch")

    class Data(pl.LightningDataModule):
        def __init__(self, batch_size: int = 4):
            super().__init__()
            self.save_hyperparameters()

        def train_dataloader(self):
            raise AssertionError("the loader is not built before launch")

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 2)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", gradient_clip_val=0.5,
                         strategy=EffiDeepSpeedStrategy(stage=2, config={
                             "fp16": {"enabled": True}, "gradient_clipping": 1.0,
                             "train_micro_batch_size_per_gpu": 8}),
                         logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(DeepSpeedConfigConflict) as err:
        if how == "dataloader":
            trainer.fit(Never(), loader)
        else:
            trainer.fit(Never(), datamodule=Data())
    text = str(err.value)
    assert "fp16.enabled is true" in text and "gradient_clipping is 1.0" in text
    assert re.search(r"train_micro_batch_size_per_gpu is 8.*batches of 4", text, re.S), text


def test_strategy_rejects_foreign_precision_plugins():
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_effi.strategies import EffiDeepSpeedStrategy

    strategy = EffiDeepSpeedStrategy(stage=1)
    with pytest.raises(RuntimeError, match=r"cannot use the precision plugin MixedPrecision"):
        strategy.precision_plugin = MixedPrecision("bf16-mixed", "cpu")


def test_default_precision_plugin_is_built_once(tmp_path):
    import lightning.pytorch as pl

    from lightning_effi.strategies import EffiDeepSpeedStrategy

    strategy = EffiDeepSpeedStrategy(stage=1)
    first = strategy.precision_plugin
    assert strategy.precision_plugin is first and first.precision == "32-true"
    # The default is not a plugin the user set: Trainer(precision=...) still decides.
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", strategy=strategy, logger=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    assert trainer.strategy.precision_plugin.precision == "bf16-mixed"
    assert trainer.strategy.precision_plugin is trainer.strategy.precision_plugin


def test_registered_names():
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_effi.strategies  # noqa: F401

    for stage in (1, 2, 3):
        assert StrategyRegistry[f"effi_deepspeed_stage_{stage}"]["init_params"] == {"stage": stage}


# ------------------------------------------------------------------------------------- one function per section
# Each merge_* function writes its section into the config being built and returns its conflicts (it raises only
# for a malformed config); build_deepspeed_config above composes them.
def test_merge_zero_optimization():
    cfg = {"zero_optimization": {"reduce_bucket_size": 5, "stage": "auto"}}
    assert merge_zero_optimization(cfg, stage=3) == []
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 5 and zero["overlap_comm"] is True
    assert "offload_optimizer" not in zero and "offload_param" not in zero

    cfg = {}
    assert merge_zero_optimization(cfg, stage=3, offload_optimizer=True, offload_parameters=True) == []
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu"}

    cfg = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/x"}}}
    assert merge_zero_optimization(cfg, stage=2, offload_optimizer=True) == []
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "nvme_path": "/x"}


def test_merge_zero_optimization_conflicts():
    (stage,) = merge_zero_optimization({"zero_optimization": {"stage": 1}}, stage=2)
    assert stage == ("zero_optimization.stage is 1 in the DeepSpeed config but the strategy is stage 2 "
                     "(effi_deepspeed_stage_2): use effi_deepspeed_stage_1 / EffiDeepSpeedStrategy(stage=1), or "
                     "remove 'stage' from the config")
    conflicts = merge_zero_optimization(
        {"zero_optimization": {"offload_optimizer": {"device": "none"}, "offload_param": {}}}, stage=3,
        offload_optimizer=True, offload_parameters=True)
    assert conflicts == [
        "zero_optimization.offload_optimizer.device is 'none' in the DeepSpeed config but the strategy has "
        "offload_optimizer=True: set the device to 'cpu' or 'nvme', or drop the strategy flag",
        "zero_optimization.offload_param.device is 'none' in the DeepSpeed config but the strategy has "
        "offload_parameters=True: set the device to 'cpu' or 'nvme', or drop the strategy flag",
    ]
    with pytest.raises(ValueError, match=r"'zero_optimization' must be an object, got 'fast'"):
        merge_zero_optimization({"zero_optimization": "fast"}, stage=2)


def test_merge_optimizer():
    cfg = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert merge_optimizer(cfg) == []
    assert cfg["zero_force_ds_cpu_optimizer"] is False and cfg["zero_allow_untested_optimizer"] is True
    # not offloaded, or DeepSpeed's own optimizer from the config: DeepSpeed's choice stands
    for cfg, client in (({"zero_optimization": {}}, True),
                        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, False)):
        assert merge_optimizer(cfg, client_optimizer=client) == []
        assert "zero_force_ds_cpu_optimizer" not in cfg
    cfg = {"zero_allow_untested_optimizer": False}
    merge_optimizer(cfg)
    assert cfg["zero_allow_untested_optimizer"] is False
    (conflict,) = merge_optimizer({"zero_optimization": {"offload_optimizer": {"device": "cpu"}},
                                   "zero_force_ds_cpu_optimizer": True})
    assert conflict == ("zero_force_ds_cpu_optimizer is true in the DeepSpeed config but the optimizer comes from "
                        "configure_optimizers and the optimizer is offloaded: set it to false (or remove it)")


def test_merge_accumulation():
    for user in ({}, {"gradient_accumulation_steps": "auto"}, {"gradient_accumulation_steps": 3}):
        cfg = dict(user)
        assert merge_accumulation(cfg, accumulate_grad_batches=3) == []
        assert cfg["gradient_accumulation_steps"] == 3
    assert merge_accumulation({"gradient_accumulation_steps": 4}, accumulate_grad_batches=2) == [
        "gradient_accumulation_steps is 4 in the DeepSpeed config but Trainer(accumulate_grad_batches=2): set "
        "Trainer(accumulate_grad_batches=4) (or an AccumulationScheduler) and remove the key or set it to 'auto'"
    ]


def test_merge_batch_sizes():
    cfg = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
    assert merge_batch_sizes(cfg, micro_batch_size=4, accumulate_grad_batches=3, world_size=2) == []
    assert cfg == {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 24}
    # micro-batch not known yet (before launch): "auto" keys are dropped, nothing derived
    cfg = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
    assert merge_batch_sizes(cfg, micro_batch_size=None, accumulate_grad_batches=3, world_size=2) == []
    assert cfg == {}
    # ... but a micro-batch the user wrote is used
    cfg = {"train_micro_batch_size_per_gpu": 2}
    assert merge_batch_sizes(cfg, micro_batch_size=None, accumulate_grad_batches=1, world_size=2) == []
    assert cfg == {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4}


def test_merge_batch_sizes_conflicts():
    conflicts = merge_batch_sizes({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 64}, micro_batch_size=4,
                                  accumulate_grad_batches=2, world_size=2)
    assert conflicts == [
        "train_micro_batch_size_per_gpu is 8 in the DeepSpeed config but the train dataloader yields batches of 4: "
        "change the DataLoader batch_size to 8, or set the key to 'auto'",
        "train_batch_size is 64 in the DeepSpeed config but micro-batch 4 x accumulation 2 x world size 2 = 16: "
        "remove train_batch_size (it is derived) or set it to 'auto'",
    ]


def test_merge_gradient_clipping():
    for user, trainer, expected in (({}, None, 0.0), ({}, 0.5, 0.5), ({"gradient_clipping": "auto"}, 0.5, 0.5),
                                    ({"gradient_clipping": 0.3}, None, 0.3), ({"gradient_clipping": 1}, 1.0, 1.0)):
        cfg = dict(user)
        assert merge_gradient_clipping(cfg, gradient_clip_val=trainer) == []
        assert cfg["gradient_clipping"] == expected and isinstance(cfg["gradient_clipping"], float)
    assert merge_gradient_clipping({"gradient_clipping": 1.0}, gradient_clip_val=0.5) == [
        "gradient_clipping is 1.0 in the DeepSpeed config but Trainer(gradient_clip_val=0.5): keep one (remove "
        "'gradient_clipping' from the config, or drop the Trainer argument)"
    ]


def test_merge_precision():
    cfg = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert merge_precision(cfg, precision="32-true") == [] and cfg == {}
    cfg = {"bf16": {"immediate_grad_update": True}}
    assert merge_precision(cfg, precision="bf16-true") == []
    assert cfg == {"bf16": {"immediate_grad_update": True, "enabled": True}}
    cfg = {"fp16": {"loss_scale_window": "auto", "auto_cast": False}}
    assert merge_precision(cfg, precision="16-mixed") == []
    assert cfg == {"fp16": {"auto_cast": False, "enabled": True}}
    cfg = {"fp16": {"hysteresis": 2}}
    assert merge_precision(cfg, precision="16-mixed", loss_scaler=SCALER) == []
    assert cfg["fp16"] == {"hysteresis": 2, "enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                           "loss_scale_window": 1000, "consecutive_hysteresis": False, "min_loss_scale": 1}


def test_merge_precision_conflicts():
    assert merge_precision({"fp16": {"enabled": True}}, precision="bf16-mixed") == [
        "fp16.enabled is true in the DeepSpeed config but Trainer(precision='bf16-mixed'): set "
        "Trainer(precision='16-mixed') or remove 'fp16' from the config"
    ]
    assert merge_precision({"bf16": {"enabled": True}}, precision="32-true") == [
        "bf16.enabled is true in the DeepSpeed config but Trainer(precision='32-true'): set "
        "Trainer(precision='bf16-mixed') or remove 'bf16' from the config"
    ]
    assert merge_precision({"bf16": {"enabled": False}}, precision="bf16-mixed") == [
        "bf16.enabled is false in the DeepSpeed config but Trainer(precision='bf16-mixed'): remove 'bf16' from the "
        "config or use Trainer(precision='32-true')"
    ]
    assert merge_precision({"fp16": {"enabled": False}}, precision="16-mixed") == [
        "fp16.enabled is false in the DeepSpeed config but Trainer(precision='16-mixed'): remove 'fp16' from the "
        "config or use Trainer(precision='32-true')"
    ]
    assert merge_precision({"fp16": {"initial_scale_power": 10}}, precision="16-mixed", loss_scaler=SCALER) == [
        "fp16.initial_scale_power is 10 in the DeepSpeed config but LossScalingPrecision(init_scale=65536.0) gives "
        "16: set it in one place (remove fp16.initial_scale_power from the config, or change the plugin)"
    ]
    # a loss scaler DeepSpeed cannot express is an error of the plugin, not a conflict
    with pytest.raises(ValueError, match=r"growth_factor=4\.0"):
        merge_precision({}, precision="16-mixed", loss_scaler={**SCALER, "growth_factor": 4.0})
    # the loss scaler only matters for fp16
    cfg = {}
    assert merge_precision(cfg, precision="bf16-mixed", loss_scaler={**SCALER, "growth_factor": 4.0}) == []
