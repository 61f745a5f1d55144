"""The FSDP2 sharding plan as a plain function over a module and a device mesh, usable without a Trainer.

:func:`apply_fsdp` is what :class:`~lightning_effi.strategies.EffiFSDPStrategy` runs at setup; the layout it produces
and why is described in ``docs/fsdp.md``. The argument checks are shared with the strategy, so both report a bad
value with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn

from lightning_effi import _compat

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = ["FSDPLayout", "apply_fsdp"]


# ------------------------------------------------------------------------------------------------ argument checks
def check_names(value: Optional[Sequence[str]], what: str) -> Optional[list[str]]:
    """``value`` as a list of class names (None stays None); a bare string is refused, it would iterate by letter."""
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(f"{what} must be a list of class names, got the string {value!r}; write [{value!r}]")
    out = list(value)
    for name in out:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what} entries must be non-empty class-name strings, got {name!r}")
    return out


def check_reshard_after_forward(value: Union[bool, int]) -> Union[bool, int]:
    if isinstance(value, bool) or (isinstance(value, int) and value >= 1):
        return value
    raise ValueError(f"Invalid reshard_after_forward {value!r}: must be True, False or a positive group size")


def check_group_size(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        one = "no tensor parallelism" if what == "tensor_parallel_size" else "one unit per wrapped module"
        raise ValueError(f"Invalid {what} {value!r}: must be a positive int (1: {one})")
    return value


def check_flag(value: bool, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {what} {value!r}: must be True or False")
    return value


def check_compile_with_checkpointing(compile: bool, activation_checkpointing: Sequence[str]) -> None:
    if compile and activation_checkpointing:
        raise ValueError(
            f"compile=True with activation_checkpointing={list(activation_checkpointing)} is not supported: the "
            "recomputation hooks would sit inside the compiled forward. Use one of the two."
        )


# ------------------------------------------------------------------------------------------------ module search
def _class_names(cls: type) -> tuple[str, str]:
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def _find_modules(root: nn.Module, names: Sequence[str], what: str) -> list[nn.Module]:
    """Modules of ``root`` (pre-order) whose class name, or ``module.QualName``, is in ``names``.

    Raises ``ValueError`` listing the class names present when a name matches nothing: a typo must not silently
    leave a model unsharded (or un-checkpointed), which would only show up later as memory or speed.
    """
    wanted = set(names)
    found: list[nn.Module] = []
    matched: set[str] = set()
    for module in root.modules():
        hit = wanted.intersection(_class_names(type(module)))
        if hit:
            found.append(module)
            matched |= hit
    missing = [n for n in names if n not in matched]
    if missing:
        present = sorted({type(m).__name__ for m in root.modules()})
        raise ValueError(
            f"{what} class name(s) {missing} match no module of {type(root).__name__}. Module classes present: "
            f"{present}. Use one of these names (or 'package.module.ClassName')."
        )
    return found


def _auto_wrap_names(root: nn.Module) -> list[str]:
    """Class names of the children of every ``nn.ModuleList``: the repeated blocks of a transformer."""
    names: dict[str, None] = {}
    for module in root.modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                if any(True for _ in child.parameters()):
                    names[type(child).__name__] = None
    return list(names)


def _group_siblings(root: nn.Module, units: list[nn.Module], names: dict[int, str],
                    size: int) -> list[list[nn.Module]]:
    """``units`` cut into FSDP units of up to ``size`` modules: runs of consecutive entries of one ``nn.ModuleList`` /
    ``nn.Sequential`` with the same class (the repeated blocks, which run back to back). Anything else stays a unit
    of its own, in particular direct children of ``root``: those become FSDP roots, and FSDP2 wants one module per
    root."""
    groups: list[list[nn.Module]] = []
    previous: Optional[tuple[str, type, int]] = None  # (parent, class, index) of the last module added
    for unit in units:
        parent, _, leaf = names[id(unit)].rpartition(".")
        container = root.get_submodule(parent) if parent else None
        key = None
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and leaf.isdigit():
            key = (parent, type(unit), int(leaf))
        follows = (key is not None and previous is not None and key[:2] == previous[:2]
                   and key[2] == previous[2] + 1 and len(groups[-1]) < size)
        if follows:
            groups[-1].append(unit)
        else:
            groups.append([unit])
        previous = key
    return groups


def _check_unsharded(module: nn.Module) -> None:
    """The root must not be sharded yet (the strategy and apply_fsdp choose the units themselves)."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from torch.distributed.fsdp import FSDPModule

    lightning = isinstance(module, LightningModule)
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        where = "configure_model" if lightning and is_overridden("configure_model", module) else "your code"
        raise RuntimeError(
            f"{type(module).__name__} is already sharded with fully_shard (in {where}). EffiFSDPStrategy and "
            "apply_fsdp shard the module themselves: remove those fully_shard calls, or use Lightning's "
            "ModelParallelStrategy."
        )


def _unit_params(unit: list[nn.Module], sharded: set[int]) -> dict[int, str]:
    """What ``fully_shard(unit)`` takes: the parameters reachable from the unit's modules without passing through an
    already sharded module, by id, with the first path (relative to the unit's module) they are reached by."""
    out: dict[int, str] = {}

    def visit(m: nn.Module, prefix: str) -> None:
        for name, p in m.named_parameters(recurse=False, remove_duplicate=False):
            out.setdefault(id(p), prefix + name)
        for name, child in m.named_children():
            if id(child) not in sharded:
                visit(child, f"{prefix}{name}.")

    for m in unit:
        visit(m, "")
    return out


def _check_ties(order: list[list[nn.Module]], names: dict[int, str]) -> None:
    """A tensor shared by two modules (tied embedding and head) can live in one FSDP unit only: FSDP2 refuses it in a
    second one with a message that names neither parameter. Checked for the planned units before any is sharded."""
    owner: dict[int, tuple[str, str]] = {}  # param id -> (unit name, parameter name)
    sharded: set[int] = set()
    for unit in order:
        unit_name = names[id(unit[0])] or "<root>"
        base = names[id(unit[0])]
        for pid, rel in _unit_params(unit, sharded).items():
            full = f"{base}.{rel}" if base else rel
            if pid in owner:
                other_unit, other_param = owner[pid]
                raise ValueError(
                    f"parameters {other_param!r} and {full!r} are one tensor (tied) but would be sharded in two FSDP "
                    f"units ({other_unit!r} and {unit_name!r}); FSDP2 keeps a tensor in one unit. Remove the class "
                    f"of {other_unit!r} from wrap so both stay in one unit, or untie the weights."
                )
            owner[pid] = (unit_name, full)
        sharded.update(id(m) for m in unit)


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class FSDPLayout:
    """What :func:`apply_fsdp` did, by module name (as in ``module.named_modules()``).

    Attributes:
        units: one entry per FSDP unit made of wrapped modules: the names of the modules sharded together, in the
            order they were sharded (deepest first).
        unit_classes: the class names of the wrapped modules (sorted, before ``fully_shard`` renamed them).
        roots: children of the module sharded as root units for the parameters no wrapped unit holds.
        checkpointed: modules whose activations are recomputed in backward.
        compiled: wrapped modules whose ``forward`` was compiled.
        root_params: parameters registered on the module itself; when there are any, the module is sharded last as
            the FSDP root, so its own parameters are gathered in its forward (under Lightning the strategy runs the
            steps through it).
    """

    units: tuple[tuple[str, ...], ...]
    unit_classes: tuple[str, ...]
    roots: tuple[str, ...]
    checkpointed: tuple[str, ...]
    compiled: tuple[str, ...]
    root_params: tuple[str, ...] = ()


def apply_fsdp(
    module: nn.Module,
    mesh: Optional[DeviceMesh],
    *,
    wrap: Optional[Sequence[str]] = None,
    group_size: int = 1,
    mp_policy: Optional[MixedPrecisionPolicy] = None,
    activation_checkpointing: Sequence[str] = (),
    compile: bool = False,
    reshard_after_forward: Union[bool, int] = True,
    offload: bool = False,
) -> FSDPLayout:
    """Shard the children of ``module`` with FSDP2's ``fully_shard`` over ``mesh``.

    Every module whose class name is in ``wrap`` becomes an FSDP unit (consecutive same-class entries of one
    ``nn.ModuleList``/``nn.Sequential`` grouped ``group_size`` at a time), then every direct child of ``module`` that
    still holds unsharded parameters becomes a root unit. ``module`` itself is not wrapped: under Lightning it is the
    LightningModule, whose ``training_step`` runs instead of the ``forward`` FSDP2 hooks. Everything is validated
    before the first module is changed. See ``docs/fsdp.md`` for the layout and its reshard rules.

    Args:
        module: the root; it must not be sharded yet. Parameters registered on it directly are sharded with it as
            the FSDP root (its forward gathers them).
        mesh: the data-parallel device mesh handed to every ``fully_shard`` call (None: FSDP2's default, the world).
        wrap: class names (``"Block"`` or ``"pkg.module.Block"``) of the modules to shard as units. None (default):
            the classes of the children of every ``nn.ModuleList``. ``[]``: root units only. A name that matches no
            module raises ``ValueError`` listing the classes present.
        group_size: how many consecutive wrapped siblings form one unit (default 1).
        mp_policy: FSDP2 ``MixedPrecisionPolicy`` of every unit (default: FSDP2's, no mixed precision).
        activation_checkpointing: class names of modules whose activations are recomputed in backward (torch's
            composable ``checkpoint``, so parameter names are unchanged). Default: none.
        compile: ``torch.compile`` the ``forward`` of every wrapped module, FSDP2's hooks staying outside the graph.
            Not combinable with ``activation_checkpointing``. Default False.
        reshard_after_forward: for wrapped units: free the all-gathered parameters after forward (True, default),
            keep them until backward (False), or reshard to a smaller group of that size (int). With True the units
            that are FSDP roots (direct children of ``module``) keep FSDP2's root default instead: backward starts
            with them, so resharding would only add an all-gather.
        offload: keep sharded parameters, gradients and optimizer state in pinned CPU memory (default False).

    Returns:
        the :class:`FSDPLayout` that was applied.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    wrap = check_names(wrap, "wrap")
    checkpoint_names = check_names(activation_checkpointing, "activation_checkpointing") or []
    group_size = check_group_size(group_size, "group_size")
    reshard_after_forward = check_reshard_after_forward(reshard_after_forward)
    compile = check_flag(compile, "compile")
    offload = check_flag(offload, "offload")
    check_compile_with_checkpointing(compile, checkpoint_names)
    if mp_policy is None:
        mp_policy = MixedPrecisionPolicy()
    elif not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"Invalid mp_policy {mp_policy!r}: must be a torch.distributed.fsdp.MixedPrecisionPolicy")
    _check_unsharded(module)

    wrap = wrap if wrap is not None else _auto_wrap_names(module)
    units = _find_modules(module, wrap, "wrap") if wrap else []
    names = {id(m): name for name, m in module.named_modules()}
    checkpointed = _find_modules(module, checkpoint_names, "activation_checkpointing")
    unit_classes = tuple(sorted({type(u).__name__ for u in units}))  # before fully_shard renames them FSDP<cls>
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy,
              "offload_policy": CPUOffloadPolicy(pin_memory=True) if offload else OffloadPolicy()}

    # Deepest groups first: fully_shard on a parent only takes the parameters its sharded children left over.
    groups = sorted(_group_siblings(module, units, names, group_size), key=lambda g: -names[id(g[0])].count("."))
    wrapped = {id(m) for g in groups for m in g}
    covered = set().union(*(_unit_params(g, wrapped - {id(m) for m in g}).keys() for g in groups)) if groups else set()
    # A child whose parameters all belong to wrapped units is covered (a wrapped unit, or an alias such as a
    # torch.compile'd view of another child); sharding it again would create an empty unit. Membership, not
    # "is a DTensor": tensor parallelism makes DTensors that FSDP2 has not sharded yet.
    roots = [(name, c) for name, c in module.named_children() if id(c) not in wrapped
             and any(id(p) not in covered for p in c.parameters())]
    root_params = tuple(name for name, _ in module.named_parameters(recurse=False))
    scalars = [name for name, p in module.named_parameters() if p.ndim == 0]
    if scalars:
        raise ValueError(f"FSDP2 cannot shard 0-dim parameters {scalars}: make each a 1-element tensor "
                         "(nn.Parameter(torch.ones(1)) instead of torch.ones(()))")
    _check_ties([*groups, *([c] for _, c in roots), *([[module]] if root_params else [])], names)

    for m in checkpointed:
        _compat.composable_checkpoint(m)
    # None (FSDP2's root default: keep the parameters from forward to backward) for units that end up FSDP roots.
    root_reshard = None if reshard_after_forward is True else reshard_after_forward
    for group in groups:
        top_level = "." not in names[id(group[0])]
        fully_shard(group if len(group) > 1 else group[0],
                    reshard_after_forward=root_reshard if top_level else reshard_after_forward, **kwargs)
        for unit in group if compile else ():
            # An instance attribute: nn.Module.__call__ runs FSDP2's hooks eagerly around it.
            unit.forward = torch.compile(unit.forward)
    for _, child in roots:
        fully_shard(child, reshard_after_forward=root_reshard, **kwargs)
    if root_params:
        fully_shard(module, reshard_after_forward=root_reshard, **kwargs)
    return FSDPLayout(
        units=tuple(tuple(names[id(m)] for m in g) for g in groups),
        unit_classes=unit_classes,
        roots=tuple(name for name, _ in roots),
        checkpointed=tuple(names[id(m)] for m in checkpointed),
        compiled=tuple(names[id(m)] for g in groups for m in g) if compile else (),
        root_params=root_params,
    )
