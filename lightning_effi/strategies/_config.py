"""One DeepSpeed configuration from Trainer arguments and an optional user config (pure dict logic, no DeepSpeed).

Lightning's ``DeepSpeedStrategy`` writes some Trainer values into the DeepSpeed config, silently ignores others
when the user's JSON already has the key (gradient clipping, fp16 vs bf16), and raises on a few others only
once training has started. Here every value that exists on both sides is compared once, before launch, and all
disagreements are reported together, each naming both values and which one to change. Keys that only exist on
one side are copied; ``"auto"`` means "take the Trainer's value".

Each config section has its own ``merge_*`` function and :func:`build_deepspeed_config` composes them. Everything
here is plain data in, plain data out, so it is unit-tested without processes or DeepSpeed.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Lightning precision strings -> the DeepSpeed section that must be enabled (None: neither fp16 nor bf16).
_PRECISION_TO_SECTION = {
    "32-true": None,
    "32": None,
    "16-mixed": "fp16",
    "16-true": "fp16",
    "bf16-mixed": "bf16",
    "bf16-true": "bf16",
}

# The LossScalingPrecision knob -> DeepSpeed fp16 key it maps onto (init_scale is handled separately: DeepSpeed
# takes its log2 as "initial_scale_power").
_SCALER_KEYS = {
    "growth_interval": "loss_scale_window",
    "hysteresis": "hysteresis",
    "consecutive_hysteresis": "consecutive_hysteresis",
    "min_scale": "min_loss_scale",
}

# Defaults for the ZeRO section when the user's config does not say. Bucket sizes follow Lightning's defaults;
# sub_group_size is large so that ZeRO-3 keeps one optimizer sub-group per param group (one optimizer call per
# group; _zero_layout.install_flat_layouts handles several).
_ZERO_DEFAULTS = {
    "contiguous_gradients": True,
    "overlap_comm": True,
    "allgather_partitions": True,
    "reduce_scatter": True,
    "allgather_bucket_size": 200_000_000,
    "reduce_bucket_size": 200_000_000,
    "sub_group_size": 1_000_000_000_000,
}


class DeepSpeedConfigConflict(ValueError):
    """Raised when the user's DeepSpeed config and the Trainer arguments disagree; lists every disagreement."""

    def __init__(self, conflicts: list[str]) -> None:
        self.conflicts = list(conflicts)
        lines = "\n".join(f"  - {c}" for c in self.conflicts)
        super().__init__(
            f"The DeepSpeed config conflicts with the Trainer/strategy arguments in {len(self.conflicts)} place(s); "
            f"each setting must have one source of truth:\n{lines}"
        )


def load_user_config(config: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a deep copy of ``config`` (a dict, a path to a JSON file, or None for an empty config)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config file {str(path)!r} does not exist; pass a dict or a JSON path")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config file {str(path)!r} is not valid JSON: {err}; fix the JSON there, or "
                             "pass the config as a dict") from None
        if not isinstance(loaded, dict):
            raise ValueError(
                f"DeepSpeed config file {str(path)!r} must hold a JSON object, got {type(loaded).__name__}; write "
                'the config as one object, e.g. {"zero_optimization": {"stage": 2}}'
            )
        return loaded
    raise TypeError(f"Invalid DeepSpeed config {config!r}: pass a dict, a path to a JSON file, or None")


def loss_scaler_to_fp16(knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Map ``LossScalingPrecision`` knobs onto DeepSpeed's ``fp16`` section, or raise if DeepSpeed cannot express them.

    DeepSpeed's dynamic scaler grows and backs off by a fixed factor of 2, starts at a power of two, takes an integer
    floor and raises at the floor; other values would silently train with a different scaler than the one asked for.
    It has no ceiling: ``max_scale`` is not part of the config, the strategy clamps the scale after each step.
    """
    problems = []
    init_scale = float(knobs["init_scale"])
    power = math.log2(init_scale) if init_scale > 0 else float("nan")
    if not (math.isfinite(power) and power == int(power)):
        problems.append(f"init_scale={knobs['init_scale']!r}: DeepSpeed starts at 2**initial_scale_power; "
                        f"use a power of two such as {2.0 ** round(power) if math.isfinite(power) else 65536.0}")
    if float(knobs.get("growth_factor", 2.0)) != 2.0:
        problems.append(f"growth_factor={knobs['growth_factor']!r}: DeepSpeed always grows the scale by 2.0; use 2.0")
    if float(knobs.get("backoff_factor", 0.5)) != 0.5:
        problems.append(f"backoff_factor={knobs['backoff_factor']!r}: DeepSpeed always halves the scale; use 0.5")
    if knobs.get("on_min_scale", "raise") != "raise":
        problems.append(f"on_min_scale={knobs['on_min_scale']!r}: DeepSpeed's scaler always raises when an overflow "
                        "happens at min_scale; use on_min_scale='raise'")
    min_scale = float(knobs.get("min_scale", 1.0))
    if min_scale != int(min_scale) or min_scale < 1:
        problems.append(f"min_scale={knobs['min_scale']!r}: DeepSpeed's min_loss_scale is an integer >= 1; "
                        "use e.g. 1.0")
    if problems:
        raise ValueError(
            "LossScalingPrecision settings that DeepSpeed's fp16 loss scaler cannot express "
            "(use EffiFSDPStrategy/DDP for these, or change them):\n" + "\n".join(f"  - {p}" for p in problems)
        )
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": int(power)}
    for knob, key in _SCALER_KEYS.items():
        if knob in knobs:
            value = knobs[knob]
            fp16[key] = bool(value) if key == "consecutive_hysteresis" else int(value)
    return fp16


def _enabled(section: Any) -> bool:
    return isinstance(section, Mapping) and bool(section.get("enabled", False))


def _is_auto(value: Any) -> bool:
    return value == "auto"


# ---------------------------------------------------------------------------------------------- config sections
# Each merge_* function takes the config being built (a deep copy of the user's), writes its section into it and
# returns the conflicts it found, so build_deepspeed_config can report all of them together.
def merge_zero_optimization(cfg: dict[str, Any], *, stage: int, offload_optimizer: bool = False,
                            offload_parameters: bool = False) -> list[str]:
    """``zero_optimization``: the strategy's stage, its offload flags, and defaults for keys the user left out."""
    conflicts: list[str] = []
    zero = cfg.get("zero_optimization")
    if zero is None:
        zero = {}
    if not isinstance(zero, Mapping):
        raise ValueError(f"DeepSpeed config 'zero_optimization' must be an object, got {zero!r}; write it as "
                         '{"stage": N, ...} or leave it out (the strategy sets the stage)')
    zero = dict(zero)
    user_stage = zero.get("stage")
    _derive(zero, "stage", stage, conflicts, lambda: (
        f"zero_optimization.stage is {user_stage} in the DeepSpeed config but the strategy is stage {stage} "
        f"(effi_deepspeed_stage_{stage}): use effi_deepspeed_stage_{user_stage} / "
        f"EffiDeepSpeedStrategy(stage={user_stage}), or remove 'stage' from the config"))
    for key, value in _ZERO_DEFAULTS.items():
        zero.setdefault(key, value)
    for flag, key, device_default in (
        (offload_optimizer, "offload_optimizer", "cpu"),
        (offload_parameters, "offload_param", "cpu"),
    ):
        section = zero.get(key)
        user_device = section.get("device", "none") if isinstance(section, Mapping) else None
        if flag:
            if user_device is None:
                zero[key] = {"device": device_default}
            elif user_device == "none":
                conflicts.append(
                    f"zero_optimization.{key}.device is 'none' in the DeepSpeed config but the strategy has "
                    f"{'offload_optimizer' if key == 'offload_optimizer' else 'offload_parameters'}=True: "
                    "set the device to 'cpu' or 'nvme', or drop the strategy flag"
                )
    cfg["zero_optimization"] = zero
    return conflicts


def merge_optimizer(cfg: dict[str, Any], *, client_optimizer: bool = True) -> list[str]:
    """The keys that let DeepSpeed take the optimizer from ``configure_optimizers``.

    Reads the ``zero_optimization`` section, so it runs after :func:`merge_zero_optimization`.
    """
    conflicts: list[str] = []
    zero = cfg.get("zero_optimization") or {}
    offloads_optimizer = isinstance(zero.get("offload_optimizer"), Mapping) and zero["offload_optimizer"].get(
        "device", "none") != "none"
    if offloads_optimizer and client_optimizer:
        # An offloaded optimizer otherwise has to be DeepSpeed's own DeepSpeedCPUAdam: DeepSpeed refuses the one
        # from configure_optimizers.
        if cfg.get("zero_force_ds_cpu_optimizer", False) is True:
            conflicts.append(
                "zero_force_ds_cpu_optimizer is true in the DeepSpeed config but the optimizer comes from "
                "configure_optimizers and the optimizer is offloaded: set it to false (or remove it)"
            )
        cfg["zero_force_ds_cpu_optimizer"] = False
    cfg.setdefault("zero_allow_untested_optimizer", True)
    return conflicts


def merge_accumulation(cfg: dict[str, Any], *, accumulate_grad_batches: int) -> list[str]:
    """``gradient_accumulation_steps`` from ``Trainer(accumulate_grad_batches=...)``."""
    conflicts: list[str] = []
    user_gas = cfg.get("gradient_accumulation_steps")
    _derive(cfg, "gradient_accumulation_steps", accumulate_grad_batches, conflicts, lambda: (
        f"gradient_accumulation_steps is {user_gas} in the DeepSpeed config but "
        f"Trainer(accumulate_grad_batches={accumulate_grad_batches}): set "
        f"Trainer(accumulate_grad_batches={user_gas}) (or an AccumulationScheduler) and remove the key or set "
        "it to 'auto'"))
    return conflicts


def merge_batch_sizes(cfg: dict[str, Any], *, micro_batch_size: int | None, accumulate_grad_batches: int,
                      world_size: int) -> list[str]:
    """``train_micro_batch_size_per_gpu`` from the train dataloader and the derived ``train_batch_size``.

    With ``micro_batch_size=None`` (not known yet) an ``"auto"`` micro-batch is dropped for a later call to fill in.
    """
    conflicts: list[str] = []
    user_micro = cfg.get("train_micro_batch_size_per_gpu")
    _derive(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, conflicts, lambda: (
        f"train_micro_batch_size_per_gpu is {user_micro} in the DeepSpeed config but the train dataloader "
        f"yields batches of {micro_batch_size}: change the DataLoader batch_size to {user_micro}, or set the "
        "key to 'auto'"))
    micro = cfg.get("train_micro_batch_size_per_gpu")
    expected = None if micro is None else int(micro) * accumulate_grad_batches * world_size
    user_tbs = cfg.get("train_batch_size")
    _derive(cfg, "train_batch_size", expected, conflicts, lambda: (
        f"train_batch_size is {user_tbs} in the DeepSpeed config but micro-batch {micro} x accumulation "
        f"{accumulate_grad_batches} x world size {world_size} = {expected}: remove train_batch_size (it is "
        "derived) or set it to 'auto'"))
    return conflicts


def _derive(cfg: dict, key: str, value: Any, conflicts: list[str], message: Callable[[], str]) -> None:
    """Set ``cfg[key]`` to the value derived from the Trainer; a different explicit value in the user's config is
    a conflict (``message()``), an ``"auto"`` with nothing to derive it from is dropped for DeepSpeed to fill."""
    user = cfg.get(key)
    if value is not None:
        if user is not None and not _is_auto(user) and int(user) != value:
            conflicts.append(message())
        cfg[key] = value
    elif _is_auto(user):
        del cfg[key]


def merge_gradient_clipping(cfg: dict[str, Any], *, gradient_clip_val: float | None) -> list[str]:
    """``gradient_clipping`` from ``Trainer(gradient_clip_val=...)``; the config's value when the Trainer sets none."""
    conflicts: list[str] = []
    user_clip = cfg.get("gradient_clipping")
    if user_clip is not None and not _is_auto(user_clip):
        if gradient_clip_val is not None and float(user_clip) != float(gradient_clip_val):
            conflicts.append(
                f"gradient_clipping is {user_clip} in the DeepSpeed config but Trainer(gradient_clip_val="
                f"{gradient_clip_val}): keep one (remove 'gradient_clipping' from the config, or drop the Trainer "
                "argument)"
            )
        cfg["gradient_clipping"] = float(user_clip)
    else:
        cfg["gradient_clipping"] = float(gradient_clip_val or 0.0)
    return conflicts


def merge_precision(cfg: dict[str, Any], *, precision: str,
                    loss_scaler: Mapping[str, Any] | None = None) -> list[str]:
    """``fp16``/``bf16`` from ``Trainer(precision=...)``; the fp16 loss scaler from ``LossScalingPrecision``.

    Raises ``ValueError`` for loss-scaler settings DeepSpeed cannot express (:func:`loss_scaler_to_fp16`).
    """
    conflicts: list[str] = []
    wanted = _PRECISION_TO_SECTION[precision]
    for section in ("fp16", "bf16"):
        if section == wanted:
            continue
        if _enabled(cfg.get(section)):
            fix = (f"set Trainer(precision={'16-mixed' if section == 'fp16' else 'bf16-mixed'!r}) or remove "
                   f"'{section}' from the config")
            conflicts.append(f"{section}.enabled is true in the DeepSpeed config but Trainer(precision={precision!r}): "
                             f"{fix}")
        cfg.pop(section, None)
    if wanted == "bf16":
        conflicts += _merge_bf16(cfg, precision)
    elif wanted == "fp16":
        conflicts += _merge_fp16(cfg, precision, loss_scaler)
    return conflicts


def _merge_bf16(cfg: dict[str, Any], precision: str) -> list[str]:
    conflicts: list[str] = []
    user_bf16 = cfg.get("bf16")
    if isinstance(user_bf16, Mapping) and "enabled" in user_bf16 and not user_bf16["enabled"]:
        conflicts.append(f"bf16.enabled is false in the DeepSpeed config but Trainer(precision={precision!r}): "
                         "remove 'bf16' from the config or use Trainer(precision='32-true')")
    cfg["bf16"] = {**(dict(user_bf16) if isinstance(user_bf16, Mapping) else {}), "enabled": True}
    return conflicts


def _merge_fp16(cfg: dict[str, Any], precision: str, loss_scaler: Mapping[str, Any] | None) -> list[str]:
    conflicts: list[str] = []
    user_fp16 = dict(cfg.get("fp16") or {})
    if "enabled" in user_fp16 and not user_fp16["enabled"]:
        conflicts.append(f"fp16.enabled is false in the DeepSpeed config but Trainer(precision={precision!r}): "
                         "remove 'fp16' from the config or use Trainer(precision='32-true')")
    fp16 = {**user_fp16, "enabled": True}
    if loss_scaler is not None:
        mapped = loss_scaler_to_fp16(loss_scaler)
        knob_of = {v: k for k, v in _SCALER_KEYS.items()}
        knob_of["initial_scale_power"] = "init_scale"
        for key, value in mapped.items():
            user_set = key in user_fp16 and not _is_auto(user_fp16[key]) and key != "enabled"
            if user_set and type(value)(user_fp16[key]) != value:
                knob = knob_of.get(key, key)
                conflicts.append(
                    f"fp16.{key} is {user_fp16[key]} in the DeepSpeed config but LossScalingPrecision("
                    f"{knob}={loss_scaler.get(knob)!r}) gives {value}: set it in one place (remove "
                    f"fp16.{key} from the config, or change the plugin)"
                )
            fp16[key] = value
    cfg["fp16"] = {k: v for k, v in fp16.items() if not _is_auto(v)}
    return conflicts


def _check_arguments(*, stage: int, precision: str, accumulate_grad_batches: int, world_size: int,
                     gradient_clip_algorithm: str | None, offload_parameters: bool) -> None:
    if stage not in (1, 2, 3):
        raise ValueError(f"Invalid ZeRO stage {stage!r}: must be 1, 2 or 3")
    if precision not in _PRECISION_TO_SECTION:
        raise ValueError(f"Invalid precision {precision!r} for DeepSpeed: use one of {sorted(_PRECISION_TO_SECTION)}")
    if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
        raise ValueError(f"Invalid accumulate_grad_batches {accumulate_grad_batches!r}: must be an int >= 1")
    if world_size < 1:
        raise ValueError(f"Invalid world_size {world_size!r}: must be >= 1")
    if gradient_clip_algorithm not in (None, "norm"):
        raise ValueError(
            f"Trainer(gradient_clip_algorithm={gradient_clip_algorithm!r}) is not supported by DeepSpeed, which only "
            "clips by global norm: use gradient_clip_algorithm='norm'"
        )
    if offload_parameters and stage != 3:
        raise ValueError(f"offload_parameters=True needs ZeRO stage 3 (got stage {stage}): use effi_deepspeed_stage_3")


def build_deepspeed_config(
    *,
    user_config: Mapping[str, Any] | None,
    stage: int,
    precision: str,
    accumulate_grad_batches: int,
    gradient_clip_val: float | None,
    gradient_clip_algorithm: str | None,
    world_size: int,
    micro_batch_size: int | None,
    loss_scaler: Mapping[str, Any] | None = None,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    client_optimizer: bool = True,
) -> dict[str, Any]:
    """Merge the user's DeepSpeed config with the Trainer/strategy arguments into the config DeepSpeed receives.

    Args:
        user_config: the user's DeepSpeed config (already loaded), or None. Not modified.
        stage: ZeRO stage from the strategy (1, 2 or 3).
        precision: Lightning precision string (``"32-true"``, ``"16-mixed"``, ``"bf16-mixed"``, ...).
        accumulate_grad_batches: ``Trainer(accumulate_grad_batches=...)`` (the initial factor of a schedule).
        gradient_clip_val: ``Trainer(gradient_clip_val=...)``; None means "not set by the Trainer".
        gradient_clip_algorithm: ``Trainer(gradient_clip_algorithm=...)``; DeepSpeed only clips by norm.
        world_size: number of data-parallel processes.
        micro_batch_size: per-process batch size of the train dataloader, or None when not known yet (the
            micro-batch key is then left for a second call that knows it).
        loss_scaler: ``LossScalingPrecision`` knobs (``init_scale``, ``growth_interval``, ``hysteresis``, ...) when
            that plugin is the Trainer's precision, else None.
        offload_optimizer: strategy flag: optimizer state and step on CPU (ZeRO-Offload).
        offload_parameters: strategy flag: ZeRO-3 parameters on CPU.
        client_optimizer: the optimizer comes from ``configure_optimizers`` (not from the config).

    Returns:
        A new dict; raises :class:`DeepSpeedConfigConflict` listing every disagreement, or ``ValueError`` for
        invalid arguments.
    """
    _check_arguments(stage=stage, precision=precision, accumulate_grad_batches=accumulate_grad_batches,
                     world_size=world_size, gradient_clip_algorithm=gradient_clip_algorithm,
                     offload_parameters=offload_parameters)
    cfg = copy.deepcopy(dict(user_config or {}))
    conflicts: list[str] = []
    # The order of the sections is the order of the reported conflicts.
    conflicts += merge_zero_optimization(cfg, stage=stage, offload_optimizer=offload_optimizer,
                                         offload_parameters=offload_parameters)
    conflicts += merge_optimizer(cfg, client_optimizer=client_optimizer)
    conflicts += merge_accumulation(cfg, accumulate_grad_batches=accumulate_grad_batches)
    conflicts += merge_batch_sizes(cfg, micro_batch_size=micro_batch_size,
                                   accumulate_grad_batches=accumulate_grad_batches, world_size=world_size)
    conflicts += merge_gradient_clipping(cfg, gradient_clip_val=gradient_clip_val)
    conflicts += merge_precision(cfg, precision=precision, loss_scaler=loss_scaler)
    if conflicts:
        raise DeepSpeedConfigConflict(conflicts)
    return cfg
