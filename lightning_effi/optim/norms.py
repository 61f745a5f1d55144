"""Shard-aware per-parameter norms for LAMB.

LAMB needs, per logical parameter, the norm of the *whole* tensor (‖x‖ and ‖u‖), and for ``max_grad_norm`` one
norm over all gradients. Under sharding each rank only holds a piece, so every rank sums squares over what it has
("units": local shards or slices of a flat partition), the sums are scattered into one vector indexed by logical
parameter, and that vector is summed across ranks with a single ``all_reduce`` per process group.

Three layouts are recognised:

- plain tensors: one unit per parameter, nothing to reduce;
- DTensors (FSDP2 ``fully_shard``, tensor parallel): one unit per parameter (its local shard, possibly empty);
  squares are summed over the mesh dimension that carries a ``Shard`` placement (``.to_local().norm()`` alone would
  be the shard's norm);
- flat partitions (DeepSpeed ZeRO): one tensor per param group holding slices of many parameters, described by a
  :class:`FlatLayout`; one unit per segment, reduced over ``optimizer.norm_process_group``.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_effi import _compat


@dataclass(frozen=True)
class FlatLayout:
    """Where logical parameters live inside one flat partition tensor.

    Args:
        segments: ``(logical_id, offset, numel)`` triples, one per piece of a logical parameter held in this flat
            tensor. Elements not covered by any segment (padding) are ignored by LAMB and left unchanged.
        num_logical: the total number of logical parameters across *all* groups of the optimizer; logical ids are
            unique across groups and lie in ``[0, num_logical)``. A logical parameter may be split across ranks;
            its pieces are summed by the all_reduce.
    """

    segments: tuple[tuple[int, int, int], ...]
    num_logical: int

    def __post_init__(self) -> None:
        if not isinstance(self.num_logical, int) or self.num_logical < 0:
            raise ValueError(f"Invalid FlatLayout.num_logical {self.num_logical!r}: must be an int >= 0")
        segs = tuple(tuple(int(v) for v in s) for s in self.segments)
        for s in segs:
            if len(s) != 3:
                raise ValueError(f"Invalid FlatLayout segment {s!r}: must be (logical_id, offset, numel)")
            lid, off, n = s
            if not 0 <= lid < self.num_logical:
                raise ValueError(f"Invalid FlatLayout logical_id {lid}: must be in [0, num_logical={self.num_logical})")
            if off < 0 or n < 0:
                raise ValueError(f"Invalid FlatLayout segment {s!r}: offset and numel must be >= 0")
        ordered = sorted(segs, key=lambda s: s[1])
        for a, b in zip(ordered, ordered[1:]):
            if a[1] + a[2] > b[1]:
                raise ValueError(f"Invalid FlatLayout: segments {a!r} and {b!r} overlap; each element of the flat "
                                 "tensor belongs to one segment at most")
        object.__setattr__(self, "segments", segs)

    def check(self, flat: Tensor) -> None:
        """Raise if this layout does not fit ``flat`` (a 1-D contiguous tensor)."""
        if flat.dim() != 1 or not flat.is_contiguous():
            raise RuntimeError(
                f"flat_layouts need 1-D contiguous flat partitions, got shape {tuple(flat.shape)}; the strategy "
                "must put the flat fp32 partition itself into group['params']"
            )
        end = max((off + n for _, off, n in self.segments), default=0)
        if end > flat.numel():
            raise RuntimeError(f"FlatLayout covers {end} elements but the flat partition has only {flat.numel()}")


_DTENSOR: list = []


def _dtensor_type():
    # Resolved once: this runs for every parameter of every step.
    if not _DTENSOR:
        cls = None
        if torch.distributed.is_available():
            try:
                from torch.distributed.tensor import DTensor as cls
            except ImportError:  # a torch build without distributed tensors
                cls = None
        _DTENSOR.append(cls)
    return _DTENSOR[0]


def is_dtensor(t: Tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def to_local(t: Tensor) -> Tensor:
    """The local piece of a DTensor, or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def dtensor_reduce_groups(t: Any) -> tuple:
    """The process groups over which squares of this DTensor's local shard must be summed, one per sharded mesh
    dimension (FSDP2: the data-parallel dimension; tensor parallel: the tensor-parallel one; 2D: both), in mesh
    order; empty for a replicated DTensor. Sums over several dimensions are taken one dimension after the other."""
    from torch.distributed.tensor import Replicate, Shard

    groups = []
    for dim, pl in enumerate(t.placements):
        if isinstance(pl, Shard) or _compat.is_strided_shard(pl):
            if t.device_mesh.size(dim) > 1:  # a dimension of one rank has nothing to sum
                groups.append(t.device_mesh.get_group(dim))
        elif not isinstance(pl, Replicate):
            raise RuntimeError(
                f"Lamb got a parameter with placement {pl!r}; only Shard and Replicate placements are supported "
                "(a Partial parameter has no well-defined norm before it is reduced)"
            )
    return tuple(groups)


def resolve_flat_group(group):
    """``optimizer.norm_process_group``: None means the default group when torch.distributed is initialised."""
    if group is not None:
        return group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


def scatter_sumsq(sumsq: Tensor, lids: Tensor, size: int) -> Tensor:
    """Sum per-unit squared norms into one entry per logical id."""
    out = torch.zeros(size, dtype=sumsq.dtype, device=sumsq.device)
    return out.index_add_(0, lids, sumsq)


def all_reduce_parts(parts: Sequence[tuple[object, Tensor]]) -> None:
    """One SUM all_reduce per distinct process group, in place, on the given 1-D tensors.

    ``parts`` is a list of ``(group, tensor)``; tensors of the same group are concatenated so that the group sees a
    single collective. Order is deterministic (first appearance), so all ranks issue the same collectives.
    """
    by_group: dict[int, tuple[object, list[Tensor]]] = {}
    for group, t in parts:
        if group is None:
            continue
        by_group.setdefault(id(group), (group, []))[1].append(t)
    for group, ts in by_group.values():
        flat = torch.cat(ts) if len(ts) > 1 else ts[0].clone()
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        off = 0
        for t in ts:
            t.copy_(flat[off : off + t.numel()])
            off += t.numel()


class GroupsByRanks:
    """One process-group object per set of ranks: a 2-D mesh and its 1-D submesh hold different group objects over
    the same ranks (FSDP2 puts tensor-parallel weights on the 2-D mesh and the others on the data-parallel submesh),
    and reducing each separately would double the collectives."""

    def __init__(self) -> None:
        self._by_id: dict[int, object] = {}
        self._by_ranks: dict[tuple[int, ...], object] = {}

    def __call__(self, group):
        canonical = self._by_id.get(id(group))
        if canonical is None:
            ranks = tuple(torch.distributed.get_process_group_ranks(group))
            canonical = self._by_id[id(group)] = self._by_ranks.setdefault(ranks, group)
        return canonical


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of all ``tensors`` together, each taken as its full logical tensor: plain tensors and DTensors
    sharded over any mesh dimensions may be mixed (FSDP2 x tensor parallel puts tensor-parallel weights on the 2-D
    mesh and the rest on the data-parallel one, which ``torch.nn.utils.get_total_norm`` cannot stack). Local sums of
    squares are summed per set of sharded dimensions and reduced with one all_reduce per process group; a float32
    0-dim tensor."""
    by_groups: dict[tuple, list[Tensor]] = {}
    same_ranks = GroupsByRanks()
    for t in tensors:
        key = tuple(same_ranks(g) for g in dtensor_reduce_groups(t)) if is_dtensor(t) else ()
        by_groups.setdefault(key, []).append(to_local(t))
    if not by_groups:
        raise ValueError("global_norm of no tensors")
    keys = list(by_groups)
    device = by_groups[keys[0]][0].device
    sums = torch.stack([torch.nn.utils.get_total_norm(by_groups[k], norm_type=2.0, error_if_nonfinite=False)
                        .to(device, torch.float32).square() for k in keys])
    order: dict[int, object] = {}
    for k in keys:
        for g in k:
            order.setdefault(id(g), g)
    for group in order.values():
        sel = [i for i, k in enumerate(keys) if any(g is group for g in k)]
        part = sums[sel]
        torch.distributed.all_reduce(part, op=torch.distributed.ReduceOp.SUM, group=group)
        sums[sel] = part
    return sums.sum().sqrt()


def clip_grad_norm_(grads: Sequence[Tensor], max_norm: float) -> Tensor:
    """Scale ``grads`` in place so that their :func:`global_norm` is at most ``max_norm`` (torch's
    ``clip_grad_norm_`` rule, coefficient ``max_norm / (norm + 1e-6)`` capped at 1) and return the norm before
    clipping. Works where torch's cannot (gradients on several meshes); the coefficient stays on the device."""
    total = global_norm(grads)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        piece = to_local(g)
        by_device.setdefault(piece.device, []).append(piece)
    for device, pieces in by_device.items():
        torch._foreach_mul_(pieces, coef.to(device))
    return total
