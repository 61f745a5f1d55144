"""What the ``effi`` command refuses before any training work, where Lightning would accept it silently or fail
late: a misspelt strategy name, ``max_steps=0``, a negative ``gradient_clip_val``, and a resume whose model
options contradict the checkpoint's saved hyper-parameters."""

from __future__ import annotations

import difflib
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# ckpt_path values that Lightning resolves itself, from the Trainer's callbacks or environment
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")


def strategy_names() -> list[str]:
    """The strategy names the Trainer accepts as a string: Lightning's registry (with this package's) and "auto"."""
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_effi.strategies  # noqa: F401  (registers effi_fsdp / effi_deepspeed_stage_N)

    return ["auto", *StrategyRegistry.available_strategies()]


def check_strategy_name(name: str) -> None:
    """Raise naming ``name`` and the closest registered names if the Trainer would not accept it (Lightning's
    own error lists a few examples and a web page)."""
    names = strategy_names()
    if name.lower() in names or "." in name:  # a dot: a class path, which jsonargparse imports and checks
        return
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
            else f"registered names: {', '.join(names)}")
    raise ValueError(f"Invalid strategy {name!r}: not a registered strategy name; {hint} (or give a strategy "
                     "class path, e.g. lightning_effi.strategies.EffiFSDPStrategy)")


def check_fit_limits(max_steps: Any, gradient_clip_val: Any) -> None:
    """Raise on Trainer values Lightning accepts but that cannot be meant for a training run."""
    if max_steps == 0 and not isinstance(max_steps, bool):
        raise ValueError("Invalid trainer.max_steps 0: the run would stop before its first optimizer step; give the "
                         "number of optimizer steps to train (>= 1), or -1 for no step limit")
    # NaN from a YAML .nan: every comparison is false, so Lightning would never clip
    if isinstance(gradient_clip_val, (int, float)) and not isinstance(gradient_clip_val, bool) and (
            math.isnan(gradient_clip_val) or gradient_clip_val < 0):
        raise ValueError(f"Invalid trainer.gradient_clip_val {gradient_clip_val!r}: must be >= 0 (the threshold "
                         "gradients are clipped to); give a positive threshold, or leave it unset (null) for no "
                         "clipping")


def checkpoint_hyper_parameters(ckpt_path: str | Path) -> tuple[dict[str, Any] | None, bool]:
    """The model hyper-parameters saved in a checkpoint file or directory, and whether LightningCLI restores them
    (it does for a file only). ``(None, False)`` for a directory layout without a known metadata file.

    Only the small entries are read: a file is memory-mapped (its tensors stay on disk), and a directory's
    metadata file holds no weights (or, for DeepSpeed stages 1-2, memory-mapped ones).
    """
    path = Path(ckpt_path)
    if path.is_file():
        # weights_only: LightningCLI reads the same file the same way to restore the hyper-parameters
        return _hparams(_load(path, weights_only=True)), True
    from lightning_effi.export import directory_metadata

    try:
        # not weights_only: the strategy unpickles these files in full when it resumes, so reading them trusts
        # nothing more
        meta = directory_metadata(path)
    except Exception as e:  # noqa: BLE001  (any reason the metadata is unreadable is the same input error)
        raise ValueError(f"Invalid ckpt_path {str(path)!r}: its metadata could not be read ({e})") from e
    # None: another strategy's layout, whose hyper-parameters, if any, are not where the package looks
    return (_hparams(meta), False) if meta is not None else (None, False)


def _load(path: Path, weights_only: bool) -> Any:
    try:
        # mmap needs torch.save's zip format (the default); an older file is read whole
        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=weights_only)
    except Exception as e:  # noqa: BLE001  (any reason the file is unreadable is the same input error)
        raise ValueError(f"Invalid ckpt_path {str(path)!r}: could not be read as a checkpoint ({e})") from e


def _hparams(checkpoint: Any) -> dict[str, Any] | None:
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    return dict(hparams) if isinstance(hparams, Mapping) else None


def check_ckpt_path(ckpt_path: Any) -> bool:
    """Raise if ``ckpt_path`` names a local path that does not exist; False for values Lightning resolves itself
    (``"last"``, ``"best"``, remote URLs), which have no local file to compare against yet."""
    text = str(ckpt_path)
    if text in _SPECIAL_CKPT or text.startswith("registry:") or "://" in text:
        return False
    if not Path(text).exists():
        raise ValueError(f"Invalid ckpt_path {text!r}: no such file or directory; give a checkpoint file or a "
                         "sharded checkpoint directory, or drop --ckpt_path to start a new run")
    return True


def resume_conflicts(model: Mapping[str, Any], hparams: Mapping[str, Any],
                     labels: Mapping[str, str] | None = None) -> list[str]:
    """``"<key> is <given> here, <saved> in the checkpoint"`` for every model value that differs from the saved one.

    Args:
        model: the model's ``class_path`` and ``init_args`` (the options given, or every value), plain values.
        hparams: the checkpoint's ``hyper_parameters`` (LightningCLI records the class as ``_class_path``).
        labels: what to call a key instead (a linked option: the option that sets it). Default None.
    """
    out: list[str] = []
    saved_cls, given_cls = hparams.get("_class_path"), model.get("class_path")
    if saved_cls and given_cls and saved_cls != given_cls:
        out.append(f"the model class is {given_cls} here, {saved_cls} in the checkpoint")
    init_args = model.get("init_args") or {}
    for key in sorted(set(init_args) & {k for k in hparams if not k.startswith("_")}):
        name = f"model.init_args.{key}"
        _compare((labels or {}).get(name, name), plain(init_args[key]), plain(hparams[key]), out)
    return out


def _compare(key: str, given: Any, saved: Any, out: list[str]) -> None:
    if isinstance(given, dict) and isinstance(saved, dict):
        # a nested class config: the entries both sides name (one side may list defaults the other leaves out)
        for k in sorted(set(given) & set(saved)):
            _compare(f"{key}.{k}", given[k], saved[k], out)
    elif given != saved:
        out.append(f"{key} is {given!r} here, {saved!r} in the checkpoint")


def plain(value: Any) -> Any:
    """Config values as the checkpoint holds them: namespaces as dicts, tuples as lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def raise_resume_conflicts(ckpt_path: Any, conflicts: list[str], restored: bool) -> None:
    """Raise naming each conflict and the fix (which depends on whether the checkpoint's values get restored)."""
    if not conflicts:
        return
    fix = ("resuming restores the checkpoint's hyper-parameters: drop the option (or config entry)"
           if restored else "a sharded checkpoint's hyper-parameters are not restored: set the checkpoint's value")
    raise ValueError(f"--ckpt_path {str(ckpt_path)!r} contradicts the model config: {'; '.join(conflicts)}. "
                     f"{fix[0].upper()}{fix[1:]}, or start a new run (without --ckpt_path) to train with the new "
                     "value")
