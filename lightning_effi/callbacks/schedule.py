"""Gradient-accumulation schedules: pure math, no Lightning.

A schedule maps a *position* (epochs, optimizer steps, samples or tokens seen so far, all ranks together) to an
accumulation *factor*: how many micro-batches each rank runs per optimizer step. Three ways to describe it:

* ``schedule={threshold: factor}``: piecewise constant. Before the first threshold the factor is 1.
* ``ramp=(start_factor, end_factor, length)``: the factor goes linearly from ``start_factor`` to ``end_factor`` over
  ``length`` units, in integer steps, then stays at ``end_factor`` (Megatron-LM's ``rampup_batch_size``, GPT-3's
  batch-size warm-up, expressed in micro-batches per rank).
* ``global_batch_size``: a constant factor ``global_batch_size / (micro_batch_size * data_parallel_size)``.

:func:`loop_accumulate_value` is the bridge to Lightning's loop arithmetic: Lightning decides window boundaries
with ``batch_idx % accumulate_grad_batches`` inside an epoch, which is only right when every window starts at a
multiple of its own size. It returns, per micro-batch, a value for ``accumulate_grad_batches`` that makes that
arithmetic land on the boundaries the schedule wants, wherever they fall.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

UNITS = ("epoch", "step", "sample", "token")
NORMALIZE = ("mean", "tokens")


def _as_int(value: object, what: str) -> int:
    # YAML gives strings for mapping keys ("1000": 4); bool is an int subclass but never a count.
    if isinstance(value, bool):
        raise TypeError(f"Invalid {what} {value!r}: must be an integer, not a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            raise TypeError(f"Invalid {what} {value!r}: must be an integer (e.g. 1000 or '1000')") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise TypeError(f"Invalid {what} {value!r}: must be an integer")


def parse_schedule(schedule: Mapping[int | str, int] | None) -> tuple[tuple[int, int], ...]:
    """Validate ``{threshold: factor}`` and return it as sorted ``((threshold, factor), ...)``.

    Thresholds must be non-negative and strictly increasing in the order given (a schedule written out of order is
    almost always a typo, so it is rejected rather than sorted); factors must be integers >= 1.
    """
    if schedule is None:
        return ()
    if not isinstance(schedule, Mapping):
        raise TypeError(f"Invalid schedule {schedule!r}: must be a mapping {{threshold: factor}}, e.g. {{0: 1, 1000: 4}}")
    if not schedule:
        raise ValueError("Invalid schedule {}: give at least one {threshold: factor} entry, or leave schedule=None")
    out: list[tuple[int, int]] = []
    for key, value in schedule.items():
        threshold = _as_int(key, "schedule threshold")
        factor = _as_int(value, f"accumulation factor for threshold {key!r}")
        if threshold < 0:
            raise ValueError(f"Invalid schedule threshold {key!r}: thresholds must be >= 0")
        if factor < 1:
            raise ValueError(f"Invalid accumulation factor {value!r} at threshold {key!r}: factors must be >= 1")
        if out and threshold <= out[-1][0]:
            raise ValueError(
                f"Invalid schedule threshold {key!r} after {out[-1][0]}: thresholds must be strictly increasing "
                f"(write the entries in increasing order, without duplicates)"
            )
        out.append((threshold, factor))
    return tuple(out)


def parse_ramp(ramp: Sequence[int] | None) -> tuple[int, int, int] | None:
    """Validate ``(start_factor, end_factor, length)``."""
    if ramp is None:
        return None
    if isinstance(ramp, (str, bytes)) or not isinstance(ramp, Sequence) or len(ramp) != 3:
        raise ValueError(f"Invalid ramp {ramp!r}: must be (start_factor, end_factor, length), e.g. (1, 8, 2000)")
    start = _as_int(ramp[0], "ramp start_factor")
    end = _as_int(ramp[1], "ramp end_factor")
    length = _as_int(ramp[2], "ramp length")
    if start < 1 or end < 1:
        raise ValueError(f"Invalid ramp {tuple(ramp)!r}: start_factor and end_factor must be >= 1")
    if length <= 0:
        raise ValueError(f"Invalid ramp length {ramp[2]!r}: must be > 0 units")
    return start, end, length


def ramp_factor(position: int, *, start: int, end: int, length: int) -> int:
    """Factor of a linear ramp at ``position``: integer steps, ``start`` at 0, ``end`` from ``length`` on.

    The factor moves towards ``end`` by ``floor(|end - start| * position / length)``, exactly as a linear ramp of the
    global batch in whole micro-batches (Megatron's ``rampup_batch_size`` with an increment of one micro-batch).
    """
    done = min(max(position, 0), length)
    delta = abs(end - start) * done // length
    return start + delta if end >= start else start - delta


def factor_at(position: int, *, schedule: tuple[tuple[int, int], ...] = (),
              ramp: tuple[int, int, int] | None = None, constant: int = 1) -> int:
    """Accumulation factor at ``position`` (a count in the schedule's unit).

    Args:
        position: epochs, optimizer steps, samples or tokens seen so far.
        schedule: output of :func:`parse_schedule`; the last threshold <= position wins, 1 before the first.
        ramp: output of :func:`parse_ramp`.
        constant: the factor when neither schedule nor ramp is given (from ``global_batch_size``).
    """
    if ramp is not None:
        return ramp_factor(position, start=ramp[0], end=ramp[1], length=ramp[2])
    if schedule:
        factor = 1
        for threshold, f in schedule:
            if position >= threshold:
                factor = f
            else:
                break
        return factor
    return constant


def factor_from_global_batch(global_batch_size: int, *, micro_batch_size: int, data_parallel_size: int) -> int:
    """``global_batch_size / (micro_batch_size * data_parallel_size)``; raises if it does not divide."""
    per_step = micro_batch_size * data_parallel_size
    if micro_batch_size < 1 or data_parallel_size < 1:
        raise ValueError(f"Invalid micro_batch_size {micro_batch_size!r} / data_parallel_size {data_parallel_size!r}")
    if global_batch_size % per_step != 0:
        lower = max(per_step, global_batch_size // per_step * per_step)
        raise ValueError(
            f"Invalid global_batch_size {global_batch_size}: not a multiple of micro_batch_size {micro_batch_size} x "
            f"data-parallel size {data_parallel_size} = {per_step}; use e.g. {lower} or {lower + per_step}, "
            f"or change the DataLoader batch_size"
        )
    return global_batch_size // per_step


@dataclass(frozen=True)
class LoopValue:
    """What to give Lightning's automatic loop for one micro-batch.

    Attributes:
        accumulate: value for ``trainer.accumulate_grad_batches`` during this micro-batch.
        loop_zeroes: whether Lightning's own ``batch_idx % accumulate == 0`` rule zeroes the gradients before this
            micro-batch's backward. When the window starts here and this is False, the caller must zero them.
    """

    accumulate: int
    loop_zeroes: bool


def loop_accumulate_value(*, batch_idx: int, position: int, window_size: int) -> LoopValue:
    """Pick ``accumulate_grad_batches`` so Lightning's modulo arithmetic lands on the wanted window boundary.

    Lightning 2.6 (``training_epoch_loop.py``/``optimization/automatic.py``) steps after micro-batch ``n`` (0-based
    within the epoch) iff ``(n + 1) % A == 0`` or ``n`` is the epoch's last batch, and zeroes gradients before its
    backward iff ``n % A == 0``. For a micro-batch at ``position`` (0-based) of a window of ``window_size`` we need:
    a step iff it is the window's last micro-batch, and no zeroing unless it is the window's first.

    ``A = window_size`` satisfies this whenever the window starts at a multiple of its size (the common case: a
    constant factor), so it is preferred and the loop looks exactly as with ``Trainer(accumulate_grad_batches=k)``.
    Otherwise (a window starting after a schedule change at an unaligned index) the choice is
    ``A = n + 1`` for the last micro-batch (divides n+1, and not n since n >= 1 there) and ``A = n + 2`` for the
    others (does not divide n+1; divides n only when n == 0, which is a window start). The loss division by ``A`` that
    Lightning then applies is undone by the caller.
    """
    if window_size < 1 or not 0 <= position < window_size or batch_idx < position:
        raise ValueError(f"Invalid window: batch_idx={batch_idx}, position={position}, window_size={window_size}")
    last = position == window_size - 1

    def fits(a: int) -> bool:
        steps = (batch_idx + 1) % a == 0
        zeroes = batch_idx % a == 0
        return steps == last and (position == 0 or not zeroes)

    if fits(window_size):
        a = window_size
    elif last:
        a = batch_idx + 1
    elif position == 0 and batch_idx >= 2:
        # Window start that is not its end: A = n divides n (Lightning zeroes) and not n + 1 (no step).
        a = batch_idx
    else:
        a = batch_idx + 2
    if not fits(a):  # pragma: no cover - the cases above are exhaustive; guard against future edits
        raise RuntimeError(f"No accumulate value for batch_idx={batch_idx}, position={position}, size={window_size}")
    return LoopValue(accumulate=a, loop_zeroes=batch_idx % a == 0)


def window_size(factor: int, *, batch_idx: int, num_batches: float) -> int:
    """Size of a window opening at ``batch_idx``: ``factor``, cut at the epoch end so no window straddles epochs."""
    if math.isinf(num_batches):
        return factor
    return max(1, min(factor, int(num_batches) - batch_idx))
