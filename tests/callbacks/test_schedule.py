"""Pure schedule math (no Lightning): factors, ramps, global batch, and the loop-driving value."""

from __future__ import annotations

import random

import pytest

from lightning_effi.callbacks.schedule import (
    factor_at,
    factor_from_global_batch,
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
