"""AutoMicroBatch: micro-batch choice (explicit max on CPU, OOM probe) and the accumulation that keeps the global
batch fixed."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_effi.callbacks import AutoMicroBatch
from lightning_effi.callbacks.microbatch import micro_batch_candidates
from tests.callbacks._toy import TinyLM, make_batches
from tests.callbacks.test_accumulation import StepRecorder, _max_diff, _weights

N_SAMPLES = 24


def _samples() -> list[dict]:
    rows = make_batches(N_SAMPLES, batch_size=1, max_len=6, seed=31)
    return [{k: v[0] for k, v in r.items()} for r in rows]


class SizedLM(TinyLM):
    """Builds its own loader from ``self.batch_size`` (what AutoMicroBatch sets); counts probe-visible state."""

    def __init__(self, oom_above: int | None = None, **kw) -> None:
        super().__init__(loss_reduction="mean", **kw)
        self.batch_size = 1
        self.oom_above = oom_above
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.shapes: list[int] = []

    def train_dataloader(self):
        return DataLoader(_samples(), batch_size=self.batch_size, shuffle=False)

    def training_step(self, batch, batch_idx):
        b = batch["input_ids"].shape[0]
        if self.oom_above is not None and b > self.oom_above:
            raise torch.OutOfMemoryError(f"fake OOM at micro-batch {b}")
        self.seen += b
        self.shapes.append(b)
        self.log("train/b", float(b))  # must be harmless during the probe
        torch.rand(1)  # consumes RNG: the probe must restore it
        return super().training_step(batch, batch_idx)


def _trainer(callbacks) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def test_candidates_are_divisors_largest_first():
    assert micro_batch_candidates(48, data_parallel_size=2, max_micro_batch_size=10) == [8, 6, 4, 3, 2, 1]
    assert micro_batch_candidates(12, data_parallel_size=1, max_micro_batch_size=100) == [12, 6, 4, 3, 2, 1]
    with pytest.raises(ValueError, match=r"Invalid global_batch_size 10: not divisible by the data-parallel size 4"):
        micro_batch_candidates(10, data_parallel_size=4, max_micro_batch_size=8)


def test_cpu_explicit_max_sets_micro_and_factor():
    rec = StepRecorder()
    m = SizedLM()
    cb = AutoMicroBatch(12, max_micro_batch_size=5)
    _trainer([cb, rec]).fit(m)
    assert cb.micro_batch_size == 4 and m.batch_size == 4  # largest divisor of 12 that is <= 5
    assert set(m.shapes) == {4}
    assert rec.sizes == [3, 3]  # 12 = 4 x 1 rank x 3
    assert rec.logged[-1]["accumulation/global_batch_samples"] == 12
    assert cb.probed == {}  # no probe on CPU


def test_cpu_without_max_is_refused():
    with pytest.raises(ValueError, match=r"AutoMicroBatch needs max_micro_batch_size on cpu with SingleDeviceStrategy"):
        _trainer([AutoMicroBatch(12)]).fit(SizedLM())
    with pytest.raises(ValueError, match=r"batch_arg_name='bs'"):
        _trainer([AutoMicroBatch(12, max_micro_batch_size=4, batch_arg_name="bs")]).fit(SizedLM())
    with pytest.raises(ValueError, match=r"Invalid max_micro_batch_size 0"):
        AutoMicroBatch(12, max_micro_batch_size=0)
    with pytest.raises(ValueError, match=r"Invalid memory_fraction 1.5"):
        AutoMicroBatch(12, memory_fraction=1.5)


class ProbingOnCPU(AutoMicroBatch):
    """The probe's selection logic on CPU: OOM is injected by the module; memory is not measured."""

    @staticmethod
    def _can_probe(trainer) -> bool:
        return True


def test_probe_picks_largest_that_fits_and_leaves_no_trace():
    m = SizedLM(oom_above=3)
    reference = SizedLM(oom_above=3)
    before = _weights(m)
    rec = StepRecorder()
    cb = ProbingOnCPU(12)
    torch.manual_seed(123)
    _trainer([cb, rec]).fit(m)
    assert cb.probed == {12: "oom", 6: "oom", 4: "oom", 3: "ok"}
    assert cb.micro_batch_size == 3 and rec.sizes == [4, 4]
    # The probe ran one forward/backward of size 3; its token counter, RNG use and logging left no trace: the same
    # training with the micro-batch fixed by hand gives identical weights and counters.
    from lightning_effi.callbacks import AccumulationScheduler

    reference.batch_size = 3
    torch.manual_seed(123)
    _trainer([AccumulationScheduler({0: 4})]).fit(reference)
    assert int(m.seen) == int(reference.seen) == N_SAMPLES
    assert _max_diff(_weights(m), _weights(reference)) == 0.0
    assert _max_diff(before, _weights(m)) > 0  # it did train


@pytest.mark.gpu
def test_cuda_probe_real_oom():
    """On a GPU with memory capped, the chosen micro-batch fits and the next larger divisor does not."""
    import torch.nn.functional as F

    class Big(SizedLM):
        def __init__(self) -> None:
            super().__init__()
            self.wide = torch.nn.Linear(6, 1 << 20)  # ~4 MiB fp32 activation per token, ~24 MiB per sample

        def train_dataloader(self):
            rows = [{"input_ids": torch.randint(0, 13, (6,)), "labels": torch.zeros(6, dtype=torch.long)}
                    for _ in range(960)]
            return DataLoader(rows, batch_size=self.batch_size, shuffle=False)

        def training_step(self, batch, batch_idx):
            self.shapes.append(batch["input_ids"].shape[0])
            x = F.one_hot(batch["input_ids"] % 6, 6).float()
            return self.wide(x).square().mean()

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = (3 << 30) / total  # cap this process at ~3 GiB
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    try:
        m = Big()
        cb = AutoMicroBatch(240)  # default memory_fraction=0.85: headroom for the real step
        Trainer(accelerator="cuda", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, callbacks=[cb]).fit(m)
        chosen = cb.micro_batch_size
        assert chosen is not None and cb.probed[chosen] == "ok"
        larger = [c for c in cb.probed if c > chosen]
        assert larger and all(cb.probed[c] in ("oom", "over memory_fraction") for c in larger)
        assert 240 % chosen == 0 and chosen < 240
        # Training then ran two full windows at the chosen size without OOM (earlier entries are the probes).
        n_train = 2 * 240 // chosen
        assert len(m.shapes) == len(cb.probed) + n_train and set(m.shapes[-n_train:]) == {chosen}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
