"""``AutoMicroBatch``: the largest micro-batch that fits, the accumulation that keeps the global batch fixed, and
recovery from an out-of-memory error at run time."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
from typing_extensions import override

from lightning_effi._compat import coalesced_all_reduce, default_store
from lightning_effi._host import device_scalar
from lightning_effi.callbacks._logging import metrics_due
from lightning_effi.callbacks._split import SplitSize, handoff, set_replaying, slice_batch
from lightning_effi.callbacks.accumulation import AccumulationScheduler
from lightning_effi.callbacks.failfast import FailFast, start_watchdog

_log = logging.getLogger(__name__)


def micro_batch_candidates(global_batch_size: int, *, data_parallel_size: int, max_micro_batch_size: int) -> list[int]:
    """Micro-batch sizes ``m <= max_micro_batch_size`` with ``m * data_parallel_size * factor == global_batch_size``
    for an integer factor, largest first."""
    if global_batch_size % data_parallel_size:
        raise ValueError(
            f"Invalid global_batch_size {global_batch_size}: not divisible by the data-parallel size "
            f"{data_parallel_size}; use a multiple of {data_parallel_size}"
        )
    per_rank = global_batch_size // data_parallel_size
    return [m for m in range(min(per_rank, max_micro_batch_size), 0, -1) if per_rank % m == 0]


def _allowed_cuda_memory(device: torch.device) -> int:
    """Bytes this process may allocate: the device total times ``set_per_process_memory_fraction``'s cap."""
    total = torch.cuda.get_device_properties(device).total_memory
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return int(total * (get_fraction(device) if get_fraction is not None else 1.0))


class AutoMicroBatch(AccumulationScheduler):
    """Pick the largest micro-batch that fits in memory, accumulate to a fixed global batch, and recover from an
    out-of-memory error at run time.

    Given ``global_batch_size`` (samples per optimizer step over all ranks), the micro-batch ``m`` is the largest
    divisor of ``global_batch_size / data_parallel_size`` that is at most ``max_micro_batch_size`` and, on CUDA,
    survives a probe; the accumulation factor is then ``global_batch_size / (m * data_parallel_size)``, with all of
    :class:`AccumulationScheduler`'s exact-window machinery (this class is one, with ``global_batch_size`` set). The
    train DataLoader yields batches of ``m`` (the ``loader_batch_size``); the window counts them.

    **The probe** (CUDA, at ``on_fit_start``, before the train DataLoader is built) sets the batch-size attribute
    (``batch_arg_name`` on the module, its hparams or the datamodule, as Lightning's ``BatchSizeFinder`` finds it),
    builds the train DataLoader, and runs ``training_step`` + backward on one batch per candidate, largest first.
    A candidate is accepted when it raises no ``torch.OutOfMemoryError`` and its peak allocated memory stays within
    ``memory_fraction`` of what the process may allocate (device total x ``set_per_process_memory_fraction``): the
    rest is headroom for what one forward/backward does not allocate (optimizer state is created at the first step;
    fragmentation). Every rank probes the same candidate at the same time and a candidate is taken only when every
    rank accepted it (the verdicts are exchanged through the job's key-value store, with a deadline: under FSDP2 or
    DeepSpeed a rank that ran out of memory inside a collective of the sharded forward leaves the others waiting in
    it, and that ends the job with an error naming ``max_micro_batch_size`` instead of a hang). Gradients are dropped
    after each probe; weights are never stepped. On CPU there is nothing to probe against (the process grows into
    swap rather than failing), so ``max_micro_batch_size`` is required there and taken as the memory limit.

    **At run time** (``on_oom="split"``, the default on CUDA with one device or DDP): a ``torch.OutOfMemoryError``
    in the forward or backward of a loader batch frees what the failed attempt held (its activations and autograd
    graph, the allocator cache), halves the part size (down to ``min_micro_batch_size``) and goes on running the
    batch in parts of that size, so the optimizer step sees the gradient it would have seen without the error: the
    same samples with the same weights (each part weighted by its share of the batch's samples under
    ``normalize="mean"``, which is exact for a loss that is a mean over samples; the identical token-normalised
    gradient under ``normalize="tokens"``). After an error in a forward the gradients already accumulated are kept
    (a forward does not touch them); after an error in a backward, which may have added part of a gradient, the
    window is replayed: gradients are zeroed and the window's earlier batches run again, in parts, from references
    kept until the window closes. A replayed or non-final part does not call ``self.log`` (values logged by
    ``training_step`` are those of a batch's last part) and skips ``on_before_backward``/``on_after_backward``, which
    run once per loader batch as without a split; module buffers (BatchNorm statistics) are restored after a replay,
    and ``lightning_effi.callbacks.replaying(module)`` tells a ``training_step`` that counts samples or tokens itself
    that the batch was counted already (the example models use it).
    ``grow_after`` clean optimizer steps later the part size doubles (up to the loader batch); an error soon after a
    growth doubles the wait before the next. Past the floor the error is raised again with the smallest size tried.
    The part size is logged (``automicrobatch/micro_batch_size``, ``automicrobatch/oom_recoveries``) and saved in
    checkpoints: a resumed run keeps the loader batch it had and starts at the saved part size.

    Under DDP every rank accumulates locally (DDP's reducer does not run inside backward, where an out-of-memory
    error on one rank would leave the others waiting in a bucket's all-reduce for ever); at the window's end the
    ranks agree on the part size over a CPU (gloo) group and the gradients are averaged in one coalesced all-reduce.
    The cost is the overlap DDP has between the last backward and its all-reduces: the reduction runs after the
    backward instead (``on_oom="raise"`` keeps DDP's own reducer and its ``ddp_comm_hook``, which ``"split"``
    refuses). A rank past the floor raises; in either mode a fail-fast watchdog (as
    :class:`~lightning_effi.callbacks.FailFast`) ends the others.

    Under FSDP2 and DeepSpeed, whose collectives run inside forward and backward, a run-time split cannot be made;
    ``on_oom="raise"`` (their default, and the CPU default) raises ``torch.OutOfMemoryError`` naming the micro-batch
    and ``max_micro_batch_size`` to lower, and the strategies' fail-fast watchdog ends every other rank.

    Args:
        global_batch_size: samples per optimizer step, all ranks.
        max_micro_batch_size: upper bound for the micro-batch (required on CPU). Default ``None`` (the per-rank
            global batch).
        batch_arg_name: the attribute that sets the DataLoader's batch size. Default ``"batch_size"``.
        memory_fraction: CUDA probe acceptance threshold on peak allocated memory. Default 0.85.
        normalize: as in :class:`AccumulationScheduler`. Default ``"mean"``.
        on_oom: ``"split"`` (recover as above) or ``"raise"``. Default ``None``: ``"split"`` on CUDA with a single
            device or DDP, else ``"raise"``.
        min_micro_batch_size: the smallest part a split goes down to. Default 1.
        grow_after: clean optimizer steps before a split part doubles again; ``None`` keeps it. Default 100.
    """

    def __init__(
        self,
        global_batch_size: int,
        *,
        max_micro_batch_size: int | None = None,
        batch_arg_name: str = "batch_size",
        memory_fraction: float = 0.85,
        normalize: Literal["mean", "tokens"] = "mean",
        on_oom: Literal["split", "raise"] | None = None,
        min_micro_batch_size: int = 1,
        grow_after: int | None = 100,
    ) -> None:
        super().__init__(global_batch_size=global_batch_size, normalize=normalize)
        if max_micro_batch_size is not None and not _positive_int(max_micro_batch_size):
            raise ValueError(f"Invalid max_micro_batch_size {max_micro_batch_size!r}: must be an integer >= 1")
        if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float)) \
                or not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"Invalid memory_fraction {memory_fraction!r}: must be in (0, 1]")
        if on_oom not in (None, "split", "raise"):
            raise ValueError(f"Invalid on_oom {on_oom!r}: must be 'split', 'raise' or None (split where it can)")
        if not _positive_int(min_micro_batch_size):
            raise ValueError(f"Invalid min_micro_batch_size {min_micro_batch_size!r}: must be an integer >= 1")
        if grow_after is not None and not _positive_int(grow_after):
            raise ValueError(f"Invalid grow_after {grow_after!r}: must be an integer >= 1 (optimizer steps) or None")
        self.max_micro_batch_size = max_micro_batch_size
        self.batch_arg_name = batch_arg_name
        self.memory_fraction = memory_fraction
        self.on_oom = on_oom
        self.min_micro_batch_size = min_micro_batch_size
        self.grow_after = grow_after
        self.loader_batch_size: int | None = None  # the train DataLoader's batch, after on_fit_start
        self.probed: dict[int, str] = {}  # candidate -> "ok" / "oom" / "over memory_fraction"
        self.split: SplitSize | None = None  # the run-time part size (on_oom="split")
        self.recoveries: list[dict[str, Any]] = []  # one entry per out-of-memory error recovered from
        self._mode = "raise"
        self._restored: dict[str, Any] | None = None
        self._records: list[_Record] = []
        self._base_grads: list[tuple[Any, torch.Tensor]] | None = None
        self._window_ooms = 0
        self._ddp: Any = None
        self._cpu_group: Any = None
        self._watchdog: Any = None
        self._module: LightningModule | None = None
        self._fit_started = False  # on_fit_start chose the loader batch in this fit

    @property
    def micro_batch_size(self) -> int | None:
        """Samples per forward/backward now: the loader batch, or the part size of a split."""
        if self.split is not None:
            return self.split.size
        return self.loader_batch_size

    # ------------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._mode = self._resolve_mode(trainer)
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._module = pl_module
        if not lightning_hasattr(pl_module, self.batch_arg_name):
            raise ValueError(
                f"AutoMicroBatch(batch_arg_name={self.batch_arg_name!r}): neither the LightningModule, its hparams nor "
                f"the datamodule has that attribute; give the name of the attribute that sets the train batch size"
            )
        if self.max_micro_batch_size is None and not self._can_probe(trainer):
            raise ValueError(
                f"AutoMicroBatch needs max_micro_batch_size on {trainer.strategy.root_device.type} with "
                f"{type(trainer.strategy).__name__}: the OOM probe runs only on CUDA; pass "
                f"AutoMicroBatch({self.global_batch_size}, max_micro_batch_size=N)"
            )
        if self._mode == "raise":
            self._install_backward_message(trainer)

    def _resolve_mode(self, trainer: Trainer) -> str:
        strategy = trainer.strategy
        plain = _plain_strategy(strategy)
        if self.on_oom is None:
            return "split" if plain and strategy.root_device.type == "cuda" else "raise"
        if self.on_oom == "split":
            if not plain:
                raise ValueError(
                    f"AutoMicroBatch(on_oom='split') with {type(strategy).__name__}: its collectives run inside "
                    "forward and backward, so one rank cannot re-run a micro-batch in parts while the others wait; "
                    "use on_oom='raise' (an out-of-memory error then ends every rank, naming the micro-batch), or a "
                    "single device / strategy='ddp'"
                )
            _loss_scaler(trainer.precision_plugin)  # refuses a precision plugin whose loss scaling is unknown
            if getattr(strategy, "_ddp_comm_hook", None) is not None:
                raise ValueError(
                    "AutoMicroBatch(on_oom='split') with DDPStrategy(ddp_comm_hook=...): the split averages the "
                    "gradients itself at the window's end, so the hook would not run; use on_oom='raise' to keep "
                    "DDP's reducer and its hook"
                )
        return self.on_oom

    @staticmethod
    def _can_probe(trainer: Trainer) -> bool:
        return trainer.strategy.root_device.type == "cuda"

    @override
    def _install_training_step(self, pl_module: LightningModule) -> None:
        if self._original_training_step is not None:
            return
        original = pl_module.training_step
        if self._mode == "split":
            def training_step(*args: Any, **kwargs: Any) -> Any:
                return self._run_batch(original, args, kwargs)
        else:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                try:
                    output = original(*args, **kwargs)
                except torch.OutOfMemoryError as e:
                    raise self._raise_mode_error(e, "forward") from e
                return self._after_training_step(output, args, kwargs)

        self._original_training_step = original
        pl_module.training_step = functools.wraps(original)(training_step)  # type: ignore[method-assign]

    def _install_backward_message(self, trainer: Trainer) -> None:
        strategy = trainer.strategy
        backward = strategy.backward

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return backward(*args, **kwargs)
            except torch.OutOfMemoryError as e:
                raise self._raise_mode_error(e, "backward") from e

        strategy.backward = wrapped  # type: ignore[method-assign]

    def _raise_mode_error(self, error: BaseException, where: str) -> torch.OutOfMemoryError:
        trainer = self._trainer
        strategy = type(trainer.strategy).__name__ if trainer is not None else "this strategy"
        step = trainer.global_step if trainer is not None else 0
        m = self.micro_batch_size or 0
        why = ("a run-time split is not possible there: its collectives run inside forward and backward"
               if trainer is not None and not _plain_strategy(trainer.strategy)
               else "on_oom='raise' does not split at run time")
        return torch.OutOfMemoryError(
            f"AutoMicroBatch: out of memory in the {where} of a micro-batch of {m} samples under {strategy} at "
            f"optimizer step {step}; {why}. Lower the micro-batch: AutoMicroBatch({self.global_batch_size}, "
            f"max_micro_batch_size={max(1, m // 2)}). The error was: {error}"
        )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            vars(trainer.strategy).pop("backward", None)
            if self._ddp is not None:
                self._ddp.require_backward_grad_sync = True
                self._ddp = None
            if self._watchdog is not None:
                self._watchdog.stop()
                self._watchdog = None
            self._records.clear()
            self._base_grads = None
            self._module = None
            self._fit_started = False
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._watchdog is not None:
            self._watchdog.post(exception)

    # ------------------------------------------------------------------------------------------------- probe
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dp = self._data_parallel_size(trainer)
        assert self.global_batch_size is not None  # required by the constructor
        limit = self.max_micro_batch_size or self.global_batch_size
        candidates = micro_batch_candidates(self.global_batch_size, data_parallel_size=dp, max_micro_batch_size=limit)
        restored = self._restored
        if restored is not None and restored.get("loader_batch_size") in candidates:
            chosen = int(restored["loader_batch_size"])  # the resumed run keeps its loader batch
        elif self._can_probe(trainer):
            chosen = self._probe_all(trainer, pl_module, candidates)
        else:
            chosen = candidates[0]
        self.loader_batch_size = chosen
        self.window.micro_batch_size = chosen  # the window derives the factor from it
        lightning_setattr(pl_module, self.batch_arg_name, chosen)
        if self._mode == "split":
            self.split = SplitSize(chosen, floor=self.min_micro_batch_size, grow_after=self.grow_after)
            if restored is not None and restored.get("split") and restored.get("loader_batch_size") == chosen:
                self.split.load_state_dict(restored["split"])
        self._restored = None
        self._fit_started = True

    def _probe_all(self, trainer: Trainer, pl_module: LightningModule, candidates: list[int]) -> int:
        agree = _ProbeAgreement(trainer) if trainer.world_size > 1 else None
        for m in candidates:
            verdict = self._probe(trainer, pl_module, m)
            self.probed[m] = verdict
            if agree is not None:
                verdict = agree.verdict(m, verdict, self.global_batch_size)
            if verdict == "ok":
                return m
        raise RuntimeError(
            f"AutoMicroBatch: even a micro-batch of {candidates[-1]} does not fit "
            f"(probes: {self.probed}); reduce the model or sequence length"
        )

    def _probe(self, trainer: Trainer, pl_module: LightningModule, m: int) -> str:
        lightning_setattr(pl_module, self.batch_arg_name, m)
        datamodule = getattr(trainer, "datamodule", None)
        source = datamodule if datamodule is not None else pl_module
        batch = next(iter(source.train_dataloader()))
        got = extract_batch_size(batch)
        if got != m:
            raise RuntimeError(
                f"AutoMicroBatch set {self.batch_arg_name}={m} but the train DataLoader gave a batch of {got} "
                f"(a dataset smaller than the micro-batch, or a loader that ignores {self.batch_arg_name!r}); "
                f"give max_micro_batch_size <= the dataset size, or the right batch_arg_name"
            )
        device = trainer.strategy.root_device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        verdict = "ok"
        try:
            self._probe_step(trainer, pl_module, trainer.strategy.batch_to_device(batch))
            if cuda:
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device)
                if peak > self.memory_fraction * _allowed_cuda_memory(device):
                    verdict = "over memory_fraction"
        except torch.OutOfMemoryError:
            verdict = "oom"
        finally:
            batch = None
            pl_module.zero_grad(set_to_none=True)
            _reshard(pl_module)
            if cuda:
                torch.cuda.empty_cache()
        return verdict

    def _probe_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """One forward + backward of the unwrapped ``training_step`` (no accumulation bookkeeping, no logging).

        Buffers (BatchNorm statistics, token counters) and the RNG are restored afterwards so that training is the
        same as without the probe.
        """
        step = self._original_training_step or pl_module.training_step
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        engine = _deepspeed_engine(trainer)
        try:
            with _buffers_kept(pl_module):
                with _silenced_log(pl_module), trainer.precision_plugin.forward_context():
                    out = step(batch, 0)
                loss: Any = out["loss"] if isinstance(out, dict) else out
                if engine is not None:  # ZeRO's gradient hooks expect its own backward; its partitions are zeroed after
                    engine.backward(loss)
                else:
                    loss.backward()
        finally:
            if engine is not None and getattr(engine, "optimizer", None) is not None:
                engine.optimizer.zero_grad(set_to_none=True)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    # ------------------------------------------------------------------------------------------ run time
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.world_size < 2:
            return
        if not any(isinstance(c, FailFast) for c in getattr(trainer, "callbacks", ())):
            # an out-of-memory error that ends one rank ends the others too, whatever on_oom says
            self._watchdog = start_watchdog(trainer.strategy)
        if self._mode != "split":
            return
        from torch.nn.parallel import DistributedDataParallel

        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            # Local accumulation for every micro-batch; the window's end reduces (see _reduce_grads).
            self._ddp = model
            model.require_backward_grad_sync = False
        self._cpu_group = _cpu_group()

    def _run_batch(self, original: Any, args: tuple, kwargs: dict) -> Any:
        """One loader batch: in parts of ``split.size``, counted by the window; the last part's loss goes back to
        the loop, whose backward reaches :meth:`_final_backward` through the hand-off."""
        assert self.split is not None
        w = self.window
        opening = w.pos == 0
        if opening:  # a window opens: the previous one's batches and a resumed base are done with
            self._records.clear()
            self._base_grads = None
            self._window_ooms = 0
        batch = kwargs["batch"] if "batch" in kwargs else args[0]
        rec = _Record(args, kwargs, extract_batch_size(batch))
        self._records.append(rec)
        rows, start = rec.rows, 0
        earlier: list[torch.Tensor] = []  # detached weighted losses of the parts before the last
        tokens: Any = None
        # At a window's start the loop zeroes the gradients after training_step, before its backward: the previous
        # window's gradients wait aside while the parts run, go back for the loop to zero, and the parts' gradients
        # are added in the last part's backward.
        previous: list[tuple[Any, torch.Tensor]] | None = None
        while True:
            failed: BaseException | None = None
            in_backward, stop = False, start
            try:
                while True:
                    stop = min(start + self.split.size, rows)
                    last = stop == rows
                    output = self._call(original, rec, start, stop, log=last)
                    if output is None:
                        if start == 0 and last:
                            w.pos += 1
                            return None
                        raise RuntimeError(
                            "AutoMicroBatch: training_step returned None for a part of a split micro-batch; a split "
                            "batch must give a loss for every part (skip a batch before the split, or on_oom='raise')")
                    loss, n, extra = self._unpack(output)
                    weighted = w.scale_loss(loss, samples=stop - start, num_tokens=n, part=(stop - start) / rows,
                                            last=last)
                    rec.multiplier, rec.accumulate = w.multiplier, w.accumulate
                    if n is not None:
                        tokens = n if tokens is None else tokens + n
                    if last:
                        value = weighted.detach()
                        for e in earlier:
                            value = value + e
                        aside = []
                        if previous is not None:
                            aside = self._set_aside()
                            for p, g in previous:
                                p.grad = g
                        job = functools.partial(self._final_backward, rec, [weighted], aside)
                        return self._repack(output, extra, handoff(value, job), tokens)
                    earlier.append(weighted.detach())
                    if opening and previous is None:
                        previous = self._set_aside()
                    in_backward = True
                    self._backward(weighted, rec.accumulate)
                    in_backward = False
                    start = stop
            except torch.OutOfMemoryError as e:
                failed = e.with_traceback(None)  # the traceback's frames would keep the failed graph alive
            output = loss = weighted = None  # type: ignore[assignment]  # drop the failed attempt's tensors
            self._recover(failed, "backward" if in_backward else "forward")
            if in_backward:  # the part's backward may have added to some gradients: rebuild the window's
                self._replay(rec, upto=stop)
                start = stop

    def _set_aside(self) -> list[tuple[Any, torch.Tensor]]:
        assert self._module is not None
        aside = [(p, p.grad) for p in self._module.parameters() if p.grad is not None]
        for p, _ in aside:
            p.grad = None
        return aside

    def _final_backward(self, rec: _Record, holder: list[torch.Tensor], aside: list[tuple[Any, torch.Tensor]],
                        grad: torch.Tensor) -> None:
        """The backward of a batch's last part, with the gradient the loop applied (accumulation division, loss
        scale); after an out-of-memory error the graph is dropped and the window replayed in smaller parts."""
        for p, g in aside:
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        aside.clear()
        failed: BaseException | None = None
        try:
            torch.autograd.backward(holder.pop(), grad)
            return
        except torch.OutOfMemoryError as e:
            failed = e.with_traceback(None)
        self._recover(failed, "backward")
        self._replay(rec, upto=rec.rows)

    def _replay(self, current: _Record, *, upto: int) -> None:
        """Gradients from zero (or the resumed window's base): every recorded batch of the window in parts of the
        current size, uncounted, the current one up to row ``upto``; smaller again on another error."""
        assert self.split is not None and self._module is not None
        module = self._module
        # Buffers (BatchNorm statistics) already saw these batches: what the replay does to them is undone.
        set_replaying(module, True)
        try:
            with _buffers_kept(module):
                self._replay_window(current, upto)
        finally:
            set_replaying(module, False)

    def _replay_window(self, current: _Record, upto: int) -> None:
        assert self.split is not None and self._module is not None
        while True:
            failed: BaseException | None = None
            try:
                for p in self._module.parameters():
                    p.grad = None
                for p, g in self._base_grads or ():
                    p.grad = g.clone()
                for rec in self._records:
                    rows = upto if rec is current else rec.rows
                    for start in range(0, rows, self.split.size):
                        self._replay_part(rec, start, min(start + self.split.size, rows))
                    if rec is current:
                        break
                return
            except torch.OutOfMemoryError as e:
                failed = e.with_traceback(None)
            self._recover(failed, "replay")

    def _replay_part(self, rec: _Record, start: int, stop: int) -> None:
        """Forward and backward of rows ``start:stop`` of a recorded batch, with its weights (its own frame: after an
        error nothing here outlives the cleared traceback)."""
        with torch.enable_grad():
            with self._forward_context():
                loss, _, _ = self._unpack(self._call(self._original_training_step, rec, start, stop, log=False))
            self._backward(self.window.weigh(loss, rec.multiplier, (stop - start) / rec.rows), rec.accumulate)

    def _recover(self, error: BaseException | None, where: str) -> None:
        """Free what the failed attempt held and halve the part size; past the floor, raise."""
        assert error is not None and self.split is not None
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        before = self.split.size
        if not self.split.shrink():
            raise torch.OutOfMemoryError(
                f"AutoMicroBatch: out of memory in the {where} even at {before} samples per forward/backward, "
                f"the floor (min_micro_batch_size={self.min_micro_batch_size}; loader batch "
                f"{self.loader_batch_size}, smallest tried {self.split.smallest}). Reduce the model, the sequence "
                f"length or the activation memory (checkpointing). The error was: {error}"
            ) from error
        self._window_ooms += 1
        step = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        self.recoveries.append({"step": step, "rank": rank, "where": where, "from": before, "to": self.split.size,
                                "free_s": time.perf_counter() - t0})
        _log.warning("[rank %d] AutoMicroBatch: out of memory in the %s at optimizer step %d; running micro-batches "
                     "of %d in parts of %d", rank, where, step, self.loader_batch_size, self.split.size)

    def _call(self, original: Any, rec: _Record, start: int, stop: int, *, log: bool) -> Any:
        batch = rec.kwargs["batch"] if "batch" in rec.kwargs else rec.args[0]
        part = slice_batch(batch, start, stop, rec.rows)
        if "batch" in rec.kwargs:
            args, kwargs = rec.args, {**rec.kwargs, "batch": part}
        else:
            args, kwargs = (part, *rec.args[1:]), rec.kwargs
        if log:
            return original(*args, **kwargs)
        assert self._module is not None
        with _silenced_log(self._module):
            return original(*args, **kwargs)

    def _unpack(self, output: Any) -> tuple[torch.Tensor, Any, Any]:
        """``(loss, num_tokens, the dict or None)``; a split needs a loss from every part."""
        unpacked = self._unpack_output(output)
        if unpacked is None:
            raise RuntimeError(f"AutoMicroBatch(on_oom='split'): training_step returned {type(output).__name__}; "
                               "return a loss tensor or a dict with 'loss'")
        return unpacked[0], unpacked[1], output if isinstance(output, Mapping) else None

    @staticmethod
    def _repack(output: Any, extra: Any, loss: torch.Tensor, tokens: Any) -> Any:
        if extra is None:
            return loss
        out = {**extra, "loss": loss}
        if tokens is not None:
            out["num_tokens"] = tokens
        return out

    def _backward(self, weighted: torch.Tensor, accumulate: int) -> None:
        """A part's backward as the loop would run it: divided by its accumulation value, scaled by the precision
        plugin's loss scaler, outside autocast."""
        trainer, module = self._trainer, self._module
        assert trainer is not None and module is not None
        loss = _loss_scaler(trainer.precision_plugin)(weighted / accumulate)
        with torch.autocast(trainer.strategy.root_device.type, enabled=False):
            module.backward(loss)

    def _forward_context(self) -> Any:
        assert self._trainer is not None
        return self._trainer.precision_plugin.forward_context()

    @override
    def _restore_window(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super()._restore_window(trainer, pl_module)
        if self._mode == "split":  # a replay in this window starts from the restored partial gradients
            self._base_grads = [(p, p.grad.clone()) for p in pl_module.parameters() if p.grad is not None]

    @override
    def _close_window(self, trainer: Trainer, pl_module: LightningModule, *, fix_grads: bool) -> None:
        if self.split is not None and not self.window.closed:
            ooms = self._window_ooms
            if trainer.world_size > 1:
                # The ranks agree on the part size (the smallest) and on whether any rank recovered, over a CPU
                # group: host values, no wait for the device.
                agreed = torch.tensor([self.split.size, -ooms], dtype=torch.int64)
                dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self._cpu_group)
                size, ooms = (int(v) for v in agreed.numpy())
                ooms = -ooms
                self.split.adopt(size)
                if self._ddp is not None:
                    _reduce_grads(pl_module, self._ddp.process_group, trainer.world_size)
            if ooms == 0:
                self.split.step_done()
            self._window_ooms = 0
        super()._close_window(trainer, pl_module, fix_grads=fix_grads)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ended = self.window.is_open and self.window.pos >= self.window.size
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if ended and self.split is not None and metrics_due(trainer):
            device = trainer.strategy.root_device
            pl_module.log("automicrobatch/micro_batch_size", device_scalar(self.split.size, device), on_step=True,
                          on_epoch=False)
            pl_module.log("automicrobatch/oom_recoveries", device_scalar(self.split.ooms, device), on_step=True,
                          on_epoch=False)

    # ------------------------------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "chosen_micro_batch_size": self.loader_batch_size or 0,
                "split": self.split.state_dict() if self.split is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._fit_started and self.loader_batch_size:
            # Restored after on_fit_start (DeepSpeed restores after setup): the loader was built with this run's
            # choice, and the window's factor must follow it.
            self.window.micro_batch_size = self.loader_batch_size
            return
        self._restored = {"loader_batch_size": state_dict.get("chosen_micro_batch_size") or None,
                          "split": state_dict.get("split")}


class _Record:
    """A loader batch of the open window: its training_step arguments and its weights, for a replay."""

    __slots__ = ("args", "kwargs", "rows", "multiplier", "accumulate")

    def __init__(self, args: tuple, kwargs: dict, rows: int) -> None:
        self.args, self.kwargs, self.rows = args, kwargs, rows
        self.multiplier: Any = 1.0
        self.accumulate = 1


class _ProbeAgreement:
    """Probe verdicts exchanged through the job's key-value store, with a deadline.

    A rank that ran out of memory inside a collective of a sharded forward leaves the other ranks waiting in that
    collective: they never post. Past the deadline the waiting rank raises, naming the setting, and the fail-fast
    watchdog ends the rest.
    """

    TIMEOUT_S = 120.0
    # Probes started in this process: the same on every rank of an SPMD program, so keys of an earlier fit in the
    # same job (the store outlives a fit) are never read as this one's.
    started = 0

    def __init__(self, trainer: Trainer) -> None:
        self.store = default_store()
        self.rank, self.world = trainer.global_rank, trainer.world_size
        _ProbeAgreement.started += 1
        self.generation = _ProbeAgreement.started
        self.round = 0

    def verdict(self, m: int, mine: str, global_batch_size: int | None) -> str:
        if self.store is None:  # pragma: no cover - a multi-process run always has one
            raise RuntimeError("AutoMicroBatch: no key-value store to agree on the probe over")
        self.round += 1
        prefix = f"lightning_effi/automicrobatch/probe/{self.generation}/{self.round}"
        self.store.set(f"{prefix}/{self.rank}", mine.encode())
        keys = [f"{prefix}/{r}" for r in range(self.world)]
        deadline = time.monotonic() + self.TIMEOUT_S
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
                raise torch.OutOfMemoryError(
                    f"AutoMicroBatch: probing a micro-batch of {m}, rank {self.rank} found {mine!r} while rank(s) "
                    f"{missing} gave no verdict within {self.TIMEOUT_S:.0f} s (out of memory inside a collective of "
                    f"the sharded forward leaves the others waiting in it). Give the size: AutoMicroBatch("
                    f"{global_batch_size}, max_micro_batch_size={max(1, m // 2)})"
                )
            time.sleep(0.01)
        verdicts = [self.store.get(k).decode() for k in keys]
        return "ok" if all(v == "ok" for v in verdicts) else next(v for v in verdicts if v != "ok")


def _positive_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= 1


def _plain_strategy(strategy: Any) -> bool:
    """One device or DDP: forward and backward run no collective of the strategy's own."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    return type(strategy) in (SingleDeviceStrategy, DDPStrategy)


def _loss_scaler(plugin: Any) -> Any:
    """What the precision plugin's ``pre_backward`` does to a loss: its scaler's ``scale`` (Lightning's
    ``MixedPrecision``, ``LossScalingPrecision``) or nothing (a plugin that keeps ``Precision.pre_backward``)."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from lightning_effi.plugins.precision import LossScalingPrecision

    scaler = getattr(plugin, "scaler", None)
    if isinstance(plugin, (MixedPrecision, LossScalingPrecision)):
        return scaler.scale if scaler is not None else _identity
    if type(plugin).pre_backward is Precision.pre_backward:
        return _identity
    raise ValueError(
        f"AutoMicroBatch(on_oom='split') with the precision plugin {type(plugin).__name__}: its pre_backward "
        "changes the loss in a way a split cannot repeat for each part; use on_oom='raise', or Lightning's "
        "precision flags / LossScalingPrecision"
    )


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def _silenced_log(module: LightningModule) -> Iterator[None]:
    """``self.log`` as a no-op: a probe or a replayed part must not log (only the training loop accepts it, and a
    split batch logs once)."""
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        if "log" in vars(module):
            del module.log


@contextlib.contextmanager
def _buffers_kept(module: torch.nn.Module) -> Iterator[None]:
    """Module buffers as they were before the block (a probe or a replay must not count its batches again)."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def _deepspeed_engine(trainer: Trainer) -> Any:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return trainer.strategy.model if isinstance(trainer.strategy, DeepSpeedStrategy) else None


def _reshard(module: torch.nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state after a probe (an out-of-memory error mid-forward leaves the
    module it hit unsharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _cpu_group() -> Any:
    """A gloo group over the world for host-value agreement (the default group when it is gloo already)."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def _reduce_grads(module: LightningModule, group: Any, world: int) -> None:
    """Average the gradients over the ranks as DDP's reducer would (divide, then sum), in one coalesced all-reduce
    per dtype. A parameter without a gradient on this rank contributes zeros, so every rank reduces the same list."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        torch._foreach_div_(grads, float(world))
        coalesced_all_reduce(grads, group)
