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
from typing import Any

import torch
from torch import Tensor

from lightning_effi._host import HostMirror

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
        raise TypeError(
            f"Invalid schedule {schedule!r}: must be a mapping {{threshold: factor}}, e.g. {{0: 1, 1000: 4}}")
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


def factor_sum(start: int, stop: int, *, schedule: tuple[tuple[int, int], ...] = (),
               ramp: tuple[int, int, int] | None = None, constant: int = 1) -> int:
    """``sum(factor_at(p) for p in range(start, stop))``: the micro-batches per rank of the optimizer steps
    ``start .. stop - 1`` of a step-keyed schedule, in time proportional to the number of factor changes (a progress
    bar asks at every step of a run that may have millions).

    Args:
        start, stop: positions (optimizer steps); an empty range sums to 0.
        schedule, ramp, constant: as for :func:`factor_at`.
    """
    if stop <= start:
        return 0
    if ramp is not None:
        first, last, length = ramp
        span = abs(last - first)
        # ramp_factor moves by d once span * position >= d * length: the change points are ceil(d * length / span)
        changes = [-(-d * length // span) for d in range(1, span + 1)]
    else:
        changes = [threshold for threshold, _ in schedule]
    total, at = 0, start
    for edge in [c for c in changes if start < c < stop] + [stop]:
        if edge > at:
            total += factor_at(at, schedule=schedule, ramp=ramp, constant=constant) * (edge - at)
            at = edge
    return total


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


# ------------------------------------------------------------------------------------------ the window state machine
# Count vector of a window, summed over data-parallel ranks: [samples, valid tokens] (float64: exact below 2**53).
_SAMPLES, _TOKENS = 0, 1


@dataclass(frozen=True)
class MicroBatchPlan:
    """What the caller does for one micro-batch before its ``training_step``.

    Attributes:
        accumulate: value for ``trainer.accumulate_grad_batches`` (see :func:`loop_accumulate_value`).
        zero_grad: the caller zeroes the gradients itself (the one window start Lightning's rule cannot zero).
        engine_factor: when not None, tell an engine-side accumulator the new window size.
    """

    accumulate: int
    zero_grad: bool
    engine_factor: int | None


class AccumulationWindow:
    """The accumulation window of :class:`~lightning_effi.callbacks.AccumulationScheduler`, free of Lightning.

    One window is the run of micro-batches (per rank) whose gradients make one optimizer step:
    :meth:`start` before each micro-batch (opens a window when none is open), :meth:`scale_loss` on each
    micro-batch's loss before its backward, :meth:`close` after the window's last backward (returns the gradient fix),
    :meth:`finish` at the end of that micro-batch. Host values are Python numbers; everything derived from the
    data (token counts, the ``normalize="tokens"`` scales) stays on the device, so no method reads a device value
    on the host, with one documented exception: ``unit="token"`` positions (see :meth:`position`).

    Args:
        unit, normalize, schedule, ramp, global_batch_size: as for ``AccumulationScheduler`` (schedule and ramp as
            returned by :func:`parse_schedule` / :func:`parse_ramp`).
        data_parallel_size: ranks whose micro-batches add up to the global batch.
        reduce_sum: in-place sum of a tensor over those ranks (None: a single rank).
    """

    def __init__(self, *, unit: str = "step", normalize: str = "mean", schedule: tuple[tuple[int, int], ...] = (),
                 ramp: tuple[int, int, int] | None = None, global_batch_size: int | None = None,
                 data_parallel_size: int = 1, reduce_sum=None) -> None:
        self.unit, self.normalize = unit, normalize
        self.schedule, self.ramp, self.global_batch_size = schedule, ramp, global_batch_size
        self.data_parallel_size = data_parallel_size
        self.reduce_sum = reduce_sum
        self.needs_tokens = normalize == "tokens" or unit == "token"
        self.micro_batch_size = 0
        self.reset()

    @property
    def counts_every_window(self) -> bool:
        """Whether each window's counts are summed (and reduced over ranks) when it closes. Otherwise they are only
        what the logger reads: the token counts are kept as they came and summed the first time ``last_counts`` is
        read, so a window that no one looks at adds no device work (a host-paced step pays for every launch)."""
        return self.normalize == "tokens" or self.unit == "token" or (
            self.reduce_sum is not None and self.data_parallel_size > 1)  # the ranks reduce together, every window

    def reset(self) -> None:
        self.is_open = False
        self.closed = False  # the open window's counts were reduced and its gradients fixed
        self.pos = 0  # micro-batches whose training_step ran in the open window
        self.size = 0  # micro-batches in the open window
        self.opened_size = 0  # the size it opened with (an unsized loader may end it early)
        self.accumulate = 1  # last value given to the loop
        self.multiplier: Any = 1.0  # loss multiplier of the current micro-batch (a device tensor with tokens)
        self.scale: Any = None  # normalize="tokens": the provisional per-token scale s of the open window
        self._prev_tokens: Any = 0  # see prev_tokens; None: the lazily summed last_counts hold it
        self.samples_seen = 0  # all ranks, closed windows (host: micro-batch sizes x data-parallel size)
        self.tokens_seen = 0  # all ranks, windows folded into the host count (unit="token": one window behind)
        # closed windows not folded into tokens_seen yet: ("count", n) or ("copy", HostMirror sequence number)
        self.pending_tokens: list[tuple[str, int]] = []
        self.engine_factor = 0  # last size reported through MicroBatchPlan.engine_factor
        self.win_samples = 0  # this rank, open window
        self._tokens: list[Any] = []  # this rank, open window: each micro-batch's count (int or device tensor)
        self._last_counts: Any = None  # see last_counts
        self._closed_parts: tuple[int, list[Any], torch.device] | None = None  # a closed window's, not summed yet
        self._steady: MicroBatchPlan | None = None  # the plan of every later micro-batch of an aligned window
        self._opened_at = 0  # batch index of the open window's first micro-batch
        self.last_size = 0
        self.has_closed = False  # a window closed in this run (or before the checkpoint it resumed from)
        self.saw_tokens = False  # training_step returned a token count
        self._mirror = HostMirror(slots=4)
        self._sample_checks: dict[int, int] = {}  # mirror sequence number -> samples the host derived

    @property
    def win_tokens(self) -> Any:
        """Valid tokens of the open window on this rank: an int, or a device tensor once a micro-batch gave one."""
        return _total(self._tokens)

    @win_tokens.setter
    def win_tokens(self, value: Any) -> None:
        self._tokens = [value] if isinstance(value, Tensor) or value else []

    @property
    def last_counts(self) -> Any:
        """``[samples, tokens]`` of the last closed window, all ranks (a float64 device tensor; None before one)."""
        if self._closed_parts is not None:
            samples, parts, device = self._closed_parts
            self._closed_parts = None
            self._last_counts = self._sum([samples, _total(parts)], device=device)
        return self._last_counts

    @property
    def prev_tokens(self) -> Any:
        """Valid tokens (all ranks) of the last closed window: an int or a device tensor."""
        if self._prev_tokens is None:
            counts = self.last_counts
            return 0 if counts is None else counts[_TOKENS]
        return self._prev_tokens

    @prev_tokens.setter
    def prev_tokens(self, value: Any) -> None:
        self._prev_tokens = value

    # -------------------------------------------------------------------------------------------- position
    def position(self, *, step: int, epoch: int) -> int:
        """Where the schedule is read. ``"token"``: valid tokens of every window closed before the last one (the
        last window's count is still being copied to the host when the next opens, so positions lag one window;
        reading it one window later never waits for work issued after it)."""
        if self.unit == "epoch":
            return epoch
        if self.unit == "step":
            return step
        if self.unit == "sample":
            return self.samples_seen
        while len(self.pending_tokens) > 1:
            self.tokens_seen += self._pending_count(self.pending_tokens.pop(0))
        return self.tokens_seen

    def _pending_count(self, entry: tuple[str, int]) -> int:
        kind, value = entry
        return value if kind == "count" else int(self._mirror.get(value)[_TOKENS])

    def factor(self, *, step: int, epoch: int) -> int:
        if self.global_batch_size is not None:
            return factor_from_global_batch(self.global_batch_size, micro_batch_size=self.micro_batch_size,
                                            data_parallel_size=self.data_parallel_size)
        return factor_at(self.position(step=step, epoch=epoch), schedule=self.schedule, ramp=self.ramp)

    # -------------------------------------------------------------------------------------------- per micro-batch
    def start(self, *, batch_idx: int, num_batches: float, is_last_batch: bool, step: int, epoch: int,
              batch_size: int, engine_accumulates: bool = False) -> MicroBatchPlan:
        """Before a micro-batch's ``training_step``: open a window if none is open, pick the loop value."""
        if self.is_open:
            return self.advance(batch_idx=batch_idx, is_last_batch=is_last_batch,
                                engine_accumulates=engine_accumulates)
        engine_factor = None
        if not self.micro_batch_size:
            self.micro_batch_size = batch_size
        size = window_size(self.factor(step=step, epoch=epoch), batch_idx=batch_idx, num_batches=num_batches)
        self.is_open, self.closed, self.pos = True, False, 0
        self.size = self.opened_size = size
        self.win_samples, self._tokens, self._opened_at = 0, [], batch_idx
        # A window that starts at a multiple of its size gives the loop its size at every micro-batch and no
        # zeroing after the first (see loop_accumulate_value): the later micro-batches reuse one plan.
        self._steady = MicroBatchPlan(accumulate=size, zero_grad=False, engine_factor=None) \
            if batch_idx % size == 0 else None
        if self.normalize == "tokens":
            self.scale = _inverse_or_one(self.prev_tokens) if self.has_closed else None
        if size != self.engine_factor:
            engine_factor = self.engine_factor = size
        return self._plan(batch_idx=batch_idx, is_last_batch=is_last_batch, engine_accumulates=engine_accumulates,
                          engine_factor=engine_factor)

    def advance(self, *, batch_idx: int, is_last_batch: bool, engine_accumulates: bool = False) -> MicroBatchPlan:
        """:meth:`start` for a micro-batch of the open window (which needs no schedule position to be read)."""
        steady = self._steady
        if steady is not None and self.pos > 0 and batch_idx == self._opened_at + self.pos and \
                not (is_last_batch and self.pos < self.size - 1):
            return steady  # the loop value and the loss multiplier are those of the window's first micro-batch
        return self._plan(batch_idx=batch_idx, is_last_batch=is_last_batch, engine_accumulates=engine_accumulates,
                          engine_factor=None)

    def _plan(self, *, batch_idx: int, is_last_batch: bool, engine_accumulates: bool,
              engine_factor: int | None) -> MicroBatchPlan:
        if self.pos >= self.size:  # pragma: no cover - guarded by finish()
            raise RuntimeError(f"AccumulationScheduler: window overrun at batch {batch_idx} (position {self.pos})")
        if is_last_batch and self.pos < self.size - 1:
            # Unsized loader ended inside the window: close it here; close() rescales what it accumulated.
            self.size = self.pos + 1
            self._steady = None
        value = loop_accumulate_value(batch_idx=batch_idx, position=self.pos, window_size=self.size)
        self.accumulate = value.accumulate
        zero = self.pos == 0 and not value.loop_zeroes and not engine_accumulates
        # Lightning divides the loss by `accumulate`; multiply it back and apply the weight we want.
        if self.normalize == "tokens":
            # the data-parallel average divides by dp; the fix at close() does the rest
            weight = value.accumulate * self.data_parallel_size
            self.multiplier = None if self.scale is None else _mul(self.scale, weight)
        else:
            self.multiplier = value.accumulate / self.opened_size
        return MicroBatchPlan(accumulate=value.accumulate, zero_grad=zero, engine_factor=engine_factor)

    def scale_loss(self, loss: Tensor, *, samples: int, num_tokens: Any = None, part: float = 1.0,
                   last: bool = True) -> Tensor:
        """Right after ``training_step`` (before backward): count the micro-batch and return its weighted loss.

        ``num_tokens`` (int or integer tensor) is required when tokens are needed (``normalize="tokens"`` or
        ``unit="token"``); the caller checks the training-step protocol. A micro-batch run in parts (an
        out-of-memory split) calls this once per part: ``part`` is the part's share of the micro-batch's samples
        (its weight under ``normalize="mean"``; token sums need none) and ``last`` marks the part that ends it.
        """
        if last:
            self.pos += 1
        self.win_samples += samples
        if num_tokens is not None:
            # Kept as given and summed when the window's count is read: no device op per micro-batch.
            self._tokens.append(num_tokens if isinstance(num_tokens, Tensor) else int(num_tokens))
            self.saw_tokens = True
            if self.normalize == "tokens" and self.scale is None:
                n = num_tokens.detach().reshape(()) if isinstance(num_tokens, Tensor) else int(num_tokens)
                # First window of the run: no previous total to set the provisional scale from. Estimate it from
                # this micro-batch (summed over ranks) x window size, so even the first window's loss has the
                # magnitude of a per-token mean (what fp16 loss scaling expects). One extra reduction, once.
                first = self._sum([n], like=loss)[0] / part
                self.scale = (first * self.size).clamp(min=1).reciprocal()
                self.multiplier = self.scale * (self.accumulate * self.data_parallel_size)
        return self.weigh(loss, self.multiplier, part)

    def weigh(self, loss: Tensor, multiplier: Any, part: float = 1.0) -> Tensor:
        """``loss`` times a micro-batch's ``multiplier`` (a float or a device tensor) and, under
        ``normalize="mean"``, the share ``part`` of its samples; the product is taken in the loss dtype."""
        m = multiplier if part == 1.0 or self.normalize == "tokens" else multiplier * part
        if isinstance(m, Tensor):
            return loss * m.to(loss.dtype)
        # A full window under "mean" weighs by exactly 1: the product would be the same loss, for one more kernel
        # and autograd node per micro-batch (host time in a step the host bounds).
        return loss if m == 1.0 else loss * m

    def ready_to_close(self) -> bool:
        return self.is_open and not self.closed and self.pos >= self.size

    def close(self, device: torch.device) -> Any:
        """After the window's last backward: reduce its counts over ranks and return the gradient multiplier
        (None: leave the gradients as they are; else a float or a 0-dim device tensor)."""
        derived = self.win_samples * self.data_parallel_size
        self.samples_seen += derived
        self.last_size = self.size
        self.closed = self.has_closed = True
        if not self.counts_every_window:
            self._closed_parts, self._tokens = (self.win_samples, self._tokens, device), []
            self._last_counts = self._prev_tokens = None
            return self.opened_size / self.size if self.size != self.opened_size else None
        counts = self._sum([self.win_samples, self.win_tokens], device=device)
        fix: Any = None
        if self.normalize == "tokens":
            # Gradients hold s * grad(sum of token losses); divide by s * (valid tokens, all ranks).
            fix = (self.scale * counts[_TOKENS].clamp(min=1)).reciprocal()
        elif self.size != self.opened_size:
            fix = self.opened_size / self.size  # each micro-batch was weighted 1/opened_size, not 1/size
        self.prev_tokens = counts[_TOKENS]
        if self.unit == "token":
            self.pending_tokens.append(("copy", self._mirror.push(counts)))
        elif self.unit == "sample" and self.data_parallel_size > 1:
            self._check_samples(self._mirror.push(counts), derived)
        self._closed_parts, self._last_counts = None, counts
        return fix

    def _check_samples(self, seq: int, derived: int) -> None:
        """unit="sample" counts micro-batch size x data-parallel size on the host; compare with the true all-rank
        count once its copy has landed (non-blocking), so unequal per-rank batches are named, not silently wrong."""
        self._sample_checks[seq] = derived
        for k in sorted(self._sample_checks):
            if k < self._mirror.pushed - self._mirror.slots:  # overwritten before it was looked at
                del self._sample_checks[k]
                continue
            got = self._mirror.peek(k)
            if got is None:
                break
            want = self._sample_checks.pop(k)
            if int(got[_SAMPLES]) != want:
                raise RuntimeError(
                    f"AccumulationScheduler(unit='sample') counts micro-batch size x {self.data_parallel_size} ranks "
                    f"= {want} samples per window, but the ranks' micro-batches add up to {int(got[_SAMPLES])}: they "
                    "differ in size across ranks. Use equal per-rank batches (Lightning's DistributedSampler gives "
                    "them), or unit='step'/'token'."
                )

    def finish(self) -> bool:
        """At the end of a micro-batch: True when it ended the window (which must have been closed)."""
        if not (self.is_open and self.pos >= self.size):
            return False
        self.is_open = False
        return True

    def _sum(self, values: list[Any], *, like: Tensor | None = None, device: torch.device | None = None) -> Tensor:
        device = device if device is not None else like.device  # type: ignore[union-attr]
        t = torch.stack([v.to(device, torch.float64) if isinstance(v, Tensor)
                         else torch.full((), float(v), dtype=torch.float64, device=device) for v in values])
        if self.reduce_sum is not None and self.data_parallel_size > 1:
            self.reduce_sum(t)
        return t

    # -------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (device values are read: a sync, as any checkpoint)."""
        pending = [self._pending_count(e) for e in self.pending_tokens]
        return {
            "open": self.is_open, "pos": self.pos, "size": self.size, "opened_size": self.opened_size,
            "accumulate": self.accumulate, "multiplier": _as_float(self.multiplier),
            "scale": 1.0 if self.scale is None else _as_float(self.scale), "scale_set": self.scale is not None,
            "prev_tokens": int(_as_float(self.prev_tokens)), "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen + sum(pending[:-1]), "pending_tokens": pending[-1] if pending else 0,
            "has_pending_tokens": bool(pending),
            "micro_batch_size": self.micro_batch_size, "has_closed": self.has_closed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.is_open, self.pos, self.size = state["open"], state["pos"], state["size"]
        self.opened_size, self.accumulate = state["opened_size"], state["accumulate"]
        self.multiplier = state["multiplier"]
        self.scale = state["scale"] if state.get("scale_set", True) else None
        self.prev_tokens = int(state["prev_tokens"])
        self.samples_seen = state["samples_seen"]
        self.tokens_seen = state["tokens_seen"]
        self.pending_tokens = [("count", int(state["pending_tokens"]))] if state.get("has_pending_tokens") else []
        self.micro_batch_size = state["micro_batch_size"]
        self.closed = False
        self.has_closed = state.get("has_closed", self.prev_tokens > 0 or self.samples_seen > 0)
        self.engine_factor = 0  # engines do not checkpoint a changed factor: set it again

    def window_counts(self, device: torch.device) -> Tensor:
        """This rank's counts of the open window, [samples, tokens] (device)."""
        return torch.stack([torch.full((), float(self.win_samples), dtype=torch.float64, device=device),
                            torch.as_tensor(self.win_tokens, dtype=torch.float64).to(device).reshape(())])


def _total(parts: list[Any]) -> Any:
    """Sum of token counts: an int, or a 0-dim device tensor when any part is one (one stack and one sum)."""
    tensors = [p.detach().reshape(()) for p in parts if isinstance(p, Tensor)]
    ints = sum(p for p in parts if not isinstance(p, Tensor))
    if not tensors:
        return ints
    total = tensors[0] if len(tensors) == 1 else torch.stack(tensors).sum()
    return total + ints if ints else total


def _inverse_or_one(v: Any) -> Any:
    """1 / v for v > 0, else 1 (a window without valid tokens); device tensors stay on the device."""
    if isinstance(v, Tensor):
        return torch.where(v > 0, v.reciprocal(), torch.ones_like(v))
    return 1.0 / v if v > 0 else 1.0


def _as_float(v: Any) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


def _mul(a: Any, b: float) -> Any:
    return a * b
