"""AccumulationScheduler on a single device, against plain-torch float64 references and independent window counts."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_effi.callbacks import AccumulationScheduler
from tests.callbacks._toy import IGNORE, ListLoader, TinyLM, make_batches, naive_sgd, reference_sgd

LR = 0.5


def _trainer(callbacks, **kw) -> Trainer:
    kw.setdefault("max_epochs", 1)
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)


class StepRecorder(Callback):
    """Independent observer: micro-batches per optimizer step, from on_train_batch_start/on_before_optimizer_step."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._n = 0
        self.global_steps: list[int] = []
        self.logged: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._n += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sizes.append(self._n)
        self._n = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.global_steps.append(trainer.global_step)
        m = trainer.callback_metrics
        if "accumulation/factor" in m:
            self.logged.append({k: float(v) for k, v in m.items() if k.startswith("accumulation/")})


def _weights(module: TinyLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _split(batches: list[dict], sizes: list[int]) -> list[list[dict]]:
    out, i = [], 0
    for s in sizes:
        out.append(batches[i:i + s])
        i += s
    assert i == len(batches)
    return out


def _cat(window: list[dict]) -> dict:
    """One big padded batch from the window's micro-batches (all have the same length here)."""
    return {k: torch.cat([b[k] for b in window]) for k in window[0]}


# --------------------------------------------------------------------------------------- equivalence


def test_k_micro_batches_equal_one_big_batch():
    """4 micro-batches of 2 == one step on the same 8 samples (mean per-token loss, equal token counts)."""
    batches = make_batches(8, batch_size=2, max_len=5)
    for b in batches:  # no padding: micro-batch means weigh equally, so mean-of-means is the big-batch mean
        b["labels"] = b["input_ids"].roll(-1, 1)
    big = [_cat(batches[0:4]), _cat(batches[4:8])]
    acc = TinyLM(loss_reduction="mean", lr=LR)
    ref = TinyLM(loss_reduction="mean", lr=LR)
    _trainer([AccumulationScheduler({0: 4})]).fit(acc, ListLoader(batches))
    _trainer([]).fit(ref, ListLoader(big))
    assert _max_diff(_weights(acc), _weights(ref)) < 1e-6


def test_tokens_exact_and_naive_mean_is_not():
    """Variable-length padded sequences, a schedule change at an unaligned batch and a partial last window."""
    batches = make_batches(11, batch_size=3, max_len=9, seed=3)
    sizes = [2, 3, 3, 3]  # {0: 2, 1: 3}; 11 = 2 + 3 + 3 + 3 (the 2nd window starts at batch 2: not a multiple of 3)
    batches = batches[:11]
    rec = StepRecorder()
    tok = TinyLM(loss_reduction="sum", lr=LR)
    init = TinyLM(loss_reduction="sum", lr=LR).net
    _trainer([AccumulationScheduler({0: 2, 1: 3}, normalize="tokens"), rec]).fit(tok, ListLoader(batches))
    assert rec.sizes == sizes
    windows = _split(batches, sizes)
    exact = reference_sgd(init, windows, lr=LR, normalize="tokens")
    naive = naive_sgd(init, windows, lr=LR)
    err = _max_diff(_weights(tok), exact)
    gap = _max_diff(naive, exact)
    assert err < 2e-6, err
    assert gap > 100 * 2e-6, gap  # the mean of micro-batch means is a different gradient

    # The stock semantics (per-micro-batch means, normalize="mean") reproduce the naive reference, not the exact one.
    mean = TinyLM(loss_reduction="mean", lr=LR)
    _trainer([AccumulationScheduler({0: 2, 1: 3}, normalize="mean")]).fit(mean, ListLoader(batches))
    assert _max_diff(_weights(mean), naive) < 2e-6
    assert _max_diff(_weights(mean), exact) > 100 * 2e-6


def test_clipping_sees_the_token_exact_gradient():
    """Trainer(gradient_clip_val) clips the final (token-normalised) gradient, not a provisional one."""
    batches = make_batches(6, batch_size=3, max_len=9, seed=4)
    m = TinyLM(loss_reduction="sum", lr=LR)
    init = TinyLM(loss_reduction="sum", lr=LR).net
    _trainer([AccumulationScheduler({0: 3}, normalize="tokens")], gradient_clip_val=0.05).fit(m, ListLoader(batches))
    windows = _split(batches, [3, 3])
    clipped = reference_sgd(init, windows, lr=LR, normalize="tokens", clip=0.05)
    assert _max_diff(_weights(m), clipped) < 2e-6
    assert _max_diff(clipped, reference_sgd(init, windows, lr=LR, normalize="tokens")) > 1e-3  # clipping was active


def test_partial_last_window_mean_is_renormalised():
    """7 batches at factor 3: windows 3, 3, 1; the last is the mean of what it has (stock Lightning divides by 3)."""
    batches = make_batches(7, batch_size=2, max_len=6, seed=5)
    rec = StepRecorder()
    m = TinyLM(loss_reduction="mean", lr=LR)
    init = TinyLM(loss_reduction="mean", lr=LR).net
    _trainer([AccumulationScheduler({0: 3}), rec]).fit(m, ListLoader(batches))
    assert rec.sizes == [3, 3, 1]
    assert _max_diff(_weights(m), reference_sgd(init, _split(batches, [3, 3, 1]), lr=LR, normalize="mean")) < 2e-6


# --------------------------------------------------------------------------------------- schedules


def _simulate(unit, factor_fn, epochs, n_batches, samples_per_batch, tokens_per_batch):
    """Reference window sizes, written directly from the rules: factor read at window start from the position,
    windows cut at epoch ends, positions counted over closed windows, except that a token position leaves out the
    window that closed last (its count is read on the host one window later)."""
    sizes, step, samples, window_tokens = [], 0, 0, []
    for epoch in range(epochs):
        i = 0
        while i < n_batches:
            tokens = sum(window_tokens[:-1])
            pos = {"epoch": epoch, "step": step, "sample": samples, "token": tokens}[unit]
            size = min(factor_fn(pos), n_batches - i)
            sizes.append(size)
            samples += sum(samples_per_batch[i:i + size])
            window_tokens.append(sum(tokens_per_batch[i:i + size]))
            step += 1
            i += size
    return sizes


def _ramp(start, end, length):
    return lambda pos: start + (end - start) * min(pos, length) // length


SCHEDULES = [
    # id, callback kwargs, reference factor function, epochs
    ("step", dict(schedule={0: 1, 2: 3, 4: 2}, unit="step"), lambda p: 1 if p < 2 else 3 if p < 4 else 2, 1),
    ("step-yaml-keys", dict(schedule={"1": 2, "3": 4}, unit="step"), lambda p: 1 if p < 1 else 2 if p < 3 else 4, 1),
    ("epoch", dict(schedule={0: 2, 1: 3}, unit="epoch"), lambda p: 2 if p < 1 else 3, 2),
    ("sample", dict(schedule={0: 1, 6: 3}, unit="sample"), lambda p: 1 if p < 6 else 3, 1),
    ("token", dict(schedule={0: 1, 40: 4}, unit="token", normalize="tokens"), lambda p: 1 if p < 40 else 4, 1),
    ("ramp-step", dict(ramp=(1, 5, 6), unit="step"), _ramp(1, 5, 6), 1),
    ("ramp-sample", dict(ramp=(1, 4, 20), unit="sample"), _ramp(1, 4, 20), 2),
    ("ramp-down-token", dict(ramp=(4, 1, 60), unit="token"), lambda p: 4 - 3 * min(p, 60) // 60, 1),
    ("global-batch", dict(global_batch_size=6), lambda p: 3, 1),
]


@pytest.mark.parametrize("kwargs,factor_fn,epochs", [s[1:] for s in SCHEDULES], ids=[s[0] for s in SCHEDULES])
def test_micro_batches_per_step_follow_schedule(kwargs, factor_fn, epochs):
    n = 17
    batches = make_batches(n, batch_size=2, max_len=6, seed=7)
    tokens = [int((b["labels"] != IGNORE).sum()) for b in batches]
    unit = kwargs.get("unit", "step")
    expected = _simulate(unit, factor_fn, epochs, n, [2] * n, tokens)
    rec = StepRecorder()
    reduction = "sum" if kwargs.get("normalize") == "tokens" else "mean"
    m = TinyLM(loss_reduction=reduction, lr=0.05, scheduler=True)
    trainer = _trainer([AccumulationScheduler(**kwargs), rec], max_epochs=epochs)
    trainer.fit(m, ListLoader(batches))
    assert rec.sizes == expected
    # global_step and the step-interval LR scheduler advance once per optimizer step, not per micro-batch.
    assert trainer.global_step == len(expected)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == len(expected)
    assert rec.global_steps[-1] == len(expected)
    # The factor and the effective global batch are logged at every step (last values here).
    last = rec.logged[-1]
    assert last["accumulation/factor"] == expected[-1]
    assert last["accumulation/global_batch_samples"] == 2 * expected[-1]
    assert last["accumulation/global_batch_tokens"] == sum(tokens[n - expected[-1]:])


def test_unsized_loader_partial_window():
    """An iterable without len: the end is only known one batch ahead; the cut window is still a true mean."""
    batches = make_batches(7, batch_size=2, max_len=6, seed=11)

    class Unsized:
        def __iter__(self):
            return iter(batches)

    rec = StepRecorder()
    m = TinyLM(loss_reduction="mean", lr=LR)
    init = TinyLM(loss_reduction="mean", lr=LR).net
    _trainer([AccumulationScheduler({0: 3}), rec]).fit(m, Unsized())
    assert rec.sizes == [3, 3, 1]
    assert _max_diff(_weights(m), reference_sgd(init, _split(batches, [3, 3, 1]), lr=LR, normalize="mean")) < 2e-6


# --------------------------------------------------------------------------------------- resume


class _Interrupted(Exception):
    pass


class StopAt(Callback):
    """Saves a checkpoint at the end of micro-batch ``at`` (global index) and stops training by raising."""

    def __init__(self, at: int, path: str, holder: list) -> None:
        self.at, self.path, self.seen, self.holder = at, path, 0, holder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        self.holder[:] = [pl_module]
        if self.seen == self.at:
            trainer.save_checkpoint(self.path)
            raise _Interrupted  # a crash right after the save: no further batch runs


@pytest.mark.parametrize("normalize", ["tokens", "mean"])
def test_resume_mid_window_mid_ramp_reproduces_uninterrupted(tmp_path, normalize):
    batches = make_batches(23, batch_size=2, max_len=6, seed=13)
    reduction = "sum" if normalize == "tokens" else "mean"

    def run(callbacks, ckpt=None):
        m = TinyLM(loss_reduction=reduction, lr=0.02, optimizer="adam", scheduler=True)
        sched = AccumulationScheduler(ramp=(1, 4, 8), unit="step", normalize=normalize)
        rec = StepRecorder()
        trainer = _trainer([sched, rec, *callbacks], max_epochs=2)
        trainer.fit(m, ListLoader(batches), ckpt_path=ckpt)
        return m, rec

    full, full_rec = run([])
    # Windows 1,1,1,2,2,2,3,3,4,...: micro-batch 11 is the 2nd of a 3-window, during the ramp (step 7 of 8).
    assert full_rec.sizes[:8] == [1, 1, 1, 2, 2, 2, 3, 3]
    ckpt = str(tmp_path / "mid.ckpt")
    with pytest.raises(_Interrupted):
        run([StopAt(11, ckpt, first_holder := [])])
    first = first_holder[0]
    saved = torch.load(ckpt, weights_only=False)
    assert "lightning_effi.accumulation.partial_window" in saved  # proves the checkpoint was mid-window
    second, second_rec = run([], ckpt=ckpt)
    assert second_rec.sizes[:2] == [1, 3]  # the resumed window finishes with its one remaining micro-batch
    losses = first.losses + second.losses
    assert len(losses) == len(full.losses) == 46
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(full.losses), rtol=1e-5, atol=1e-6)
    assert _max_diff(_weights(second), _weights(full)) < 1e-6


# --------------------------------------------------------------------------------------- errors

CONSTRUCTOR_ERRORS = [
    (dict(schedule={4: 2, 2: 3}), ValueError, r"threshold 2 after 4: thresholds must be strictly increasing"),
    (dict(schedule={"2": 2, 2: 3}), ValueError, r"threshold 2 after 2"),
    (dict(schedule={-1: 2}), ValueError, r"threshold -1: thresholds must be >= 0"),
    (dict(schedule={0: 0}), ValueError, r"factor 0 at threshold 0: factors must be >= 1"),
    (dict(schedule={0: "x"}), TypeError, r"Invalid accumulation factor for threshold 0 'x'"),
    (dict(schedule={"a": 2}), TypeError, r"Invalid schedule threshold 'a'"),
    (dict(schedule={}), ValueError, r"at least one"),
    (dict(schedule={0: True}), TypeError, r"not a bool"),
    (dict(unit="batch"), ValueError, r"Invalid unit 'batch': must be one of 'epoch', 'step', 'sample', 'token'"),
    (dict(normalize="sum"), ValueError, r"Invalid normalize 'sum'"),
    (dict(ramp=(1, 4, 0)), ValueError, r"Invalid ramp length 0: must be > 0"),
    (dict(ramp=(1, 4, -5)), ValueError, r"Invalid ramp length -5"),
    (dict(ramp=(0, 4, 10)), ValueError, r"start_factor and end_factor must be >= 1"),
    (dict(ramp=(1, 4)), ValueError, r"must be \(start_factor, end_factor, length\)"),
    (dict(ramp=(1, 2, 3), schedule={0: 2}), ValueError, r"either schedule or ramp"),
    (dict(global_batch_size=0), ValueError, r"Invalid global_batch_size 0"),
    (dict(global_batch_size=8, schedule={0: 2}), ValueError, r"cannot be combined"),
]


@pytest.mark.parametrize("kwargs,exc,match", CONSTRUCTOR_ERRORS, ids=[str(e[0]) for e in CONSTRUCTOR_ERRORS])
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        AccumulationScheduler(**kwargs)


class ManualLM(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class StepCounter(Callback):
    def __init__(self):
        self.steps = 0

    def on_before_optimizer_step(self, *args):
        self.steps += 1


@pytest.mark.parametrize(
    "module,callback,trainer_kw,exc,match",
    [
        (ManualLM, dict(), {}, RuntimeError, r"automatic_optimization=False"),
        (TinyLM, dict(schedule={0: 2}), dict(accumulate_grad_batches=2), ValueError,
         r"Trainer\(accumulate_grad_batches=2\) conflicts"),
        (lambda: TinyLM(with_tokens=False), dict(normalize="tokens"), {}, RuntimeError,
         r"normalize='tokens'\) needs training_step to return \{'loss': summed_token_loss, 'num_tokens': n\}.*"
         r"without 'num_tokens'"),
        (lambda: TinyLM(with_tokens=False), dict(unit="token", schedule={0: 2}), {}, RuntimeError,
         r"unit='token'\) needs training_step"),
        (TinyLM, dict(global_batch_size=5), {}, ValueError,
         r"Invalid global_batch_size 5: not a multiple of micro_batch_size 2 x data-parallel size 1 = 2; "
         r"use e.g. 4 or 6"),
    ],
    ids=["manual", "trainer-accumulate", "no-num-tokens", "token-unit-no-num-tokens", "indivisible-global"],
)
def test_setup_errors_before_any_step(module, callback, trainer_kw, exc, match):
    counter = StepCounter()
    m = module()
    before = _weights(m)
    with pytest.raises(exc, match=match):
        _trainer([AccumulationScheduler(**callback), counter], **trainer_kw).fit(m, ListLoader(make_batches(4)))
    assert counter.steps == 0
    assert _max_diff(before, _weights(m)) == 0.0


def test_stock_engine_accumulation_strategy_is_refused():
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class EngineAccumulates(SingleDeviceStrategy):
        @property
        def handles_gradient_accumulation(self) -> bool:
            return True

    match = r"EngineAccumulates accumulates gradients inside its engine.*effi_deepspeed"
    with pytest.raises(RuntimeError, match=match):
        _trainer([AccumulationScheduler({0: 2})], strategy=EngineAccumulates(torch.device("cpu"))).fit(
            TinyLM(), ListLoader(make_batches(4)))


def test_engine_hook_called_per_window_size_change_and_tokens_refused():
    """Interface 4: effi_set_accumulation(factor) is called at window starts when the size changes. A strategy like
    effi_deepspeed (loop-driven boundaries, handles_gradient_accumulation False) trains exactly; tokens mode is
    refused for engine-accumulating strategies."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    calls: list[int] = []

    class LoopDriven(SingleDeviceStrategy):
        def effi_set_accumulation(self, factor: int) -> None:
            calls.append(factor)

    class EngineAccumulates(LoopDriven):
        @property
        def handles_gradient_accumulation(self) -> bool:
            return True

    with pytest.raises(RuntimeError, match=r"normalize='tokens'\) with EngineAccumulates: the engine keeps gradients"):
        _trainer([AccumulationScheduler({0: 2}, normalize="tokens")],
                 strategy=EngineAccumulates(torch.device("cpu"))).fit(TinyLM(), ListLoader(make_batches(4)))
    batches = make_batches(7, seed=17)
    rec = StepRecorder()
    m = TinyLM(loss_reduction="mean", lr=LR)
    init = TinyLM(loss_reduction="mean", lr=LR).net
    _trainer([AccumulationScheduler(ramp=(1, 3, 4)), rec], strategy=LoopDriven(torch.device("cpu"))).fit(
        m, ListLoader(batches))
    assert rec.sizes == [1, 1, 2, 2, 1]
    assert calls == [1, 2, 1]
    ref = reference_sgd(init, _split(batches, rec.sizes), lr=LR, normalize="mean")
    assert _max_diff(_weights(m), ref) < 2e-6


def test_stateful_schedule_state_is_plain():
    cb = AccumulationScheduler({0: 2})
    state = cb.state_dict()
    assert all(isinstance(v, (int, float, bool)) for v in state.values())
    cb2 = AccumulationScheduler({0: 2})
    cb2.load_state_dict(state)
    assert cb2.state_dict() == state
    assert not math.isnan(state["scale"])


# --------------------------------------------------------------------------------------- the example GPT


def test_example_gpt_token_protocol_exact():
    """The package's GPT with loss_reduction="sum": accumulated windows == the big-batch per-token mean step."""
    import copy
    from functools import partial

    from lightning_effi.models import GPTLightningModule
    from lightning_effi.models.gpt import token_loss

    torch.manual_seed(0)
    module = GPTLightningModule(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16, weight_decay=0.0,
                                optimizer=partial(torch.optim.SGD, lr=LR), warmup_steps=0, min_lr_ratio=1.0,
                                loss_reduction="sum")
    init = copy.deepcopy(module.model).double()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(5):
        ids = torch.randint(0, 32, (2, 8), generator=g)
        labels = torch.randint(0, 32, (2, 8), generator=g)
        labels[torch.arange(8)[None, :] >= torch.randint(1, 9, (2, 1), generator=g)] = -100
        batches.append({"input_ids": ids, "labels": labels})
    rec = StepRecorder()
    _trainer([AccumulationScheduler({0: 3}, normalize="tokens"), rec]).fit(module, ListLoader(batches))
    assert rec.sizes == [3, 2]
    opt = torch.optim.SGD(init.parameters(), lr=LR)
    for window in _split(batches, [3, 2]):
        opt.zero_grad()
        sums, counts = zip(*(token_loss(init(b["input_ids"]), b["labels"]) for b in window))
        (sum(sums) / sum(counts)).backward()
        opt.step()
    ref = {k: v.float() for k, v in init.state_dict().items()}
    assert _max_diff({k: v.detach() for k, v in module.model.state_dict().items()}, ref) < 2e-6


@pytest.mark.gpu
def test_cuda_fp16_tokens_matches_big_batch_and_scaler():
    """CUDA fp16 with GradScaler: 4 accumulated micro-batches (token-exact) == one big batch with the per-token mean,
    and the dynamic loss scale evolves the same (the provisional scale keeps per-token-mean magnitudes)."""
    from functools import partial

    from lightning_effi.models import GPTLightningModule

    def module(reduction):
        torch.manual_seed(0)
        return GPTLightningModule(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=64, weight_decay=0.0,
                                  optimizer=partial(torch.optim.SGD, lr=0.1), warmup_steps=0, min_lr_ratio=1.0,
                                  loss_reduction=reduction)

    g = torch.Generator().manual_seed(2)
    micro = []
    for _ in range(16):
        ids = torch.randint(0, 64, (2, 16), generator=g)
        labels = torch.randint(0, 64, (2, 16), generator=g)
        labels[torch.arange(16)[None, :] >= torch.randint(1, 17, (2, 1), generator=g)] = -100
        micro.append({"input_ids": ids, "labels": labels})
    big = [_cat(micro[i:i + 4]) for i in range(0, 16, 4)]

    def fit(m, batches, callbacks):
        t = Trainer(accelerator="cuda", devices=1, precision="16-mixed", max_epochs=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=callbacks)
        t.fit(m, ListLoader(batches))
        return t.precision_plugin.scaler.get_scale()

    acc, ref = module("sum"), module("mean")
    scale_acc = fit(acc, micro, [AccumulationScheduler({0: 4}, normalize="tokens")])
    scale_ref = fit(ref, big, [])
    assert scale_acc == scale_ref
    a = {k: v.float().cpu() for k, v in acc.model.state_dict().items()}
    b = {k: v.float().cpu() for k, v in ref.model.state_dict().items()}
    assert _max_diff(a, b) < 2e-3


class DeferredSaver(Callback):
    """At micro-batch ``at`` (mid-window) asks for a checkpoint and the removal of an older one, as ModelCheckpoint
    does at a mid-window validation; records what is on disk after each batch; crashes ``crash_after`` batches on."""

    def __init__(self, at: int, path, old, crash_after: int) -> None:
        self.at, self.path, self.old, self.crash_after, self.seen = at, path, old, crash_after, 0
        self.on_disk: list[tuple[int, bool, bool]] = []  # (global_step, new file written, old file present)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.at:
            trainer.save_checkpoint(self.path)
            trainer.strategy.remove_checkpoint(self.old)
        if self.seen >= self.at:
            self.on_disk.append((trainer.global_step, self.path.exists(), self.old.exists()))
        if self.seen == self.at + self.crash_after:
            raise _Interrupted


def test_mid_window_save_is_deferred_to_the_window_end_where_partial_gradients_are_unreachable(tmp_path,
                                                                                              monkeypatch):
    """Under DeepSpeed and tensor parallelism the partial window's gradients cannot be saved: a save asked for
    inside a window is written at the window's end (the next optimizer step), an older checkpoint is removed only
    after it, and resuming from it reproduces the uninterrupted run."""
    from lightning_effi.callbacks import accumulation

    monkeypatch.setattr(accumulation, "_defers_saves", lambda trainer: True)
    batches = make_batches(23, batch_size=2, max_len=6, seed=13)

    def run(callbacks, ckpt=None):
        m = TinyLM(loss_reduction="sum", lr=0.02, optimizer="adam", scheduler=True)
        rec = StepRecorder()
        trainer = _trainer([AccumulationScheduler(ramp=(1, 4, 8), unit="step", normalize="tokens"), rec,
                            *callbacks], max_epochs=2)
        trainer.fit(m, ListLoader(batches), ckpt_path=ckpt)
        assert "save_checkpoint" not in vars(trainer)  # the deferral is undone after fit
        return m, rec

    full, full_rec = run([])
    assert full_rec.sizes[:8] == [1, 1, 1, 2, 2, 2, 3, 3]  # micro-batch 11 is the 2nd of the window 10..12
    ckpt, old = tmp_path / "mid.ckpt", tmp_path / "old.ckpt"
    old.write_bytes(b"previous checkpoint")
    saver = DeferredSaver(11, ckpt, old, crash_after=3)
    first_holder: list = []
    with pytest.raises(_Interrupted):
        run([saver, StopAt(10**6, "", first_holder)])  # StopAt only keeps the module here
    first = first_holder[0]
    # micro-batch 11 (after 6 steps, mid-window): nothing written, the old file kept; micro-batch 12 makes step 7
    assert saver.on_disk == [(6, False, True), (7, True, False), (7, True, False), (7, True, False)]
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 7 and "lightning_effi.accumulation.partial_window" not in saved
    second, second_rec = run([], ckpt=str(ckpt))
    assert second_rec.sizes[0] == 3  # the resumed run opens the next window
    n_first = 12  # micro-batches up to the window end the checkpoint holds
    losses = first.losses[:n_first] + second.losses
    assert len(losses) == len(full.losses) == 46
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(full.losses), rtol=1e-5, atol=1e-6)
    assert _max_diff(_weights(second), _weights(full)) < 1e-6
