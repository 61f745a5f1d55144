"""``AutoMicroBatch``: the largest micro-batch that fits, and the accumulation that keeps the global batch fixed."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
from typing_extensions import override

from lightning_effi.callbacks.accumulation import AccumulationScheduler


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
    """Pick the largest micro-batch that fits in memory and accumulate to a fixed global batch.

    Given ``global_batch_size`` (samples per optimizer step over all ranks), the micro-batch ``m`` is the largest
    divisor of ``global_batch_size / data_parallel_size`` that is at most ``max_micro_batch_size`` and, on CUDA,
    survives a probe; the accumulation factor is then ``global_batch_size / (m * data_parallel_size)``, with all of
    :class:`AccumulationScheduler`'s exact-window machinery (this class is one, with ``global_batch_size`` set).

    The probe (CUDA, at ``on_fit_start``, before the train DataLoader is built) sets the batch-size attribute
    (``batch_arg_name`` on the module, its hparams or the datamodule, as Lightning's ``BatchSizeFinder`` finds it),
    builds the train DataLoader, and runs ``training_step`` + backward on one batch per candidate, largest first.
    A candidate is accepted when it raises no ``torch.OutOfMemoryError`` and its peak allocated memory stays within
    ``memory_fraction`` of what the process may allocate (device total x ``set_per_process_memory_fraction``): the
    rest is headroom for what one forward/backward does not allocate
    (optimizer state is created at the first step; fragmentation). Gradients are dropped after each probe; weights are
    never stepped.

    On CPU there is nothing to probe against (the process grows into swap rather than failing), so
    ``max_micro_batch_size`` is required and taken as the memory limit. Sharded strategies (FSDP, DeepSpeed) run
    collectives inside forward/backward, where an OOM on one rank would hang the others; there too the probe is not
    run and ``max_micro_batch_size`` is required.

    Args:
        global_batch_size: samples per optimizer step, all ranks.
        max_micro_batch_size: upper bound for the micro-batch (required on CPU and with sharded strategies).
            Default ``None`` (the per-rank global batch).
        batch_arg_name: the attribute that sets the DataLoader's batch size. Default ``"batch_size"``.
        memory_fraction: CUDA probe acceptance threshold on peak allocated memory. Default 0.85.
        normalize: as in :class:`AccumulationScheduler`. Default ``"mean"``.
    """

    def __init__(
        self,
        global_batch_size: int,
        *,
        max_micro_batch_size: int | None = None,
        batch_arg_name: str = "batch_size",
        memory_fraction: float = 0.85,
        normalize: Literal["mean", "tokens"] = "mean",
    ) -> None:
        super().__init__(global_batch_size=global_batch_size, normalize=normalize)
        if max_micro_batch_size is not None and (
            isinstance(max_micro_batch_size, bool) or not isinstance(max_micro_batch_size, int)
            or max_micro_batch_size < 1
        ):
            raise ValueError(f"Invalid max_micro_batch_size {max_micro_batch_size!r}: must be an integer >= 1")
        if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float)) \
                or not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"Invalid memory_fraction {memory_fraction!r}: must be in (0, 1]")
        self.max_micro_batch_size = max_micro_batch_size
        self.batch_arg_name = batch_arg_name
        self.memory_fraction = memory_fraction
        self.micro_batch_size: int | None = None  # the choice, after on_fit_start
        self.probed: dict[int, str] = {}  # candidate -> "ok" / "oom" / "over memory_fraction"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not lightning_hasattr(pl_module, self.batch_arg_name):
            raise ValueError(
                f"AutoMicroBatch(batch_arg_name={self.batch_arg_name!r}): neither the LightningModule, its hparams nor "
                f"the datamodule has that attribute; give the name of the attribute that sets the train batch size"
            )
        if self.max_micro_batch_size is None and not self._can_probe(trainer):
            raise ValueError(
                f"AutoMicroBatch needs max_micro_batch_size on {trainer.strategy.root_device.type} with "
                f"{type(trainer.strategy).__name__}: the OOM probe runs only on CUDA with a single device or DDP; pass "
                f"AutoMicroBatch({self.global_batch_size}, max_micro_batch_size=N)"
            )

    @staticmethod
    def _can_probe(trainer: Trainer) -> bool:
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        plain = type(strategy) in (SingleDeviceStrategy, DDPStrategy)
        return strategy.root_device.type == "cuda" and plain

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dp = self._data_parallel_size(trainer)
        assert self.global_batch_size is not None  # required by the constructor
        limit = self.max_micro_batch_size or self.global_batch_size
        candidates = micro_batch_candidates(self.global_batch_size, data_parallel_size=dp, max_micro_batch_size=limit)
        chosen = None
        if self._can_probe(trainer):
            for m in candidates:
                verdict = self._probe(trainer, pl_module, m)
                self.probed[m] = verdict
                if trainer.world_size > 1:
                    # Every rank must pick the same size: accept only if all ranks accepted.
                    flag = torch.tensor([0 if verdict == "ok" else 1], device=trainer.strategy.root_device)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    verdict = "ok" if int(flag) == 0 else verdict
                if verdict == "ok":
                    chosen = m
                    break
            if chosen is None:
                raise RuntimeError(
                    f"AutoMicroBatch: even a micro-batch of {candidates[-1]} does not fit "
                    f"(probes: {self.probed}); reduce the model or sequence length"
                )
        else:
            chosen = candidates[0]
        self.micro_batch_size = chosen
        self.window.micro_batch_size = chosen  # the window derives the factor from it
        lightning_setattr(pl_module, self.batch_arg_name, chosen)

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
            if cuda:
                torch.cuda.empty_cache()
        return verdict

    def _probe_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """One forward + backward of the unwrapped ``training_step`` (no accumulation bookkeeping, no logging).

        Buffers (BatchNorm statistics, token counters) and the RNG are restored afterwards so that training is the
        same as without the probe.
        """
        step = self._original_training_step or pl_module.training_step
        buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        # training_step may call self.log, which only the training loop accepts: silence it for the probe.
        log, pl_module.log = pl_module.log, lambda *a, **k: None  # type: ignore[method-assign]
        try:
            with trainer.precision_plugin.forward_context():
                out = step(batch, 0)
            loss: Any = out["loss"] if isinstance(out, dict) else out
            loss.backward()
        finally:
            if "log" in vars(pl_module):
                del pl_module.log
            del log
            with torch.no_grad():
                for name, b in pl_module.named_buffers():
                    b.copy_(buffers[name])
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "chosen_micro_batch_size": self.micro_batch_size or 0}
