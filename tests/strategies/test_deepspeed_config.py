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


def test_strategy_rejects_foreign_precision_plugins():
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_effi.strategies import EffiDeepSpeedStrategy

    strategy = EffiDeepSpeedStrategy(stage=1)
    with pytest.raises(RuntimeError, match=r"cannot use the precision plugin MixedPrecision"):
        strategy.precision_plugin = MixedPrecision("bf16-mixed", "cpu")


def test_registered_names():
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_effi.strategies  # noqa: F401

    for stage in (1, 2, 3):
        assert StrategyRegistry[f"effi_deepspeed_stage_{stage}"]["init_params"] == {"stage": stage}
