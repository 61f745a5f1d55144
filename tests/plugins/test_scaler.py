"""DynamicLossScaler alone: the update rule against an independent reference, unscaling, skipping, state, errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from lightning_effi.plugins import DynamicLossScaler
from tests.plugins._toy import reference_scales


def run_scaler(scaler, pattern):
    """Drive ``scaler`` through real unscale/step/update calls with an inf injected on overflow steps."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.0)
    scales, skipped = [], []
    for overflow in pattern:
        p.grad = torch.full((3,), scaler.get_scale())
        if overflow:
            p.grad[1] = float("inf")
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        skipped.append(scaler.last_step_skipped)
    return scales, skipped


PATTERNS = {
    # O = overflow, . = clean
    "isolated": "..O..O....O.......",
    "pairs": "..OO...OO..........",
    "burst": "OOOOO.........",
    "alternating": "O.O.O.O.O.O.",
    "growth_then_overflow": "........O.O......",
}
KNOBS = {
    "h1": dict(hysteresis=1),
    "h2": dict(hysteresis=2),
    "h3": dict(hysteresis=3),
}


@pytest.mark.parametrize("consecutive", [False, True], ids=["nonconsecutive", "consecutive"])
@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
@pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())
def test_scale_sequence_matches_reference(pattern, knobs, consecutive):
    cfg = dict(init=2.0**8, growth=2.0, backoff=0.5, interval=4, lo=8.0, hi=2.0**10, consecutive=consecutive)
    flags = [c == "O" for c in pattern]
    expected = reference_scales(flags, hysteresis=knobs["hysteresis"], **cfg)
    scaler = DynamicLossScaler(
        init_scale=cfg["init"],
        growth_factor=cfg["growth"],
        backoff_factor=cfg["backoff"],
        growth_interval=cfg["interval"],
        min_scale=cfg["lo"],
        max_scale=cfg["hi"],
        consecutive_hysteresis=consecutive,
        **knobs,
    )
    scales, skipped = run_scaler(scaler, flags)
    assert scales == expected
    assert skipped == flags
    assert scaler.skipped_steps == sum(flags)
    assert scaler.num_updates == len(flags)


def test_hysteresis_rules_differ_by_hand():
    """Hand-computed: hysteresis=2 with one clean step between two overflows backs off only when not consecutive."""
    flags = [True, False, True, False]
    nonconsec = DynamicLossScaler(init_scale=64.0, hysteresis=2, growth_interval=100)
    consec = DynamicLossScaler(init_scale=64.0, hysteresis=2, growth_interval=100, consecutive_hysteresis=True)
    assert run_scaler(nonconsec, flags)[0] == [64.0, 64.0, 32.0, 32.0]
    assert run_scaler(consec, flags)[0] == [64.0, 64.0, 64.0, 64.0]
    # once spent, each further overflow backs off (until refilled by growth)
    assert run_scaler(nonconsec, [True, True])[0] == [16.0, 8.0]


def test_floor_and_ceiling_and_at_min_flag():
    s = DynamicLossScaler(init_scale=4.0, min_scale=2.0, max_scale=8.0, hysteresis=1, growth_interval=1)
    assert run_scaler(s, [False, False])[0] == [8.0, 8.0]  # ceiling
    scales = []
    flags = []
    for _ in range(4):
        scales += run_scaler(s, [True])[0]
        flags.append(s.overflow_at_min_scale)
    assert scales == [4.0, 2.0, 2.0, 2.0]
    assert flags == [False, False, True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_unscale_divides_exactly_and_flags(dtype):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, dtype=dtype)) for _ in range(3)]
    ps.append(torch.nn.Parameter(torch.randn(2)))  # mixed dtypes in one optimizer
    opt = torch.optim.SGD(ps, lr=0.1)
    s = DynamicLossScaler(init_scale=2.0**10)
    grads = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g * 2.0**10  # exact: power-of-two scale
    flag = s.unscale_(opt)
    assert flag.item() == 0.0 and flag.dtype == torch.float32
    for p, g in zip(ps, grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already called"):
        s.unscale_(opt)
    s.step(opt)
    s.update()
    assert not s.last_step_skipped
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    ps[2].grad[3] = float("nan")
    before = [p.detach().clone() for p in ps]
    assert s.unscale_(opt).item() == 1.0
    assert s.step(opt) is None
    s.update()
    assert s.last_step_skipped
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_skipped_step_leaves_weights_and_state_bit_identical():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    s = DynamicLossScaler(init_scale=2.0**4)
    x = torch.randn(8, 4)
    for step in range(5):
        opt.zero_grad()
        s.scale(model(x).square().mean()).backward()
        if step in (2, 3):
            model.bias.grad[0] = float("inf") if step == 2 else float("nan")
        before_w = copy.deepcopy(model.state_dict())
        before_o = copy.deepcopy(opt.state_dict())
        out = s.step(opt)
        s.update()
        if step in (2, 3):
            assert out is None and s.last_step_skipped
            for k, v in model.state_dict().items():
                assert torch.equal(v, before_w[k])
            after_o = opt.state_dict()
            for pid, st in before_o["state"].items():
                for k, v in st.items():
                    assert torch.equal(after_o["state"][pid][k], v)
        else:
            assert not s.last_step_skipped
    assert s.skipped_steps == 2
    assert opt.state_dict()["state"][0]["step"].item() == 3


def test_state_dict_round_trip_continues_identically():
    flags = [c == "O" for c in "..O.O...OO......O..."]
    a = DynamicLossScaler(init_scale=2.0**8, growth_interval=3, hysteresis=2)
    run_scaler(a, flags[:9])
    b = DynamicLossScaler(init_scale=1.0, min_scale=1.0, growth_interval=3, hysteresis=2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.state_dict() == a.state_dict()
    assert run_scaler(a, flags[9:]) == run_scaler(b, flags[9:])
    assert (a.skipped_steps, a.growth_tracker, a.hysteresis_tracker) == (b.skipped_steps, b.growth_tracker,
                                                                         b.hysteresis_tracker)
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({"scale": 1.0, "_growth_tracker": 0})


def test_scale_keeps_graph_and_multiplies():
    x = torch.tensor(3.0, requires_grad=True)
    s = DynamicLossScaler(init_scale=8.0)
    y = s.scale(x * 2)
    y.backward()
    assert y.item() == 48.0 and x.grad.item() == 16.0
    with pytest.raises(TypeError, match="Tensor"):
        s.scale(3.0)


def test_update_without_step_and_closure_errors():
    s = DynamicLossScaler()
    with pytest.raises(RuntimeError, match="no step"):
        s.update()
    p = torch.nn.Parameter(torch.ones(1))
    p.grad = torch.ones(1)
    with pytest.raises(RuntimeError, match="closures"):
        s.step(torch.optim.SGD([p], lr=1.0), closure=lambda: 0.0)


ERRORS = [
    (dict(init_scale=0.0), ValueError, "Invalid init_scale 0.0"),
    (dict(init_scale=float("inf")), ValueError, "Invalid init_scale inf"),
    (dict(growth_factor=1.0), ValueError, "Invalid growth_factor 1.0: must be > 1"),
    (dict(backoff_factor=1.0), ValueError, r"Invalid backoff_factor 1.0: must be in \(0, 1\)"),
    (dict(backoff_factor=0.0), ValueError, "Invalid backoff_factor 0.0"),
    (dict(growth_interval=0), ValueError, "Invalid growth_interval 0: must be an int >= 1"),
    (dict(growth_interval=2.5), ValueError, "Invalid growth_interval 2.5"),
    (dict(hysteresis=0), ValueError, "Invalid hysteresis 0"),
    (dict(hysteresis=True), ValueError, "Invalid hysteresis True"),
    (dict(min_scale=-1.0), ValueError, "Invalid min_scale -1.0"),
    (dict(min_scale=4.0, max_scale=2.0, init_scale=2.0), ValueError, "Invalid max_scale 2.0: must be >= min_scale"),
    (dict(init_scale=2.0**30), ValueError, r"Invalid init_scale 1073741824.0: must lie in \[min_scale, max_scale\]"),
    (dict(consecutive_hysteresis="yes"), TypeError, "Invalid consecutive_hysteresis 'yes'"),
]


@pytest.mark.parametrize("kwargs,exc,msg", ERRORS, ids=[next(iter(k)) + str(i) for i, (k, _, _) in enumerate(ERRORS)])
def test_validation_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        DynamicLossScaler(**kwargs)


def test_no_grads_is_a_clean_step():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    s = DynamicLossScaler()
    s.step(opt)
    s.update()
    assert not s.last_step_skipped and s.num_updates == 1


def test_all_patterns_of_length_six_against_reference():
    """Exhaustive over all 64 overflow patterns of length 6, both hysteresis rules, hysteresis 1..3."""
    for bits, h, consecutive in itertools.product(itertools.product([False, True], repeat=6), (1, 2, 3), (False, True)):
        cfg = dict(init=64.0, growth=2.0, backoff=0.5, interval=2, lo=4.0, hi=256.0, consecutive=consecutive)
        s = DynamicLossScaler(init_scale=64.0, growth_interval=2, min_scale=4.0, max_scale=256.0, hysteresis=h,
                              consecutive_hysteresis=consecutive)
        assert run_scaler(s, list(bits))[0] == reference_scales(list(bits), hysteresis=h, **cfg), (bits, h, consecutive)


# ------------------------------------------------------------------------------------------- peers, number by number
def _patterns(n=7):
    return [list(bits) for bits in itertools.product([False, True], repeat=n)]


def _gradscaler_scales(flags) -> list[float]:
    """torch.amp.GradScaler's scale after each step of an overflow pattern (the independent reference)."""
    gs = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.0)
    scales = []
    for overflow in flags:
        gs.scale(torch.ones(()))
        p.grad = torch.tensor([1.0, float("inf") if overflow else 1.0])
        gs.step(opt)
        gs.update()
        scales.append(gs.get_scale())
    return scales


def test_hysteresis_1_matches_torch_gradscaler():
    """hysteresis=1 (and a floor/ceiling out of reach) is torch.amp.GradScaler's rule exactly."""
    for flags in _patterns():
        theirs = _gradscaler_scales(flags)
        ours = DynamicLossScaler(init_scale=2.0**10, growth_interval=2, hysteresis=1, min_scale=2.0**-20,
                                 max_scale=2.0**40)
        assert run_scaler(ours, flags)[0] == theirs, flags


@pytest.mark.parametrize("consecutive", [False, True], ids=["nonconsecutive", "consecutive"])
def test_hysteresis_matches_deepspeed_and_growth_is_one_step_earlier(consecutive, monkeypatch):
    """Against DeepSpeed 0.19's DynamicLossScaler (the rule EffiDeepSpeedStrategy maps our knobs onto): backoff and
    hysteresis (both counting rules) agree on every pattern. Growth differs by design: DeepSpeed counts its window
    from the step *after* an overflow (and after the start), so its first growth needs growth_interval + 1 clean
    steps; ours, torch's and Megatron-LM's need growth_interval."""
    loss_scaler = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")
    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda *a, **k: 0)  # it only logs on rank 0

    def deepspeed_scales(flags, window):
        ds = loss_scaler.DynamicLossScaler(init_scale=64.0, scale_window=window, min_scale=1.0, delayed_shift=2,
                                           consecutive_hysteresis=consecutive, raise_error_at_min_scale=False)
        out = []
        for f in flags:
            ds.update_scale(f)
            out.append(ds.cur_scale)
        return out

    for flags in _patterns():
        ours = DynamicLossScaler(init_scale=64.0, growth_interval=10**6, hysteresis=2, min_scale=1.0,
                                 consecutive_hysteresis=consecutive)
        assert run_scaler(ours, flags)[0] == deepspeed_scales(flags, 10**6), flags
    clean = [False] * 6
    ours = DynamicLossScaler(init_scale=64.0, growth_interval=2, hysteresis=2, consecutive_hysteresis=consecutive)
    assert run_scaler(ours, clean)[0] == [64.0, 128.0, 128.0, 256.0, 256.0, 512.0]
    assert deepspeed_scales(clean, 2) == [64.0, 64.0, 128.0, 128.0, 256.0, 256.0]


# ------------------------------------------------------------------------------------- the device-side rule, masked
def run_masked(scaler, pattern):
    """As run_scaler, with an optimizer that skips inside its kernel (torch's fused AdamW): nothing is decided on the
    host. Also checks that a skipped step leaves weights and optimizer state bit for bit."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    assert scaler.masks_step(opt)
    scales, skipped = [], []
    for overflow in pattern:
        p.grad = torch.full((3,), scaler.get_scale())
        if overflow:
            p.grad[1] = float("inf")
        before = (p.detach().clone(), copy.deepcopy(opt.state_dict()["state"]))
        scaler.step(opt)
        scaler.update()
        assert scaler.host_known_skip is None  # only the device knows
        if overflow:
            assert torch.equal(p, before[0])
            for k, v in before[1].get(0, {}).items():
                assert torch.equal(opt.state_dict()["state"][0][k], v), k
        scales.append(scaler.get_scale())
        skipped.append(scaler.last_step_skipped)
    return scales, skipped


@pytest.mark.parametrize("consecutive", [False, True], ids=["nonconsecutive", "consecutive"])
@pytest.mark.parametrize("hysteresis", [1, 2, 3])
def test_masked_steps_follow_the_reference_rule(hysteresis, consecutive):
    for bits in itertools.product([False, True], repeat=6):
        cfg = dict(init=64.0, growth=2.0, backoff=0.5, interval=2, lo=4.0, hi=256.0, consecutive=consecutive)
        s = DynamicLossScaler(init_scale=64.0, growth_interval=2, min_scale=4.0, max_scale=256.0,
                              hysteresis=hysteresis, consecutive_hysteresis=consecutive)
        scales, skipped = run_masked(s, list(bits))
        assert scales == reference_scales(list(bits), hysteresis=hysteresis, **cfg), bits
        assert skipped == list(bits)
        assert s.skipped_steps == sum(bits)


def test_masked_hysteresis_1_matches_torch_gradscaler():
    for flags in _patterns(6):
        theirs = _gradscaler_scales(flags)
        ours = DynamicLossScaler(init_scale=2.0**10, growth_interval=2, hysteresis=1, min_scale=2.0**-20,
                                 max_scale=2.0**40)
        assert run_masked(ours, flags)[0] == theirs, flags


def test_floor_events_are_counted_on_the_device():
    s = DynamicLossScaler(init_scale=4.0, min_scale=2.0, hysteresis=1, growth_interval=100)
    run_masked(s, [True, True, False, True, True])
    # backoffs due at scale 2 (the floor) on the 3rd, 4th and 5th overflow: updates 1, 3, 4
    assert (s.floor_events, s.first_floor_update) == (3, 1)
    assert s.state_dict()["last_floor_update"] == 4


def test_host_decision_can_be_forced_and_is_refused_for_plain_optimizers():
    s = DynamicLossScaler(init_scale=8.0)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, float("inf")])
    fused = torch.optim.AdamW([p], lr=1.0, fused=True)
    assert s.step(fused, on_device=False) is None  # decided on the host: not called
    s.update()
    assert s.host_known_skip is True and s.last_step_skipped
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="does not take found_inf"):
        s.step(torch.optim.SGD([p], lr=1.0), on_device=True)
