"""AutoMicroBatch(on_oom="split"): out-of-memory errors injected in the forward or the backward of chosen micro-batches
are recovered from by running the batch in parts, and training ends where the run without the errors ends."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lightning_effi.callbacks import AccumulationScheduler, AutoMicroBatch, TrainingHealthMonitor
from lightning_effi.callbacks._split import SplitSize, slice_batch
from lightning_effi.plugins import LossScalingPrecision
from tests.callbacks._toy import ListLoader, TinyLM, make_batches
from tests.callbacks.test_accumulation import _max_diff, _weights

N_SAMPLES = 48
TOL = 2e-6  # fp32: the parts' gradients are summed in another order than the whole batch's


def _samples(seed: int = 7) -> list[dict]:
    rows = make_batches(N_SAMPLES, batch_size=1, max_len=7, seed=seed)  # padded, very uneven token counts
    return [{k: v[0] for k, v in r.items()} for r in rows]


class OOMLM(TinyLM):
    """Raises ``torch.OutOfMemoryError`` in the forward or the backward of chosen micro-batches larger than a part.

    ``oom`` maps ``(optimizer step, batch_idx)`` to ``("forward" | "backward", largest size that fits)``; the
    backward error comes from a hook on an inner activation, after the head's gradients were already accumulated.
    """

    def __init__(self, oom: dict | None = None, reduction: str = "mean", rank: int | None = None,
                 resumable: bool = True, **kw) -> None:
        super().__init__(loss_reduction=reduction, **kw)
        self.resumable = resumable  # False: a plain DataLoader, which Lightning shards over DDP ranks
        self.batch_size = 8
        self.oom = dict(oom or {})
        self.oom_rank = rank  # None: every rank
        self.parts: list[tuple[int, int, int]] = []  # (step, batch_idx, rows) of every training_step call
        self.raised: list[tuple[int, int, str, int]] = []

    def train_dataloader(self):
        loader = DataLoader(_samples(), batch_size=self.batch_size, shuffle=False)
        # resumable mid-epoch (Lightning restores its position), so a mid-window checkpoint resumes exactly
        return ListLoader(list(loader)) if self.resumable else loader

    def forward(self, input_ids, hook=None):  # a module's forward: FSDP2 gathers the parameters around it
        h = torch.tanh(self.net.mix(self.net.emb(input_ids)))
        if hook is not None:
            h.register_hook(hook)
        return self.net.head(h)

    def training_step(self, batch, batch_idx):
        rows = batch["input_ids"].shape[0]
        step = self.trainer.global_step
        self.parts.append((step, batch_idx, rows))
        where, fits = self.oom.get((step, batch_idx), (None, rows))
        if self.oom_rank is not None and self.global_rank != self.oom_rank:
            where = None
        if where == "forward" and rows > fits:
            self.raised.append((step, batch_idx, where, rows))
            raise torch.OutOfMemoryError(f"injected: forward of {rows} rows")
        hook = None
        if where == "backward" and rows > fits:
            def hook(grad, rows=rows):
                self.raised.append((step, batch_idx, "backward", rows))
                raise torch.OutOfMemoryError(f"injected: backward of {rows} rows")

        logits = self(batch["input_ids"], hook)
        loss_sum = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     batch["labels"].reshape(-1), ignore_index=-100, reduction="sum")
        n = (batch["labels"] != -100).sum()
        if self.loss_reduction == "sum":
            return {"loss": loss_sum, "num_tokens": n}
        return loss_sum / (rows * batch["labels"].shape[1])  # a mean over samples (x a constant): exact under "mean"


class Sizes(Callback):
    """The part size at each optimizer step."""

    def __init__(self, cb: AutoMicroBatch) -> None:
        self.cb, self.sizes = cb, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.cb.window.pos == 0 or not self.cb.window.is_open:
            self.sizes.append(self.cb.split.size)


def _fit(module, cb, *, extra=(), plugins=(), max_steps=-1, epochs=1, ckpt=None, **kw) -> Trainer:
    kw.setdefault("enable_checkpointing", False)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=epochs, max_steps=max_steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb, *extra], plugins=list(plugins), **kw)
    trainer.fit(module, ckpt_path=ckpt)
    return trainer


def _auto(normalize: str = "mean", **kw) -> AutoMicroBatch:
    # 48 samples, loader batch 8, global batch 16: factor 2, three optimizer steps per epoch
    return AutoMicroBatch(16, max_micro_batch_size=8, normalize=normalize, on_oom="split", **kw)


def _reference(normalize: str = "mean", optimizer: str = "sgd", **kw) -> dict:
    m = OOMLM(reduction="sum" if normalize == "tokens" else "mean", optimizer=optimizer)
    _fit(m, AccumulationScheduler({0: 2}, normalize=normalize), **kw)
    return _weights(m)


@pytest.mark.parametrize("normalize", ["mean", "tokens"])
@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("batch_idx", [0, 3])  # the first micro-batch of a window, and the last one of another
def test_injected_oom_gives_the_parameters_of_the_run_without_it(normalize, where, batch_idx):
    reference = _reference(normalize)
    m = OOMLM({(batch_idx // 2, batch_idx): (where, 4)}, reduction="sum" if normalize == "tokens" else "mean")
    cb = _auto(normalize, grow_after=None)
    _fit(m, cb)
    assert m.raised == [(batch_idx // 2, batch_idx, where, 8)]
    assert cb.split.size == 4 and cb.split.ooms == 1
    assert [(r["where"], r["from"], r["to"]) for r in cb.recoveries] == [(where, 8, 4)]
    # after the error every batch runs in two parts of 4
    after = [rows for step, b, rows in m.parts if b > batch_idx]
    assert after and set(after) == {4}
    assert _max_diff(_weights(m), reference) < TOL
    assert _max_diff(_weights(OOMLM()), reference) > 1e-3  # it trained


def test_backward_oom_late_in_a_window_replays_its_earlier_batches():
    """The error hits the second batch of a window after the head's gradients got part of its contribution: the
    window is rebuilt from its first batch (re-run in parts), not patched."""
    reference = _reference()
    m = OOMLM({(1, 3): ("backward", 2)})
    cb = _auto(grow_after=None)
    _fit(m, cb)
    step1 = [(b, rows) for step, b, rows in m.parts if step == 1]
    # batch 2 once whole, batch 3 whole (fails), then the replay: batch 2 in parts of 4, batch 3 in parts of 4 (the
    # first fails again: 4 > 2), then parts of 2 for both
    assert step1[:2] == [(2, 8), (3, 8)]
    assert cb.split.size == 2 and cb.split.ooms == 2
    assert (2, 2) in step1 and (3, 2) in step1
    assert _max_diff(_weights(m), reference) < TOL


def test_adam_momentum_state_matches_too():
    reference = _reference(optimizer="adam")
    m = OOMLM({(0, 1): ("backward", 3), (2, 4): ("forward", 1)}, optimizer="adam")
    cb = _auto(grow_after=None)
    _fit(m, cb)
    assert cb.split.ooms == 3 and cb.split.size == 1  # 8 -> 4 -> 2 at step 0, -> 1 at step 2
    assert _max_diff(_weights(m), reference) < 1e-5  # Adam's normalised step magnifies fp32 rounding


def test_past_the_floor_raises_the_error_with_the_smallest_size():
    m = OOMLM({(1, 2): ("forward", 1)})
    with pytest.raises(torch.OutOfMemoryError, match=r"even at 2 samples per forward/backward, the floor "
                       r"\(min_micro_batch_size=2; loader batch 8, smallest tried 2\).*injected: forward of 2 rows"):
        _fit(m, _auto(min_micro_batch_size=2))


def test_grows_back_after_grow_after_clean_steps_and_waits_longer_after_a_failed_growth():
    m = OOMLM({(1, 2): ("forward", 4), (4, 2): ("forward", 4)})  # step 4 is batch 2 of the second epoch
    cb = _auto(grow_after=2)
    sizes = Sizes(cb)
    _fit(m, cb, extra=[sizes], epochs=3)  # 9 optimizer steps
    # step 1: 8 -> 4; steps 2, 3 clean -> 8 after step 3; step 4 fails again at the grown size -> 4 and the wait
    # doubles to 4: steps 5..8 clean -> 8 again after step 8
    assert [r["step"] for r in cb.recoveries] == [1, 4]
    assert sizes.sizes == [8, 4, 4, 8, 4, 4, 4, 4, 8]
    assert cb.split.wait == 4
    assert _max_diff(_weights(m), _reference(epochs=3)) < TOL


def test_size_is_logged_and_resumed(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    reference = _reference(epochs=2)
    m = OOMLM({(1, 2): ("backward", 2)})
    cb = _auto(grow_after=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=1)
    trainer = _fit(m, cb, extra=[ckpt], max_steps=2, log_every_n_steps=1, enable_checkpointing=True)
    assert trainer.callback_metrics["automicrobatch/micro_batch_size"] == 2
    assert trainer.callback_metrics["automicrobatch/oom_recoveries"] == 2
    path = tmp_path / "epoch=0-step=2.ckpt"
    saved = torch.load(path, weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("AutoMicroBatch"))
    assert state["split"]["size"] == 2 and state["chosen_micro_batch_size"] == 8
    resumed = OOMLM()
    cb2 = _auto(grow_after=None)
    _fit(resumed, cb2, epochs=2, ckpt=str(path), enable_checkpointing=True)
    assert cb2.loader_batch_size == 8 and cb2.split.size == 2  # starts from the saved part size
    assert {rows for step, b, rows in resumed.parts} == {2}
    assert _max_diff(_weights(resumed), reference) < TOL
    again = OOMLM()  # the first run's callback instance, fitted a second time, resumes the same way
    _fit(again, cb, epochs=2, ckpt=str(path), enable_checkpointing=True)
    assert cb.split.size == 2 and {rows for step, b, rows in again.parts} == {2}
    assert _max_diff(_weights(again), reference) < TOL


@pytest.mark.parametrize("precision,tol", [("16-mixed", 2e-4), ("bf16-mixed", 1e-3)])
def test_composes_with_loss_scaling_and_health_monitor(precision, tol):
    kw = dict(plugins=[LossScalingPrecision(precision, device="cpu")])
    ref_module = OOMLM(reduction="sum")
    _fit(ref_module, AccumulationScheduler({0: 2}, normalize="tokens"),
         extra=[TrainingHealthMonitor(log_every_n_steps=2)], **kw)
    m = OOMLM({(0, 1): ("backward", 4), (1, 2): ("forward", 1)}, reduction="sum")
    cb = _auto("tokens", grow_after=None)
    _fit(m, cb, extra=[TrainingHealthMonitor(log_every_n_steps=2)], **kw)
    assert cb.split.ooms == 3 and cb.split.size == 1  # 8 -> 4 at step 0, -> 2 -> 1 at step 1
    # half-precision forwards of parts round differently from the whole batch's; training moved the weights by ~6e-2
    assert _max_diff(_weights(m), _weights(ref_module)) < tol


def test_raise_mode_names_the_size_and_the_setting():
    m = OOMLM({(1, 2): ("forward", 4)})
    with pytest.raises(torch.OutOfMemoryError,
                       match=r"out of memory in the forward of a micro-batch of 8 samples under SingleDeviceStrategy "
                             r"at optimizer step 1; on_oom='raise' does not split at run time\. Lower the micro-batch: "
                             r"AutoMicroBatch\(16, max_micro_batch_size=4\)"):
        _fit(m, AutoMicroBatch(16, max_micro_batch_size=8))  # the CPU default is "raise"
    m = OOMLM({(0, 1): ("backward", 4)})
    with pytest.raises(torch.OutOfMemoryError, match=r"out of memory in the backward of a micro-batch of 8 samples"):
        _fit(m, AutoMicroBatch(16, max_micro_batch_size=8, on_oom="raise"))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"Invalid on_oom 'retry'"):
        AutoMicroBatch(8, on_oom="retry")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid min_micro_batch_size 0"):
        AutoMicroBatch(8, min_micro_batch_size=0)
    with pytest.raises(ValueError, match=r"Invalid grow_after 0"):
        AutoMicroBatch(8, grow_after=0)


def test_split_size_rule():
    s = SplitSize(12, floor=2, grow_after=3)
    assert s.bounds(12) == [(0, 12)] and s.bounds(5) == [(0, 5)]
    assert s.shrink() and s.size == 6 and s.bounds(12) == [(0, 6), (6, 12)]
    assert s.shrink() and s.size == 3 and s.bounds(8) == [(0, 3), (3, 6), (6, 8)]
    assert s.shrink() and s.size == 2
    assert not s.shrink() and s.size == 2 and s.smallest == 2
    assert [s.step_done() for _ in range(3)] == [False, False, True] and s.size == 4
    s.adopt(3)
    assert s.size == 3 and s.clean == 0
    s.adopt(5)
    assert s.size == 3  # only a smaller size is adopted
    t = SplitSize(12)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_slice_batch_cuts_batch_tensors_only():
    batch = {"input_ids": torch.arange(12).reshape(4, 3), "scale": torch.tensor(2.0), "meta": "x",
             "pair": (torch.ones(4, 2), torch.zeros(3))}
    part = slice_batch(batch, 1, 3, 4)
    assert part["input_ids"].tolist() == [[3, 4, 5], [6, 7, 8]]
    assert part["scale"] == 2.0 and part["meta"] == "x"
    assert part["pair"][0].shape == (2, 2) and part["pair"][1].shape == (3,)
    assert slice_batch(batch, 0, 4, 4) is batch


@pytest.mark.gpu
def test_cuda_real_oom_mid_run_recovers_with_the_loss_curve_of_the_smaller_size():
    """The example GPT fits at a loader batch of 16 until the process's memory is capped mid-run: the next forward or
    backward really runs out of memory, the run goes on in smaller parts, and its losses and weights then follow a run
    started at that size."""
    from lightning_effi.models import GPTLightningModule

    V, T = 16384, 256
    total = torch.cuda.get_device_properties(0).total_memory

    class LM(GPTLightningModule):
        def __init__(self) -> None:
            torch.manual_seed(0)
            super().__init__(vocab_size=V, block_size=T, n_layer=2, n_head=4, d_model=128, warmup_steps=2,
                             max_steps=10)
            self.batch_size = 16

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, V, (32 * 12, T + 1), generator=g)
            return DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=self.batch_size)

    class Cap(Callback):
        def __init__(self, at: int | None) -> None:
            self.at, self.losses, self.peak, self.base = at, [], 0, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.at and self.base == 0:
                self.base = torch.cuda.memory_allocated()
                torch.cuda.set_per_process_memory_fraction((self.base + 0.75 * (self.peak - self.base)) / total)
                torch.cuda.empty_cache()  # the limit binds new segments only: give back the cached ones

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            if not next(c for c in trainer.callbacks if isinstance(c, AutoMicroBatch)).window.is_open:
                self.losses.append(float(trainer.callback_metrics["train/loss"]))

    def fit(max_micro: int, at: int | None):
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cb, cap = AutoMicroBatch(32, max_micro_batch_size=max_micro), Cap(at)
        m = LM()
        try:
            Trainer(accelerator="gpu", devices=1, max_steps=10, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                    callbacks=[cb, cap]).fit(m)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        return cb, cap, m

    cb, cap, m = fit(16, at=4)
    assert cb._mode == "split" and cb.loader_batch_size == 16  # the default on CUDA; the probe took 16
    assert cb.recoveries and cb.recoveries[0]["step"] == 4 and cb.split.size < 16
    found = cb.split.size
    ref_cb, ref_cap, ref = fit(found, at=None)
    assert ref_cb.loader_batch_size == found and not ref_cb.recoveries
    assert len(cap.losses) == len(ref_cap.losses) == 10
    # The logged loss is a step's last micro-batch's (the whole 16 before the recovery, 8 or fewer after; the
    # reference's last micro-batch throughout): from the recovery on the same samples; before it, the gradients
    # were summed over the same samples in another order (fp32 rounding).
    after = range(4, 10)
    assert max(abs(cap.losses[i] - ref_cap.losses[i]) for i in after) < 1e-3
    a, b = m.model.state_dict(), ref.model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


class SaveMidWindow(Callback):
    """Saves a checkpoint after the first batch of the window of optimizer step ``step``."""

    def __init__(self, cb: AutoMicroBatch, step: int, path) -> None:
        self.cb, self.step, self.path = cb, step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.cb.window.is_open and self.cb.window.pos == 1:
            trainer.save_checkpoint(self.path)


def test_backward_oom_right_after_a_mid_window_resume_keeps_the_restored_gradients(tmp_path):
    """The window's first batch ran before the checkpoint: its gradient comes back from the file, not from a batch
    this run has, and a replay starts from it."""
    reference = _reference()
    path = tmp_path / "mid.ckpt"
    m = OOMLM()
    cb = _auto(grow_after=None)
    _fit(m, cb, extra=[SaveMidWindow(cb, 1, path)], max_steps=2, enable_checkpointing=True)
    assert path.exists()
    resumed = OOMLM({(1, 3): ("backward", 4)})  # the window's second batch, first in this run
    cb2 = _auto(grow_after=None)
    _fit(resumed, cb2, ckpt=str(path), enable_checkpointing=True)
    assert [(r["step"], r["where"]) for r in cb2.recoveries] == [(1, "backward")]
    assert resumed.parts[0] == (1, 3, 8)  # the resumed run starts inside the window
    assert _max_diff(_weights(resumed), reference) < TOL


def test_replay_leaves_buffers_and_the_example_token_count_as_one_pass():
    """A replay runs training_step again on batches seen before: a BatchNorm-like buffer and the example GPT's
    token counter must end as after one pass (the run without the error)."""
    from lightning_effi.callbacks import replaying
    from lightning_effi.models import GPTLightningModule

    class Counting(OOMLM):
        def __init__(self, oom=None) -> None:
            super().__init__(oom)
            self.register_buffer("rows_seen", torch.zeros((), dtype=torch.long))
            self.counted = 0

        def training_step(self, batch, batch_idx):
            self.rows_seen += batch["input_ids"].shape[0]  # a buffer updated in the forward (BatchNorm-like)
            if not replaying(self):
                self.counted += batch["input_ids"].shape[0]
            return super().training_step(batch, batch_idx)

    plain, m = Counting(), Counting({(1, 3): ("backward", 2)})
    _fit(plain, _auto(grow_after=None))
    _fit(m, _auto(grow_after=None))
    assert len(m.parts) > len(plain.parts) + 2  # batch 2 and 3 ran again, in parts
    assert int(m.rows_seen) == int(plain.rows_seen) == N_SAMPLES
    assert m.counted == plain.counted == N_SAMPLES

    class GPTOOM(GPTLightningModule):
        def __init__(self, oom_at=None) -> None:
            torch.manual_seed(0)
            super().__init__(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=16, loss_reduction="sum",
                             max_steps=2)
            self.batch_size, self.oom_at, self.fired = 8, oom_at, False

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 16, (32, 9), generator=g)
            return DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=self.batch_size)

        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            if (self.trainer.global_step, batch_idx) == self.oom_at and batch["input_ids"].shape[0] == 8:
                def hook(grad):
                    raise torch.OutOfMemoryError("injected")

                out["loss"].register_hook(hook)
            return out

    g_plain, g_oom = GPTOOM(), GPTOOM((1, 3))
    _fit(g_plain, _auto("tokens", grow_after=None))
    cb = _auto("tokens", grow_after=None)
    _fit(g_oom, cb)
    assert cb.recoveries and int(g_oom.tokens_seen) == int(g_plain.tokens_seen) == 32 * 8


def test_split_refuses_a_ddp_comm_hook_it_would_bypass():
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import DDPStrategy

    def hook(state, bucket):  # pragma: no cover - never called
        raise AssertionError

    trainer = SimpleNamespace(strategy=DDPStrategy(ddp_comm_hook=hook), precision_plugin=Precision())
    with pytest.raises(ValueError, match=r"ddp_comm_hook=...\): the split averages the gradients itself .* use "
                                         r"on_oom='raise'"):
        _auto()._resolve_mode(trainer)
    assert _auto()._resolve_mode(SimpleNamespace(strategy=DDPStrategy(), precision_plugin=Precision())) == "split"
