"""Write a single-file, world-size-independent export of any checkpoint this package produces, and load it back.

``effi export CKPT OUT.pt`` calls :func:`export_checkpoint`. Checkpoint formats, detected from what is on disk:

- a Lightning ``.ckpt`` file (single device, DDP, or a full-state-dict save): its ``state_dict`` as is;
- a torch.distributed.checkpoint directory (EffiFSDPStrategy's sharded save): see ``_export_dcp``;
- a DeepSpeed checkpoint directory (EffiDeepSpeedStrategy): see ``_export_deepspeed``.

The export file (format version 1) is one ``torch.save`` of plain values, readable with
``torch.load(weights_only=True)``::

    {
        "format": "lightning_effi.export",
        "format_version": 1,
        "state_dict": {name: tensor},   # the LightningModule's keys ("model." kept) unless strip_prefix is given
        "model": {                      # None when the checkpoint does not say which network it holds
            "class_path": "lightning_effi.models.gpt.GPT",
            "init_args": {"vocab_size": 260, "block_size": 128, ...},
            "prefix": "model.",         # where the network's keys start in "state_dict" ("" after strip_prefix)
        },
    }

``"model"`` comes from the checkpoint entry ``"export_spec"``, which the example LightningModules write
(``export_spec`` classmethod, :class:`~lightning_effi._protocols.ExportSpecModule`); for older checkpoints written by
``effi fit``, from the module class that LightningCLI recorded in the hyper-parameters (``_class_path``). A module of
your own opts in by writing ``checkpoint["export_spec"] = model_spec(Net, init_args, prefix="net.")`` in its
``on_save_checkpoint``.

:func:`load_export` rebuilds the network; ``GPT.from_export(path)`` and ``BertEncoder.from_export(path)`` do the same
and check that the file holds their class (:class:`ExportableModule`).
"""

from __future__ import annotations

import importlib
import numbers
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn

from lightning_effi import _compat
from lightning_effi._protocols import ExportSpecModule

FORMAT = "lightning_effi.export"
FORMAT_VERSION = 1
#: the checkpoint entry naming the network a LightningModule's checkpoint holds (see :func:`model_spec`)
SPEC_KEY = "export_spec"
# Lightning's sharded save writes everything but the weights and the optimizer states to this file.
_DCP_META = "meta.pt"

M = TypeVar("M", bound=nn.Module)


def _class_path(cls: type) -> str:
    """``"package.module.Class"``, the import path :func:`load_export` rebuilds ``cls`` from."""
    return f"{cls.__module__}.{cls.__qualname__}"


class _NotPlain(TypeError):
    pass


def _plain(value: Any) -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back without an allow-list: builtin bool, int, float,
    str and None, in lists and str-keyed dicts. Other numbers and str subclasses (numpy scalars, enums) become the
    builtin type: pickled by their own class, they would be refused on loading."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {str.__str__(k): _plain(v) for k, v in value.items()}
    raise _NotPlain(value)


def model_spec(model_class: type[nn.Module] | str, init_args: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The ``"model"`` entry of an export: which network to build, with which constructor arguments, and where its
    keys start in the LightningModule's ``state_dict``.

    Args:
        model_class: the ``nn.Module`` subclass, or its import path.
        init_args: its constructor's keyword arguments; plain values only (bool, int, float, str, None, and lists
            and dicts of them), so the export stays readable with ``torch.load(weights_only=True)``.
        prefix: the attribute path of the network in the LightningModule with its dot (``"model."``); default ``""``.
    """
    path = model_class if isinstance(model_class, str) else _class_path(model_class)
    if prefix and not prefix.endswith("."):
        raise ValueError(f"Invalid prefix {prefix!r}: must be empty or end with '.' (e.g. 'model.')")
    args = {}
    for name, value in init_args.items():
        try:
            args[name] = _plain(value)
        except _NotPlain:
            raise TypeError(f"Invalid init_args[{name!r}] {value!r} of {path}: must be a bool, int, float, str, "
                            "None, or a list or dict of them (what torch.load(weights_only=True) reads)") from None
    return {"class_path": path, "init_args": args, "prefix": prefix}


# ---------------------------------------------------------------------------------------------- reading checkpoints
def _export_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
    return ckpt["state_dict"], ckpt


def _is_dcp_dir(path: Path) -> bool:
    """A torch.distributed.checkpoint directory (EffiFSDPStrategy / ModelParallelStrategy): DCP writes ``.metadata``."""
    return (path / ".metadata").is_file()


def _export_dcp(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full model weights of a sharded DCP checkpoint, on CPU, in this process, without a process group.

    Lightning's sharded save puts the model under the top-level key ``"state_dict"`` (optimizers under
    ``"optimizer_<i>"``, loops, callbacks and hyper-parameters in ``meta.pt``); only the model entries are read, so
    the optimizer state (2x the weights for Adam/LAMB) is never loaded. DCP stores each tensor by its global shape, so
    the result does not depend on how many ranks wrote it. Read with ``_compat.dcp_load_keys`` (torch's private
    reader for exactly this; the public ``format_utils.dcp_to_torch_save`` would also load every optimizer state).
    """
    with warnings.catch_warnings():
        # "torch.distributed is unavailable or uninitialized, assuming the intent is to load in a single process":
        # exactly the intent here.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        loaded = _compat.dcp_load_keys({"state_dict"}, str(path))
    if "state_dict" not in loaded:
        raise ValueError(f"{str(path)!r} is a torch.distributed.checkpoint directory without a 'state_dict' entry: "
                         "not a Lightning checkpoint")
    return dict(loaded["state_dict"]), directory_metadata(path) or {}


def _is_deepspeed_dir(path: Path) -> bool:
    """A DeepSpeed checkpoint directory: a 'latest' tag file or tag sub-directories holding *_model_states.pt."""
    return (path / "latest").is_file() or any(path.glob("*/*model_states.pt"))


def _deepspeed_tag(path: Path) -> str | None:
    # EffiDeepSpeedStrategy saves under the tag "checkpoint"; other tags are found through the "latest" file.
    return "checkpoint" if (path / "checkpoint").is_dir() else None


def _deepspeed_client_state(path: Path) -> dict[str, Any]:
    """The entries Lightning passed as DeepSpeed's client state (hyper-parameters, ``export_spec``): rank 0's model
    states file holds them, with ZeRO-3's name or the other stages' one."""
    tag = _deepspeed_tag(path)
    if tag is None and (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        f = path / str(tag) / name
        if f.is_file():
            # mmap: the stage 1/2 file also holds the half-precision weights, which are not needed here.
            return torch.load(f, map_location="cpu", weights_only=False, mmap=True)
    return {}


def directory_metadata(path: str | Path) -> dict[str, Any] | None:
    """Lightning's non-tensor entries of a sharded checkpoint directory (hyper-parameters, ``export_spec``, loops):
    ``meta.pt`` of a DCP directory, rank 0's client state of a DeepSpeed one; None for another layout. Reads no
    weights (DeepSpeed's stage 1/2 file, which holds some, is memory-mapped)."""
    path = Path(path)
    if _is_dcp_dir(path):
        meta = path / _DCP_META
        return torch.load(meta, map_location="cpu", weights_only=False) if meta.is_file() else None
    return (_deepspeed_client_state(path) or None) if path.is_dir() else None


def _export_deepspeed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 weights of a DeepSpeed checkpoint (any ZeRO stage, any number of writer ranks), merged on CPU.

    DeepSpeed's ``zero_to_fp32`` reassembles the full fp32 master weights from every rank's optimizer shard (not
    the bf16/fp16 model copy), so the result is independent of the world size that wrote it.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=_deepspeed_tag(path))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    return sd, _deepspeed_client_state(path)


def _read_checkpoint(ckpt_path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full model ``state_dict`` and the checkpoint's other top-level entries (hyper-parameters and the like)."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass a Lightning .ckpt file, an FSDP (DCP) "
                                "checkpoint directory or a DeepSpeed checkpoint directory")
    if path.is_file():
        return _export_file(path)
    if _is_dcp_dir(path):
        return _export_dcp(path)
    if _is_deepspeed_dir(path):
        return _export_deepspeed(path)
    raise ValueError(f"{str(path)!r} is a directory but not a checkpoint format this version can export (no DCP "
                     "'.metadata', no DeepSpeed 'latest' or '*/*model_states.pt'); pass a Lightning .ckpt file, an "
                     "FSDP (DCP) checkpoint directory or a DeepSpeed checkpoint directory")


def export_state_dict(ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """Return the full, unsharded model ``state_dict`` (CPU tensors) stored in ``ckpt_path``."""
    return _read_checkpoint(ckpt_path)[0]


def _checkpoint_model_spec(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The network a checkpoint holds (:func:`model_spec`), from a checkpoint's top-level entries; None if unknown.

    The ``"export_spec"`` entry first; else the LightningModule class LightningCLI recorded as ``_class_path`` in the
    hyper-parameters, if it is an :class:`~lightning_effi._protocols.ExportSpecModule`.
    """
    spec = meta.get(SPEC_KEY)
    if spec is not None:
        if not isinstance(spec, Mapping) or not {"class_path", "init_args"} <= set(spec):
            raise ValueError(f"Invalid checkpoint entry {SPEC_KEY!r} {spec!r}: must be model_spec(...)'s "
                             "{'class_path', 'init_args', 'prefix'}")
        return model_spec(spec["class_path"], spec["init_args"], spec.get("prefix", ""))
    hparams = meta.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or not isinstance(hparams.get("_class_path"), str):
        return None
    module_path = hparams["_class_path"]
    try:
        module_cls = _import(module_path)
    except (ImportError, AttributeError) as e:
        warnings.warn(f"the checkpoint's module class {module_path!r} cannot be imported ({e}): the export holds "
                      "no model class and config, so loading it needs them passed explicitly", stacklevel=3)
        return None
    return module_cls.export_spec(hparams) if isinstance(module_cls, ExportSpecModule) else None


def _relative_to(spec: dict[str, Any] | None, strip_prefix: str, ckpt_path: str | Path) -> dict[str, Any] | None:
    """``spec`` with its prefix relative to the exported keys, or None when ``strip_prefix`` cuts into the network
    (the keys then describe a part of it, which its class cannot load)."""
    if spec is None or spec["prefix"].startswith(strip_prefix):
        return None if spec is None else {**spec, "prefix": spec["prefix"][len(strip_prefix):]}
    warnings.warn(f"strip_prefix {strip_prefix!r} does not contain the network {spec['class_path']} of "
                  f"{str(ckpt_path)!r} (its keys start with {spec['prefix']!r}): the export holds no model class and "
                  f"config; use strip_prefix=None or {spec['prefix']!r} to export a file that rebuilds it",
                  stacklevel=3)
    return None


def export_checkpoint(ckpt_path: str | Path, out_path: str | Path, strip_prefix: str | None = None) -> Path:
    """Export ``ckpt_path`` to a single ``torch.save`` file at ``out_path`` (format in the module docstring) and
    return that path.

    Args:
        ckpt_path: a Lightning checkpoint file or a sharded checkpoint directory.
        out_path: destination ``.pt`` file; written to a temporary name first, then renamed, so a crash never
            leaves a truncated file behind.
        strip_prefix: keep only the keys under this prefix, without it (e.g. ``"model."``: the keys of the bare
            ``GPT``; entries outside the prefix are dropped). Default None: the LightningModule's keys. Either way
            the file records where the network's keys start, so :func:`load_export` loads both.
    """
    out = Path(out_path)
    if out.is_dir():
        raise ValueError(f"Export destination {str(out)!r} is a directory; give the file to write, e.g. "
                         f"{str(out / (Path(ckpt_path).stem + '.pt'))!r}")
    sd, meta = _read_checkpoint(ckpt_path)
    spec = _checkpoint_model_spec(meta)
    if strip_prefix and not strip_prefix.endswith("."):
        strip_prefix += "."  # "model" means the submodule "model.", never a partial key like "model_x"
    if strip_prefix:
        kept = {k[len(strip_prefix):]: v for k, v in sd.items() if k.startswith(strip_prefix)}
        if not kept:
            shown = ", ".join(repr(p) for p in sorted({k.split(".")[0] + "." for k in sd if "." in k})[:5])
            raise ValueError(f"no key of {str(ckpt_path)!r} starts with strip_prefix {strip_prefix!r}; pass one its "
                             f"keys start with ({shown or 'none has a dot'}) or no strip_prefix")
        sd = kept
    spec = _relative_to(spec, strip_prefix or "", ckpt_path)
    sd = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    from lightning_effi.plugins import _atomic  # the plugins import Lightning; exports are read without it

    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "state_dict": sd, "model": spec}
    _atomic.write_file(out, lambda f: torch.save(payload, f))  # synced and renamed; no temporary file survives
    return out


# ---------------------------------------------------------------------------------------------- loading exports
def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ImportError(f"{path!r} is not an import path 'package.module.Class'")
    return getattr(importlib.import_module(module), name)


def _is_bare_state_dict(obj: Any) -> bool:
    """What ``effi export`` wrote before the format had a version: ``{name: tensor}`` only."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _read_export(path: Path, map_location: str | torch.device) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """The exported ``state_dict``, the ``"model"`` entry, and why it is missing (``""`` when it is not)."""
    if not path.is_file():
        raise FileNotFoundError(f"export {str(path)!r} does not exist; pass the OUT.pt file `effi export CKPT OUT.pt` "
                                "wrote")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same actionable message
        raise ValueError(f"{str(path)!r} could not be read as an `effi export` file ({type(e).__name__}: {e}); "
                         "write one with `effi export CKPT OUT.pt`") from e
    if _is_bare_state_dict(obj):
        return obj, None, "a bare state_dict without the model's class and config (an earlier `effi export`)"
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an `effi export` file (no 'format': {FORMAT!r} entry); write one "
                         "with `effi export CKPT OUT.pt`")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has export format_version {version!r}; this version of lightning_effi "
                         f"reads up to {FORMAT_VERSION}: upgrade lightning_effi")
    return obj["state_dict"], obj["model"], "no model class and config (its checkpoint did not record them)"


def load_export(path: str | Path, map_location: str | torch.device = "cpu", *,
                model_class: type[nn.Module] | None = None, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Rebuild the network of an ``effi export`` file: its class with its recorded constructor arguments, the
    weights loaded strictly, in eval mode.

    The class is imported from the path recorded in the file (it must be an ``nn.Module`` subclass): load files you
    trust, or pass ``model_class``.

    Args:
        path: the ``.pt`` file :func:`export_checkpoint` wrote.
        map_location: device the network is built on and the tensors are loaded to. Default ``"cpu"``.
        model_class: the class to build; the file must record this class. Default None: the recorded class.
        config: constructor arguments that replace the recorded ones; with ``model_class``, all of them for a file
            that records none (a bare ``state_dict``, whose keys must then be the network's own). Default None.
    """
    path = Path(path)
    sd, spec, missing = _read_export(path, map_location)
    if spec is None:
        if model_class is None or config is None:
            raise ValueError(f"{str(path)!r} holds {missing}; re-export the checkpoint with the current "
                             "`effi export CKPT OUT.pt`, or pass the config explicitly: "
                             "GPT.from_export(path, config={'n_layer': ..., ...}) or "
                             "load_export(path, model_class=..., config=...)")
        spec = model_spec(model_class, {})
    recorded = spec["class_path"]
    if model_class is not None and _class_path(model_class) != recorded:
        raise ValueError(f"{str(path)!r} holds a {recorded} export, not a {_class_path(model_class)}; load it with "
                         f"{recorded.rpartition('.')[2]}.from_export(...) or lightning_effi.export.load_export(...)")
    cls = model_class if model_class is not None else _import(recorded)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{str(path)!r} records class_path {recorded!r}, which is not an nn.Module subclass")
    init_args = {**spec["init_args"], **(config or {})}
    prefix = spec["prefix"]
    # Entries outside the prefix belong to the LightningModule, not to the network.
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    with torch.device(map_location):
        model = cls(**init_args)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{str(path)!r} does not fit {cls.__name__}(**{init_args!r}): {e}") from e
    return model.eval()


class ExportableModule(nn.Module):
    """An ``nn.Module`` that ``effi export`` files rebuild: adds :meth:`from_export`."""

    @classmethod
    def from_export(cls: type[M], path: str | Path, map_location: str | torch.device = "cpu",
                    config: Mapping[str, Any] | None = None) -> M:
        """Build this class from an ``effi export`` file with the recorded constructor arguments and load its
        weights (strictly; eval mode). A file of another class raises, naming both.

        Args:
            path: the ``.pt`` file ``effi export CKPT OUT.pt`` wrote.
            map_location: device to build on and load to. Default ``"cpu"``.
            config: constructor arguments that replace the recorded ones; required for a file that records none
                (a bare ``state_dict`` of an earlier ``effi export``). Default None.
        """
        return cast(M, load_export(path, map_location, model_class=cls, config=config))
