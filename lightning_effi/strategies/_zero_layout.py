"""Where DeepSpeed ZeRO puts an optimizer's parameters, for :class:`EffiDeepSpeedStrategy`.

Under ZeRO the client optimizer never sees the model's tensors: each param group (ZeRO-3: each sub-group) becomes
one flat fp32 partition per rank holding pieces of many parameters. A per-tensor-norm optimizer such as LAMB
would then compute one norm per rank and partition instead of one per parameter. The functions here read
DeepSpeed's own bookkeeping to describe each partition as a :class:`~lightning_effi.optim.norms.FlatLayout`, hand
it to a partition-aware optimizer (:class:`~lightning_effi._protocols.FlatLayoutOptimizer`), move such an
optimizer's ``max_grad_norm`` into DeepSpeed's global clipping, and read how many ranks wrote a checkpoint.

The DeepSpeed attributes read are those of deepspeed 0.19 (see ``docs/deepspeed.md``), each checked by an entry in
:mod:`lightning_effi._compat`. Nothing here imports Lightning, and only :func:`stage3_segments` (for its default rank
lookup) imports DeepSpeed, so the segment logic is unit-tested with small stand-in objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch.optim import Optimizer

from lightning_effi import _compat
from lightning_effi._protocols import FlatLayoutOptimizer

Segments = list[list[tuple[int, int, int]]]

# Optimizers that compute per-tensor norms and would silently be wrong on flat partitions (one norm per rank and
# group instead of one per parameter), recognised by class name unless they are partition-aware.
NORM_BASED_OPTIMIZERS = ("lamb", "lars", "adafactor", "novograd")


# ------------------------------------------------------------------------------------------------- the optimizer
def logical_ids(optimizer: Optimizer) -> dict[int, int]:
    """id(param) -> its index over all param groups in order (the logical ids FlatLayout refers to)."""
    ids: dict[int, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            ids.setdefault(id(p), len(ids))
    return ids


def is_partition_aware(optimizer: Any) -> bool:
    """Whether ``optimizer`` takes ``group["flat_layouts"]`` (by its attributes, so subclasses defined anywhere do)."""
    return isinstance(optimizer, FlatLayoutOptimizer) and bool(optimizer.accepts_flat_layouts)


def check_optimizer_supported(optimizer: Optimizer) -> None:
    """Raise for a per-tensor-norm optimizer that cannot be told about flat partitions."""
    name = type(optimizer).__name__.lower()
    if not is_partition_aware(optimizer) and any(n in name for n in NORM_BASED_OPTIMIZERS):
        raise RuntimeError(
            f"{type(optimizer).__module__}.{type(optimizer).__name__} computes per-tensor norms, but ZeRO hands it one "
            "flat partition per param group, so its trust ratios/norms would silently be wrong. Use "
            "lightning_effi.optim.Lamb (partition-aware) or an element-wise optimizer such as AdamW"
        )


def client_optimizer(ds_optimizer: Any) -> Optimizer:
    """The optimizer from ``configure_optimizers`` inside DeepSpeed's ZeRO wrapper (the wrapper's ``optimizer``)."""
    return getattr(ds_optimizer, "optimizer", ds_optimizer)


# ------------------------------------------------------------------------------------------------------ segments
def is_stage3(ds_optimizer: Any) -> bool:
    """Whether ``ds_optimizer`` is DeepSpeed's ZeRO-3 optimizer (sub-groups, parameters partitioned one by one)."""
    return hasattr(ds_optimizer, "fp16_groups") and hasattr(ds_optimizer, "fp32_partitioned_groups_flat")


def stage12_segments(ds_optimizer: Any, logical_ids: Mapping[int, int]) -> Segments:
    """Segments ``(logical_id, offset, numel)`` per param group for ZeRO 1/2 and bf16 ZeRO 1.

    ``DeepSpeedZeroOptimizer`` (``bit16_groups``) and ``BF16_Optimizer`` (``bf16_groups``) both link every
    low-precision parameter to its piece of the flat fp32 partition with ``link_hp_params``, the mapping DeepSpeed's
    universal checkpoints use: ``lp._hp_mapping`` is None when no element of the parameter is in this rank's
    partition, else its ``get_hp_fragment_address()`` gives (start, numel) inside the partition.
    """
    lp_groups = getattr(ds_optimizer, "bit16_groups", None)
    if lp_groups is None:
        lp_groups = ds_optimizer.bf16_groups
    segments = []
    for params in lp_groups:
        segs = []
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            address = mapping.get_hp_fragment_address()
            if address.numel > 0:
                segs.append((logical_ids[id(p)], int(address.start), int(address.numel)))
        segments.append(segs)
    return segments


def _deepspeed_rank(group: Any) -> int:
    import deepspeed.comm as dist

    return dist.get_rank(group=group)


def stage3_segments(ds_optimizer: Any, logical_ids: Mapping[int, int],
                    rank_of: Callable[[Any], int] | None = None) -> Segments:
    """Segments ``(logical_id, offset, numel)`` per ZeRO-3 sub-group.

    Each parameter is cut into ``world`` equal pieces of ``ds_tensor.ds_numel`` elements (the last one padded); rank
    r holds elements ``[r * n, (r + 1) * n)`` of the flattened parameter. A sub-group's flat fp32 tensor is its
    parameters' pieces back to back, in ``fp16_groups`` order (DeepSpeed's ``_get_parameter_partitions``).

    Args:
        rank_of: this rank's index in a process group; default DeepSpeed's ``get_rank(group=...)`` (tests pass one
            so that no process group is needed).
    """
    rank_of = rank_of or _deepspeed_rank
    segments = []
    for sub_id, params in enumerate(ds_optimizer.fp16_groups):
        group = ds_optimizer.sub_group_process_groups[sub_id] if hasattr(ds_optimizer, "sub_group_process_groups") \
            else ds_optimizer.dp_process_group
        rank = rank_of(group)
        offset = 0
        segs = []
        for p in params:
            piece = int(p.ds_tensor.ds_numel)
            start = rank * piece
            numel = max(0, min(piece, int(p.ds_numel) - start))
            if numel > 0:
                segs.append((logical_ids[id(p)], offset, numel))
            offset += piece
        segments.append(segs)
    return segments


# ---------------------------------------------------------------------------------------------------- installing
def install_flat_layouts(ds_optimizer: Any, optimizer: Optimizer, logical_ids: Mapping[int, int] | None,
                         layouts: list[Any] | None = None,
                         rank_of: Callable[[Any], int] | None = None) -> list[Any] | None:
    """Describe ZeRO's flat fp32 partitions to a partition-aware optimizer (:class:`FlatLayoutOptimizer`).

    Builds the layouts from ``logical_ids`` unless ``layouts`` (from an earlier call) are given, as after a
    checkpoint load replaced the param groups. Returns the layouts (per param group for stage 1/2, per sub-group for
    stage 3) or None when the optimizer does not need them (element-wise optimizers are unaffected by flattening).
    """
    if not is_partition_aware(optimizer):
        return None
    from lightning_effi.optim.norms import FlatLayout

    stage3 = is_stage3(ds_optimizer)
    if layouts is None:
        assert logical_ids is not None
        num_logical = len(logical_ids)
        segs = stage3_segments(ds_optimizer, logical_ids, rank_of) if stage3 else \
            stage12_segments(ds_optimizer, logical_ids)
        layouts = [FlatLayout(segments=tuple(s), num_logical=num_logical) for s in segs]
    optimizer.norm_process_group = ds_optimizer.dp_process_group  # type: ignore[attr-defined]  # FlatLayoutOptimizer
    if not stage3:
        for group, layout in zip(optimizer.param_groups, layouts):
            group["flat_layouts"] = [layout]
        return layouts

    # ZeRO-3 calls optimizer.step() once per sub-group with only that sub-group's flat tensor in its param group
    # (the others are empty).
    for group in optimizer.param_groups:
        group["flat_layouts"] = []
    sub_to_group = ds_optimizer.sub_group_to_group_id

    # On this optimizer instance only: the layout must match the one sub-group DeepSpeed puts in the param group for
    # this call. A second install (after a checkpoint load) wraps DeepSpeed's method, not the previous wrapper.
    def with_layout(sub_group_id: int, step: Callable[[int], None]) -> None:
        group = optimizer.param_groups[sub_to_group[sub_group_id]]
        group["flat_layouts"] = [layouts[sub_group_id]]
        try:
            step(sub_group_id)
        finally:
            group["flat_layouts"] = []

    _compat.wrap_zero3_optimizer_step(ds_optimizer, with_layout)
    return layouts


def move_max_grad_norm_to_deepspeed(optimizer: Optimizer, config: dict[str, Any]) -> float | None:
    """Let DeepSpeed apply a partition-aware optimizer's ``max_grad_norm`` over all partitions.

    ZeRO 1/2 and 3 call ``optimizer.step()`` once per param group (sub-group) with only that group present, so a
    clipping coefficient computed inside the optimizer would cover one group per call. Clipping by global norm is a
    rescaling, and two successive clips equal one clip at the smaller threshold, so ``max_grad_norm`` joins DeepSpeed's
    ``gradient_clipping`` (the norm over every partition, computed before the step) as ``min(clip, max_grad_norm)``.

    Updates ``config`` and the optimizer in place; returns the ``max_grad_norm`` that was moved, or None.
    """
    if not is_partition_aware(optimizer):
        return None
    values: set[float] = {g["max_grad_norm"] for g in optimizer.param_groups if g.get("max_grad_norm") is not None}
    if not values:
        return None
    if len(values) > 1:
        raise RuntimeError(
            f"{type(optimizer).__name__} param groups have different max_grad_norm values {sorted(values)}: a global "
            "gradient-norm clip has one threshold; set the same value on every group"
        )
    max_grad_norm = float(values.pop())
    clip = float(config.get("gradient_clipping") or 0.0)
    config["gradient_clipping"] = min(clip, max_grad_norm) if clip > 0 else max_grad_norm
    for group in optimizer.param_groups:
        group["max_grad_norm"] = None
    if "max_grad_norm" in optimizer.defaults:
        optimizer.defaults["max_grad_norm"] = None
    return max_grad_norm


# ------------------------------------------------------------------------------------------------------- on disk
def saved_world_size(checkpoint_path: str | Path) -> int | None:
    """World size a DeepSpeed checkpoint directory was written with (one ZeRO optimizer shard file per rank)."""
    root = Path(checkpoint_path)
    tag_dir = root / "checkpoint"
    if not tag_dir.is_dir():
        latest = root / "latest"
        if latest.is_file():
            tag_dir = root / latest.read_text().strip()
    if not tag_dir.is_dir():
        return None
    shards = list(tag_dir.glob("*_optim_states.pt"))
    return len(shards) or None


def check_world_size(checkpoint_path: str | Path, world_size: int) -> None:
    """Raise, with the conversion command, when a checkpoint was written by another number of ranks."""
    saved = saved_world_size(checkpoint_path)
    if saved is not None and saved != world_size:
        tag_dir = Path(checkpoint_path) / "checkpoint"
        raise RuntimeError(
            f"DeepSpeed checkpoint {str(checkpoint_path)!r} was saved by {saved} processes but this run has "
            f"{world_size}; ZeRO shards cannot be re-partitioned in place. Convert it to a universal checkpoint once:\n"
            f"  python -m deepspeed.checkpoint.ds_to_universal --input_folder {tag_dir} "
            f"--output_folder {tag_dir}_universal\n"
            "and resume with EffiDeepSpeedStrategy(config={'checkpoint': {'load_universal': True}}) (weights, "
            f"optimizer and scheduler state), or resume with {saved} processes, or take only the weights with "
            "`effi export CKPT weights.pt`."
        )
