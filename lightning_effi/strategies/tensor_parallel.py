"""Tensor and sequence parallelism from a plan written as data: module-path patterns mapped to style names.

:func:`apply_tensor_parallel` is what :class:`~lightning_effi.strategies.EffiFSDPStrategy` runs at setup before
FSDP2 shards over the data-parallel dimension; it also works on a plain ``nn.Module`` and a 1-D mesh. How to write a
plan for your own model is in ``docs/tensor_parallel.md``.

A plan maps a glob over module paths (relative to the module the plan is applied to; ``*`` matches one path segment)
to one of :data:`STYLES`. The styles are torch's ``parallelize_module`` styles with the layouts chosen from two
switches, so one plan serves every combination:

``sequence_parallel``
    activations between blocks (norms, residuals) sharded along the sequence (dimension 1) instead of replicated;
``loss_parallel``
    the output projection's logits stay sharded over the vocabulary for torch's ``loss_parallel`` cross-entropy.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["STYLES", "TPLayout", "apply_tensor_parallel", "check_plan"]

#: style name -> what it does (also the text of the unknown-style error).
STYLES: dict[str, str] = {
    "colwise": "nn.Linear split by output features (q/k/v, MLP up/gate); input replicated, or gathered from "
               "sequence shards under sequence parallelism",
    "rowwise": "nn.Linear split by input features (attention output, MLP down); output summed to replicated, or "
               "reduce-scattered to sequence shards under sequence parallelism",
    "sequence": "a norm or dropout between blocks: runs on sequence shards under sequence parallelism (no-op "
                "without)",
    "sequence_split": "any module whose first input enters the sequence-sharded region (input split along "
                      "dimension 1; no-op without sequence parallelism)",
    "sequence_gather": "any module whose first input leaves the sequence-sharded region (input gathered; no-op "
                       "without sequence parallelism)",
    "embedding": "nn.Embedding split by vocabulary (rows); output replicated",
    "output": "the nn.Linear producing logits, split by vocabulary; logits gathered, or left sharded under "
              "loss_parallel",
    "divide": "an int attribute (e.g. a head count, the last path segment) divided by the tensor-parallel size",
}

_LINEAR_STYLES = ("colwise", "rowwise", "output")
_SEQUENCE_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.Dropout, nn.Identity)


def check_plan(plan: Mapping[str, str] | None) -> dict[str, str] | None:
    """``plan`` as a dict after checking its shape and style names (before any model exists)."""
    if plan is None:
        return None
    if not isinstance(plan, Mapping):
        raise TypeError(f"Invalid tp_plan {plan!r}: must be a mapping of module-path pattern -> style, e.g. "
                        "{'model.blocks.*.attn.qkv': 'colwise'}")
    out: dict[str, str] = {}
    for pattern, style in plan.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"tp_plan keys must be non-empty module-path patterns, got {pattern!r}")
        if style not in STYLES:
            known = "; ".join(f"{k!r}: {v}" for k, v in STYLES.items())
            raise ValueError(f"tp_plan[{pattern!r}] = {style!r} is not a tensor-parallel style. Styles: {known}")
        out[pattern] = style
    return out


def _matches(pattern: str, name: str) -> bool:
    parts, segs = pattern.split("."), name.split(".")
    return len(parts) == len(segs) and all(fnmatch.fnmatchcase(s, p) for p, s in zip(parts, segs))


@dataclass(frozen=True)
class TPLayout:
    """What :func:`apply_tensor_parallel` did.

    Attributes:
        styles: module path -> style, for every module that was parallelized (styles that are no-ops without
            sequence parallelism included, so the plan is visible as a whole).
        divided: attribute path -> (value before, value after).
        tied: groups of parameter names that shared one tensor before and still do.
    """

    styles: dict[str, str]
    divided: dict[str, tuple[int, int]]
    tied: tuple[tuple[str, ...], ...]


def _resolve(module: nn.Module, plan: dict[str, str], tp: int) -> tuple[dict[str, str], dict[str, tuple]]:
    """Match every pattern and check every target before anything changes; returns (module path -> style,
    attribute path -> (owner, attribute, value))."""
    modules = dict(module.named_modules())
    styles: dict[str, str] = {}
    owner_pattern: dict[str, str] = {}
    attrs: dict[str, tuple] = {}
    for pattern, style in plan.items():
        if style == "divide":
            owner_pat, _, attr = pattern.rpartition(".")
            owners = [n for n in modules if n and _matches(owner_pat, n)] if owner_pat else [""]
            hits = [n for n in owners if isinstance(getattr(modules[n], attr, None), int)]
            if not hits:
                raise ValueError(f"tp_plan pattern {pattern!r} ('divide') matches no int attribute {attr!r} of a "
                                 f"module matching {owner_pat!r}; module classes present: {_classes(module)}")
            for n in hits:
                value = getattr(modules[n], attr)
                path = f"{n}.{attr}" if n else attr
                if isinstance(value, bool) or value % tp:
                    raise ValueError(f"{path} = {value!r} is not divisible by tensor_parallel_size={tp}; choose a "
                                     f"tensor_parallel_size that divides it (or change the model)")
                attrs[path] = (modules[n], attr, value)
            continue
        hits = [n for n in modules if n and _matches(pattern, n)]
        if not hits:
            raise ValueError(f"tp_plan pattern {pattern!r} matches no module of {type(module).__name__} (paths are "
                             f"relative to it, '*' is one path segment); module classes present: "
                             f"{_classes(module)}; first paths: {[n for n in modules if n][:12]}")
        for n in hits:
            m = modules[n]
            _check_type(pattern, style, n, m, tp)
            if n in styles and styles[n] != style:
                raise ValueError(f"module {n!r} gets two styles: {styles[n]!r} from tp_plan pattern "
                                 f"{owner_pattern[n]!r} and {style!r} from {pattern!r}")
            styles[n], owner_pattern[n] = style, pattern
    return styles, attrs


def _classes(module: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in module.modules()})


def _check_type(pattern: str, style: str, name: str, m: nn.Module, tp: int) -> None:
    where = f"tp_plan[{pattern!r}] = {style!r} matched {name!r} ({type(m).__name__})"
    if style in _LINEAR_STYLES:
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{where}, but {style!r} splits an nn.Linear; use it on the Linear layers inside, or "
                             "'embedding' for an nn.Embedding")
        if style == "colwise" and m.out_features % tp:
            raise ValueError(f"{where}: out_features={m.out_features} is not divisible by tensor_parallel_size={tp}")
        if style == "rowwise" and m.in_features % tp:
            raise ValueError(f"{where}: in_features={m.in_features} is not divisible by tensor_parallel_size={tp}")
    elif style == "embedding" and not isinstance(m, nn.Embedding):
        raise ValueError(f"{where}, but 'embedding' splits an nn.Embedding by vocabulary")
    elif style == "sequence" and not (isinstance(m, _SEQUENCE_TYPES) or type(m).__name__.endswith("Norm")):
        raise ValueError(f"{where}, but 'sequence' is for norms and dropout (LayerNorm, RMSNorm, *Norm, Dropout); "
                         "use 'sequence_split' / 'sequence_gather' on a module where activations enter / leave the "
                         "sequence-sharded region")


def _check_dropout(module: nn.Module) -> None:
    # Activations replicated over the tensor-parallel ranks would get a different mask on each rank, and sequence
    # shards would draw the same mask pattern for different positions: neither trains like one device.
    active = [n for n, m in module.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if active:
        raise ValueError(f"dropout is not supported under tensor parallelism (modules {active[:4]} have p > 0): set "
                         "the model's dropout to 0")


def _sequence_length_check(tp: int, name: str):
    def hook(_module: nn.Module, args: tuple) -> None:
        t = args[0].shape[1]
        if t % tp:
            raise ValueError(f"sequence parallelism splits the sequence at {name!r} into {tp} equal shards, but the "
                             f"input has length {t}; use sequence lengths divisible by tensor_parallel_size={tp}")

    return hook


def _torch_style(style: str, sequence_parallel: bool, loss_parallel: bool) -> Any:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    seq = Shard(1) if sequence_parallel else Replicate()
    if style == "colwise":
        return ColwiseParallel(input_layouts=seq)
    if style == "rowwise":
        return RowwiseParallel(output_layouts=seq)
    if style == "embedding":
        # Replicated output: models add position embeddings to it before the sequence is split.
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if style == "output":
        return ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                               use_local_output=not loss_parallel)
    if not sequence_parallel:
        return None
    if style == "sequence":
        return SequenceParallel()
    if style == "sequence_split":
        return PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                  use_local_output=True)
    if style == "sequence_gather":
        return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                  use_local_output=True)
    raise AssertionError(style)  # check_plan admits only STYLES


def _tie_groups(module: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


_SPLIT = {  # (style, parameter) -> how parallelize_module lays the parameter out over the tensor-parallel ranks
    ("colwise", "weight"): "Shard(0)", ("colwise", "bias"): "Shard(0)", ("output", "weight"): "Shard(0)",
    ("output", "bias"): "Shard(0)", ("rowwise", "weight"): "Shard(1)", ("rowwise", "bias"): "Replicate",
    ("embedding", "weight"): "Shard(0)",
}


def _check_ties(groups: list[list[str]], styles: dict[str, str], sequence_parallel: bool) -> None:
    for names in groups:
        layouts, splits = {}, set()
        for n in names:
            owner, _, leaf = n.rpartition(".")
            style = styles.get(owner)
            split = _SPLIT.get((style, leaf)) if style else None
            if split is None and style == "sequence" and sequence_parallel:
                split = "Replicate"
            layouts[n] = f"{style or 'not in the plan'}: {split or 'whole on every rank'}"
            splits.add(split)
        if len(splits) > 1:
            raise ValueError(
                f"parameters {names} are tied, but tp_plan splits them differently ({layouts}); give the modules "
                "matching styles ('embedding' for the embedding with 'output' for the head both split the "
                "vocabulary) or untie the weights")


def _retie(module: nn.Module, groups: list[list[str]]) -> None:
    # parallelize_module replaces each module's parameters with new ones, so weights tied before (an embedding and
    # the output head) become two tensors; _check_ties made sure both sides have the same layout.
    for names in groups:
        first = module.get_parameter(names[0])
        for n in names[1:]:
            owner, _, leaf = n.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, leaf, first)


def apply_tensor_parallel(module: nn.Module, mesh: DeviceMesh, plan: Mapping[str, str], *,
                          sequence_parallel: bool = False, loss_parallel: bool = False) -> TPLayout:
    """Parallelize ``module`` over the 1-D tensor-parallel ``mesh`` following ``plan``.

    Every pattern must match, every style must fit the module type it matched, every ``divide`` attribute must be
    divisible, and the module must have no active dropout; all of that is checked before the first module changes.
    Tied parameters stay tied when both sides are split the same way.

    Args:
        module: the root the plan's paths are relative to (under Lightning: the LightningModule).
        mesh: the tensor-parallel mesh (1-D).
        plan: module-path glob -> style name (:data:`STYLES`).
        sequence_parallel: shard activations between blocks along dimension 1 (see the module docstring).
        loss_parallel: keep the ``output`` module's logits sharded over the vocabulary (a DTensor) for torch's
            ``loss_parallel`` context; requires an ``output`` entry.

    Returns:
        the :class:`TPLayout` that was applied.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    checked = check_plan(plan)
    assert checked is not None
    tp = mesh.size()
    styles, attrs = _resolve(module, checked, tp)
    if loss_parallel and "output" not in styles.values():
        raise ValueError("loss_parallel=True needs the logits' nn.Linear marked 'output' in tp_plan")
    _check_dropout(module)
    ties = _tie_groups(module)
    _check_ties(ties, styles, sequence_parallel)

    torch_plan = {}
    for name, style in styles.items():
        torch_style = _torch_style(style, sequence_parallel, loss_parallel)
        if torch_style is None:
            continue
        if style == "sequence_split":
            module.get_submodule(name).register_forward_pre_hook(_sequence_length_check(tp, name))
        torch_plan[name] = torch_style
    if torch_plan:
        parallelize_module(module, mesh, torch_plan)
    _retie(module, ties)
    divided = {}
    for path, (owner, attr, value) in attrs.items():
        setattr(owner, attr, value // tp)
        divided[path] = (value, value // tp)
    return TPLayout(styles=styles, divided=divided, tied=tuple(tuple(g) for g in ties))
