"""ZeRO flat-partition layouts (``lightning_effi.strategies._zero_layout``) without a process group.

The stand-ins below mirror the attribute names of deepspeed 0.19's ZeRO optimizers, which is all these functions
read (``docs/deepspeed.md`` lists them):

- ``DeepSpeedZeroOptimizer`` (ZeRO 1/2): ``bit16_groups`` (the model's parameters per param group),
  ``dp_process_group``, ``optimizer`` (the client optimizer); each parameter's ``_hp_mapping`` set by DeepSpeed's
  ``link_hp_params`` (used here for real where DeepSpeed is installed), whose ``get_hp_fragment_address()`` has
  ``start`` and ``numel`` inside this rank's flat fp32 partition.
- ``BF16_Optimizer`` (bf16 ZeRO 1): the same with ``bf16_groups``.
- ``DeepSpeedZeroOptimizer_Stage3``: ``fp16_groups`` (parameters per sub-group), ``fp32_partitioned_groups_flat``,
  ``sub_group_to_group_id``, ``dp_process_group`` and ``_optimizer_step(sub_group_id)``, which puts the sub-group's
  flat tensor alone into its param group and steps; each parameter's ``ds_numel`` (full size) and
  ``ds_tensor.ds_numel`` (size of one rank's piece).

The distributed tests (``tests/distributed/test_deepspeed.py``) run the same functions on real DeepSpeed engines.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_effi._protocols import FlatLayoutOptimizer
from lightning_effi.optim import FlatLayout, Lamb
from lightning_effi.strategies import _zero_layout as zl


class MyLamb(Lamb):
    """A Lamb subclass defined outside the package: partition-aware by its attributes, not by where it lives."""


class Lars(torch.optim.SGD):
    """A per-tensor-norm optimizer (by name) that knows nothing of flat partitions."""


class DuckLamb(torch.optim.SGD):
    """Not a Lamb at all, but it has the attributes of FlatLayoutOptimizer."""

    accepts_flat_layouts = True
    norm_process_group = None


def _model() -> nn.Module:
    torch.manual_seed(0)
    # odd sizes so that 2-rank partitions split parameters; the 1-element gain ends up on one rank only
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    model.gain = nn.Parameter(torch.full((1,), 1.5))
    return model


def _groups(model: nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _coverage(params_by_group, segments_per_rank, logical_ids) -> None:
    """Every element of every parameter is in exactly one segment on exactly one rank; segments do not overlap."""
    covered = {logical_ids[id(p)]: 0 for ps in params_by_group for p in ps}
    for segments in segments_per_rank:
        for segs in segments:
            spans = sorted((off, off + n) for _, off, n in segs)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"overlapping segments {segs}"
            for lid, _, n in segs:
                covered[lid] += n
    assert covered == {logical_ids[id(p)]: p.numel() for ps in params_by_group for p in ps}


# ------------------------------------------------------------------------------------------------ the optimizer
def test_logical_ids_number_params_over_groups_in_order():
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a, b]}, {"params": [c]}], lr=0.1)
    assert zl.logical_ids(opt) == {id(a): 0, id(b): 1, id(c): 2}


def test_partition_aware_by_protocol_not_by_module():
    p = [nn.Parameter(torch.zeros(2))]
    assert MyLamb.__module__ != Lamb.__module__
    for opt in (Lamb(p), MyLamb(p), DuckLamb(p, lr=0.1)):
        assert isinstance(opt, FlatLayoutOptimizer) and zl.is_partition_aware(opt)
        zl.check_optimizer_supported(opt)
    no = DuckLamb(p, lr=0.1)
    no.accepts_flat_layouts = False
    for opt in (torch.optim.AdamW(p), no):
        assert not zl.is_partition_aware(opt)


def test_per_tensor_norm_optimizer_is_refused():
    with pytest.raises(RuntimeError, match=r"test_zero_layout\.Lars computes per-tensor norms.*silently be wrong"):
        zl.check_optimizer_supported(Lars([nn.Parameter(torch.zeros(2))], lr=0.1))
    zl.check_optimizer_supported(torch.optim.AdamW([nn.Parameter(torch.zeros(2))]))  # element-wise: fine


def test_client_optimizer_unwraps_deepspeed():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert zl.client_optimizer(SimpleNamespace(optimizer=opt)) is opt
    assert zl.client_optimizer(opt) is opt


# ---------------------------------------------------------------------------------------------- ZeRO 1/2 layouts
def _link_rank(params_by_group, rank: int, world: int) -> list[torch.Tensor]:
    """What ZeRO 1/2 does per param group on one rank: flatten, pad to a multiple of world, keep the rank's slice,
    and link each parameter to its piece with DeepSpeed's own ``link_hp_params``. Returns the flat partitions."""
    from deepspeed.utils.mixed_precision_linkage import link_hp_params

    flats = []
    for i, params in enumerate(params_by_group):
        total = sum(p.numel() for p in params)
        size = -(-total // world)
        full = torch.cat([p.detach().reshape(-1) for p in params] + [torch.zeros(size * world - total)])
        flat = full[rank * size:(rank + 1) * size].clone()
        link_hp_params(lp_param_list=params, flat_hp_partition=flat, gradient_dict={}, offload_gradient_dict={},
                       use_offload=False, param_group_index=i, partition_start=rank * size, partition_size=size,
                       dp_group=None)
        flats.append(flat)
    return flats


@pytest.mark.parametrize("attr", ["bit16_groups", "bf16_groups"])
def test_stage12_segments_from_deepspeed_links(attr):
    pytest.importorskip("deepspeed")
    model = _model()
    groups = [g["params"] for g in _groups(model)]
    ids = {id(p): i for i, p in enumerate(p for ps in groups for p in ps)}
    world = 2
    per_rank, flats = [], []
    for rank in range(world):
        flats.append(_link_rank(groups, rank, world))
        per_rank.append(zl.stage12_segments(SimpleNamespace(**{attr: groups}), ids))
    _coverage(groups, per_rank, ids)
    # Each segment points at the parameter's own values inside the partition.
    for rank in range(world):
        for flat, segs in zip(flats[rank], per_rank[rank]):
            for lid, off, n in segs:
                p = next(p for ps in groups for p in ps if ids[id(p)] == lid)
                values = p.detach().reshape(-1)
                assert any(torch.equal(flat[off:off + n], values[s:s + n]) for s in range(p.numel() - n + 1))
    split = {lid for segs in per_rank[0] for lid, _, _ in segs} & {lid for segs in per_rank[1] for lid, _, _ in segs}
    assert split, "the 2-rank partitions must split at least one parameter"


def test_stage12_segments_skip_parameters_outside_the_partition():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))
    a._hp_mapping = None  # DeepSpeed sets None for a parameter with no element on this rank
    b._hp_mapping = SimpleNamespace(get_hp_fragment_address=lambda: SimpleNamespace(start=0, numel=3))
    empty = nn.Parameter(torch.zeros(0))
    empty._hp_mapping = SimpleNamespace(get_hp_fragment_address=lambda: SimpleNamespace(start=3, numel=0))
    segs = zl.stage12_segments(SimpleNamespace(bit16_groups=[[a, b, empty]]), {id(a): 0, id(b): 1, id(empty): 2})
    assert segs == [[(1, 0, 3)]]


# ------------------------------------------------------------------------------------------------ ZeRO 3 layouts
def _stage3_fake(params_by_group, world: int, rank: int, optimizer=None):
    """A stand-in for DeepSpeedZeroOptimizer_Stage3: one sub-group per param group (the strategy's default
    sub_group_size), each parameter cut into ``world`` equal pieces, ``_optimizer_step`` as DeepSpeed's."""
    flats = []
    for params in params_by_group:
        pieces = []
        for p in params:
            piece = -(-p.numel() // world)
            p.ds_numel = p.numel()
            p.ds_tensor = SimpleNamespace(ds_numel=piece)
            padded = torch.cat([p.detach().reshape(-1), torch.zeros(piece * world - p.numel())])
            pieces.append(padded[rank * piece:(rank + 1) * piece])
        flats.append(nn.Parameter(torch.cat(pieces)))
    fake = SimpleNamespace(fp16_groups=params_by_group, fp32_partitioned_groups_flat=flats, dp_process_group=None,
                           sub_group_to_group_id={i: i for i in range(len(flats))}, optimizer=optimizer, steps=[])

    def _optimizer_step(sub_group_id):
        group = fake.optimizer.param_groups[fake.sub_group_to_group_id[sub_group_id]]
        group["params"] = [flats[sub_group_id]]
        fake.steps.append((sub_group_id, [list(g["flat_layouts"]) for g in fake.optimizer.param_groups]))
        fake.optimizer.step()
        group["params"] = []

    fake._optimizer_step = _optimizer_step
    return fake


def test_stage3_segments_cover_every_parameter_once():
    model = _model()
    groups = [g["params"] for g in _groups(model)]
    ids = {id(p): i for i, p in enumerate(p for ps in groups for p in ps)}
    per_rank = [zl.stage3_segments(_stage3_fake(groups, 2, r), ids, rank_of=lambda _g, r=r: r) for r in range(2)]
    _coverage(groups, per_rank, ids)
    # pieces back to back in fp16_groups order; the 1-element gain lives on rank 0 only
    gain = ids[id(model.gain)]
    assert [s for segs in per_rank[0] for s in segs if s[0] == gain] == [(gain, sum(
        -(-p.numel() // 2) for p in groups[1][:groups[1].index(model.gain)]), 1)]
    assert not [s for segs in per_rank[1] for s in segs if s[0] == gain]


def test_stage3_segments_use_the_sub_group_process_group():
    p = nn.Parameter(torch.zeros(4))
    fake = _stage3_fake([[p]], 2, 1)
    fake.sub_group_process_groups = ["sub0"]
    seen = []
    assert zl.stage3_segments(fake, {id(p): 0}, rank_of=lambda g: seen.append(g) or 1) == [[(0, 0, 2)]]
    assert seen == ["sub0"]


# --------------------------------------------------------------------------------------------------- installing
@pytest.mark.parametrize("cls", [Lamb, MyLamb])
def test_install_stage12_gives_per_parameter_trust_ratios(cls):
    """One rank holding the whole partition (world 1, so no collective): Lamb on ZeRO's flat tensors with the
    installed layouts equals Lamb on the model's tensors, one trust ratio per parameter."""
    pytest.importorskip("deepspeed")
    ref_model, model = _model(), _model()
    ref = cls(_groups(ref_model), lr=1e-2)
    opt = cls(_groups(model), lr=1e-2)
    ids = zl.logical_ids(opt)
    lp_groups = [list(g["params"]) for g in opt.param_groups]
    flats = [nn.Parameter(f) for f in _link_rank(lp_groups, 0, 1)]
    for group, flat in zip(opt.param_groups, flats):
        group["params"] = [flat]  # what DeepSpeed does to the client optimizer
    fake = SimpleNamespace(bit16_groups=lp_groups, dp_process_group=None, optimizer=opt)
    layouts = zl.install_flat_layouts(fake, opt, ids)
    assert [g["flat_layouts"] for g in opt.param_groups] == [[lay] for lay in layouts]
    assert all(isinstance(lay, FlatLayout) and lay.num_logical == len(ids) for lay in layouts)
    assert opt.norm_process_group is None  # the fake's dp_process_group
    for step in range(3):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        for m in (ref_model, model):
            m.zero_grad()
            (m(x).pow(2).mean() * m.gain).sum().backward()
        for flat, params in zip(flats, lp_groups):
            flat.grad = torch.cat([p.grad.reshape(-1) for p in params])
        ref.step()
        opt.step()
        torch.testing.assert_close(opt.trust_ratios, ref.trust_ratios)
        with torch.no_grad():
            for p in model.parameters():
                p._hp_mapping.update_lp()  # DeepSpeed's copy of the updated partition back into the model
    assert opt.trust_ratios.numel() == len(ids)
    for flat, ref_group in zip(flats, ref.param_groups):
        torch.testing.assert_close(flat.detach(), torch.cat([p.detach().reshape(-1) for p in ref_group["params"]]))


def test_install_returns_none_for_element_wise_optimizers():
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p])
    fake = SimpleNamespace(bit16_groups=[[p]], dp_process_group="dp")
    assert zl.install_flat_layouts(fake, opt, {id(p): 0}) is None
    assert "flat_layouts" not in opt.param_groups[0] and not hasattr(opt, "norm_process_group")


def test_reinstall_after_checkpoint_load_reuses_the_layouts():
    p = nn.Parameter(torch.zeros(3))
    p._hp_mapping = SimpleNamespace(get_hp_fragment_address=lambda: SimpleNamespace(start=0, numel=3))
    opt = Lamb([p])
    fake = SimpleNamespace(bit16_groups=[[p]], dp_process_group="dp")
    layouts = zl.install_flat_layouts(fake, opt, {id(p): 0})
    opt.param_groups[0].pop("flat_layouts")  # Optimizer.load_state_dict replaced the groups
    opt.norm_process_group = None
    assert zl.install_flat_layouts(fake, opt, None, layouts=layouts) is layouts
    assert opt.param_groups[0]["flat_layouts"] == [layouts[0]] and opt.norm_process_group == "dp"


@pytest.mark.parametrize("cls", [Lamb, MyLamb])
def test_install_stage3_sets_one_sub_group_layout_per_call(cls):
    model = _model()
    opt = cls(_groups(model), lr=1e-2)
    ids = zl.logical_ids(opt)
    groups = [list(g["params"]) for g in opt.param_groups]
    fake = _stage3_fake(groups, 1, 0, optimizer=opt)
    for group in opt.param_groups:
        group["params"] = []  # ZeRO-3 leaves every group empty between sub-group steps
    original = fake._optimizer_step
    layouts = zl.install_flat_layouts(fake, opt, ids, rank_of=lambda _g: 0)
    assert fake._optimizer_step._effi_original is original
    assert [g["flat_layouts"] for g in opt.param_groups] == [[], []]
    for flat, params in zip(fake.fp32_partitioned_groups_flat, groups):
        flat.grad = torch.cat([torch.ones(p.numel()) for p in params])
    for sub_id in (0, 1):
        fake._optimizer_step(sub_id)
    # during sub-group i's step only its group carries a layout, and the one for sub-group i; none afterwards
    assert fake.steps == [(0, [[layouts[0]], []]), (1, [[], [layouts[1]]])]
    assert [g["flat_layouts"] for g in opt.param_groups] == [[], []]
    assert opt.trust_ratios.numel() == len(ids)
    # a second install (after a checkpoint load) wraps DeepSpeed's method again, not the previous wrapper
    zl.install_flat_layouts(fake, opt, None, layouts=layouts)
    assert fake._optimizer_step._effi_original is original


# ---------------------------------------------------------------------------------------------- max_grad_norm
@pytest.mark.parametrize(("clip", "max_grad_norm", "expected"), [(0.0, 0.5, 0.5), (1.0, 0.5, 0.5), (0.2, 0.5, 0.2)])
def test_max_grad_norm_joins_deepspeed_clipping(clip, max_grad_norm, expected):
    p = [nn.Parameter(torch.zeros(2))]
    opt = MyLamb(p, max_grad_norm=max_grad_norm)
    config = {"gradient_clipping": clip}
    assert zl.move_max_grad_norm_to_deepspeed(opt, config) == max_grad_norm
    assert config["gradient_clipping"] == expected
    assert opt.param_groups[0]["max_grad_norm"] is None and opt.defaults["max_grad_norm"] is None


def test_max_grad_norm_left_alone():
    p = [nn.Parameter(torch.zeros(2))]
    config = {"gradient_clipping": 1.0}
    assert zl.move_max_grad_norm_to_deepspeed(Lamb(p), config) is None  # no max_grad_norm
    sgd = torch.optim.SGD(p, lr=0.1)
    sgd.param_groups[0]["max_grad_norm"] = 0.5
    assert zl.move_max_grad_norm_to_deepspeed(sgd, config) is None  # not partition-aware
    assert config == {"gradient_clipping": 1.0} and sgd.param_groups[0]["max_grad_norm"] == 0.5


def test_max_grad_norm_must_be_one_threshold():
    opt = Lamb([{"params": [nn.Parameter(torch.zeros(2))]}, {"params": [nn.Parameter(torch.zeros(2))]}],
               max_grad_norm=0.5)
    opt.param_groups[1]["max_grad_norm"] = 0.25
    with pytest.raises(RuntimeError, match=r"different max_grad_norm values \[0\.25, 0\.5\].*same value"):
        zl.move_max_grad_norm_to_deepspeed(opt, {})


# ---------------------------------------------------------------------------------------------------- on disk
def test_saved_world_size_counts_optimizer_shards(tmp_path):
    assert zl.saved_world_size(tmp_path) is None
    tag = tmp_path / "global_step5"
    tag.mkdir()
    (tmp_path / "latest").write_text("global_step5\n")
    for r in range(3):
        (tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert zl.saved_world_size(tmp_path) == 3
    zl.check_world_size(tmp_path, 3)
    with pytest.raises(RuntimeError, match=r"(?s)saved by 3 processes but this run has 2.*ds_to_universal"):
        zl.check_world_size(tmp_path, 2)
