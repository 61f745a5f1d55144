"""Pure schedule math (no Lightning): factors, ramps, global batch, and the loop-driving value."""

from __future__ import annotations

import random

import pytest

from lightning_effi.callbacks.schedule import (
    factor_at,
    factor_from_global_batch,
    factor_sum,
    loop_accumulate_value,
    parse_ramp,
    parse_schedule,
    ramp_factor,
    window_size,
)


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ({0: 2}, [2, 2, 2, 2, 2, 2]),
        ({2: 3}, [1, 1, 3, 3, 3, 3]),  # factor 1 before the first threshold
        ({"1": 2, "4": 5}, [1, 2, 2, 2, 5, 5]),  # YAML string keys
        ({0: 4, 3: 1}, [4, 4, 4, 1, 1, 1]),  # decreasing factors are allowed
        ({"1_000": 2}, [1] * 6),
    ],
)
def test_piecewise_schedule(schedule, expected):
    parsed = parse_schedule(schedule)
    assert [factor_at(p, schedule=parsed) for p in range(6)] == expected


def test_ramp_is_linear_in_whole_micro_batches():
    # 1 -> 8 over 70 units: +1 every 10 units, 8 from 70 on (Megatron's rampup with one micro-batch increments).
    got = [ramp_factor(p, start=1, end=8, length=70) for p in range(0, 100, 5)]
    want = [1 + min(p, 70) // 10 for p in range(0, 100, 5)]
    assert got == want
    assert ramp_factor(69, start=1, end=8, length=70) == 7
    assert ramp_factor(70, start=1, end=8, length=70) == 8
    # Decreasing ramps move towards the end at the same pace.
    assert [ramp_factor(p, start=4, end=1, length=3) for p in range(5)] == [4, 3, 2, 1, 1]
    assert factor_at(35, ramp=parse_ramp((1, 8, 70))) == 4
    assert parse_ramp(["2", 3.0, 10]) == (2, 3, 10)


def test_global_batch():
    assert factor_from_global_batch(512, micro_batch_size=16, data_parallel_size=8) == 4
    with pytest.raises(ValueError, match=r"Invalid global_batch_size 500: not a multiple of micro_batch_size 16 x "
                                         r"data-parallel size 8 = 128; use e.g. 384 or 512"):
        factor_from_global_batch(500, micro_batch_size=16, data_parallel_size=8)


@pytest.mark.parametrize("seed", range(20))
def test_factor_sum_equals_the_sum_of_factors(seed):
    rng = random.Random(seed)
    if seed % 3 == 0:
        kw = {"ramp": parse_ramp((rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 60)))}
    elif seed % 3 == 1:
        thresholds = sorted(rng.sample(range(80), rng.randint(1, 4)))
        kw = {"schedule": parse_schedule({t: rng.randint(1, 9) for t in thresholds})}
    else:
        kw = {"constant": rng.randint(1, 9)}
    for _ in range(30):
        start, stop = rng.randint(0, 100), rng.randint(0, 100)
        assert factor_sum(start, stop, **kw) == sum(factor_at(p, **kw) for p in range(start, stop)), (kw, start, stop)


def test_window_size_cut_at_epoch_end():
    assert window_size(4, batch_idx=0, num_batches=10) == 4
    assert window_size(4, batch_idx=8, num_batches=10) == 2
    assert window_size(4, batch_idx=8, num_batches=float("inf")) == 4


def _lightning_loop(values, num_batches):
    """Lightning 2.6's automatic-optimization rules, written out: after micro-batch n it steps iff
    (n + 1) % A == 0 or n is the epoch's last; before n's backward it zeroes iff n % A == 0."""
    steps, zeros = [], []
    for n, a in enumerate(values):
        zeros.append(n % a == 0)
        steps.append((n + 1) % a == 0 or n == num_batches - 1)
    return steps, zeros


@pytest.mark.parametrize("seed", range(30))
def test_loop_value_lands_every_boundary(seed):
    """For random window sequences (any sizes, any alignment), Lightning's modulo rules driven by the returned values
    step exactly at window ends, never zero mid-window, and zero at window starts unless told to the caller."""
    rng = random.Random(seed)
    sizes = [rng.choice([1, 1, 2, 3, 4, 5, 7, 8]) for _ in range(rng.randint(1, 12))]
    num_batches = sum(sizes)
    values, loop_zeroes, want_step, starts = [], [], [], []
    n = 0
    for size in sizes:
        for k in range(size):
            v = loop_accumulate_value(batch_idx=n, position=k, window_size=size)
            values.append(v.accumulate)
            loop_zeroes.append(v.loop_zeroes)
            want_step.append(k == size - 1)
            starts.append(k == 0)
            n += 1
    steps, zeros = _lightning_loop(values, num_batches)
    assert steps == want_step
    for z, lz, s in zip(zeros, loop_zeroes, starts):
        assert z == lz
        assert not z or s  # Lightning never zeroes in the middle of a window
    # Aligned windows of a constant factor use the factor itself, as Trainer(accumulate_grad_batches=k) does.
    assert [loop_accumulate_value(batch_idx=i, position=i % 4, window_size=4).accumulate for i in range(8)] == [4] * 8


def test_loop_value_window_start_at_batch_one_needs_caller_zero():
    # A window of one, then a window of two starting at batch 1: no A makes Lightning zero at 1 without stepping.
    v = loop_accumulate_value(batch_idx=1, position=0, window_size=2)
    assert not v.loop_zeroes and (1 + 1) % v.accumulate != 0


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        ([1, 2, 3], TypeError, r"Invalid schedule \[1, 2, 3\]: must be a mapping"),
        ({1.5: 2}, TypeError, r"Invalid schedule threshold 1.5"),
    ],
)
def test_parse_schedule_type_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        parse_schedule(bad)


def test_loop_value_rejects_bad_window():
    with pytest.raises(ValueError, match="Invalid window"):
        loop_accumulate_value(batch_idx=0, position=2, window_size=2)


# ------------------------------------------------------------------------------------------ the window, no Trainer
import torch  # noqa: E402

from lightning_effi.callbacks.schedule import AccumulationWindow  # noqa: E402


def _drive(window, tokens_per_batch, *, num_batches=None, step0=0):
    """Run micro-batches through the window as the callback does; returns per window (size, effective weight of each
    micro-batch's summed loss after Lightning's division and the close fix)."""
    n = len(tokens_per_batch)
    num_batches = n if num_batches is None else num_batches
    out, step, cur = [], step0, []
    for b, tok in enumerate(tokens_per_batch):
        plan = window.start(batch_idx=b, num_batches=num_batches, is_last_batch=b == n - 1, step=step, epoch=0,
                            batch_size=2)
        loss = window.scale_loss(torch.ones((), dtype=torch.float64), samples=2, num_tokens=torch.tensor(tok))
        cur.append(float(loss) / plan.accumulate)  # Lightning divides by accumulate_grad_batches
        if window.ready_to_close():
            fix = window.close(torch.device("cpu"))
            fix = 1.0 if fix is None else float(fix)
            out.append((window.last_size, [w * fix for w in cur]))
            cur = []
            step += 1
        assert window.finish() == (not cur)
    return out


def test_window_token_weights_are_exact_without_a_trainer():
    tokens = [5, 3, 8, 1, 4, 6]
    w = AccumulationWindow(normalize="tokens", schedule=((0, 2), (2, 3)))
    windows = _drive(w, tokens)
    assert [s for s, _ in windows] == [2, 2, 2]  # step thresholds: factor 3 from step 2, cut at the epoch end
    i = 0
    for size, weights in windows:
        total = sum(tokens[i:i + size])
        assert weights == pytest.approx([1.0 / total] * size, rel=1e-12)  # grad(sum of token losses) / tokens
        i += size


def test_window_mean_weights_and_partial_window():
    w = AccumulationWindow(normalize="mean", schedule=((0, 3),))
    windows = _drive(w, [1] * 7)
    assert [s for s, _ in windows] == [3, 3, 1]
    for size, weights in windows:
        assert weights == pytest.approx([1.0 / size] * size)


def test_mean_window_runs_no_tensor_op_until_its_counts_are_read():
    """Under "mean" on one rank the counts only feed the logger: the micro-batches and the close issue no tensor op
    (each would be a launch in a host-paced step), and the counts read afterwards are the exact sums."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    w = AccumulationWindow(normalize="mean", schedule=((0, 4),))
    tokens = [torch.tensor(t) for t in (7, 0, 5, 9)]
    loss = torch.tensor(2.0, requires_grad=True) * 1
    with Ops() as seen:
        for b, n in enumerate(tokens):
            w.start(batch_idx=b, num_batches=8, is_last_batch=False, step=0, epoch=0, batch_size=3)
            assert w.scale_loss(loss, samples=3, num_tokens=n) is loss
        assert w.ready_to_close()
        assert w.close(torch.device("cpu")) is None
        assert w.finish()
    assert seen.ops == []
    assert w.last_counts.tolist() == [12.0, 21.0]
    assert w.last_size == 4 and w.samples_seen == 12


def test_steady_plans_match_the_loop_rule():
    """The plan an aligned window reuses after its first micro-batch is the one loop_accumulate_value gives, and
    the windows that start off their size's multiple (after the change to 2 at batch 3) get theirs computed."""
    w = AccumulationWindow(schedule=((0, 3), (1, 2)))
    step = 0
    for b in range(12):
        plan = w.start(batch_idx=b, num_batches=12, is_last_batch=b == 11, step=step, epoch=0, batch_size=1)
        want = loop_accumulate_value(batch_idx=b, position=w.pos, window_size=w.size)
        assert plan.accumulate == want.accumulate
        assert plan.zero_grad == (w.pos == 0 and not want.loop_zeroes)
        w.scale_loss(torch.ones(()), samples=1)
        if w.ready_to_close():
            w.close(torch.device("cpu"))
            step += 1
        w.finish()
    assert step == 6  # a window of 3, then of 2 from batch 3 (unaligned), and a last one of 1


def test_full_mean_window_leaves_the_loss_as_it_is():
    """Under "mean" with full, aligned windows the loop's own 1/k is the weight: the window multiplies by nothing,
    so a micro-batch adds no kernel or autograd node; a part of a split micro-batch is still weighted."""
    w = AccumulationWindow(normalize="mean", schedule=((0, 4),))
    w.start(batch_idx=0, num_batches=8, is_last_batch=False, step=0, epoch=0, batch_size=2)
    loss = torch.tensor(2.5, requires_grad=True) * 1  # a non-leaf, as a training_step's loss is
    assert w.scale_loss(loss, samples=2) is loss
    w.start(batch_idx=1, num_batches=8, is_last_batch=False, step=0, epoch=0, batch_size=2)
    half = w.scale_loss(loss, samples=1, part=0.5, last=False)
    assert half is not loss and float(half) == pytest.approx(1.25)


def test_token_position_lags_one_window_and_survives_a_checkpoint():
    inf = float("inf")
    w = AccumulationWindow(unit="token", schedule=((0, 1), (20, 2)))
    # positions read at window starts: 0, 0, 10, 20 (the window that closed last is not counted yet)
    assert [s for s, _ in _drive(w, [10] * 5, num_batches=inf)] == [1, 1, 1, 2]
    state = w.state_dict()
    assert all(isinstance(v, (int, float, bool)) for v in state.values())
    resumed = AccumulationWindow(unit="token", schedule=((0, 1), (20, 2)))
    resumed.load_state_dict(state)
    assert resumed.position(step=0, epoch=0) == w.position(step=0, epoch=0) == 30
