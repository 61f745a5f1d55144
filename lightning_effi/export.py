"""Write a single-file, world-size-independent ``state_dict`` from any checkpoint this package produces.

``effi export CKPT OUT.pt`` calls :func:`export_checkpoint`. Formats, detected from what is on disk:

- a Lightning ``.ckpt`` file (single device, DDP, or a full-state-dict save): its ``state_dict`` as is;
- a torch.distributed.checkpoint directory (EffiFSDPStrategy's sharded save): see ``_export_dcp``;
- a DeepSpeed checkpoint directory (EffiDeepSpeedStrategy): see ``_export_deepspeed``.

Keys are the LightningModule's parameter names (``model.`` prefix kept) unless ``strip_prefix`` is given.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_effi import _compat


def _export_file(path: Path) -> dict[str, torch.Tensor]:
    # weights_only=False as Lightning itself loads checkpoints (they hold hyper-parameters and callback state):
    # export only checkpoints you trust.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same actionable message
        raise ValueError(f"{str(path)!r} could not be read as a checkpoint ({type(e).__name__}: {e}); pass a "
                         "Lightning .ckpt file, an FSDP (DCP) checkpoint directory or a DeepSpeed checkpoint "
                         "directory") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict' key); pass a .ckpt file "
                         "or a sharded checkpoint directory")
    return ckpt["state_dict"]


def _is_dcp_dir(path: Path) -> bool:
    """A torch.distributed.checkpoint directory (EffiFSDPStrategy / ModelParallelStrategy): DCP writes ``.metadata``."""
    return (path / ".metadata").is_file()


def _export_dcp(path: Path) -> dict[str, torch.Tensor]:
    """Full model weights of a sharded DCP checkpoint, on CPU, in this process, without a process group.

    Lightning's sharded save puts the model under the top-level key ``"state_dict"`` (optimizers under
    ``"optimizer_<i>"``, loops and callbacks in ``meta.pt``); only the model entries are read, so the optimizer
    state (2x the weights for Adam/LAMB) is never loaded. DCP stores each tensor by its global shape, so the result
    does not depend on how many ranks wrote it. Read with ``_compat.dcp_load_keys`` (torch's private reader for
    exactly this; the public ``format_utils.dcp_to_torch_save`` would also load every optimizer state).
    """
    import warnings

    with warnings.catch_warnings():
        # "torch.distributed is unavailable or uninitialized, assuming the intent is to load in a single process":
        # exactly the intent here.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        loaded = _compat.dcp_load_keys({"state_dict"}, str(path))
    if "state_dict" not in loaded:
        raise ValueError(f"{str(path)!r} is a torch.distributed.checkpoint directory without a 'state_dict' entry: "
                         "not a Lightning checkpoint")
    return dict(loaded["state_dict"])


def _is_deepspeed_dir(path: Path) -> bool:
    """A DeepSpeed checkpoint directory: a 'latest' tag file or tag sub-directories holding *_model_states.pt."""
    return (path / "latest").is_file() or any(path.glob("*/*model_states.pt"))


def _export_deepspeed(path: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint (any ZeRO stage, any number of writer ranks), merged on CPU.

    DeepSpeed's ``zero_to_fp32`` reassembles the full fp32 master weights from every rank's optimizer shard (not
    the bf16/fp16 model copy), so the result is independent of the world size that wrote it. EffiDeepSpeedStrategy
    saves under the tag ``"checkpoint"``; other tags are found through the ``latest`` file.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = "checkpoint" if (path / "checkpoint").is_dir() else None
    sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def export_state_dict(ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """Return the full, unsharded model ``state_dict`` (CPU tensors) stored in ``ckpt_path``."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_file():
        return _export_file(path)
    if _is_dcp_dir(path):
        return _export_dcp(path)
    if _is_deepspeed_dir(path):
        return _export_deepspeed(path)
    raise ValueError(f"{str(path)!r} is a directory but not a checkpoint format this version can export")


def export_checkpoint(ckpt_path: str | Path, out_path: str | Path, strip_prefix: str | None = None) -> Path:
    """Export ``ckpt_path`` to a single ``torch.save`` file at ``out_path`` and return that path.

    Args:
        ckpt_path: a Lightning checkpoint file or a sharded checkpoint directory.
        out_path: destination ``.pt`` file; written to a temporary name first, then renamed, so a crash never
            leaves a truncated file behind.
        strip_prefix: keep only the keys under this prefix, without it (e.g. ``"model."`` to load into the bare
            ``GPT``; entries outside the prefix are dropped).
    """
    sd = export_state_dict(ckpt_path)
    if strip_prefix and not strip_prefix.endswith("."):
        strip_prefix += "."  # "model" means the submodule "model.", never a partial key like "model_x"
    if strip_prefix:
        sd = {k[len(strip_prefix):]: v for k, v in sd.items() if k.startswith(strip_prefix)}
        if not sd:
            raise ValueError(f"no key of {str(ckpt_path)!r} starts with strip_prefix {strip_prefix!r}")
    sd = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(out)
    return out
